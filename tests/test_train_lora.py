"""Exercise 3b end to end on the tiny model: the LoRA it writes works with plain diffusers."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from common import lora, prior, sampling, training
import exercise3a_train_textual_inversion
import exercise3b_train_lora
from conftest import ROOT, read_tensorboard_run

FAST = ["--model", "tiny", "--num-class-images", "4", "--sample-every", "3", "--checkpoint-every", "3",
        "--num-inference-steps", "4", "--num-sample-seeds", "1", "--learning-rate", "5e-3",
        "--gradient-accumulation", "1"]  # (the course's 4 micro-batches a step would only make the tests slower)


def test_short_run_writes_a_lora_that_plain_diffusers_loads(workdir, capsys):
    from diffusers import StableDiffusionPipeline

    result = exercise3b_train_lora.train(FAST + ["--max-train-steps", "6"])
    said = capsys.readouterr().out
    lora_file = workdir / "models/fabric_lora/pytorch_lora_weights.safetensors"
    assert result.lora_file.resolve() == lora_file and lora_file.is_file()
    assert lora.read_settings(lora_file)["MAX_TRAIN_STEPS"] == 6
    assert lora.read_settings(lora_file)["resolution"] == 64  # RESOLUTION None: tiny's own (1, 2 and the morph compare)
    assert isinstance(lora.read_settings(lora_file)["training_seconds"], int)  # for the TI-vs-LoRA caption
    for name in ["exercise3b_loss_curves.png", "exercise3b_progression.png",
                 "training_progress_lora/step_00000.png", "training_progress_lora/step_00006.png"]:
        assert (workdir / "outputs" / name).is_file(), name
    assert len(list((workdir / "class_images").glob("class_*.png"))) == 4
    assert [p.name for p in training.checkpoint_dirs(workdir / "models/fabric_lora/checkpoints")] == [
        "checkpoint-000003", "checkpoint-000006"]
    assert len(result.history["total"]) == 6

    # The reflection questions quote this run's numbers: the LoRA file as "Files written" showed it, the UNet.
    size = re.search(r"pytorch_lora_weights\.safetensors  \((.+?)\)", said).group(1)
    trainable, total = (int(n.replace(",", "")) for n in re.search(
        r"([\d,]+) trainable parameters \(([\d,]+) in the UNet\)", said).groups())
    reflection = said.split("Reflection questions")[1]
    assert f"The LoRA file is {size} ({trainable:,} numbers); the UNet it adapts is " in reflection
    assert f" ({total - trainable:,} numbers). What does that say" in reflection
    assert "3.4 GB" not in reflection and "{" not in reflection

    # A fresh pipeline, plain diffusers calls only.
    pipe = StableDiffusionPipeline.from_pretrained("models/tiny-sd")
    pipe.set_progress_bar_config(disable=True)
    sampling.use_multistep_solver(pipe)
    base, _ = sampling.generate(pipe, result.sample_prompts, result.sample_seeds, result.settings, progress=False)
    pipe.load_lora_weights("models/fabric_lora")
    assert len(lora.lora_layer_names(pipe.unet)) == 56
    after, _ = sampling.generate(pipe, result.sample_prompts, result.sample_seeds, result.settings, progress=False)
    for trained, reloaded, untouched in zip(result.samples, after, base):
        trained, reloaded, untouched = (np.asarray(x, dtype=np.int16) for x in (trained, reloaded, untouched))
        assert np.abs(trained - reloaded).max() <= 1  # the in-training sample, reproduced from the file
        assert np.abs(reloaded - untouched).mean() > 0.5  # and the LoRA visibly changes the picture

    # Beside it, what AUTOMATIC1111/ComfyUI read (kohya's layout), which plain diffusers loads with the same
    # effect on the UNet, and a model card the Hub's own parser reads.
    from huggingface_hub import ModelCard

    kohya = StableDiffusionPipeline.from_pretrained("models/tiny-sd")
    kohya.load_lora_weights("models/fabric_lora", weight_name="fabric_lora_kohya.safetensors")
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        assert torch.allclose(kohya.unet(x, t, text).sample, pipe.unet(x, t, text).sample, atol=1e-5)
    card = ModelCard.load(workdir / "models/fabric_lora/README.md")
    assert card.data.instance_prompt == "a sks african fabric pattern" and card.data.base_model == "tiny"
    assert "| `MAX_TRAIN_STEPS` | `6` |" in card.text and (workdir / "models/fabric_lora/preview.png").is_file()


def test_resume_continues_at_the_right_step(workdir, capsys):
    script = exercise3b_train_lora
    script.train(FAST + ["--max-train-steps", "3", "--sample-every", "100"])
    # (MODEL_ID spelt another way names the same model: not "a change of settings")
    result = script.train(FAST + ["--max-train-steps", "5", "--sample-every", "100", "--resume", "--model", "TINY"])
    said = capsys.readouterr().out
    assert "Resumed from 'models/fabric_lora/checkpoints/checkpoint-000003' at step 3" in said
    assert len(result.history["total"]) == 5  # 3 from the first run (restored) + 2 new steps


def test_resume_reads_none_as_the_models_own_size_and_crop_and_refuses_another(workdir, capsys):
    """RESOLUTION None is the model's own size (64 for tiny), CROP_FRACTION None its own crop (1.0): written either
    way, the run resumes. --resume refused 'RESOLUTION None -> 64' for the very same size."""
    from common.errors import LessonError

    script, quiet = exercise3b_train_lora, FAST + ["--sample-every", "100", "--checkpoint-every", "1"]
    script.train(quiet + ["--max-train-steps", "2"])
    run_json = workdir / "models/fabric_lora/checkpoints/run.json"
    assert {k: json.loads(run_json.read_text())["fixed"][k] for k in ("RESOLUTION", "CROP_FRACTION")} == {
        "RESOLUTION": 64, "CROP_FRACTION": 1.0}  # (what it trained at)
    script.train(quiet + ["--max-train-steps", "3", "--resume", "--resolution", "64", "--crop-fraction", "1"])
    assert "at step 2." in capsys.readouterr().out
    with pytest.raises(LessonError, match=r"cannot change mid-run: RESOLUTION 64 -> 32\. Change them back"):
        script.train(quiet + ["--max-train-steps", "4", "--resume", "--resolution", "32"])

    script.train(quiet + ["--max-train-steps", "1", "--resolution", "32"])  # a new run, at 32
    with pytest.raises(LessonError, match=r"at another size, .*RESOLUTION 32 -> 64 \(the model's own size is 64\)\. "
                                          r"Change it back"):
        script.train(quiet + ["--max-train-steps", "2", "--resume"])  # (None: the model's own, 64)
    script.train(quiet + ["--max-train-steps", "2", "--resume", "--resolution", "32"])
    assert "at step 1." in capsys.readouterr().out


def test_resume_passes_over_checkpoint_folders_that_are_not_ours(workdir, capsys):
    """A 'checkpoint-final' copy or diffusers' 'checkpoint-500' sorted after checkpoint-000003, so --resume
    refused it as 'a checkpoint in the old layout' (and keeping the newest could delete ours beside it)."""
    script = exercise3b_train_lora
    script.train(FAST + ["--max-train-steps", "3", "--sample-every", "100"])
    checkpoints = workdir / "models/fabric_lora/checkpoints"
    for name in ("checkpoint-final", "checkpoint-500"):
        (checkpoints / name).mkdir()
        (checkpoints / name / "mine.txt").write_text("mine")
    script.train(FAST + ["--max-train-steps", "4", "--sample-every", "100", "--checkpoint-every", "1",
                         "--checkpoints-to-keep", "1", "--resume"])
    assert "Resumed from 'models/fabric_lora/checkpoints/checkpoint-000003' at step 3" in capsys.readouterr().out
    assert [p.name for p in training.checkpoint_dirs(checkpoints)] == ["checkpoint-000004"]
    for name in ("checkpoint-final", "checkpoint-500"):
        assert (checkpoints / name / "mine.txt").read_text() == "mine"


def test_resume_gives_the_same_lora_as_an_uninterrupted_run(workdir, tmp_path):
    from safetensors.torch import load_file

    script = exercise3b_train_lora
    # one thread for all three runs: the scripts pick 1 or 2 by how busy the cores are, and AdamW's first steps
    # magnify the rounding differences of another thread count (2e-6 apart in a CI run here)
    args = FAST + ["--sample-every", "100", "--no-random-flip", "--threads", "1"]
    script.train(args + ["--max-train-steps", "4", "--lora-dir", "models/straight"])
    script.train(args + ["--max-train-steps", "2", "--checkpoint-every", "2", "--lora-dir", "models/split"])
    script.train(args + ["--max-train-steps", "4", "--lora-dir", "models/split", "--resume"])
    a = load_file("models/straight/pytorch_lora_weights.safetensors")
    b = load_file("models/split/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_resume_with_another_gradient_accumulation_updates_after_each_steps_micro_batches(workdir, monkeypatch):
    """A resumed run whose GRADIENT_ACCUMULATION changed (the out-of-memory advice: a smaller TRAIN_BATCH_SIZE, a
    larger accumulation) updates once per step, after that step's micro-batches. accelerate restores its count of
    micro-batches from the checkpoint and updates whenever it divides by the new accumulation: resumed at step 2
    of 1 micro-batch each, with 3, step 3 updated after its first micro-batch, step 4 after step 3's other two
    and its own first, and step 4's last two micro-batches never reached the LoRA."""
    args = FAST + ["--max-train-steps", "2", "--sample-every", "100", "--checkpoint-every", "1",
                   "--no-prior-preservation", "--gradient-accumulation", "1"]
    exercise3b_train_lora.train(args)
    seen = []
    step_generator, adamw_step = training.step_generator, torch.optim.AdamW.step
    monkeypatch.setattr(training, "step_generator", lambda seed, step, process=0, micro=0: (
        seen.append((step, micro)), step_generator(seed, step, process, micro))[1])
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (seen.append("update"),
                                                                         adamw_step(self, *a, **k))[1])
    exercise3b_train_lora.train(args[:-1] + ["3", "--max-train-steps", "4", "--resume"])
    seen = seen[seen.index((3, 0)):]  # (the memory check's forward passes came first, on a Linux CPU)
    assert seen == [(3, 0), (3, 1), (3, 2), "update", (4, 0), (4, 1), (4, 2), "update"]


