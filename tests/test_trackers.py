"""LOG_WITH (issue 13): 3a and 3b log their losses, learning rate and every progress grid through accelerate's
trackers, one run folder per run under outputs/runs/, read back here with TensorBoard's own reader."""

import importlib.util
import io
import re

import numpy as np
import pytest
from PIL import Image

import exercise3a_train_textual_inversion
import exercise3b_train_lora
from common.errors import LessonError
from conftest import needs_tensorboard, read_tensorboard_run

LORA = ["--model", "tiny", "--num-class-images", "2", "--num-inference-steps", "1", "--num-sample-seeds", "1",
        "--learning-rate", "5e-3", "--checkpoint-every", "100"]
TI = ["--model", "tiny", "--num-inference-steps", "1", "--num-sample-seeds", "1", "--gradient-accumulation", "1",
      "--learning-rate", "5e-2", "--sample-every", "100"]


def run_folders(workdir, script):
    runs = workdir / "outputs" / "runs"
    return sorted(p for p in runs.iterdir() if p.name.startswith(script)) if runs.is_dir() else []


def assert_grids_logged(run, steps, progress_dir):
    """The image tag holds each progress grid, at its step, pixel for pixel as the PNG beside it."""
    assert [e.step for e in run.Images("progress_grid")] == steps
    for event in run.Images("progress_grid"):
        saved = Image.open(progress_dir / f"step_{event.step:05d}.png").convert("RGB")
        assert (event.width, event.height) == saved.size
        logged = Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")
        assert np.array_equal(np.asarray(logged), np.asarray(saved))


@needs_tensorboard
def test_3b_logs_its_losses_lr_and_grids_and_a_resumed_run_continues_in_a_folder_of_its_own(workdir, capsys):
    result = exercise3b_train_lora.train(LORA + ["--max-train-steps", "4", "--sample-every", "2",
                                                "--checkpoint-every", "4"])
    [folder] = run_folders(workdir, "exercise3b")
    assert re.fullmatch(r"exercise3b-\d{8}-\d{6}", folder.name)
    assert f"Live log (LOG_WITH = 'tensorboard'): 'outputs/runs/{folder.name}/'; watch it: tensorboard --logdir " \
           "outputs/runs" in capsys.readouterr().out.replace("\\", "/")
    run = read_tensorboard_run(folder)
    assert sorted(run.Tags()["scalars"]) == ["instance", "lr", "prior", "total"]
    for tag in ("total", "instance", "prior", "lr"):  # one value per step, the ones the loss curves draw
        events = run.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3, 4], tag
        assert [e.value for e in events] == pytest.approx(result.history[tag], rel=1e-6), tag
    assert [e.value for e in run.Scalars("lr")] == pytest.approx([5e-3] * 4)
    assert_grids_logged(run, [0, 2, 4], workdir / "outputs/training_progress_lora")
    assert "MAX_TRAIN_STEPS: 4" in next(folder.glob("*/hparams.yml")).read_text()  # the run's settings

    exercise3b_train_lora.train(LORA + ["--max-train-steps", "6", "--sample-every", "2", "--resume"])
    first, resumed = run_folders(workdir, "exercise3b")
    assert first == folder and re.fullmatch(r"exercise3b-\d{8}-\d{6}(-\d+)?-from-step-4", resumed.name)
    run = read_tensorboard_run(resumed)
    assert [e.step for e in run.Scalars("total")] == [5, 6]  # where the first run's curves stopped
    assert_grids_logged(run, [6], workdir / "outputs/training_progress_lora")


@needs_tensorboard
def test_3a_logs_its_loss_lr_and_grids_and_each_run_has_a_folder(workdir):
    result = exercise3a_train_textual_inversion.train(TI + ["--max-train-steps", "3"])
    [folder] = run_folders(workdir, "exercise3a")
    run = read_tensorboard_run(folder)
    assert sorted(run.Tags()["scalars"]) == ["loss", "lr"]
    assert [e.step for e in run.Scalars("loss")] == [1, 2, 3] == [e.step for e in run.Scalars("lr")]
    assert [e.value for e in run.Scalars("loss")] == pytest.approx(result.history["loss"], rel=1e-6)
    assert_grids_logged(run, [0, 3], workdir / "outputs/training_progress_ti")

    exercise3a_train_textual_inversion.train(TI + ["--max-train-steps", "1"])  # a new run, not --resume
    first, second = run_folders(workdir, "exercise3a")
    assert first == folder and not second.name.endswith("from-step-3")
    assert [e.step for e in read_tensorboard_run(second).Scalars("loss")] == [1]


