"""The CONSTANTS block as a command line: overrides, validation before any model loads, readable errors."""

import subprocess
import sys

import pytest

from common import lesson
from common.errors import LessonError
from conftest import ROOT, load_script


def test_every_constant_has_a_dashed_flag_in_help():
    out = subprocess.run([sys.executable, "exercise3b_train_lora.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    script = load_script("exercise3b_train_lora.py")
    for name, _ in lesson._constants_in_source(script.__file__):
        assert lesson.dashed(name) in out.stdout, name
    assert "--model" in out.stdout and "--debug" in out.stdout
    assert "optimizer updates" in out.stdout  # the constant's comment is its help text


def test_overrides_and_types():
    script = load_script("exercise3b_train_lora.py")
    cfg = lesson.configure(vars(script), ["--max-train-steps", "12", "--learning-rate", "3e-4",
                                          "--no-prior-preservation", "--resolution", "128",
                                          "--sample-prompts", "a, b | c"])
    assert cfg.MAX_TRAIN_STEPS == 12 and cfg.LEARNING_RATE == 3e-4
    assert cfg.PRIOR_PRESERVATION is False and cfg.RESOLUTION == 128
    assert cfg.SAMPLE_PROMPTS == ("a, b", "c")
    assert cfg.INSTANCE_PROMPT == "a sks african fabric pattern"  # the course's default


def test_constants_are_read_when_main_runs(monkeypatch):
    script = load_script("exercise3b_train_lora.py")
    monkeypatch.setattr(script, "MAX_TRAIN_STEPS", 5)
    assert lesson.configure(vars(script), []).MAX_TRAIN_STEPS == 5


def test_model_selection_flag_and_environment(monkeypatch):
    script = load_script("exercise3b_train_lora.py")
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
    script = load_script("exercise3b_train_lora.py")
    # If validation let it through, loading this model would fail differently.
    monkeypatch.setattr(script, "MODEL_ID", "no-such/model-anywhere")
    with pytest.raises(LessonError, match=constant):
        script.main(args)


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
    script = load_script("exercise3b_train_lora.py")
    cfg = lesson.configure(vars(script), ["--instance-prompt", "a fabric pattern"])
    script.validate(cfg)
    assert "does not contain SUBJECT_TOKEN" in capsys.readouterr().out