@pytest.mark.parametrize("argv", [["--model", "tiny", "--resume", "true"], ["--resume", "false", "--model", "tiny"],
                                  ["--model", "tiny", "--resume=yes"], ["--no-resume", "--model", "tiny"],
                                  ["--model", "tiny", "--resume", "ON"]])
def test_the_command_that_continues_drops_resume_with_its_value(argv):
    """--resume takes a value ('--resume true', as every yes/no option): the command printed after Ctrl-C dropped
    the flag and kept its value, 'python ... --model tiny true --resume', which the script refused."""
    command = training.continue_command("exercise3b_train_lora.py", argv)
    assert command == "python exercise3b_train_lora.py --model tiny --resume"


CONTINUE_ARGV = ["--model", "C:\\Users\\Ana\\my sd\\", "--prompts", "a sks dress, runway & studio",
                 "--subject-token", "ohwx"]


def test_the_command_that_continues_pastes_into_a_posix_shell():
    command = training.continue_command("exercise3b_train_lora.py", CONTINUE_ARGV, shell="posix")
    assert shlex.split(command) == ["python", "exercise3b_train_lora.py", *CONTINUE_ARGV, "--resume"]


@pytest.mark.parametrize("shell", ["cmd", "powershell"])
def test_the_command_that_continues_pastes_into_cmd_and_powershell(shell):
    """On Windows the command was quoted by subprocess.list2cmdline, which quotes only for spaces: a word such as
    'fabric&cloth;plain' came out bare, which cmd cuts at the & (a second command) and PowerShell at the ; and the &,
    and in PowerShell a $ inside double quotes is a variable. Each word but a plain one is in double quotes, read
    alike by cmd and PowerShell (a folder's closing backslash doubled, for the C runtime's rules); where a word holds
    $, ` or " (PowerShell's own inside double quotes), PowerShell gets the same line after its stop-parsing token."""
    argv = CONTINUE_ARGV + ["--class-prompt", "fabric&cloth;plain"]
    command = training.continue_command("exercise3b_train_lora.py", argv, shell=shell)
    assert command == ('python exercise3b_train_lora.py --model "C:\\Users\\Ana\\my sd\\\\" '
                       '--prompts "a sks dress, runway & studio" --subject-token ohwx '
                       '--class-prompt "fabric&cloth;plain" --resume')
    command = training.continue_command("exercise3b_train_lora.py", ["--prompts", 'a "sks" dress for $5'], shell)
    assert command == ("python --% " if shell == "powershell" else "python ") + \
        'exercise3b_train_lora.py --prompts "a \\"sks\\" dress for $5" --resume'