@needs_tensorboard
def test_what_was_logged_before_an_error_is_on_disk(workdir, monkeypatch, fault_hooks):
    monkeypatch.setenv(fault_hooks.NAN_AT_STEP_ENV, "3")
    with pytest.raises(LessonError, match="loss became nan at step 3"):
        exercise3b_train_lora.train(LORA + ["--max-train-steps", "5", "--sample-every", "2"])
    [folder] = run_folders(workdir, "exercise3b")
    run = read_tensorboard_run(folder)
    assert [e.step for e in run.Scalars("total")] == [1, 2]
    assert [e.step for e in run.Images("progress_grid")] == [0, 2]


@pytest.mark.parametrize("how", ["none", "not installed"])
def test_no_live_log_writes_no_runs_folder(workdir, monkeypatch, capsys, how):
    args = LORA + ["--max-train-steps", "1", "--no-prior-preservation"]
    if how == "none":
        args += ["--log-with", "none"]
    else:  # the default, on a computer without tensorboard: a warning, and the lesson runs as before
        import accelerate.utils

        monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    exercise3b_train_lora.train(args)
    said = capsys.readouterr().out
    assert (workdir / "outputs/training_progress_lora/step_00001.png").is_file()
    assert not (workdir / "outputs/runs").exists() and "Live log" not in said
    assert ("Warning: LOG_WITH = 'tensorboard', but tensorboard is not installed" in said) == (how != "none")


@pytest.mark.parametrize("script", [exercise3b_train_lora, exercise3a_train_textual_inversion])
def test_an_unknown_log_with_is_refused_before_any_model_loads(workdir, capsys, script):
    with pytest.raises(LessonError) as refused:
        script.train(["--model", "tiny", "--log-with", "tensorbord"])
    assert str(refused.value).startswith(
        "LOG_WITH must be one of 'tensorboard', 'wandb', None, got 'tensorbord'. Edit it at the top of ")
    assert "[Step 1]" not in capsys.readouterr().out
    assert not (workdir / "outputs").exists()


def test_wandb_without_wandb_says_how_to_get_it_before_any_model_loads(workdir, capsys, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)  # (a computer without it)
    with pytest.raises(LessonError, match=r"LOG_WITH = 'wandb' needs Weights & Biases: 'pip install wandb'.* "
                                          r"or set LOG_WITH = 'tensorboard' or None \(--log-with none\)"):
        exercise3b_train_lora.train(["--model", "tiny", "--log-with", "wandb"])
    assert "[Step 1]" not in capsys.readouterr().out


needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb (requirements-test.txt) is not installed")


@pytest.fixture
def fresh_wandb():
    """W&B keeps its settings (the mode, from the environment) once per process: each test starts its own."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


@needs_wandb
def test_3b_logs_into_wandb_offline_run_in_outputs(workdir, capfd, monkeypatch, fresh_wandb):
    """LOG_WITH = "wandb" with WANDB_MODE=offline (the README's way to try it without an account): the run is
    kept in OUTPUT_DIR/runs/wandb/, with every progress grid as the PNG beside it, and W&B's own summary
    ends at the run's last losses."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(workdir / "elsewhere"))  # (our dir= wins: the run stays in outputs/)
    result = exercise3b_train_lora.train(LORA + ["--max-train-steps", "4", "--sample-every", "2", "--log-with",
                                                 "wandb"])
    said = capfd.readouterr()
    [run] = (workdir / "outputs/runs/wandb").glob("offline-run-*")
    assert re.search(r"Live log \(LOG_WITH = 'wandb'\): W&B run 'exercise3b-\d{8}-\d{6}' in project "
                     r"'dreambooth-fabric'", said.out)
    media = sorted(run.glob("files/media/images/progress_grid_*.png"), key=lambda p: int(p.name.split("_")[2]))
    assert [int(p.name.split("_")[2]) for p in media] == [0, 2, 4]
    for path in media:
        step = int(path.name.split("_")[2])
        saved = Image.open(workdir / f"outputs/training_progress_lora/step_{step:05d}.png").convert("RGB")
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(saved))
    summary = dict(re.findall(r"wandb: +(total|instance|prior) ([-\d.e]+)", said.out + said.err))
    assert {k: float(v) for k, v in summary.items()} == pytest.approx(
        {k: result.history[k][-1] for k in ("total", "instance", "prior")}, rel=1e-4)


@needs_wandb
def test_wandb_without_an_account_says_how_to_log_in(workdir, monkeypatch, fresh_wandb):
    """Not logged in, and no terminal to ask in (a notebook, a job): one message with the three ways on."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(workdir / "home"))  # (no ~/.netrc, no W&B settings)
    monkeypatch.setenv("NETRC", str(workdir / "home" / ".netrc"))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    with pytest.raises(LessonError) as refused:
        exercise3b_train_lora.train(LORA + ["--max-train-steps", "2", "--log-with", "wandb"])
    said = str(refused.value)
    assert said.startswith("LOG_WITH = 'wandb': W&B could not start the run (")
    assert "'wandb login'" in said and "WANDB_MODE=offline" in said and "--log-with none" in said
    assert not (workdir / "models/fabric_lora/pytorch_lora_weights.safetensors").exists()
