"""course.ipynb, the classroom notebook: it runs the five scripts in order, shows what each wrote, and asks
the scripts' own reflection questions.

The structure checks read the notebook as JSON and need nothing more. The run executes the whole notebook
with nbclient in a project folder of its own, on the tiny model with the notebook's quick settings
(COURSE_NOTEBOOK_QUICK=1), offline; it skips where nbclient or ipykernel is not installed. The install
cell (%pip install -r requirements.txt) is left out of the run: the test environment is already installed,
and the run must not touch it or the network.
"""

import ast
import json
import os
import re
import shutil

import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "course.ipynb"
SCRIPTS = ["exercise3b_train_lora.py", "exercise1_generate.py", "exercise2_explore.py",
           "exercise3a_train_textual_inversion.py", "generate_dreambooth_morph.py"]  # the course's order
EXPECTED_FILES = [
    "models/fabric_lora/pytorch_lora_weights.safetensors",
    "models/fabric_textual_inversion/learned_embeds.safetensors",
    "outputs/exercise3b_progression.png",
    "outputs/exercise3b_loss_curves.png",
    "outputs/exercise1_output.png",
    "outputs/exercise1_token_comparison.png",
    "outputs/exercise2_guidance_comparison.png",
    "outputs/exercise2_style_grid.png",
    "outputs/exercise2_seed_comparison.png",
    "outputs/exercise3a_loss_curve.png",
    "outputs/exercise3_ti_vs_lora.png",
    "outputs/dreambooth_fabric_morph.gif",
    "outputs/dreambooth_fabric_morph_keyframes.png",
]


def cells(notebook: dict, kind: str | None = None, tag: str | None = None) -> list[dict]:
    return [c for c in notebook["cells"] if (kind is None or c["cell_type"] == kind)
            and (tag is None or tag in c.get("metadata", {}).get("tags", []))]