def test_no_prior_preservation_trains_on_instances_only(workdir):
    result = exercise3b_train_lora.train(
        FAST + ["--max-train-steps", "2", "--no-prior-preservation", "--sample-every", "100"])
    assert not (workdir / "class_images").exists()
    assert result.history["prior"] == [0.0, 0.0]


def test_subject_token_is_trained_and_recorded_in_the_lora_file(workdir):
    result = exercise3b_train_lora.train(
        FAST + ["--max-train-steps", "1", "--no-prior-preservation", "--sample-every", "100",
                "--subject-token", "ohwx"])
    settings = lora.read_settings(result.lora_file)
    assert settings["SUBJECT_TOKEN"] == "ohwx" and settings["INSTANCE_PROMPT"] == "a ohwx african fabric pattern"
    assert settings["SAMPLE_PROMPTS"][1] == "a beautiful dress made of ohwx african fabric pattern, fashion photography"
    assert result.sample_prompts[0] == "a ohwx african fabric pattern"  # what the progress grids drew


def test_loss_falls_when_overfitting_a_fixed_batch(tiny_pipe):
    """The pieces 3b trains with (LoRA layers, AdamW, the DreamBooth loss) can fit a fixed batch."""
    unet = tiny_pipe.unet
    unet.requires_grad_(False)
    lora.add_lora(unet, rank=4, alpha=4)
    optimizer = training.make_optimizer([p for p in unet.parameters() if p.requires_grad], 1e-2)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    timesteps, text = torch.tensor([100, 300, 500, 700]), torch.randn(4, 77, 32, generator=g)
    losses = []
    for _ in range(50):
        pred = unet(latents + noise, timesteps, text).sample
        loss, _, _ = prior.prior_preservation_loss(pred, noise, 2, 1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_nan_loss_stops_without_touching_checkpoints(workdir, monkeypatch, fault_hooks):
    """Step 5's loss made NaN (tests/fault_hooks.py) stops the run; the step-3 checkpoint stays as it was."""
    from common.errors import LessonError

    script = exercise3b_train_lora
    script.train(FAST + ["--max-train-steps", "3", "--sample-every", "100"])
    good = workdir / "models/fabric_lora/checkpoints/checkpoint-000003/pytorch_lora_weights.safetensors"
    before = good.read_bytes()
    monkeypatch.setenv(fault_hooks.NAN_AT_STEP_ENV, "5")
    with pytest.raises(LessonError, match="loss became nan at step 5"):
        script.train(FAST + ["--max-train-steps", "8", "--sample-every", "100", "--resume"])
    assert good.read_bytes() == before
    assert [p.name for p in training.checkpoint_dirs(good.parents[1])] == ["checkpoint-000003"]


def test_gradient_accumulation_logs_the_mean_of_the_micro_batch_losses(workdir, monkeypatch):
    """Each step logs its micro-batches' mean loss (total, instance, prior), not the last micro-batch's."""
    script = exercise3b_train_lora
    seen = []  # (total, instance, prior) of every micro-batch, in order

    def recorded(*args, **kwargs):
        losses = original(*args, **kwargs)
        seen.append([x.item() for x in losses])
        return losses

    original = prior.prior_preservation_loss
    monkeypatch.setattr(prior, "prior_preservation_loss", recorded)
    result = script.train(FAST + ["--max-train-steps", "2", "--gradient-accumulation", "2", "--sample-every", "100",
                                 "--checkpoint-every", "2"])
    seen = seen[-4:]  # 2 steps x 2 micro-batches (on a Linux CPU, the memory check's forward passes came first)
    assert seen[0] != seen[1] and seen[2] != seen[3]  # (so the last one alone would not pass)
    for i, name in enumerate(["total", "instance", "prior"]):
        means = [(seen[0][i] + seen[1][i]) / 2, (seen[2][i] + seen[3][i]) / 2]
        assert result.history[name] == pytest.approx(means, rel=1e-6, abs=1e-9), name
    saved = json.loads((workdir / "models/fabric_lora/checkpoints/checkpoint-000002/train_state.json").read_text())
    assert saved["history"]["total"] == pytest.approx(result.history["total"], rel=1e-6)


def test_only_noise_or_velocity_predicting_models_are_trained(workdir, tiny_pipe):
    """The loss's target follows the scheduler's prediction_type; any other kind is refused, before the
    class images are drawn."""
    from diffusers import DDPMScheduler

    from common.errors import LessonError

    def scheduler(kind):
        return DDPMScheduler.from_config({**tiny_pipe.scheduler.config, "prediction_type": kind})

    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 900])
    assert training.diffusion_target(scheduler("epsilon"), latents, noise, timesteps) is noise
    alpha_bar = scheduler("v_prediction").alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(training.diffusion_target(scheduler("v_prediction"), latents, noise, timesteps),
                               alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents)  # v = a*eps - s*x0
    refused = r"This model predicts 'sample', which the lesson's loss does not handle \(epsilon or v_prediction\)"
    with pytest.raises(LessonError, match=refused):
        training.diffusion_target(scheduler("sample"), latents, noise, timesteps)

    shutil.copytree(workdir / "models/tiny-sd", workdir / "models/sample-sd")
    config = workdir / "models/sample-sd/scheduler/scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
    with pytest.raises(LessonError, match=refused):
        exercise3b_train_lora.train(FAST + ["--model", "models/sample-sd", "--max-train-steps", "1"])
    assert not (workdir / "class_images").exists()


