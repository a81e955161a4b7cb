"""The CONSTANTS block as a command line: overrides, validation before any model loads, readable errors."""

import subprocess
import sys

import pytest

from common import configurator, device, lesson
from common.errors import LessonError
import exercise1_generate
import exercise2_explore
import exercise3a_train_textual_inversion
import exercise3b_train_lora
import generate_dreambooth_morph
from conftest import ROOT


def test_every_constant_has_a_dashed_flag_in_help():
    out = subprocess.run([sys.executable, "exercise3b_train_lora.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    script = exercise3b_train_lora
    for name, _ in configurator.constants(script.__file__):
        assert lesson.dashed(name) in out.stdout, name
    assert "--model" in out.stdout and "--debug" in out.stdout and "--threads" in out.stdout
    assert "optimizer updates" in out.stdout  # the constant's comment is its help text


def test_overrides_and_types():
    script = exercise3b_train_lora
    cfg = lesson.configure(vars(script), ["--max-train-steps", "12", "--learning-rate", "3e-4",
                                          "--no-prior-preservation", "--resolution", "128",
                                          "--sample-prompts", "a, b | c"])
    assert cfg.MAX_TRAIN_STEPS == 12 and cfg.LEARNING_RATE == 3e-4
    assert cfg.PRIOR_PRESERVATION is False and cfg.RESOLUTION == 128
    assert cfg.SAMPLE_PROMPTS == ("a, b", "c")
    assert cfg.INSTANCE_PROMPT == "a sks african fabric pattern"  # the course's default


def test_constants_are_read_when_main_runs(monkeypatch):
    script = exercise3b_train_lora
    monkeypatch.setattr(script, "MAX_TRAIN_STEPS", 5)
    assert lesson.configure(vars(script), []).MAX_TRAIN_STEPS == 5


def test_model_selection_flag_and_environment(monkeypatch):
    script = exercise3b_train_lora
    assert lesson.configure(vars(script), []).MODEL_ID == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    monkeypatch.setenv("DREAMBOOTH_MODEL", "tiny")
    assert lesson.configure(vars(script), []).MODEL_ID == "tiny"
    assert lesson.configure(vars(script), ["--model", "pocket"]).MODEL_ID == "pocket"


@pytest.mark.parametrize("args, constant", [
    (["--max-train-steps", "0"], "MAX_TRAIN_STEPS"),
    (["--lora-rank", "-1"], "LORA_RANK"),
    (["--resolution", "500"], "RESOLUTION"),
    (["--guidance-scale", "-1"], "GUIDANCE_SCALE"),
    (["--train-batch-size", "0"], "TRAIN_BATCH_SIZE"),
    (["--learning-rate", "abc"], "LEARNING_RATE"),
    (["--lr-scheduler", "sometimes"], "LR_SCHEDULER"),
])
def test_bad_constants_are_rejected_by_name_before_loading(args, constant, monkeypatch):
    script = exercise3b_train_lora
    # If validation let it through, loading this model would fail differently.
    monkeypatch.setattr(script, "MODEL_ID", "no-such/model-anywhere")
    with pytest.raises(LessonError, match=constant):
        script.main(args)


HUGE = "1" + "0" * 400  # a whole number that int() reads, beyond any float: was "unexpected OverflowError"


@pytest.mark.parametrize("script", [exercise3b_train_lora, exercise3a_train_textual_inversion])
@pytest.mark.parametrize("args, says", [
    (["--max-train-steps", HUGE], r"^MAX_TRAIN_STEPS must be a number, got inf\. Edit it"),
    (["--learning-rate", "-" + HUGE], r"^LEARNING_RATE must be a number, got -inf\. Edit it"),
    (["--random-seed", HUGE[:41]], rf"^RANDOM_SEED must be a whole number between 0 and 4294967295, got {HUGE[:41]}\."),
])
def test_a_number_beyond_any_float_is_refused_by_name(script, args, says, monkeypatch):
    monkeypatch.setattr(script, "MODEL_ID", "no-such/model-anywhere")
    with pytest.raises(LessonError, match=says):
        script.main(args)


@pytest.mark.parametrize("zeros", [310, 400])
def test_a_number_beyond_any_float_written_in_the_file_is_refused_by_name(zeros, monkeypatch):
    script, value, shown = exercise3b_train_lora, 10**zeros, f"about {zeros + 1} digits"
    monkeypatch.setattr(script, "MODEL_ID", "no-such/model-anywhere")
    for name in ("LORA_ALPHA", "SAMPLE_EVERY"):
        with monkeypatch.context() as m:
            m.setattr(script, name, value)
            with pytest.raises(LessonError, match=rf"^{name} must be a number of at most 308 digits, got a whole "
                                                  rf"number of {shown}\. Edit it at the top of"):
                script.main([])


def test_script_failure_is_one_readable_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "exercise3b_train_lora.py"), "--max-train-steps", "0"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("ERROR: MAX_TRAIN_STEPS")
    debug = subprocess.run([sys.executable, str(ROOT / "exercise3b_train_lora.py"), "--max-train-steps", "0",
                            "--debug"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert "Traceback" in debug.stderr and debug.returncode == 1


def test_instance_prompt_without_token_warns(capsys):
    script = exercise3b_train_lora
    cfg = lesson.configure(vars(script), ["--instance-prompt", "a fabric pattern"])
    script.validate(cfg)
    assert "does not contain SUBJECT_TOKEN" in capsys.readouterr().out


@pytest.mark.parametrize("args, warns", [
    (["--instance-prompt", "a sks, african fabric"], False),  # (CLIP reads "sks" and ","): warned before
    (["--instance-prompt", "sks."], False),
    (["--instance-prompt", "a photo of (sks) fabric"], False),
    (["--instance-prompt", "a SKS fabric"], False),  # CLIP lower-cases every prompt
    (["--subject-token", "my fabric", "--instance-prompt", "a my fabric pattern"], False),  # a token of two words
    (["--instance-prompt", "asks for a fabric pattern"], True),  # "asks" is not "sks"
    (["--instance-prompt", "a sks_fabric pattern"], True),
])
def test_instance_prompt_holds_the_token_as_clip_reads_it(args, warns, capsys):
    script = exercise3b_train_lora
    script.validate(lesson.configure(vars(script), args))
    assert ("does not contain SUBJECT_TOKEN" in capsys.readouterr().out) is warns


@pytest.mark.parametrize("args, warns", [
    (["--class-prompt", "a {} fabric pattern"], True),  # (copied from INSTANCE_PROMPT): trained silently before
    (["--class-prompt", "a SKS fabric pattern"], True),
    (["--class-prompt", "a {} fabric pattern", "--no-prior-preservation"], False),  # (no class images are drawn)
    (["--class-prompt", "asks for a fabric pattern"], False),
])
def test_class_prompt_holding_the_subject_token_warns(args, warns, capsys):
    script = exercise3b_train_lora
    script.validate(lesson.configure(vars(script), args))
    out = capsys.readouterr().out
    assert ("contains SUBJECT_TOKEN 'sks': prior preservation would teach that word" in out) is warns, out



@pytest.mark.parametrize("args, warns", [
    (["--class-prompt", "a {} african fabric pattern"], True),  # (INSTANCE_PROMPT copied, token filled in both)
    (["--class-prompt", "A sks  African fabric pattern"], True),  # (as CLIP reads it: lower-cased, words apart)
    (["--instance-prompt", "a fabric pattern"], True),  # (the token left out of both)
    (["--class-prompt", "a {} african fabric pattern", "--no-prior-preservation"], False),  # (no prior term)
    ([], False),
])
def test_the_same_instance_and_class_prompt_warns_naming_both(args, warns, capsys):
    """With prior preservation, the instance term and the prior term taught one prompt two different things
    (the student's pictures and the base model's own), without a word."""
    script = exercise3b_train_lora
    script.validate(lesson.configure(vars(script), args))
    out = capsys.readouterr().out
    said = "INSTANCE_PROMPT and CLASS_PROMPT are the same text" in out
    assert said is warns, out
    if warns:
        assert "Make CLASS_PROMPT the instance prompt without the subject token (the course's: 'a fabric pattern')" \
            in out and out.count("Warning:") == 1 + ("does not contain SUBJECT_TOKEN" in out), out


def test_no_class_images_with_prior_preservation_says_why_and_how_to_go_without():
    # was "NUM_CLASS_IMAGES must be a whole number >= 1, got 0" though 0 is valid without prior preservation
    script = exercise3b_train_lora
    with pytest.raises(LessonError, match=r"^NUM_CLASS_IMAGES must be at least 1 while PRIOR_PRESERVATION is on "
                                          r"\(it trains on them\), got 0\. .* set PRIOR_PRESERVATION = False "
                                          r"\(--no-prior-preservation\)\.$"):
        script.validate(lesson.configure(vars(script), ["--num-class-images", "0"]))
    script.validate(lesson.configure(vars(script), ["--num-class-images", "0", "--no-prior-preservation"]))


@pytest.mark.parametrize("script", [exercise3b_train_lora, exercise3a_train_textual_inversion])
@pytest.mark.parametrize("args, said", [
    (["--lr-warmup-steps", "50"], "'constant' has no warm-up"),  # (the default schedule ignores a warm-up)
    (["--lr-warmup-steps", "5000", "--lr-scheduler", "cosine"], "never reaches LEARNING_RATE"),
    (["--lr-warmup-steps", "20", "--lr-scheduler", "cosine"], None),
])
def test_a_schedule_that_will_not_do_what_its_constants_say_warns(script, args, said, capsys):
    cfg = lesson.configure(vars(script), args)
    script.validate(cfg)
    out = capsys.readouterr().out
    assert (said in out) if said else "LR_WARMUP_STEPS" not in out, out


@pytest.mark.parametrize("script, course", [(exercise3b_train_lora, "0.0001"), (exercise3a_train_textual_inversion, "0.0005")])
@pytest.mark.parametrize("rate, warns", [("1e-12", True), ("5e-8", True), ("1e-7", False), ("1e-4", False)])
def test_a_learning_rate_far_below_any_that_trains_warns_before_loading(script, course, rate, warns, capsys):
    # --learning-rate 1e-12 trained and saved a LoRA / embedding that had hardly moved, without a word
    script.validate(lesson.configure(vars(script), ["--learning-rate", rate, "--max-train-steps", "200"]))
    out = capsys.readouterr().out
    said = (f"LEARNING_RATE {float(rate):g} is far below any rate that trains" in out
            and "MAX_TRAIN_STEPS updates the weights will hardly move (200 x" in out
            and f"The course's is {course}: set LEARNING_RATE = {course} (--learning-rate {course})." in out)
    assert said is warns, out
    assert ("LEARNING_RATE" in out) is warns, out


# --------------------------------------------------------------------------- the configurator's traps (issue 14)
SCRIPTS = ["exercise3b_train_lora.py", "exercise3a_train_textual_inversion.py", "exercise1_generate.py",
           "exercise2_explore.py", "generate_dreambooth_morph.py"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_renders_every_flag_of_every_script(name):
    out = subprocess.run([sys.executable, name, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    names = configurator.constants(str(ROOT / name))
    assert len(names) >= 10
    shown = " ".join(out.stdout.split())  # (argparse wraps long lines)
    for constant, comment in names:
        assert lesson.dashed(constant) in shown, constant
        assert f"[{constant} = " in shown, constant  # each flag shows the value written in the file
        assert " ".join(comment.split()[:4]) in shown, constant  # and its comment is the help text
    assert "%(" not in shown and "%%" not in shown  # a '%' in a comment is printed as it is


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_answers_before_any_library_loads(name):
    """--help is read before torch, diffusers, transformers, accelerate and peft are imported (they take seconds)."""
    module = name.removesuffix(".py")
    probe = ("import runpy, sys\n"
             f"sys.argv = [{name!r}, '--help']\n"
             "try:\n"
             f"    runpy.run_module({module!r}, run_name='__main__')\n"
             "except SystemExit as exc:\n"
             "    assert exc.code == 0, exc.code\n"
             "heavy = ('torch', 'diffusers', 'transformers', 'accelerate', 'peft')\n"
             "print('LOADED:', [m for m in heavy if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "--help" in out.stdout and out.stdout.strip().splitlines()[-1] == "LOADED: []", out.stdout[-500:]


def test_a_computed_constant_is_a_constant_too(tmp_path):
    """A student writes MAX_TRAIN_STEPS = 4 * 50: it keeps its flag, its value, and validation."""
    source = (ROOT / "exercise3b_train_lora.py").read_text(encoding="utf-8")
    edited = source.replace("MAX_TRAIN_STEPS = 200 ", "MAX_TRAIN_STEPS = 4 * 50 ", 1)
    assert edited != source
    (tmp_path / "exercise3b_train_lora.py").write_text(edited, encoding="utf-8")
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT))
    shown = subprocess.run([sys.executable, "exercise3b_train_lora.py", "--help"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert "--max-train-steps" in shown.stdout and "[MAX_TRAIN_STEPS = 200]" in " ".join(shown.stdout.split()), \
        shown.stdout  # (the help may wrap a line anywhere)
    refused = subprocess.run([sys.executable, "exercise3b_train_lora.py", "--lr-scheduler", "sometimes"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert refused.stderr.strip().splitlines()[-1].startswith("ERROR: LR_SCHEDULER must be one of"), refused.stderr


@pytest.mark.parametrize("args, name, value", [
    (["--lora-alpha", "0.5"], "LORA_ALPHA", 0.5),  # the file says 32, but alpha may be any number > 0
    (["--lora-alpha", "16"], "LORA_ALPHA", 16),
    (["--guidance-scale", "7"], "GUIDANCE_SCALE", 7),
    (["--resolution", "none"], "RESOLUTION", None),
    (["--instance-prompt", "1990"], "INSTANCE_PROMPT", "1990"),  # text stays text, even when it reads as a number
])
def test_a_value_is_read_as_what_it_looks_like_and_validate_decides(args, name, value):
    script = exercise3b_train_lora
    cfg = lesson.configure(vars(script), args)
    assert getattr(cfg, name) == value and type(getattr(cfg, name)) is type(value)
    script.validate(cfg)  # accepted
    with pytest.raises(LessonError, match=r"LORA_RANK must be a whole number"):
        script.validate(lesson.configure(vars(script), ["--lora-rank", "2.5"]))


@pytest.mark.parametrize("args, value", [
    (["--prior-preservation"], True), (["--no-prior-preservation"], False),
    (["--prior-preservation", "false"], False), (["--prior-preservation=No"], False),
    (["--prior-preservation", "1"], True), (["--no-prior-preservation", "--prior-preservation", "on"], True),
])
def test_a_yes_no_constant_takes_a_flag_its_negation_or_a_word(args, value):
    assert lesson.configure(vars(exercise3b_train_lora), args).PRIOR_PRESERVATION is value


@pytest.mark.parametrize("args", [["--prior-preservation", "maybe"], ["--no-prior-preservation=true"]])
def test_a_yes_no_constant_refuses_other_words_in_one_line_without_a_useless_hint(args):
    with pytest.raises(LessonError, match=r"--(no-)?prior-preservation: takes true or false") as refused:
        lesson.configure(vars(exercise3b_train_lora), args)
    assert "Did you mean" not in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("args", [["--negative-prompt", "-blurry"], ["--negative-prompt"]])
def test_an_option_without_its_value_says_how_to_give_one_that_starts_with_a_dash(args):
    with pytest.raises(LessonError, match=r"--negative-prompt: expected one argument\. .*joined to it: "
                                          r"--negative-prompt=-value\. 'python exercise2_explore.py --help'"):
        lesson.configure(vars(exercise2_explore), args)
    # ... and the value so joined is read as written
    assert lesson.configure(vars(exercise2_explore), ["--negative-prompt=-blurry"]).NEGATIVE_PROMPT == "-blurry"


@pytest.mark.parametrize("spelling, kind", [("TINY", "tiny"), (" Pocket", "pocket"), ("{}/my-sd/", "{}/my-sd"),
                                            ("{}/./my-sd", "{}/my-sd")])
def test_spellings_of_one_model_id_become_one(tmp_path, spelling, kind):
    (tmp_path / "my-sd").mkdir()
    (tmp_path / "my-sd/model_index.json").write_text("{}")
    cfg = lesson.configure(vars(exercise1_generate), ["--model", spelling.format(tmp_path.as_posix())])
    lesson.require_model_id(cfg)
    assert cfg.MODEL_ID == kind.format(tmp_path.as_posix())


def test_a_choice_is_read_in_any_case_with_spaces_around_it():
    """' Cosine' (a space after the quote, a capital) was refused as not one of 'cosine', ...; ' CPU ' as not a device."""
    cfg = lesson.configure(vars(exercise3b_train_lora), ["--model", "tiny", "--lr-scheduler", " Cosine",
                                                        "--log-with", "TensorBoard "])
    exercise3b_train_lora.validate(cfg)
    assert (cfg.LR_SCHEDULER, cfg.LOG_WITH) == ("cosine", "tensorboard")
    runtime = device.pick_runtime(" CPU ", " No ", verbose=False)
    assert runtime.device.type == "cpu" and runtime.mixed_precision == "no"
    with pytest.raises(LessonError, match=r"LR_SCHEDULER must be one of 'constant', .*got 'cosine annealing'"):
        exercise3b_train_lora.validate(lesson.configure(vars(exercise3b_train_lora),
                                                        ["--lr-scheduler", "cosine annealing"]))


def test_a_yes_no_constant_written_in_quotes_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(exercise3b_train_lora, "PRIOR_PRESERVATION", "False")  # truthy text: it would train with it
    with pytest.raises(LessonError, match=r"PRIOR_PRESERVATION = 'False' is text in quotes.*True or False"):
        lesson.configure(vars(exercise3b_train_lora), [])


def test_the_summary_says_where_each_overridden_value_came_from(monkeypatch, capsys):
    script = exercise3b_train_lora
    monkeypatch.setenv("DREAMBOOTH_MODEL", "pocket")
    cfg = lesson.configure(vars(script), ["--max-train-steps", "12", "--sample-every", "3"])
    lesson.print_summary(cfg, "title", ["MODEL_ID", "MAX_TRAIN_STEPS", "LORA_RANK"])
    said = capsys.readouterr().out
    assert "MODEL_ID        = 'pocket'  (from DREAMBOOTH_MODEL)" in said
    assert "MAX_TRAIN_STEPS = 12  (from --max-train-steps)" in said
    assert "LORA_RANK       = 4\n" in said  # as written in the file: no note
    assert "also set: SAMPLE_EVERY = 3 (from --sample-every)" in said  # an override not in the summary's list
    cfg = lesson.configure(vars(script), ["--model", "tiny"])
    assert cfg.MODEL_ID == "tiny" and cfg.SOURCES["MODEL_ID"] == "--model"  # the flag beats the variable


def test_reflection_questions_are_filled_with_what_the_run_measured(capsys):
    lesson.print_reflection(["The LoRA file is {lora_file_size}.", "Not measured: {other}.", "A student's {} {"],
                            lora_file_size="227.4 KB")
    said = capsys.readouterr().out
    assert "1. The LoRA file is 227.4 KB." in said and "2. Not measured: {other}." in said
    assert "3. A student's {} {" in said  # braces that are not a placeholder: printed as written, no crash


def test_an_error_line_carries_no_terminal_escape_codes():
    coloured = "\x1b[31mOSError\x1b[0m: could not\n  read \x1b[1;33m'file'\x1b[0m \x1b]8;;http://x\x07link\x1b]8;;\x07"
    assert lesson.one_line(coloured) == "OSError: could not read 'file' link"


def test_common_lists_every_module_once():
    import common

    modules = sorted(p.stem for p in (ROOT / "common").glob("*.py") if p.stem != "__init__")
    listed = [m for m in modules if common.__doc__.count(f"``{m}``") == 1]
    assert listed == modules


# --------------------------------------------------------------------------- SUBJECT_TOKEN is typed once
def test_the_default_prompts_are_the_courses():
    b = lesson.configure(vars(exercise3b_train_lora), [])
    assert b.INSTANCE_PROMPT == "a sks african fabric pattern"
    assert b.SAMPLE_PROMPTS == ("a sks african fabric pattern",
                                "a beautiful dress made of sks african fabric pattern, fashion photography",
                                "a fabric pattern")
    one = lesson.configure(vars(exercise1_generate), [])
    assert one.PROMPTS[0] == "a beautiful dress made of sks african fabric pattern, fashion photography"
    assert all(" sks african fabric pattern" in p for p in one.PROMPTS) and len(one.PROMPTS) == 9
    two = lesson.configure(vars(exercise2_explore), [])
    assert two.PROMPT == "a sks african fabric pattern"
    assert two.STYLE_PROMPT == "sks african fabric pattern, {style} style"
    assert lesson.configure(vars(generate_dreambooth_morph), []).PROMPT == "a sks african fabric pattern"


def test_subject_token_fills_every_prompt(capsys):
    b = lesson.configure(vars(exercise3b_train_lora), ["--subject-token", "ohwx"])
    exercise3b_train_lora.validate(b)
    assert b.INSTANCE_PROMPT == "a ohwx african fabric pattern"
    assert b.SAMPLE_PROMPTS[:2] == ("a ohwx african fabric pattern",
                                    "a beautiful dress made of ohwx african fabric pattern, fashion photography")
    assert "does not contain SUBJECT_TOKEN" not in capsys.readouterr().out
    lesson.print_summary(b, "title", ["INSTANCE_PROMPT"])
    assert "INSTANCE_PROMPT = 'a ohwx african fabric pattern'" in capsys.readouterr().out  # the summary shows it filled
    one = lesson.configure(vars(exercise1_generate), ["--subject-token", "ohwx"])
    assert all("ohwx" in p and "sks" not in p and "{}" not in p for p in one.PROMPTS)
    two = lesson.configure(vars(exercise2_explore), ["--subject-token", "ohwx"])
    assert two.PROMPT == "a ohwx african fabric pattern"
    assert two.STYLE_PROMPT == "ohwx african fabric pattern, {style} style"
    morph = lesson.configure(vars(generate_dreambooth_morph), ["--subject-token", "ohwx", "--prompt", "{} on silk"])
    assert morph.PROMPT == "ohwx on silk"  # a prompt from the command line is filled too


def test_a_prompt_without_braces_is_used_as_written(capsys):
    b = lesson.configure(vars(exercise3b_train_lora), ["--subject-token", "ohwx", "--instance-prompt",
                                                       "a sks kente pattern", "--sample-prompts", "sks | a {} cloth"])
    assert b.INSTANCE_PROMPT == "a sks kente pattern" and b.SAMPLE_PROMPTS == ("sks", "a ohwx cloth")
    exercise3b_train_lora.validate(b)  # the token is not in the instance prompt: the warning says so
    assert "INSTANCE_PROMPT 'a sks kente pattern' does not contain SUBJECT_TOKEN 'ohwx'" in capsys.readouterr().out
    one = lesson.configure(vars(exercise1_generate), ["--prompts", "a sks scarf | a {} dress"])
    assert one.PROMPTS == ("a sks scarf", "a sks dress")


def test_stray_spaces_around_the_subject_token_are_not_typed_into_the_prompts():
    b = lesson.configure(vars(exercise3b_train_lora), ["--subject-token", "  sks\t"])
    exercise3b_train_lora.validate(b)
    assert b.SUBJECT_TOKEN == "sks" and b.INSTANCE_PROMPT == "a sks african fabric pattern"
    two = lesson.configure(vars(exercise2_explore), ["--subject-token", " my   fabric "])  # several words: allowed
    assert two.SUBJECT_TOKEN == "my fabric" and two.PROMPT == "a my fabric african fabric pattern"
    a = lesson.configure(vars(exercise3a_train_textual_inversion), ["--placeholder-token", " <kente> "])
    exercise3a_train_textual_inversion.validate(a)
    assert a.PLACEHOLDER_TOKEN == "<kente>"


@pytest.mark.parametrize("script, option, word", [
    (exercise2_explore, "--subject-token", "{style}"),  # would have been filled in as the style's place
    (exercise1_generate, "--subject-token", "{}"),
    (exercise3b_train_lora, "--subject-token", "s{k}s"),
    (generate_dreambooth_morph, "--subject-token", "{"),
    (exercise3a_train_textual_inversion, "--placeholder-token", "{}"),
])
def test_a_subject_word_with_braces_is_refused_before_anything_loads(script, option, word):
    cfg = lesson.configure(vars(script), [option, word])
    name = option[2:].replace("-", "_").upper()
    with pytest.raises(LessonError, match=rf"^{name} must not contain {{ or }}, which mark in the prompts where the "
                                          rf"word goes \(try 'sks'\), got .*{option}"):
        script.validate(cfg)


@pytest.mark.parametrize("script, option", [(exercise1_generate, "--subject-token"),
                                            (exercise3b_train_lora, "--subject-token"),
                                            (exercise3a_train_textual_inversion, "--placeholder-token")])
def test_a_subject_word_of_punctuation_alone_is_refused(script, option):
    cfg = lesson.configure(vars(script), [option, ", ."])
    with pytest.raises(LessonError, match=r"must contain a letter or a digit, so that it can be found in a prompt"):
        script.validate(cfg)


def test_style_prompt_needs_its_style_placeholder():
    cfg = lesson.configure(vars(exercise2_explore), ["--style-prompt", "{} african fabric pattern, {} style"])
    with pytest.raises(LessonError, match=r"STYLE_PROMPT must contain \{style\} where each style goes, got "
                                          r"'sks african fabric pattern, sks style'"):
        exercise2_explore.validate(cfg)



@pytest.mark.parametrize("args, ignored_at", [
    # diffusers uses a negative prompt only through classifier-free guidance, off at 1 or less: was silent
    (["--guidance-scale", "1"], "GUIDANCE_SCALE 1"),
    (["--part", "a", "--guidance-scales", "0,1,7.5"], "part A's guidance 0, part A's guidance 1"),
    (["--part", "b", "--fast-mode"], "FAST_GUIDANCE_SCALE 1"),  # (LCM's default)
    (["--part", "a", "--guidance-scale", "1"], None),  # (part A samples at GUIDANCE_SCALES alone)
    ([], None),
])
def test_a_negative_prompt_that_guidance_switches_off_warns(args, ignored_at, capsys):
    cfg = lesson.configure(vars(exercise2_explore), ["--no-use-lora", "--negative-prompt", "blurry", *args])
    exercise2_explore.validate(cfg)
    out = capsys.readouterr().out
    if ignored_at:
        assert f"Warning: NEGATIVE_PROMPT is ignored at {ignored_at}: it works only through" in out, out
    else:
        assert "NEGATIVE_PROMPT" not in out, out



@pytest.mark.parametrize("args, said", [
    # diffusers turns guidance off at 1 or less: part A drew two identical pictures labelled 0 and 1 without a word
    (["--guidance-scales", "0,1,7.5"], "part A's guidance 0 draw(s) exactly what a guidance scale of 1 draws"),
    (["--part", "c", "--guidance-scale", "0.5"], "GUIDANCE_SCALE 0.5 draw(s) exactly what"),
    (["--part", "b", "--guidance-scale", "0", "--fast-mode"], None),  # (FAST_MODE samples at FAST_GUIDANCE_SCALE)
    (["--guidance-scales", "1,1.5,7.5"], None),
])
def test_a_guidance_scale_below_one_warns_that_it_draws_what_one_draws(args, said, capsys):
    exercise2_explore.validate(lesson.configure(vars(exercise2_explore), ["--no-use-lora", *args]))
    out = capsys.readouterr().out
    assert (said in out) if said else "draws exactly what" not in out, out


@pytest.mark.parametrize("script", [exercise1_generate, generate_dreambooth_morph])
def test_the_one_guidance_scale_below_one_warns_in_exercise_1_and_the_morph(script, capsys):
    script.validate(lesson.configure(vars(script), ["--no-use-lora", "--guidance-scale", "0"]))
    assert "GUIDANCE_SCALE 0 draw(s) exactly what a guidance scale of 1 draws" in capsys.readouterr().out
    script.validate(lesson.configure(vars(script), ["--no-use-lora", "--fast-mode", "--guidance-scale", "0"]))
    script.validate(lesson.configure(vars(script), ["--no-use-lora", "--guidance-scale", "1"]))
    assert "draws exactly what" not in capsys.readouterr().out  # (FAST_MODE samples at FAST_GUIDANCE_SCALE 1)
    script.validate(lesson.configure(vars(script), ["--no-use-lora", "--fast-mode", "--fast-guidance-scale", "0.5"]))
    assert "FAST_GUIDANCE_SCALE 0.5 draw(s) exactly what" in capsys.readouterr().out



@pytest.mark.parametrize("script", [exercise1_generate, exercise2_explore, generate_dreambooth_morph])
def test_steps_and_guidance_given_with_fast_mode_say_which_constants_fast_mode_uses(script, capsys):
    # FAST_MODE samples with FAST_STEPS and FAST_GUIDANCE_SCALE: --num-inference-steps 8 drew 4 steps without a word
    script.validate(lesson.configure(vars(script), ["--no-use-lora", "--fast-mode", "--num-inference-steps", "8",
                                                    "--guidance-scale", "2"]))
    out = capsys.readouterr().out
    assert ("--num-inference-steps is not used in FAST_MODE, which samples with FAST_STEPS (4): set --fast-steps "
            "instead.") in out, out
    assert "--guidance-scale is not used in FAST_MODE, which samples with FAST_GUIDANCE_SCALE (1)" in out, out
    script.validate(lesson.configure(vars(script), ["--no-use-lora", "--num-inference-steps", "8"]))
    script.validate(lesson.configure(vars(script), ["--no-use-lora", "--fast-mode", "--fast-steps", "8"]))
    assert "not used in FAST_MODE" not in capsys.readouterr().out


# --------------------------------------------------------------------------- CPU threads (--threads)
@pytest.mark.parametrize("available, torch_default, busy, chosen", [
    (2, 2, 0.0, 2),  # an idle 2-core CPU: both
    (2, 2, 0.4, 2),  # a little background work: still both
    (2, 2, 1.0, 1),  # another program keeps one core busy: the free one only
    (2, 2, 0.6, 1),
    (2, 2, 2.0, 1),  # every core busy: never fewer than one
    (16, 8, 0.0, 8),  # 16 logical cores, 8 physical: PyTorch's own default caps it
    (16, 8, 12.0, 4),  # ... and the cores left free decide below it
    (4, 1, 0.0, 1),  # OMP_NUM_THREADS=1 (PyTorch's default then): respected
    (1, 4, 0.0, 1),  # a container or taskset that allows one core
])
def test_threads_are_one_per_free_core_at_most_pytorchs_default(available, torch_default, busy, chosen):
    assert device.choose_threads(available, torch_default, busy) == chosen


def test_busy_cores_is_a_measurement_of_this_machine():
    busy = device.busy_cores(0.05)
    assert 0.0 <= busy <= device.available_cores() + 0.5  # (0.0 where /proc/stat does not exist)


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "two"])
def test_threads_must_be_a_whole_number_of_one_or_more(value):
    with pytest.raises(LessonError, match=rf"^--threads must be a whole number >= 1 .*got '{value}'\. Leave it out"):
        lesson.configure(vars(exercise1_generate), ["--threads", value])


def test_more_threads_than_cores_are_refused_before_pytorch_starts_them(monkeypatch):
    """--threads 99999 made PyTorch start threads until the system refused ("can't start new thread", blamed on
    the model) and the run crashed with a segmentation fault."""
    with pytest.raises(LessonError, match=r"^--threads 99999 is more than the \d+ CPU core\(s\).*--threads \d+ or fewer"):
        lesson.configure(vars(exercise1_generate), ["--threads", "99999"])


def test_threads_flag_sets_pytorchs_threads_for_the_run_and_the_device_line_says_why(workdir, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        exercise1_generate.generate(["--model", "tiny", "--no-use-lora", "--num-inference-steps", "1", "--threads",
                                     "1", "--prompts", "a {} african fabric pattern", "--no-compare-without-token"])
        assert torch.get_num_threads() == 1
        assert "Device: cpu (1 thread: from --threads)" in capsys.readouterr().out
        lesson.configure(vars(exercise1_generate), [])  # without the flag: the rule's choice for this machine
        assert torch.get_num_threads() == device.THREADS.count >= 1 and "busy with other programs" in device.THREADS.reason
    finally:
        torch.set_num_threads(before)


def test_a_file_or_folder_in_the_way_of_a_save_is_named(tmp_path):
    """Real failures from the file system, as the scripts meet them: a file where a folder is made (mkdir, or a
    path through it) and a folder where a file is written (os.replace onto it)."""
    import os

    (tmp_path / "exercise1_variations").write_text("my notes")
    (tmp_path / "grid.png").mkdir()
    (tmp_path / "tmp.png").write_bytes(b"new")
    raised = []
    for act in (lambda: (tmp_path / "exercise1_variations").mkdir(parents=True, exist_ok=True),
                lambda: (tmp_path / "exercise1_variations" / "01.png").write_bytes(b"x"),
                lambda: os.replace(tmp_path / "tmp.png", tmp_path / "grid.png")):
        with pytest.raises(OSError) as exc:
            act()
        raised.append(lesson.explain(exc.value))
    for message in raised[:2]:
        assert message.startswith(f"'{tmp_path / 'exercise1_variations'}' is a file, but this script makes a folder "
                                  "of that name there. Move or rename it"), message
    assert raised[2].startswith(f"'{tmp_path / 'grid.png'}' is a folder, but this script writes a file"), raised[2]
    assert (tmp_path / "exercise1_variations").read_text() == "my notes"
    existing = FileExistsError(17, "File exists", str(tmp_path / "grid.png"))  # (a folder: not in anyone's way)
    assert lesson.explain(existing) is None and lesson.explain(FileExistsError(17, "File exists")) is None


def test_a_script_saved_with_a_utf8_bom_keeps_its_constants(tmp_path):
    """Windows editors (Notepad's 'UTF-8 with BOM', Visual Studio) may start the file with a BOM: Python runs such a
    script, and its constants must still be read (the BOM made them a SyntaxError, U+FEFF)."""
    script = tmp_path / "edited.py"
    script.write_bytes(b"\xef\xbb\xbf" + "# CONSTANTS\nSTEPS = 5  # how many\nPROMPT = 'caf\u00e9'  # a prompt\n"
                       "# ====\n".encode("utf-8"))
    assert configurator.constants(str(script)) == [("STEPS", "how many"), ("PROMPT", "a prompt")]


def test_a_second_process_under_accelerate_launch_may_print_any_prompt():
    """RANK > 0 prints into os.devnull: opened in the locale's encoding (cp1252 on Windows; ASCII here, with
    LC_ALL=C and UTF-8 mode off) an emoji or a Greek prompt ended that process in UnicodeEncodeError."""
    import os

    env = {**os.environ, "RANK": "1", "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    code = ("import exercise1_generate as s; from common import lesson; lesson.configure(vars(s), [], None); "
            "print('caf\\u00e9 \\u03b1 \\U0001F600', flush=True)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_path_too_long_for_windows_is_named_with_what_to_do(monkeypatch):
    """Windows refuses paths of 260 characters or more unless long paths are on, with only 'No such file or
    directory': a project deep in OneDrive met it in a checkpoint's temporary file ('unexpected FileNotFoundError')."""
    monkeypatch.setattr(lesson, "_WINDOWS", True)
    deep = "C:\\Users\\Ana\\OneDrive - University\\" + "course\\" * 30 + "learned_embeds.safetensors"
    message = lesson.explain(FileNotFoundError(2, "No such file or directory", deep))
    assert message and "characters long" in message and "long paths" in message and "C:\\course" in message
    assert lesson.explain(FileNotFoundError(2, "No such file or directory", "outputs\\x.png")) is None  # (short)
    monkeypatch.setattr(lesson, "_WINDOWS", False)
    assert lesson.explain(FileNotFoundError(2, "No such file or directory", deep)) is None  # (elsewhere: no limit)


@pytest.mark.parametrize("script", ["exercise1_generate.py", "tools/evaluate_dreambooth.py"])
def test_a_script_run_from_another_folder_says_where_its_paths_are_read(script, tmp_path, monkeypatch, capsys):
    """'python ~/course/exercise1_generate.py' from the home folder read models/fabric_lora there and said only
    'No LoRA at models/fabric_lora'. It says first where its folders are taken from, and where the project is;
    nothing where the current folder is the project, or a project folder of its own (a copy, a test's)."""
    monkeypatch.chdir(tmp_path)
    lesson.warn_if_elsewhere(str(ROOT / script))
    said = capsys.readouterr().out
    assert f"runs from '{tmp_path}', not from its project folder '{ROOT}'" in said, said
    assert f"'cd' into '{ROOT}'" in said
    (tmp_path / "models").mkdir()
    lesson.warn_if_elsewhere(str(ROOT / script))
    monkeypatch.chdir(ROOT)
    lesson.warn_if_elsewhere(str(ROOT / script))
    assert capsys.readouterr().out == ""


def test_a_library_error_log_before_its_exception_is_not_printed():
    """diffusers logs "Loading fabric was unsuccessful with the following error: ..." (several lines) and then
    raises; the exception becomes the one ERROR line, so the log must not print above it (--debug shows it).
    (Asked of the loggers, not of captured output: the libraries' handler keeps the stream of its first use.)"""
    import logging

    import diffusers
    import transformers

    libs = (diffusers.utils.logging, transformers.utils.logging)
    loggers = [diffusers.utils.logging.get_logger("diffusers.loaders.peft"),
               transformers.utils.logging.get_logger("transformers.modeling_utils")]
    before = [lib.get_verbosity() for lib in libs]
    try:
        lesson._quiet_libraries(debug=False)
        assert not any(logger.isEnabledFor(logging.ERROR) for logger in loggers)
        lesson._quiet_libraries(debug=True)
        assert all(logger.isEnabledFor(logging.ERROR) for logger in loggers)
    finally:
        for lib, level in zip(libs, before):
            lib.set_verbosity(level)


@pytest.mark.parametrize("script, typed, meant", [(exercise1_generate, "--lora-sca", "--lora-scale"),
                                                  (exercise3b_train_lora, "--learning-rat", "--learning-rate")])
def test_a_shortened_or_mistyped_option_is_refused_not_taken_for_another(script, typed, meant):
    """argparse took any unique prefix of an option as that option: '--lora-sca 0.5' ran as --lora-scale and a
    mistyped '--learning-rat' as --learning-rate, without a word. Options are whole names; the hint names the one
    meant."""
    with pytest.raises(LessonError, match=rf"unrecognized arguments: {typed} 0\.5\. Did you mean {meant} instead"):
        lesson.configure(vars(script), [typed, "0.5"])
    assert lesson.configure(vars(script), ["--model", "tiny"]).MODEL_ID == "tiny"  # (--model is a name of its own)