def text(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def reflection(script: str) -> list[str]:
    """The script's REFLECTION list, read without importing it."""
    for node in ast.parse((ROOT / script).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "REFLECTION":
            return ast.literal_eval(node.value)
    raise AssertionError(f"{script} has no REFLECTION list")


@pytest.fixture(scope="module")
def notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def test_notebook_is_shipped_clean(notebook):
    """No outputs or execution counts in the repository: a student's first run is the first output."""
    for cell in cells(notebook, "code"):
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, text(cell)[:80]
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"


def test_runs_the_five_scripts_in_the_course_order_each_followed_by_its_pictures_and_questions(notebook):
    steps = cells(notebook, "code", "step")
    assert [next(s for s in SCRIPTS if f'python {s} --model "{{MODEL}}"' in text(c)) for c in steps] == SCRIPTS
    order = notebook["cells"]
    for script, step in zip(SCRIPTS, steps):
        after = order[order.index(step) + 1:]
        figures = next(c for c in after if c["cell_type"] == "code")
        assert "figures" in figures["metadata"].get("tags", []), f"{script}: no figures cell after it"
        questions = next(c for c in after if c["cell_type"] == "markdown" and "Reflection" in text(c))
        for i, question in enumerate(reflection(script), 1):  # copied word for word, in order
            assert re.search(re.escape(f"{i}. ") + as_pattern(question), text(questions)), \
                f"{script}'s reflection question {i} is not in the notebook"
        assert "{" not in text(questions)  # a number the run fills in is shown as SD v1.5's, not as {name}


def as_pattern(question: str) -> str:
    """A REFLECTION question as a regex: its words as written, each {name} (a number the run measures and
    fills in) any text."""
    return ".+?".join(map(re.escape, re.split(r"\{\w+\}", question)))


def test_the_student_gets_the_course_settings_and_only_the_test_gets_the_quick_ones(notebook):
    parameters = text(cells(notebook, "code", "parameters")[0])
    assert 'MODEL = "auto"' in parameters and "QUICK = False" in parameters
    assert '"stable-diffusion-v1-5/stable-diffusion-v1-5" if torch.cuda.is_available() else "pocket"' in parameters
    assert 'os.environ.get("COURSE_NOTEBOOK_QUICK") == "1"' in parameters
    install = text(cells(notebook, "code", "install")[0])
    assert "%pip install -r requirements.txt" in install


@pytest.fixture
def project(workdir):
    """The project folder a student opens the notebook in: the scripts, common/, training_images/, the tiny
    model (workdir), requirements.txt and the notebook."""
    for script in SCRIPTS:
        shutil.copy2(ROOT / script, workdir / script)
    shutil.copytree(ROOT / "common", workdir / "common", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "requirements.txt", workdir / "requirements.txt")
    shutil.copy2(NOTEBOOK, workdir / NOTEBOOK.name)
    return workdir


def test_the_whole_notebook_runs_on_the_tiny_model(project, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # The kernel, and every script it starts, inherit these.
    monkeypatch.setenv("DREAMBOOTH_MODEL", "tiny")  # what MODEL = "auto" takes from the environment
    monkeypatch.setenv("COURSE_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")

    nb = nbformat.read(project / NOTEBOOK.name, as_version=4)
    nbformat.validate(nb)
    nb.cells = [c for c in nb.cells if "install" not in c.metadata.get("tags", [])]
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(project)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
    parameters = "".join(o.get("text", "") for c in nb.cells if "parameters" in c.metadata.get("tags", [])
                         for o in c.outputs)
    assert "Model: tiny (quick look)" in parameters
    for cell in nb.cells:
        if "figures" in cell.metadata.get("tags", []):
            mimes = {mime for o in cell.outputs for mime in o.get("data", {})}
            assert mimes & {"image/png", "image/gif"}, f"no picture shown by:\n{cell.source}"
            assert "run the step above" not in "".join(o.get("text", "") for o in cell.outputs), cell.source
    morph = next(c for c in nb.cells
                 if "dreambooth_fabric_morph.gif" in c.source and "figures" in c.metadata.get("tags", []))
    assert any("image/gif" in o.get("data", {}) for o in morph.outputs)
    steps = [c for c in nb.cells if "step" in c.metadata.get("tags", [])]
    for cell in steps:  # each script's own output, with its reflection questions at the end, reached the page
        shown = "".join(o.get("text", "") for o in cell.outputs)
        assert "$ python " in shown and "Reflection questions" in shown, shown[-2000:]
    for path in EXPECTED_FILES:
        assert (project / path).is_file(), path


def test_the_stop_button_is_ctrl_c_for_the_script_and_stops_the_notebook(project, monkeypatch):
    """Interrupting a training cell reaches the script once, as Ctrl-C: it saves a checkpoint and prints how
    to continue, and the cell ends in KeyboardInterrupt, so that "Run all" stops there, shown as one line."""
    pytest.importorskip("ipykernel")
    manager = pytest.importorskip("jupyter_client.manager")
    import threading
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    km, kc = manager.start_new_kernel(kernel_name="python3", cwd=str(project))
    try:
        kc.execute_interactive(text(cells(nb, "code", "setup")[0]), timeout=120)
        seen, errors = [], []

        def hook(msg):
            if msg["msg_type"] == "stream":
                seen.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                errors.append(msg["content"])

        def stop_once_training():
            deadline = time.monotonic() + 300
            while "Training:" not in "".join(seen) and time.monotonic() < deadline:
                time.sleep(0.1)
            km.interrupt_kernel()

        threading.Thread(target=stop_once_training, daemon=True).start()
        kc.execute_interactive('run_script("python exercise3b_train_lora.py --model tiny --max-train-steps 1000 '
                               '--num-class-images 2 --sample-every 1000 --checkpoint-every 1000 '
                               '--num-inference-steps 1 --num-sample-seeds 1")', timeout=300, output_hook=hook)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    shown = "".join(seen)
    assert [e["ename"] for e in errors] == ["ScriptStopped"], shown[-2000:]  # (a KeyboardInterrupt)
    assert len(errors[0]["traceback"]) == 1 and "--resume" in errors[0]["traceback"][0], errors  # one line
    assert "checkpoint saved" in shown and "--resume" in shown, shown[-2000:]
    assert shown.count("Ctrl-C: finishing this step") == 1, shown[-2000:]  # one Ctrl-C reached it, not two
    assert list((project / "models" / "fabric_lora" / "checkpoints").glob("checkpoint-*"))


def test_a_windows_path_in_a_cell_reaches_the_script_whole(notebook, monkeypatch, capsys):
    """MODEL or ARGS may name a folder the Windows way (C:\\Users\\Ana\\my_lora): the helper split the command line
    as a POSIX shell does, where a backslash is an escape, and the script got 'C:UsersAnamy_lora'."""
    pytest.importorskip("IPython")
    monkeypatch.chdir(ROOT)
    helpers = {}
    exec(text(cells(notebook, "code", "setup")[0]), helpers)  # (defines run_script; runs nothing)
    helpers["WINDOWS"] = True  # what os.name == "nt" sets on a Windows computer
    helpers["run_script"]('python -c "import sys; print(*sys.argv[1:], sep=chr(10))" C:\\Users\\Ana\\my_lora '
                          '"D:\\My Pictures\\fabric" --prompt "a #1 fabric"')
    assert capsys.readouterr().out.splitlines()[1:] == ["C:\\Users\\Ana\\my_lora", "D:\\My Pictures\\fabric",
                                                        "--prompt", "a #1 fabric"]
    helpers["WINDOWS"] = False  # elsewhere the command line reads as a POSIX shell reads it
    helpers["run_script"]("python -c \"import sys; print(*sys.argv[1:], sep=chr(10))\" a\\ b 'c d'")
    assert capsys.readouterr().out.splitlines()[1:] == ["a b", "c d"]


def test_on_windows_the_stop_button_reaches_the_script_as_ctrl_break(notebook, monkeypatch, capsys):
    """Windows has no SIGINT to send to another process: the stop button terminated the script, which saved no
    checkpoint. It sends Ctrl-Break to the script's own process group now (the scripts take it as Ctrl-C), and
    stops it outright only where that cannot be sent. Here SIGINT stands in for Ctrl-Break."""
    import shlex
    import signal

    pytest.importorskip("IPython")
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(signal, "CTRL_BREAK_EVENT", signal.SIGINT, raising=False)
    helpers = {}
    exec(text(cells(notebook, "code", "setup")[0]), helpers)
    helpers["WINDOWS"] = True

    shown = {"text": "", "stopped": False}

    def echo(*args, **kwargs):  # the stop button (Jupyter's interrupt is SIGINT), once the script waits for it
        print(*args, **kwargs)
        shown["text"] += "".join(map(str, args))
        if "ready\n" in shown["text"] and not shown["stopped"]:
            shown["stopped"] = True
            # (to this very thread: a signal sent to the process from a timer thread could land on that thread,
            # leaving this one blocked in its read until the script's 60 s were up)
            signal.raise_signal(signal.SIGINT)

    helpers["print"] = echo
    script = ("import signal, sys, time\n"
              "def stop(signum, frame):\n"
              "    print('stopped by', signal.Signals(signum).name, flush=True)\n"
              "    sys.exit(0)\n"
              "signal.signal(signal.SIGINT, stop)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    with pytest.raises(KeyboardInterrupt):
        helpers["run_script"](f"python -c {shlex.quote(script)}")
    assert "stopped by SIGINT" in capsys.readouterr().out


def kernel_errors(cwd, sources: list[str]) -> list[dict]:
    """Run these cell sources, in order, in a fresh kernel started in cwd; the error of each that failed."""
    pytest.importorskip("ipykernel")
    manager = pytest.importorskip("jupyter_client.manager")
    km, kc = manager.start_new_kernel(kernel_name="python3", cwd=str(cwd))
    errors = []
    try:
        for source in sources:
            kc.execute_interactive(source, timeout=120, output_hook=lambda msg: errors.append(msg["content"])
                                   if msg["msg_type"] == "error" else None)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return errors


def test_a_step_cell_run_before_the_setup_cells_is_a_name_error_and_the_notebook_says_what_to_run(notebook):
    """After a kernel restart (or a step cell run first) the helper is gone: IPython read `run(...)` as its %run
    magic and said 'File `"(fpython exercise1_generate.py --model {MODEL} ...)"` not found'."""
    errors = kernel_errors(ROOT, [text(c) for c in cells(notebook, "code", "step")])
    assert [e["ename"] for e in errors] == ["NameError"] * len(SCRIPTS), errors
    assert "NameError" in text(notebook["cells"][0])  # what to run when a cell says it


def test_a_script_that_fails_stops_the_notebook_with_one_line_not_the_helpers_traceback(notebook):
    """The script's own message is above: the cell ends in an error (so "Run all" stops there) shown as one line. It
    showed a 13-line traceback through the notebook's helper (raise RuntimeError(...) and the code around it)."""
    errors = kernel_errors(ROOT, [text(cells(notebook, "code", "setup")[0]),
                                  "run_script(\"python -c 'import sys; sys.exit(3)'\")"])
    assert len(errors) == 1 and len(errors[0]["traceback"]) == 1, errors
    assert "stopped with an error (exit status 3)" in errors[0]["traceback"][0]


def test_an_unclosed_quote_in_args_says_so_in_one_line(notebook):
    """ARGS["1"] += " --prompts 'a b" (the closing quote forgotten) ended in a 42-line traceback through the
    helper and shlex, 'ValueError: No closing quotation', which did not say where."""
    errors = kernel_errors(ROOT, [text(cells(notebook, "code", "setup")[0]),
                                  "run_script(\"python exercise1_generate.py --prompts 'a b\")"])
    assert len(errors) == 1 and len(errors[0]["traceback"]) == 1, errors
    assert "quote" in errors[0]["traceback"][0] and "--prompts 'a b" in errors[0]["traceback"][0], errors


@pytest.mark.parametrize("windows", [False, True])
def test_a_model_folder_with_a_space_reaches_each_script_whole(notebook, monkeypatch, windows):
    """MODEL = "models/my sd" reached the scripts as two words, '--model models/my sd', and each stopped with
    'unrecognized arguments: sd', which did not say to quote it."""
    pytest.importorskip("IPython")
    monkeypatch.chdir(ROOT)
    helpers = {}
    exec(text(cells(notebook, "code", "setup")[0]), helpers)
    helpers["WINDOWS"] = windows
    seen = []
    helpers["run_script"] = lambda command: seen.append(helpers["split"](command))
    for model in ["models/my sd", "C:\\Users\\Ana\\my sd" if windows else "/home/ana/my sd"]:
        helpers.update(MODEL=model, ARGS={"3b": "", "1": " --seed 3", "2": "", "3a": "", "morph": ""})
        seen.clear()
        for cell in cells(notebook, "code", "step"):
            exec(text(cell), helpers)
        assert [args[args.index("--model") + 1] for args in seen] == [model] * len(SCRIPTS), seen


def test_a_figures_cell_run_before_its_step_says_to_run_the_step(notebook, tmp_path, monkeypatch, capsys):
    """Exercise 1's pictures shown before exercise 1 ran said '(no outputs/exercise1_output.png: this run did not
    write it)': which run? It says to run the step above now."""
    pytest.importorskip("IPython")
    monkeypatch.chdir(ROOT)
    helpers = {}
    exec(text(cells(notebook, "code", "setup")[0]), helpers)
    monkeypatch.chdir(tmp_path)  # a project where nothing has run yet
    exec(next(text(c) for c in cells(notebook, "code", "figures") if "exercise1_output.png" in text(c)), helpers)
    shown = capsys.readouterr().out.splitlines()
    assert shown == [f"(no {p} yet: run the step above to write it)"
                     for p in ["outputs/exercise1_output.png", "outputs/exercise1_token_comparison.png"]], shown


def test_a_thumbnails_cell_run_before_its_step_says_what_to_run(notebook, tmp_path, monkeypatch, capsys):
    """The class images shown before step 1 ran said '(no pictures in class_images/)': nothing about the step that
    draws them. It says to run the step above, as the pictures beside it do; training_images/, which no step writes,
    says to put the pictures there."""
    pytest.importorskip("IPython")
    monkeypatch.chdir(ROOT)
    helpers = {}
    exec(text(cells(notebook, "code", "setup")[0]), helpers)
    monkeypatch.chdir(tmp_path)  # a project where nothing has run yet (and, here, no training_images/ either)
    thumbnail_cells = [text(c) for c in cells(notebook, "code", "figures") if "thumbnails(" in text(c)]
    assert len(thumbnail_cells) == 2, thumbnail_cells
    exec(next(c for c in thumbnail_cells if "class_images" in c), helpers)
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == "(no pictures in class_images/ yet: run the step above to write them)", shown
    exec(next(c for c in thumbnail_cells if "training_images" in c), helpers)
    shown = capsys.readouterr().out.splitlines()
    assert shown == ["(no pictures in training_images/ yet: put your fabric pictures there and run this cell again)"]


STOPPABLE = """\
import signal, sys, time
def stop(signum, frame):
    print('Stopped at step 3; checkpoint saved. Continue with:' if RESUMABLE else 'stopping', flush=True)
    if RESUMABLE:
        print('  python fake_training.py --resume', flush=True)
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
print('ready', flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(os.name == "nt", reason="sends SIGINT to a script (the Windows test has its Ctrl-Break)")
@pytest.mark.parametrize("resumable", [True, False])
def test_the_stop_button_ends_the_cell_in_one_line_that_says_how_to_continue(notebook, tmp_path, monkeypatch, capsys,
                                                                            resumable):
    """Interrupting a cell while run_script ran a script showed a KeyboardInterrupt traceback through the helper
    (its read loop, process.wait). The script is stopped (as Ctrl-C) and waited for, and the cell ends in one line:
    which script, and how to continue (--resume where the script saved a checkpoint and said so)."""
    import signal

    pytest.importorskip("IPython")
    monkeypatch.chdir(ROOT)
    helpers = {}
    exec(text(cells(notebook, "code", "setup")[0]), helpers)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fake_training.py").write_text(f"RESUMABLE = {resumable}\n" + STOPPABLE, encoding="utf-8")
    shown = {"text": "", "stopped": False}

    def echo(*args, **kwargs):  # the stop button, once the script says it waits for it (a state, not a time)
        print(*args, **kwargs)
        shown["text"] += "".join(map(str, args))
        if "ready\n" in shown["text"] and not shown["stopped"]:
            shown["stopped"] = True
            signal.raise_signal(signal.SIGINT)  # (in this thread: where Jupyter's interrupt lands)

    helpers["print"] = echo
    with pytest.raises(KeyboardInterrupt) as stopped:  # (still an error: "Run all" stops at this cell)
        helpers["run_script"]("python fake_training.py")
    lines = stopped.value._render_traceback_()
    assert len(lines) == 1 and lines[0].startswith("Stopped: fake_training.py was interrupted"), lines
    assert ("--resume" in lines[0]) == resumable, lines
    out = capsys.readouterr().out
    assert ("checkpoint saved" if resumable else "stopping") in out, out  # it reached the script, which ended