def _run(args, cwd):
    """The script as a student runs it: a separate process, output read as it comes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(workdir):
    args = [str(ROOT / "exercise3b_train_lora.py")] + FAST + ["--max-train-steps", "100000", "--sample-every",
                                                              "100000", "--checkpoint-every", "100000"]
    proc = _run(args, workdir)
    seen = ""
    for line in proc.stdout:  # until the progress bar appears: the loop (and its Ctrl-C guard) is running
        seen += line  # (text mode reads tqdm's "\r" as a line end)
        if line.startswith("Training:"):
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, seen + out
    assert "Traceback" not in out
    assert "python exercise3b_train_lora.py --model tiny --num-class-images 4" in out  # the options used ...
    assert "--max-train-steps 100000 --sample-every 100000 --checkpoint-every 100000 --resume" in out  # ... kept
    saved = training.checkpoint_dirs(workdir / "models/fabric_lora/checkpoints")
    assert len(saved) == 1
    step = int(saved[0].name.split("-")[1])
    assert 0 < step < 100000
    [live_log] = (workdir / "outputs/runs").iterdir()  # LOG_WITH: every step up to the stop, closed whole
    assert [e.step for e in read_tensorboard_run(live_log).Scalars("total")] == list(range(1, step + 1))
    result = exercise3b_train_lora.train(FAST + ["--max-train-steps", str(step + 2),
                                                                  "--sample-every", "100000", "--resume"])
    assert len(result.history["total"]) == step + 2


def test_two_processes_share_class_images(workdir):
    """`accelerate launch`/torchrun on two CPU processes (gloo): class images are shared out, one writer."""
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "exercise3b_train_lora.py")] + FAST + [
        "--max-train-steps", "2", "--num-class-images", "6"]
    proc = _run(args, workdir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert len(list((workdir / "class_images").glob("class_*.png"))) == 6
    assert out.count("Files written:") == 1  # only the main process talks
    assert (workdir / "models/fabric_lora/pytorch_lora_weights.safetensors").is_file()


def _read_until(proc, text):
    """What ``proc`` printed up to the line holding ``text`` (or to its end, if it never prints it)."""
    seen = ""
    for line in proc.stdout:
        seen += line
        if text in line:
            break
    return seen


def test_two_runs_sharing_a_class_folder_take_turns(workdir):
    """Two runs with different CLASS_PROMPTs, one CLASS_DATA_DIR (their own LORA_DIR and OUTPUT_DIR): the second
    waits while the first draws (it would otherwise set the first's images aside under it), then, once the first
    lets go (here: Ctrl-C), sets the first's images aside whole and draws its own."""
    script = str(ROOT / "exercise3b_train_lora.py")
    first = _run([script] + FAST + ["--class-prompt", "a woven cloth", "--num-class-images", "10000",
                                    "--num-inference-steps", "100", "--sample-batch-size", "1"], workdir)  # (for hours)
    second = None
    try:
        seen = _read_until(first, "Generating 10000 class images")
        while not (workdir / "class_images/manifest.json").is_file():  # its first batch, saved
            assert first.poll() is None, seen
            time.sleep(0.1)
        second = _run([script] + FAST + ["--max-train-steps", "1", "--lora-dir", "models/other",
                                         "--output-dir", "other_outputs"], workdir)
        said = _read_until(second, "waiting until it is done with them")
        assert "Another run is drawing or reading the class images in 'class_images/'" in said, said
        assert first.poll() is None and not (workdir / "class_images/replaced-1").exists()  # untouched meanwhile
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130
        out, _ = second.communicate(timeout=300)
        assert second.returncode == 0, said + out
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert "were not made for this run (they were made with prompt='a woven cloth'," in out
    aside = json.loads((workdir / "class_images/replaced-1/manifest.json").read_text())
    assert aside["recipe"]["prompt"] == "a woven cloth"
    assert all((workdir / "class_images/replaced-1" / name).is_file() for name in aside["files"])
    mine = json.loads((workdir / "class_images/manifest.json").read_text())
    assert mine["recipe"]["prompt"] == "a fabric pattern" and mine["files"] == [f"class_{i:05d}.png" for i in range(4)]


# --------------------------------------------------------------------------- CROP_FRACTION (the pocket model's crops)
@pytest.mark.parametrize("value, says", [("0", "must be a number >= 0.1"), ("1.5", "must be a number >= 0.1 and <= 1"),
                                         ("abc", "must be a number"), ("-0.5", "must be a number >= 0.1"),
                                         ("0.01", "must be a number >= 0.1")])
@pytest.mark.parametrize("script", [exercise3b_train_lora, exercise3a_train_textual_inversion])
def test_crop_fraction_is_refused_by_name_before_loading(script, value, says, workdir):
    from common import lesson
    from common.errors import LessonError

    with pytest.raises(LessonError, match=rf"^CROP_FRACTION {says}, got .*--crop-fraction"):
        script.validate(lesson.configure(vars(script), ["--model", "tiny", "--crop-fraction", value]))
    for accepted, read in (("0.4", 0.4), ("1", 1.0), ("none", None)):
        cfg = lesson.configure(vars(script), ["--model", "tiny", "--crop-fraction", accepted])
        script.validate(cfg)
        assert cfg.CROP_FRACTION == read
    assert "CROP_FRACTION" in script.FIXED_ON_RESUME


def test_the_pocket_model_trains_on_the_crops_its_card_asks_for(workdir, capsys):
    from common.errors import LessonError
    from conftest import fake_pocket

    fake_pocket(workdir, {"crop_fraction": 0.5})  # the tiny model, with a pocket card
    args = FAST + ["--model", "pocket", "--max-train-steps", "1", "--no-prior-preservation", "--sample-every", "100",
                   "--checkpoint-every", "1"]
    exercise3b_train_lora.train(args)
    said = capsys.readouterr().out
    assert re.search(r"CROP_FRACTION\s+= None", said)  # the run summary shows it
    assert "10 instance images -> 40 crops of 50% of each picture's side" in said
    exercise3b_train_lora.train(args + ["--crop-fraction", "1", "--lora-dir", "models/whole"])  # SD v1.5's way
    assert "  10 instance images\n" in capsys.readouterr().out
    with pytest.raises(LessonError, match=r"cannot change mid-run: CROP_FRACTION 0.5 -> 0.25"):  # (None: the card's)
        exercise3b_train_lora.train(args + ["--crop-fraction", "0.25", "--max-train-steps", "2", "--resume"])
    exercise3b_train_lora.train(args + ["--crop-fraction", "0.5", "--max-train-steps", "2", "--resume"])  # the same
    assert "at step 1." in capsys.readouterr().out


TI_FAST = FAST[:2] + FAST[4:] + ["--lora-dir", "models/no_lora_here"]  # (3a draws no class images)


@pytest.mark.parametrize("script, fast", [(exercise3b_train_lora, FAST), (exercise3a_train_textual_inversion, TI_FAST)])
def test_mixed_precision_trains_and_draws_its_progress_grids(script, fast, workdir):
    """MIXED_PRECISION as a GPU student gets it (fp16, automatically): the frozen models in half precision,
    accelerate's autocast around the trained one, whose answers come back in fp32. On the CPU bf16 takes the
    same path. The progress grids are drawn mid-training, where fp32 latents once met the half-precision VAE
    ('Input type (float) and bias type (c10::BFloat16) should be the same'). Both runs in one process, as in
    a notebook: accelerate keeps one precision per process unless told to forget it."""
    args = fast + ["--max-train-steps", "2", "--sample-every", "2", "--checkpoint-every", "2"]
    full = script.train(args + ["--mixed-precision", "no", "--output-dir", "outputs/fp32"])
    half = script.train(args + ["--mixed-precision", "bf16", "--output-dir", "outputs/bf16"])
    assert not half.stopped and all(len(losses) == 2 for losses in half.history.values())
    for step in (0, 2):
        assert len(list((workdir / "outputs/bf16").glob(f"training_progress_*/step_{step:05d}.png"))) == 1
    for a, b in zip(full.samples, half.samples):  # the same pictures, to half precision's rounding
        a, b = (np.asarray(x, dtype=np.float32) for x in (a, b))
        assert np.abs(a - b).mean() < 12, np.abs(a - b).mean()


@pytest.mark.parametrize("script, fast, folder", [(exercise3b_train_lora, FAST, "--lora-dir"),
                                                  (exercise3a_train_textual_inversion, TI_FAST, "--embedding-dir")])
def test_gradient_checkpointing_trains_the_same_weights(script, fast, folder, workdir, monkeypatch):
    """GRADIENT_CHECKPOINTING, the README's first advice on an 8 GB GPU: the UNet recomputes its activations in
    the backward pass (diffusers' checkpointing, seen here calling torch's) and the trained weights come out as
    without it, the LoRA's through a frozen UNet and the new word's through the UNet and text encoder."""
    from safetensors.torch import load_file
    import torch.utils.checkpoint

    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = fast + ["--max-train-steps", "2", "--sample-every", "100"]
    plain = script.train(args + [folder, "models/plain", "--output-dir", "outputs/plain"])
    assert not calls
    saved = script.train(args + [folder, "models/saved", "--output-dir", "outputs/saved", "--gradient-checkpointing"])
    assert calls  # the UNet's blocks ran through it
    plain, saved = (load_file(getattr(r, "lora_file", None) or r.embedding_file) for r in (plain, saved))
    assert plain.keys() == saved.keys()
    for key in plain:
        assert torch.allclose(plain[key], saved[key], atol=1e-6), key
    assert any(plain[key].abs().max() > 0 for key in plain)


def test_ctrl_break_asks_the_loop_to_stop_as_ctrl_c_does(monkeypatch, capsys):
    """On Windows the notebook's stop button reaches a script as Ctrl-Break (SIGBREAK): it was not handled, so
    the script died there without its checkpoint. Here a signal Linux ignores by default stands in for it."""
    from common import training

    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGWINCH, raising=False)
    with training.StopRequest() as stop:
        signal.raise_signal(signal.SIGWINCH)  # (to this thread: its handler has run when this returns)
        assert stop.requested
    assert "finishing this step and saving a checkpoint" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGWINCH) == signal.SIG_DFL  # (put back as it was)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="no SIGTERM here")
def test_a_stop_signal_in_the_middle_of_a_print_still_says_it_is_stopping(tmp_path, monkeypatch):
    """A signal handler that prints while the main code is inside a print to the same stream gets Python's
    "RuntimeError: reentrant call inside <_io.BufferedWriter name='<stdout>'>": it ended the training with a
    traceback instead of a checkpoint. The message goes straight to the stream's file instead."""
    from common import training

    class Busy:  # stdout in the middle of another write
        def __init__(self, file):
            self.file = file

        def write(self, text):
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stdout>'>")

        def flush(self):
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stdout>'>")

        def fileno(self):
            return self.file.fileno()

    with open(tmp_path / "stdout.txt", "w+b") as file:
        monkeypatch.setattr(sys, "stdout", Busy(file))
        with training.StopRequest() as stop:
            signal.raise_signal(signal.SIGTERM)  # (to this thread: its handler has run when this returns)
            assert stop.requested
        monkeypatch.undo()
    assert "SIGTERM" in (said := (tmp_path / "stdout.txt").read_text()) and "saving a checkpoint" in said, said
