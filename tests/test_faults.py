"""Faults and bad input (issue 6): every failure a student can cause ends in one clear line, and nothing is lost.

Every script runs as a student runs it: ``python <script> <args>`` in a project folder, in a process of its
own (``tests/student.py``: forked from a Python that has imported torch and diffusers once, so that ~100
runs take seconds; ``FAULTS_COLD=1`` makes every run a fresh interpreter). Each failure case asserts

1. a non-zero exit code;
2. one line ``ERROR: <what is wrong> ... <what to do>``, the last line on stderr, with no traceback
   (and the traceback with ``--debug``);
3. every file that existed before is byte-for-byte intact, and nothing appeared outside ``outputs/``,
   ``models/`` and ``class_images/``.

Faults a student cannot cause on demand (a NaN loss, NaN weights, a power cut mid-save) are injected by
``tests/fault_hooks.py``, switched on by its environment variables and installed only in the runs that set
one; the lesson code holds no test switch (``test_the_lesson_code_holds_no_test_hook``).

Cases that need a trained LoRA or embedding copy one project trained once per session (``trained``).
Covered elsewhere, not repeated here: each image mode, EXIF, animated GIF, bad files, non-ASCII names and
the upscaling warning at the loader's level (test_images.py); 3b's NaN stop, Ctrl-C + resume, and resume ==
uninterrupted (test_train_lora.py); 3a's resume == uninterrupted within 1e-6 (test_textual_inversion.py);
3b's constants in-process (test_lesson.py); model sources (test_models.py); LoRA layouts (test_lora.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from common import configurator, lesson, lora, training
from common import textual_inversion as ti
from conftest import ROOT, SHARED_SEED, needs_shared
from fault_hooks import FREE_MEMORY_ENV, KILL_DURING_SAVE_ENV, NAN_AT_STEP_ENV
from student import Student

SCRIPTS = ["exercise3b_train_lora.py", "exercise3a_train_textual_inversion.py", "exercise1_generate.py",
           "exercise2_explore.py", "generate_dreambooth_morph.py"]
B, A, E1, E2, MORPH = SCRIPTS
SHORT = {B: "3b", A: "3a", E1: "1", E2: "2", MORPH: "morph"}
WRITABLE = ("outputs", "models", "class_images")

QUICK = ["--model", "tiny", "--num-inference-steps", "1"]
TRAIN = {  # a few steps, a checkpoint after each, no progress grids but the first and the last
    B: QUICK + ["--max-train-steps", "2", "--gradient-accumulation", "1", "--num-class-images", "2",
                "--checkpoint-every", "1", "--sample-every", "100", "--num-sample-seeds", "1"],
    A: QUICK + ["--max-train-steps", "2", "--gradient-accumulation", "1", "--checkpoint-every", "1",
                "--sample-every", "100", "--num-sample-seeds", "1"],
}
GENERATE = {
    E1: QUICK,
    E2: QUICK,
    MORPH: QUICK + ["--duration-seconds", "0.5", "--fps", "8", "--num-keyframes", "2", "--gif-size", "32"],
}
ARGS = {**TRAIN, **GENERATE}


# --------------------------------------------------------------------------- the project folder and its files
def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root``: relative path -> SHA-256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def stamps(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: relative path -> (inode, modification time): a file written again, even with the
    same bytes, gets new ones (saves are atomic: a new file renamed into place)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_writes_only_where_allowed(before: dict, after: dict) -> None:
    touched = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    outside = sorted(p for p in touched if p.split("/")[0] not in WRITABLE)
    assert not outside, f"written outside {WRITABLE}: {outside}"


def assert_nothing_lost(before: dict, after: dict) -> None:
    lost = sorted(p for p, digest in before.items() if after.get(p) != digest)
    assert not lost, f"files changed or removed: {lost}"
    assert_writes_only_where_allowed(before, after)


def assert_one_line_error(result, *patterns: str) -> str:
    """Non-zero exit, no traceback, and the last line on stderr is the only ``ERROR:`` line."""
    assert result.rc not in (0, None), str(result)
    assert "Traceback" not in result.err + result.out, str(result)
    lines = [line for line in result.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    assert len(errors) == 1 and lines[-1] == errors[0], str(result)
    line = errors[0].replace("\\", "/")  # (paths in the patterns are written the POSIX way)
    for pattern in patterns:
        assert re.search(pattern, line), f"{pattern!r} not in: {line}"
    return line


def warnings_in(result) -> list[str]:
    return [line.strip() for line in result.out.splitlines() if line.strip().startswith("Warning:")]


def odd_pictures(folder: Path) -> tuple[list[str], list[str]]:
    """Real photos come in every shape: write one of each into ``folder``. Returns (loadable, skipped) names."""
    size = (96, 96)
    Image.new("L", size, 128).save(folder / "grayscale.png")
    Image.new("RGBA", size, (200, 30, 30, 120)).save(folder / "transparent.png")
    Image.new("RGB", size, (30, 200, 30)).convert("P").save(folder / "palette.png")
    Image.new("CMYK", size, (0, 255, 255, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.linspace(0, 65535, 96 * 96).reshape(size).astype(np.uint16)).save(folder / "deep_16bit.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    Image.new("RGB", (128, 96), (20, 20, 200)).save(folder / "phone_rotated.jpg", exif=exif)
    frames = [Image.new("RGB", size, c) for c in [(250, 0, 0), (0, 250, 0)]]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:], duration=100)
    Image.new("RGB", size, (240, 200, 10)).save(folder / "tissu_àéü_布.jpg")
    loadable = ["grayscale.png", "transparent.png", "palette.png", "cmyk.jpg", "deep_16bit.png",
                "phone_rotated.jpg", "animated.gif", "animated.webp", "tissu_àéü_布.jpg"]
    full = sorted((ROOT / "training_images").glob("*.jpg"))[0].read_bytes()
    (folder / "cut_short.jpg").write_bytes(full[:len(full) // 3])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "letter.png").write_text("Dear teacher, this is not a picture.", encoding="utf-8")
    Image.new("RGB", (16, 16), (0, 0, 0)).save(folder / "icon_16px.png")
    (folder / "notes.txt").write_text("where I bought the fabric", encoding="utf-8")
    return loadable, ["cut_short.jpg", "empty.jpg", "letter.png", "icon_16px.png", "notes.txt"]


# --------------------------------------------------------------------------- session fixtures
@pytest.fixture(scope="session")
def student(tmp_path_factory):
    runner = Student(tmp_path_factory.mktemp("runs"))
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_dir, student):
    """One project trained once: 3b then 3a on the tiny model, with every odd kind of picture in
    training_images/. Tests copy it (``project``); they never change it."""
    root = tmp_path_factory.mktemp("trained") / "project"
    shutil.copytree(tiny_dir, root / "models" / "tiny-sd")
    shutil.copytree(ROOT / "training_images", root / "training_images")
    loadable, skipped = odd_pictures(root / "training_images")
    runs = {script: student.run(script, TRAIN[script], root) for script in (B, A)}
    for result in runs.values():
        assert result.rc == 0, str(result)
    return root, runs, loadable, skipped


@pytest.fixture
def project(trained, tmp_path) -> Path:
    """A copy of the trained project, for one test to change as it likes."""
    copy = tmp_path / "project"
    shutil.copytree(trained[0], copy)
    return copy


# ========================================================================== the failure table
@dataclass
class Case:
    id: str
    script: str
    args: list[str]
    match: str  # what is wrong (a regex the ERROR line must match)
    advice: str  # what to do (another)
    setup: Callable[[Path], None] | None = None
    env: dict = field(default_factory=dict)
    before_model: bool = False  # refused before any model loads ("[Step 1]" never printed)
    cold: bool = False  # a fresh interpreter: the case depends on the environment at import time


def _rm(*paths):
    def setup(root):
        for p in paths:
            shutil.rmtree(root / p) if (root / p).is_dir() else (root / p).unlink()
    return setup


def _empty_images(root):
    shutil.rmtree(root / "training_images")
    (root / "training_images").mkdir()


def _only_other_files(root):
    _empty_images(root)
    (root / "training_images/notes.txt").write_text("x")
    (root / "training_images/IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")


def _only_broken_pictures(root):
    folder = root / "training_images"
    keep = {"cut_short.jpg", "empty.jpg", "letter.png", "icon_16px.png", "notes.txt"}
    for p in folder.iterdir():
        if p.name not in keep:
            p.unlink()


def _truncate(path, size):
    def setup(root):
        data = (root / path).read_bytes()
        (root / path).write_bytes(data[:size] if size else b"\0" * 1000)
    return setup


def _foreign(folder, name):
    """A LoRA or embedding that another tool saved (no training settings in its header) where a training saves."""
    def setup(root):
        (root / folder).mkdir(parents=True)
        safetensors.torch.save_file({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(4, 32)},
                                    str(root / folder / name), metadata={"format": "pt"})
    return setup


def _write(path, content: bytes):
    def setup(root):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)
    return setup


def _remove(path):
    def setup(root):
        (root / path).unlink()
    return setup


def _tensors(path, tensors):
    def setup(root):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(tensors, str(root / path))
    return setup


def _sdxl_lora(path):
    # What an SDXL LoRA's cross-attention layers look like: they read 2048-wide text features.
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    return _tensors(path, {f"unet.{name}.lora.down.weight": torch.zeros(4, 2048),
                           f"unet.{name}.lora.up.weight": torch.zeros(32, 4)})


def _sdxl_model(path):
    """An SDXL diffusers folder (model_index.json: StableDiffusionXLPipeline), tiny and random, with the tiny model's
    tokenizer: what a student gets who downloads SDXL for the course."""
    def setup(root):
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(root / "models/tiny-sd/tokenizer"))
        text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              vocab_size=len(tokenizer), projection_dim=32)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=64,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
        vae = AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                            up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4)
        StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer, unet=unet,
                                  text_encoder_2=CLIPTextModelWithProjection(text), tokenizer_2=tokenizer,
                                  scheduler=EulerDiscreteScheduler()).save_pretrained(str(root / path))
    return setup


def _lora_folder_with_only_an_embedding(root):
    shutil.rmtree(root / "models/fabric_lora")
    (root / "models/fabric_lora").mkdir()
    shutil.copy(root / "models/fabric_textual_inversion/learned_embeds.safetensors", root / "models/fabric_lora")


def _two_embeddings(root):
    folder = root / "models/embeddings"
    folder.mkdir()
    shutil.copy(root / "models/fabric_textual_inversion/learned_embeds.safetensors", folder / "kente.safetensors")
    shutil.copy(root / "models/fabric_textual_inversion/learned_embeds.safetensors", folder / "wax.safetensors")


def _peft_without_config(root):
    folder = root / "models/course_lora"
    folder.mkdir()
    shutil.copy(root / "models/fabric_lora/pytorch_lora_weights.safetensors", folder / "adapter_model.safetensors")


def _peft_folder(config_text=None, rank=None):
    """models/course_lora/ in PEFT's layout (the course's), from the trained LoRA: its config as written, or PEFT's
    own with another rank than the weights'."""
    def setup(root):
        folder = root / "models/course_lora"
        folder.mkdir()
        weights = safetensors.torch.load_file(str(root / "models/fabric_lora/pytorch_lora_weights.safetensors"))
        safetensors.torch.save_file({f"base_model.model.{k.removeprefix('unet.')}": v for k, v in weights.items()},
                                    str(folder / "adapter_model.safetensors"))
        from peft import LoraConfig

        LoraConfig(r=rank or 4, lora_alpha=32, target_modules=list(lora.TARGET_MODULES)).save_pretrained(str(folder))
        if config_text is not None:
            (folder / "adapter_config.json").write_text(config_text, encoding="utf-8")
    return setup


def _edited(script, constant, value):
    """The script as a student edited it: ``CONSTANT = value`` at the top, saved into the project folder."""
    def setup(root):
        source = (ROOT / script).read_text(encoding="utf-8")
        edited, count = re.subn(rf"^{constant} = [^#\n]*", f"{constant} = {value}  ", source, count=1, flags=re.M)
        assert count == 1
        (root / script).write_text(edited, encoding="utf-8")
    return setup


# Each invalid constant, for every script that has it. (value, what the message says)
BAD_CONSTANTS = {
    "MAX_TRAIN_STEPS": ("0", r"must be a whole number >= 1, got 0"),
    "NUM_INFERENCE_STEPS": ("-5", r"must be a whole number >= 1, got -5"),
    "FAST_STEPS": ("0", r"must be a whole number >= 1, got 0"),
    "LORA_RANK": ("-4", r"must be a whole number >= 1, got -4"),
    "NUM_VECTORS": ("0", r"must be a whole number >= 1, got 0"),
    "RESOLUTION": ("500", r"must be a multiple of 8 .*got 500"),
    "CROP_FRACTION": ("1.5", r"must be a number >= 0.1 and <= 1, got 1.5"),
    "GUIDANCE_SCALE": ("-1", r"must be a number >= 0, got -1"),
    "FAST_GUIDANCE_SCALE": ("-0.5", r"must be a number >= 0, got -0.5"),
    "TRAIN_BATCH_SIZE": ("0", r"must be a whole number >= 1, got 0"),
    "BATCH_SIZE": ("0", r"must be a whole number >= 1, got 0"),
    "SAMPLE_BATCH_SIZE": ("0", r"must be a whole number >= 1, got 0"),
    "LEARNING_RATE": ("1e-4x", r"must be a number, got '1e-4x'"),
}
TOO_BIG = {  # (a batch that outgrows a Linux CPU's memory is stopped by the kernel without a word)
    "BATCH_SIZE": ("100000", r"must be a whole number between 1 and 64, got 100000"),
    "SAMPLE_BATCH_SIZE": ("100000", r"must be a whole number between 1 and 64, got 100000"),
}


def _constant_cases() -> list[Case]:
    cases = []
    for script in SCRIPTS:
        names = {name for name, _ in configurator.constants(str(ROOT / script))}
        for name, (value, says) in [*BAD_CONSTANTS.items(), *TOO_BIG.items()]:
            if name in names:
                cases.append(Case(f"{SHORT[script]}-{name}={value}", script,
                                  QUICK + [lesson.dashed(name), value], rf"^ERROR: {name} {says}",
                                  rf"(Edit it at the top of {script} or pass {lesson.dashed(name)}"
                                  r"|Fix the value and run again)", before_model=True))
    return cases


CASES = _constant_cases() + [
    # ---------------------------------------------------------------- constants edited in the file
    Case("3b-edited-LEARNING_RATE", B, QUICK, r"LEARNING_RATE must be a number, got 'fast'",
         rf"Edit it at the top of {B}", setup=_edited(B, "LEARNING_RATE", '"fast"'), before_model=True,
         env={"PYTHONPATH": str(ROOT)}),
    Case("3b-edited-LORA_RANK", B, QUICK, r"LORA_RANK must be a whole number >= 1, got 0",
         rf"Edit it at the top of {B}", setup=_edited(B, "LORA_RANK", "0"), before_model=True,
         env={"PYTHONPATH": str(ROOT)}),
    Case("morph-edited-RESOLUTION", MORPH, QUICK, r"RESOLUTION must be a multiple of 8 .*got 300",
         rf"Edit it at the top of {MORPH}", setup=_edited(MORPH, "RESOLUTION", "300"), before_model=True,
         env={"PYTHONPATH": str(ROOT)}),
    Case("2-GUIDANCE_SCALES", E2, QUICK + ["--guidance-scales", "1.5,-2"], r"GUIDANCE_SCALES must be a list of "
         r"1 to 100 numbers >= 0", r"--guidance-scales 1\.5,7\.5,12", before_model=True),
    Case("3b-mistyped-flag", B, QUICK + ["--max-trian-steps", "5"], r"unrecognized arguments: --max-trian-steps 5",
         r"Did you mean --max-train-steps .*--help' lists every option", before_model=True),
    Case("1-unknown-flag", E1, QUICK + ["--steps", "5"], r"unrecognized arguments: --steps",
         r"--help' lists every option", before_model=True),
    Case("3a-threads-zero", A, TRAIN[A] + ["--threads", "0"], r"--threads must be a whole number >= 1 \(the CPU "
         r"threads PyTorch computes with\), got '0'", r"Leave it out to use one per free core", before_model=True),
    Case("morph-threads-text", MORPH, GENERATE[MORPH] + ["--threads", "all"], r"--threads must be a whole number "
         r">= 1 .*got 'all'", r"Leave it out", before_model=True),
    Case("morph-DEVICE", MORPH, QUICK + ["--device", "tpu"], r"DEVICE must be 'auto', 'cuda', 'cuda:N', 'mps' or "
         r"'cpu', got 'tpu'", r"DEVICE must be"),
    # ---------------------------------------------------------------- training_images/
    Case("3b-no-training-images", B, TRAIN[B], r"TRAINING_IMAGES_DIR folder 'training_images' does not exist",
         r"put your training images in 'training_images/'", setup=_rm("training_images"), before_model=True),
    Case("3a-no-training-images", A, TRAIN[A], r"TRAINING_IMAGES_DIR folder 'training_images' does not exist",
         r"Run the script from the project folder", setup=_rm("training_images"), before_model=True),
    Case("3b-empty-training-images", B, TRAIN[B], r"'training_images/' is empty: no pictures",
         r"Add 5-20 pictures of your subject", setup=_empty_images, before_model=True),
    Case("3a-empty-training-images", A, TRAIN[A], r"'training_images/' is empty: no pictures",
         r"Add 5-20 pictures", setup=_empty_images, before_model=True),
    Case("3b-only-non-pictures", B, TRAIN[B], r"holds only 2 other file\(s\) \(IMG_0001\.HEIC, notes\.txt\): "
         r"no pictures", r"Convert iPhone \.heic photos to \.jpg", setup=_only_other_files, before_model=True),
    Case("3a-images-dir-is-a-file", A, TRAIN[A] + ["--training-images-dir", "models/fabric_lora/"
                                                   "pytorch_lora_weights.safetensors"],
         r"is a file, not a folder", r"put your training images in", before_model=True),
    Case("3b-only-broken-pictures", B, TRAIN[B], r"No usable training images in 'training_images/' \(4 picture "
         r"file\(s\) found, all unreadable or smaller than 32 px", r"Add 5-20 \.jpg/\.png pictures",
         setup=_only_broken_pictures),
    # ---------------------------------------------------------------- models
    Case("1-not-a-model-id", E1, ["--model", "sd15"], r"MODEL_ID 'sd15' is not a Hub id",
         r"The course uses 'stable-diffusion-v1-5/stable-diffusion-v1-5'"),
    Case("2-unknown-hub-id-offline", E2, ["--model", "someone/no-such-model"],
         r"MODEL_ID 'someone/no-such-model': the Hugging Face Hub cannot be reached", r"use MODEL_ID = 'pocket'"),
    Case("3a-missing-local-folder", A, TRAIN[A] + ["--model", "models/my-sd15"],
         r"MODEL_ID 'models/my-sd15' does not exist on this computer", r"Check the path"),
    Case("morph-missing-local-folder", MORPH, ["--model", "./downloads/sd15"],
         r"MODEL_ID './downloads/sd15' does not exist on this computer", r"or 'tiny'"),
    Case("3b-missing-checkpoint-file", B, TRAIN[B] + ["--model", "v1-5-pruned.safetensors"],
         r"MODEL_ID 'v1-5-pruned.safetensors' does not exist", r"Check the path"),
    Case("3b-folder-is-not-a-model", B, TRAIN[B] + ["--model", "models"], r"is not a diffusers model \(it has "
         r"no model_index.json\)", r"Point it at the folder that holds model_index.json"),
    Case("1-damaged-model-file", E1, ["--model", "models/sd15.safetensors"], r"Could not load MODEL_ID "
         r"'models/sd15.safetensors'", r"download it again", setup=_write("models/sd15.safetensors", b"\0" * 4096)),
    Case("1-hub-unreachable", E1, [], r"Could not download the model for MODEL_ID 'stable-diffusion-v1-5/"
         r"stable-diffusion-v1-5': the Hugging Face Hub cannot be reached", r"use MODEL_ID = 'pocket'",
         env={"HF_HUB_OFFLINE": "1", "DREAMBOOTH_MODEL": ""}, cold=True),
    # ---------------------------------------------------------------- adapters
    Case("1-lora-for-sdxl", E1, QUICK + ["--lora-path", "models/sdxl_lora.safetensors"],
         r"'sdxl_lora.safetensors' was made for another base model: .* width 2048, this model's takes 32",
         r"Use a LoRA trained on this MODEL_ID", setup=_sdxl_lora("models/sdxl_lora.safetensors")),
    # a LoRA of another architecture (FLUX, in kohya's layout): the refusal ended in a question ('Is it a LoRA for
    # Stable Diffusion v1.x?') instead of what to do
    Case("2-flux-lora", E2, QUICK + ["--part", "a", "--lora-path", "models/flux_lora.safetensors"],
         r"'models/flux_lora.safetensors' could not be applied to this model \(Target modules .*double.blocks.0.img."
         r"attn.proj.* not found", r"Use a LoRA trained on this MODEL_ID \(for SD v1.5, an SD 1.5 LoRA; or your own, "
         r"with exercise3b_train_lora.py\)", setup=_tensors("models/flux_lora.safetensors", {
             "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(4, 3072),
             "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(3072, 4),
             "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(4.0)})),
    Case("2-embedding-for-sdxl", E2, QUICK + ["--part", "a", "--embedding-path", "models/sdxl.safetensors"],
         r"is an SDXL embedding \(vectors 768 and 1280 wide.*text encoder is 32 wide",
         r"Use an embedding made for this MODEL_ID",
         setup=_tensors("models/sdxl.safetensors", {"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)})),
    Case("morph-embedding-for-sd2", MORPH, GENERATE[MORPH] + ["--embedding-path", "models/sd2.safetensors"],
         r"holds 1024-wide vectors \(made for Stable Diffusion 2.x\).* 32 wide", r"use one made for this MODEL_ID",
         setup=_tensors("models/sd2.safetensors", {"<sd2>": torch.zeros(1, 1024)})),
    Case("1-lora-cut-short", E1, QUICK, r"'models/fabric_lora/pytorch_lora_weights.safetensors' is not a readable "
         r"\.safetensors file \(300 bytes\)", r"Download it again, or retrain with exercise3b_train_lora\.py",
         setup=_truncate("models/fabric_lora/pytorch_lora_weights.safetensors", 300), before_model=True),
    Case("morph-lora-garbage", MORPH, GENERATE[MORPH], r"is not a readable \.safetensors file \(1000 bytes\)",
         r"Download it again", setup=_truncate("models/fabric_lora/pytorch_lora_weights.safetensors", 0),
         before_model=True),
    Case("2-embedding-cut-short", E2, QUICK + ["--embedding-path", "models/fabric_textual_inversion"],
         r"learned_embeds.safetensors' is not a readable \.safetensors file",
         r"retrain with exercise3a_train_textual_inversion\.py",
         setup=_truncate("models/fabric_textual_inversion/learned_embeds.safetensors", 100), before_model=True),
    Case("1-empty-lora-folder", E1, QUICK, r"The folder 'models/fabric_lora' holds no LoRA weights",
         r"Train a LoRA with 'python exercise3b_train_lora.py', or point LORA_PATH at the right folder",
         setup=lambda root: (_rm("models/fabric_lora")(root), (root / "models/fabric_lora").mkdir()),
         before_model=True),
    Case("2-no-lora", E2, QUICK, r"No LoRA at 'models/fabric_lora' \(LORA_PATH\)",
         r"Train one first: 'python exercise3b_train_lora.py'.*USE_LORA = False", setup=_rm("models/fabric_lora"),
         before_model=True),
    Case("1-lora-folder-holds-an-embedding", E1, QUICK, r"holds no LoRA weights .*It holds only a Textual "
         r"Inversion embedding \(learned_embeds.safetensors\)", r"set EMBEDDING_PATH to it",
         setup=_lora_folder_with_only_an_embedding, before_model=True),
    Case("1-embedding-as-lora", E1, QUICK + ["--lora-path", "models/fabric_textual_inversion/"
                                                           "learned_embeds.safetensors"],
         r"is a Textual Inversion embedding, not a LoRA", r"Set EMBEDDING_PATH to it", before_model=True),
    Case("2-lora-as-embedding", E2, QUICK + ["--embedding-path", "models/fabric_lora"],
         r"holds no embedding files \(and the LoRA files fabric_lora_kohya.safetensors, "
         r"pytorch_lora_weights.safetensors, which belong in LORA_PATH\)",
         r"point EMBEDDING_PATH at the one embedding file", before_model=True),
    Case("morph-two-embeddings", MORPH, GENERATE[MORPH] + ["--embedding-path", "models/embeddings"],
         r"holds 2 embedding files \(kente.safetensors, wax.safetensors\)", r"point EMBEDDING_PATH at the one",
         setup=_two_embeddings, before_model=True),
    Case("1-empty-lora-file", E1, QUICK + ["--lora-path", "models/empty_lora.safetensors"],
         r"'models/empty_lora\.safetensors' holds no weights \(a \.safetensors file with no tensors in it\)",
         r"Get the LoRA again, or train your own", setup=_tensors("models/empty_lora.safetensors", {}),
         before_model=True),
    Case("1-peft-without-config", E1, QUICK + ["--lora-path", "models/course_lora"],
         r"adapter_model.safetensors' needs its 'adapter_config.json' beside it", r"Download both files",
         setup=_peft_without_config, before_model=True),
    # a PEFT folder whose config is cut short, or belongs to another LoRA: was "unexpected JSONDecodeError" /
    # "unexpected RuntimeError: Error(s) in loading state_dict", after the model had loaded
    Case("1-peft-config-damaged", E1, QUICK + ["--lora-path", "models/course_lora"],
         r"'models/course_lora/adapter_config.json' is not a readable PEFT config \(JSONDecodeError",
         r"Download both files of the LoRA again", setup=_peft_folder(config_text='{"r": 4, "lora_al'),
         before_model=True),
    Case("morph-peft-config-of-another-rank", MORPH, GENERATE[MORPH] + ["--lora-path", "models/course_lora"],
         r"adapter_config.json' says rank r = 8, but 'models/course_lora/adapter_model.safetensors' holds rank 4",
         r"the two files are not of one LoRA. Download both files of the LoRA again, together",
         setup=_peft_folder(rank=8), before_model=True),
    # an embedding whose word the model already knows, or that no prompt can hold: the advice was "Was it loaded
    # already? ... give it another word (token=...)", which no script can do; an empty word loaded, unusable
    Case("1-embedding-of-a-known-word", E1, QUICK + ["--embedding-path", "models/fabric.safetensors"],
         r"The embedding's token 'fabric' is already a word of this model's tokenizer",
         r"Use an embedding trained on a new word \(exercise 3a's PLACEHOLDER_TOKEN",
         setup=_tensors("models/fabric.safetensors", {"fabric": torch.randn(1, 32)})),
    Case("2-a1111-embedding-named-after-a-word", E2, QUICK + ["--part", "a", "--embedding-path",
                                                              "models/pattern.safetensors"],
         r"The embedding's token 'pattern' is already a word", r"Rename the file: AUTOMATIC1111's embeddings take "
         r"their word from the file's name \(e.g. 'my-pattern.safetensors'\)",
         setup=_tensors("models/pattern.safetensors", {"emb_params": torch.randn(1, 32)})),
    Case("morph-embedding-of-an-empty-word", MORPH, GENERATE[MORPH] + ["--embedding-path", "models/blank.safetensors"],
         r"'models/blank.safetensors' names its word '', which a prompt cannot hold as one word",
         r"Use an embedding whose word is one word", setup=_tensors("models/blank.safetensors", {"": torch.randn(1, 32)})),
    Case("2-fast-mode-offline", E2, QUICK + ["--part", "a", "--fast-mode"], r"FAST_MODE needs the LCM-LoRA "
         r"'latent-consistency/lcm-lora-sdv1-5' \(LCM_LORA_ID\)", r"hf download .*or run without FAST_MODE"),
    # a mistyped local folder for FAST_MODE's add-ons was found missing only once the base model had loaded
    Case("1-fast-mode-lcm-lora-typo", E1, QUICK + ["--fast-mode", "--lcm-lora-id", "models/lcm-lora-typo"],
         r"FAST_MODE needs the LCM-LoRA 'models/lcm-lora-typo' \(LCM_LORA_ID\), which does not exist on this "
         r"computer \(check the path: relative paths start from .*, where 'models/' is a folder\)",
         r"hf download latent-consistency/lcm-lora-sdv1-5 --local-dir models/lcm-lora-sdv1-5'\) and set LCM_LORA_ID "
         r"to that folder, or run without FAST_MODE", before_model=True),
    Case("morph-fast-mode-tiny-vae-typo", MORPH, GENERATE[MORPH] + ["--fast-mode", "--tiny-vae-id", "./my_taesd"],
         r"FAST_MODE needs the tiny autoencoder './my_taesd' \(TINY_VAE_ID\), which does not exist on this computer",
         r"hf download madebyollin/taesd --local-dir models/taesd'\) and set TINY_VAE_ID to that folder",
         before_model=True),
    # ---------------------------------------------------------------- resuming
    Case("3b-resume-damaged-checkpoint", B, TRAIN[B] + ["--resume", "--max-train-steps", "3"],
         r"--resume could not load the checkpoint 'models/fabric_lora/checkpoints/checkpoint-000002'",
         r"delete that folder to resume from the one before \('models/fabric_lora/checkpoints/checkpoint-000001'\)",
         setup=_write("models/fabric_lora/checkpoints/checkpoint-000002/optimizer.bin", b"garbage")),
    Case("3b-resume-other-rank", B, TRAIN[B] + ["--resume", "--max-train-steps", "3", "--lora-rank", "8"],
         r"cannot change mid-run: LORA_RANK 4 -> 8\.", r"Change them back to resume it", before_model=True),
    Case("3a-resume-other-num-vectors", A, TRAIN[A] + ["--resume", "--max-train-steps", "3", "--num-vectors", "2"],
         r"cannot change mid-run: NUM_VECTORS 1 -> 2\.", r"or run without --resume to start afresh",
         before_model=True),
    Case("3b-resume-past-max-train-steps", B, TRAIN[B] + ["--resume", "--max-train-steps", "1"],
         r"--resume: the run in 'models/fabric_lora/checkpoints/' has already trained 2 steps, more than "
         r"MAX_TRAIN_STEPS = 1\.",
         r"Pass --max-train-steps 2 or more to train it further", before_model=True),
    Case("3a-resume-past-max-train-steps", A, TRAIN[A] + ["--resume", "--max-train-steps", "1"],
         r"has already trained 2 steps, more than MAX_TRAIN_STEPS = 1\.", r"or run without --resume to start afresh",
         before_model=True),
    # ---------------------------------------------------------------- training faults
    Case("3b-nan-loss", B, TRAIN[B] + ["--resume", "--max-train-steps", "4"], r"The loss became nan at step 3",
         r"Lower LEARNING_RATE.*--resume", env={NAN_AT_STEP_ENV: "3"}),
    Case("3a-inf-loss", A, TRAIN[A] + ["--resume", "--max-train-steps", "4"], r"The loss became inf at step 3",
         r"Lower LEARNING_RATE.*--resume", env={NAN_AT_STEP_ENV: "3:inf"}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_failure_is_one_line_and_loses_nothing(case, student, project):
    if "TRAIN_BATCH_SIZE-64" in case.id and training.available_memory() is None:
        pytest.skip("the memory check runs on Linux (elsewhere an allocation that fails raises, and is explained)")
    if case.setup:
        case.setup(project)
    env = dict(case.env)
    if case.cold:
        env.setdefault("HF_HOME", str(project.parent / "empty_hf_home"))  # nothing cached, whatever this machine has
    script = str(project / case.script) if (project / case.script).is_file() else case.script
    before, written = snapshot(project), stamps(project)
    result = student.run(script, case.args, project, env=env, cold=case.cold)
    assert_one_line_error(result, case.match, case.advice)
    # A run that fails late has drawn its own progress grids first, over the earlier run's of the same steps; their
    # bytes may depend on the threads each run chose (by how busy the cores were), so a grid written again is its own
    after, grids = snapshot(project), [p for p, stamp in stamps(project).items()
                                       if p.startswith("outputs/training_progress_") and written.get(p) != stamp]
    assert_nothing_lost({p: d for p, d in before.items() if p not in grids}, after)
    if case.before_model:
        assert "[Step 1]" not in result.out, "refused only after loading the model"
    debug = student.run(script, case.args + ["--debug"], project, env=env, cold=case.cold)
    assert debug.rc == result.rc and "Traceback (most recent call last)" in debug.err, str(debug)
    assert [line for line in debug.err.splitlines() if line.strip()][-1].startswith("ERROR:")


def test_every_script_has_cases():
    for script in SCRIPTS:
        assert sum(c.script == script for c in CASES) >= 8, script


def test_the_lesson_code_holds_no_test_hook():
    """The faults these tests inject (a NaN loss or weights, a kill mid-save) come from tests/fault_hooks.py,
    which wraps lesson functions for the runs that ask for one: no lesson module or script reads a test switch."""
    sources = sorted((ROOT / "common").glob("*.py")) + [ROOT / script for script in SCRIPTS]
    assert len(sources) > len(SCRIPTS) + 10
    for path in sources:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            found = re.search(r"DREAMBOOTH_INJECT|DREAMBOOTH_KILL|(?<!de)fault", line, re.IGNORECASE)
            assert not found, f"{path.name}:{number}: {line.strip()}"


# ========================================================================== what works, with a warning
def test_odd_pictures_train_and_each_skipped_one_is_named(trained):
    root, runs, loadable, skipped = trained
    shipped = len(list((ROOT / "training_images").glob("*.jpg")))
    for script, count in ((B, "instance images"), (A, "training images")):
        result = runs[script]
        assert f"  {shipped + len(loadable)} {count}" in result.out, str(result)
        said = "\n".join(warnings_in(result))
        for name in skipped:
            assert name in said, name
        assert "'cut_short.jpg': the file is cut short" in said
        assert "'empty.jpg': the file is empty (0 bytes)" in said
        assert "'letter.png': its content is not a picture" in said
        assert "'icon_16px.png': 16x16 is too small" in said
        assert "ignoring 1 file(s) that are not" in said and "notes.txt" in said
        assert not any(name in said for name in loadable)


def test_long_instance_prompt_without_the_token_warns_and_shows_the_cut(student, project):
    prompt = "a fabric pattern" + " with red and blue stripes" * 20  # 3 + 100 tokens; no "sks"
    result = student.run(B, TRAIN[B] + ["--max-train-steps", "1", "--instance-prompt", prompt], project)
    assert result.rc == 0, str(result)
    said = warnings_in(result)
    assert any("does not contain SUBJECT_TOKEN 'sks'" in w for w in said), said
    cut = [w for w in said if "tokens long" in w]
    assert len(cut) == 1, said  # once, though the prompt is encoded for training and for nothing else
    assert re.search(r"is 103 tokens long, but CLIP reads only 75: it is cut after '\.\.\..*stripes with red', so "
                     r"the model never sees 'and blue stripes with red", cut[0]), cut[0]


def test_long_prompt_and_negative_prompt_warn_in_generation(student, project):
    prompt = "a sks african fabric pattern" + " with red and blue stripes" * 20  # 5 + 100 tokens
    negative = "blurry " * 80
    result = student.run(E2, QUICK + ["--part", "a", "--prompt", prompt, "--negative-prompt", negative], project)
    assert result.rc == 0, str(result)
    cut = [w for w in warnings_in(result) if "tokens long" in w]
    assert len(cut) == 2, cut
    assert re.search(r"is 105 tokens long, but CLIP reads only 75: it is cut after '\.\.\..*blue stripes', so the "
                     r"model never sees 'with red and blue stripes", cut[0]), cut[0]
    assert "is 80 tokens long" in cut[1] and "never sees 'blurry blurry blurry blurry blurry'" in cut[1]


def test_generation_warns_when_the_prompts_miss_the_word_the_lora_was_trained_on(student, project):
    """The project's LoRA was trained on 'sks' (its header says so). Before, exercise 1 with another SUBJECT_TOKEN
    drew every picture without the LoRA's word and said nothing, and exercise 2 checked the prompts of every part,
    so a part run alone whose prompts lacked the word passed unwarned."""
    result = student.run(E1, QUICK + ["--subject-token", "ohwx"], project)
    assert result.rc == 0, str(result)
    assert any(re.search(r"LoRA 'models/fabric_lora/pytorch_lora_weights.safetensors' was trained on the word 'sks' "
                         r".*SUBJECT_TOKEN here is 'ohwx' and no prompt contains 'sks'.*Set SUBJECT_TOKEN = 'sks' "
                         r"\(--subject-token sks\)", w) for w in warnings_in(result)), warnings_in(result)
    result = student.run(E1, QUICK + ["--subject-token", "ohwx", "--prompts", "a sks scarf"], project)
    assert result.rc == 0 and not any("was trained on the word" in w for w in warnings_in(result)), str(result)
    result = student.run(E2, QUICK + ["--part", "b", "--style-prompt", "{style} pattern"], project)
    assert result.rc == 0, str(result)
    assert "Warning: no prompt contains 'sks'" in result.out, str(result)


def test_mixed_folder_picks_the_lora_for_lora_path_and_the_embedding_for_embedding_path(student, project):
    mixed = project / "models/mixed"
    mixed.mkdir()
    shutil.copy(project / "models/fabric_lora/pytorch_lora_weights.safetensors", mixed / "fabric.safetensors")
    shutil.copy(project / "models/fabric_textual_inversion/learned_embeds.safetensors", mixed / "fabric_ti.safetensors")
    (mixed / ".fabric.safetensors.x1y2.safetensors").write_bytes(b"\0" * 10)  # a save that never finished
    before = snapshot(project)
    result = student.run(E1, QUICK + ["--no-compare-without-token", "--lora-path", "models/mixed", "--embedding-path",
                                      "models/mixed", "--prompts", "a sks <african-fabric> pattern"], project)
    assert result.rc == 0, str(result)
    assert "LoRA: models/mixed/fabric.safetensors (diffusers layout): 56 layers patched" in result.out
    assert "Embedding: models/mixed: token(s) <african-fabric>" in result.out
    assert_writes_only_where_allowed(before, snapshot(project))


@needs_shared
def test_course_64px_photos_train_with_an_upscaling_warning(student, project):
    result = student.run(B, TRAIN[B] + ["--training-images-dir", str(SHARED_SEED / "training_images_64px"),
                                        "--resolution", "128", "--no-prior-preservation", "--max-train-steps", "1"],
                         project)
    assert result.rc == 0, str(result)
    assert "  10 instance images" in result.out
    assert any("10 image(s) are smaller than 128x128 and were upscaled up to 2x" in w for w in warnings_in(result))


def test_huge_photo_is_downscaled_while_it_loads(tmp_path):
    """A 10000x10000 JPEG (300 MB as pixels) is decoded at 1/8 size: memory grows by megabytes, not 300 MB."""
    pytest.importorskip("resource")  # the child reads its peak memory with it (not on Windows)
    folder = tmp_path / "training_images"
    folder.mkdir()
    Image.new("RGB", (10000, 10000), (180, 60, 20)).save(folder / "huge.jpg", quality=80)
    from common import images

    assert images.open_image(folder / "huge.jpg", longest_needed=512).size == (1250, 1250)
    code = ("import resource, sys\nfrom common import images\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "out = images.load_instance_images(sys.argv[1], 512)\n"
            "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(before, after, len(out), out[0].size)\n")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    before, after, count, *_ = done.stdout.split()
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    assert int(count) == 1
    assert (int(after) - int(before)) * unit < 100 * 2**20, done.stdout


# ========================================================================== training faults
posix_signals = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals (SIGINT to a process, SIGKILL)")


@posix_signals
def test_ctrl_c_saves_3a_and_resume_equals_an_uninterrupted_run(student, project):
    shutil.rmtree(project / "models/fabric_textual_inversion")
    forever = ["--max-train-steps", "100000", "--checkpoint-every", "100000", "--sample-every", "100000",
               "--no-random-flip"]
    run = student.start(A, TRAIN[A] + forever, project)
    run.wait_for("Training:", stream="err")  # the loop (and its Ctrl-C guard) is running
    run.send_signal(signal.SIGINT)
    result = run.wait()
    assert result.rc == 130 and "Traceback" not in result.out + result.err, str(result)
    assert "--resume" in result.out
    saved = training.checkpoint_dirs(project / "models/fabric_textual_inversion/checkpoints-ti")
    assert len(saved) == 1
    step = int(saved[0].name.split("-")[1])
    assert 0 < step < 100000

    common = TRAIN[A] + ["--no-random-flip", "--sample-every", "100000", "--max-train-steps", str(step + 2)]
    resumed = student.run(A, common + ["--resume"], project)
    assert resumed.rc == 0 and f"at step {step}." in resumed.out, str(resumed)
    straight = student.run(A, common + ["--embedding-dir", "models/straight"], project)
    assert straight.rc == 0, str(straight)
    a = safetensors.torch.load_file(str(project / "models/fabric_textual_inversion/learned_embeds.safetensors"))
    b = safetensors.torch.load_file(str(project / "models/straight/learned_embeds.safetensors"))
    assert torch.allclose(a["<african-fabric>"], b["<african-fabric>"], atol=1e-6, rtol=0)


@posix_signals
def test_killed_while_saving_a_checkpoint_the_previous_one_loads_and_resume_works(student, project):
    from diffusers import StableDiffusionPipeline

    root = project / "models/fabric_lora/checkpoints"
    shutil.rmtree(root)
    final = project / "models/fabric_lora/pytorch_lora_weights.safetensors"
    kept = final.read_bytes()
    args = TRAIN[B] + ["--max-train-steps", "4", "--checkpoint-every", "2"]
    result = student.run(B, args, project, env={KILL_DURING_SAVE_ENV: "checkpoint-000004"})
    assert result.rc == -signal.SIGKILL, str(result)
    assert [p.name for p in training.checkpoint_dirs(root)] == ["checkpoint-000002"]
    assert (root / ".checkpoint-000004.partial").is_dir()  # it died half-way through the save
    assert final.read_bytes() == kept
    pipe = StableDiffusionPipeline.from_pretrained(str(project / "models/tiny-sd"))
    pipe.load_lora_weights(str(root / "checkpoint-000002"))  # plain diffusers reads the previous checkpoint
    assert len(lora.lora_layer_names(pipe.unet)) == 56

    resumed = student.run(B, args + ["--resume"], project)
    assert resumed.rc == 0, str(resumed)
    assert "Resumed from 'models/fabric_lora/checkpoints/checkpoint-000002' at step 2" in resumed.out
    assert [p.name for p in training.checkpoint_dirs(root)] == ["checkpoint-000002", "checkpoint-000004"]
    assert not list(root.glob(".checkpoint-*")) and not list(root.glob("previous-run-*"))


@posix_signals
def test_killed_before_a_checkpoint_is_renamed_3a_resumes_from_the_one_before(student, project):
    root = project / "models/fabric_textual_inversion/checkpoints-ti"
    shutil.rmtree(root)
    result = student.run(A, TRAIN[A], project, env={KILL_DURING_SAVE_ENV: "checkpoints-ti/checkpoint-000002"})
    assert result.rc == -signal.SIGKILL, str(result)
    assert [p.name for p in training.checkpoint_dirs(root)] == ["checkpoint-000001"]
    partial = root / ".checkpoint-000002.partial"
    assert (partial / ti.WEIGHT_NAME).is_file() and (partial / "optimizer.bin").is_file()  # all written, not renamed
    resumed = student.run(A, TRAIN[A] + ["--resume"], project)
    assert resumed.rc == 0 and "checkpoint-000001' at step 1" in resumed.out, str(resumed)
    assert [p.name for p in training.checkpoint_dirs(root)] == ["checkpoint-000001", "checkpoint-000002"]
    assert not list(root.glob(".checkpoint-*")) and not list(root.glob("previous-run-*"))


@posix_signals
def test_killed_while_writing_the_lora_the_old_one_stays_whole(student, project):
    from diffusers import StableDiffusionPipeline

    folder = project / "models/fabric_lora"
    kept = (folder / lora.WEIGHT_NAME).read_bytes()
    result = student.run(B, TRAIN[B], project, env={KILL_DURING_SAVE_ENV: "fabric_lora/pytorch_lora_weights"})
    assert result.rc == -signal.SIGKILL, str(result)
    assert "[Step 7]" in result.out  # it died while saving the LoRA
    assert (folder / lora.WEIGHT_NAME).read_bytes() == kept
    leftovers = list(folder.glob(f".{lora.WEIGHT_NAME}.*"))
    assert len(leftovers) == 1
    pipe = StableDiffusionPipeline.from_pretrained(str(project / "models/tiny-sd"))
    pipe.load_lora_weights(str(folder))  # the course's one line still loads the old LoRA
    assert len(lora.lora_layer_names(pipe.unet)) == 56
    again = student.run(B, TRAIN[B], project)
    assert again.rc == 0, str(again)
    assert not list(folder.glob(f".{lora.WEIGHT_NAME}.*"))  # the next save cleans up after the killed one


# ========================================================================== out of memory
def _oom():
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB (GPU 0; 7.79 GiB total "
                                       "capacity; 6.10 GiB already allocated)")


@pytest.mark.parametrize("script, tips", [
    (B, ["TRAIN_BATCH_SIZE = 1", "GRADIENT_CHECKPOINTING = True", "RESOLUTION", "USE_8BIT_ADAM = True"]),
    (A, ["TRAIN_BATCH_SIZE = 1", "GRADIENT_CHECKPOINTING = True", "RESOLUTION"]),
    (E1, ["BATCH_SIZE", "RESOLUTION", "FAST_MODE = True"]),
    (E2, ["BATCH_SIZE", "RESOLUTION", "FAST_MODE = True"]),
    (MORPH, ["BATCH_SIZE", "RESOLUTION", "FAST_MODE = True"]),
])
def test_out_of_memory_advice_names_what_the_script_can_change(script, tips):
    constants = {name for name, _ in configurator.constants(str(ROOT / script))}
    message = lesson.explain(_oom(), constants)
    assert message.startswith("The GPU ran out of memory. Try, one at a time:") and "\n" not in message
    for tip in tips:
        assert tip in message, tip
    for name, _ in lesson.OOM_TIPS:
        if re.search(rf"\b{name}\b", message):
            assert name in constants, f"{script} has no {name}"
    everything = lesson.explain(_oom())
    for tip in ["TRAIN_BATCH_SIZE", "GRADIENT_CHECKPOINTING", "RESOLUTION", "USE_8BIT_ADAM", "FAST_MODE"]:
        assert tip in everything
    assert lesson.explain(RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"), constants) == message
    assert lesson.explain(MemoryError(), constants).startswith("The computer (RAM) ran out of memory. Try")


def test_out_of_memory_ends_a_script_in_one_line_of_advice(student, project):
    (project / "oom_lesson.py").write_text(
        "import torch\nfrom common import lesson\n\n"
        "BATCH_SIZE = 4  # images at once\nFAST_MODE = False  # quick\n\n"
        "def main(argv=None):\n    lesson.configure(globals(), argv)\n"
        "    raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 1.50 GiB')\n\n"
        "if __name__ == '__main__':\n    lesson.run(main)\n", encoding="utf-8")
    result = student.run(str(project / "oom_lesson.py"), [], project, env={"PYTHONPATH": str(ROOT)})
    line = assert_one_line_error(result, r"^ERROR: The GPU ran out of memory", r"BATCH_SIZE", r"FAST_MODE = True")
    assert "GRADIENT_CHECKPOINTING" not in line and "USE_8BIT_ADAM" not in line  # this script has neither


def test_generation_halves_the_batch_when_memory_runs_out_and_explains_at_one(tiny_pipe, capsys):
    from common import sampling

    settings = sampling.SamplingSettings(num_inference_steps=2, guidance_scale=7.5, batch_size=4)
    prompts, seeds = ["a sks african fabric pattern"] * 4, [1, 2, 3, 4]
    reference, _ = sampling.generate(tiny_pipe, prompts, seeds, settings, progress=False)
    most = {"images": 2}  # more than this many images at once (x2 with guidance) "do not fit"

    def limit(module, args):
        if args[0].shape[0] > 2 * most["images"]:
            raise _oom()

    hook = tiny_pipe.unet.register_forward_pre_hook(limit)
    try:
        images, _ = sampling.generate(tiny_pipe, prompts, seeds, settings, progress=False)
        assert "Out of memory: generating 2 image(s) at a time from now on." in capsys.readouterr().out
        assert all(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
                   for a, b in zip(images, reference))  # each image keeps its own seed, whatever the batch
        most["images"] = 0  # not even one fits
        with pytest.raises(torch.cuda.OutOfMemoryError) as info:
            sampling.generate(tiny_pipe, prompts, seeds, settings, progress=False)
    finally:
        hook.remove()
    assert lesson.explain(info.value, {"BATCH_SIZE", "FAST_MODE"}).startswith("The GPU ran out of memory")


# ========================================================================== outputs
STUDENT_FILES = {"my_notes.txt": b"ideas for the next run", "outputs/my_favourite.png": b"\x89PNG not really",
                 "models/downloaded/README.txt": b"my other models", "class_images/README.txt": b"mine too",
                 "training_images/extra_notes.md": b"# fabric"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_second_run_overwrites_its_own_files_and_touches_nothing_else(script, student, project):
    for path, content in STUDENT_FILES.items():
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_bytes(content)
    start, start_stamps = snapshot(project), stamps(project)
    first = student.run(script, ARGS[script], project)
    assert first.rc == 0, str(first)
    middle, middle_stamps = snapshot(project), stamps(project)
    assert_writes_only_where_allowed(start, middle)
    second = student.run(script, ARGS[script], project)
    assert second.rc == 0, str(second)
    end = snapshot(project)
    # A fresh run moves the earlier run's checkpoints aside whole (checkpoints/previous-run-N/), never deletes them,
    # and a training logs into a run folder of its own (outputs/runs/<script>-<date>-<time>/, LOG_WITH).
    aside = {p for p in end.keys() - middle.keys() if re.search(r"/checkpoints(-ti)?/previous-run-\d+/", p)}
    live = {p for p in end.keys() - middle.keys() if p.startswith("outputs/runs/")}
    assert end.keys() - aside - live == middle.keys(), "the second run left other files than the first"
    assert all(end[p] == middle[re.sub(r"previous-run-\d+/", "", p)] for p in aside)
    assert bool(aside) == (script in TRAIN)
    assert len({p.split("/")[2] for p in live}) == (script in TRAIN)
    assert all(end[p] == d for p, d in middle.items() if p.startswith("outputs/runs/")), "the first run's log changed"
    # what the first run wrote, even where it wrote the same bytes again (a run as quick and on as many threads as
    # the one that trained the project writes the same LoRA and card; the second run may not)
    own = {p for p in middle if start.get(p) != middle[p] or start_stamps.get(p) != middle_stamps[p]}
    assert own, "the first run wrote nothing"
    others = {p: d for p, d in middle.items() if p not in own}
    assert all(end[p] == d for p, d in others.items()), [p for p, d in others.items() if end[p] != d]
    for path, content in STUDENT_FILES.items():
        assert (project / path).read_bytes() == content


# ===== inputs, folders and early checks (issue 11)
# Odd values for every kind of constant, output folders that cannot be written, class images that share a
# folder with the training pictures, broken built-in models, web addresses as MODEL_ID, NaN weights, and a
# console that cannot print accents. Refusals of constants come before "[Step 1]": no model is loaded for them.
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes into read-only folders anyway
FIRST_JPG = sorted((ROOT / "training_images").glob("*.jpg"))[0].name


def _symlink_to_training_images(root):
    (root / "my_class_images").symlink_to(root / "training_images", target_is_directory=True)


def _read_only_folder(root):
    (root / "locked").mkdir()
    (root / "locked").chmod(0o555)


def _non_finite_copy(source, target, key_index=0, value=float("nan")):
    """A copy of a trained file with one weight made NaN (or inf): what a diverged training run leaves."""
    def setup(root):
        with safetensors.safe_open(str(root / source), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        key = sorted(tensors)[key_index]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(tensors, str(root / target), metadata=metadata)
    return setup


def _pocket_copy_cut_short(root):
    shutil.copytree(ROOT / "models/pocket-sd", root / "models/pocket-sd")
    _truncate("models/pocket-sd/unet/diffusion_pytorch_model.safetensors", 5000)(root)


_NO_MODEL = ["--num-inference-steps", "1"]  # (QUICK without --model: MODEL_ID comes from elsewhere)
_FOLDER = r"Set {0} to a folder you can write to \(edit it at the top of {1} or pass {2}\)"
_OWN_CLASS_FOLDER = rf"Set CLASS_DATA_DIR to a folder of its own \(edit it at the top of {B} or pass --class-data-dir\)"

INPUT_CASES = [
    # ---------------------------------------------------------------- class images beside the training pictures
    Case("3b-class-dir-is-training-images", B, TRAIN[B] + ["--class-data-dir", "training_images"],
         r"CLASS_DATA_DIR 'training_images' is the same folder as TRAINING_IMAGES_DIR 'training_images'",
         _OWN_CLASS_FOLDER, before_model=True),
    Case("3b-class-dir-inside-training-images", B, TRAIN[B] + ["--class-data-dir", "training_images/class"],
         r"CLASS_DATA_DIR 'training_images/class' is inside TRAINING_IMAGES_DIR",
         _OWN_CLASS_FOLDER, before_model=True),
    Case("3b-class-dir-holds-training-images", B, TRAIN[B] + ["--class-data-dir", "."],
         r"CLASS_DATA_DIR '\.' contains TRAINING_IMAGES_DIR 'training_images'",
         _OWN_CLASS_FOLDER, before_model=True),
    Case("3b-class-dir-symlink-to-training-images", B, TRAIN[B] + ["--class-data-dir", "my_class_images"],
         r"CLASS_DATA_DIR 'my_class_images' is the same folder as TRAINING_IMAGES_DIR",
         _OWN_CLASS_FOLDER, setup=_symlink_to_training_images, before_model=True),
    # the class folder's pictures without a manifest are moved aside: was the student's outputs/*.png (exercise 1's
    # pictures, 3b's curves) moved to outputs/replaced-1/, "not made for this run"
    Case("3b-class-dir-is-output-dir", B, TRAIN[B] + ["--class-data-dir", "outputs/"],
         r"CLASS_DATA_DIR 'outputs/' is the same folder as OUTPUT_DIR 'outputs'", _OWN_CLASS_FOLDER,
         before_model=True),
    Case("3a-output-dir-is-training-images", A, TRAIN[A] + ["--output-dir", "./training_images/"],
         r"OUTPUT_DIR '\./training_images/' is the same folder as TRAINING_IMAGES_DIR 'training_images': what this "
         r"script writes there would be mixed with your pictures", r"pass --output-dir", before_model=True),
    Case("3b-lora-dir-is-training-images", B, TRAIN[B] + ["--lora-dir", "training_images"],
         r"LORA_DIR 'training_images' is the same folder as TRAINING_IMAGES_DIR",
         r"Set LORA_DIR to a folder of its own",
         before_model=True),
    # ---------------------------------------------------------------- output folders
    Case("1-output-dir-is-a-file", E1, QUICK + ["--output-dir", f"training_images/{FIRST_JPG}"],
         rf"OUTPUT_DIR 'training_images/{FIRST_JPG}' is a file, not a folder",
         _FOLDER.format("OUTPUT_DIR", E1, "--output-dir"), before_model=True),
    # generated pictures in the training pictures' folder (the generation scripts have no TRAINING_IMAGES_DIR): were
    # written there, and the next training took the grids, keyframes and the GIF's first frame for photos of the fabric
    Case("morph-output-dir-is-training-images", MORPH, GENERATE[MORPH] + ["--output-dir", "./training_images/"],
         r"OUTPUT_DIR '\./training_images/' is 'training_images/', the folder of your training pictures: exercises "
         r"3a and 3b would train on the pictures this script writes there",
         _FOLDER.format("OUTPUT_DIR", MORPH, "--output-dir").replace("to a folder you can write to", "to a folder of "
                                                                     "its own"), before_model=True),
    Case("3a-embedding-dir-under-a-file", A, TRAIN[A] + ["--embedding-dir", "my_notes.txt/embedding"],
         r"EMBEDDING_DIR 'my_notes.txt/embedding' cannot be created: 'my_notes.txt' is a file, not a folder",
         _FOLDER.format("EMBEDDING_DIR", A, "--embedding-dir"), setup=_write("my_notes.txt", b"ideas"),
         before_model=True),
    Case("3b-lora-dir-holds-a-downloaded-lora", B, TRAIN[B] + ["--lora-dir", "models/downloaded"],
         r"LORA_DIR 'models/downloaded' already holds 'pytorch_lora_weights.safetensors', which this course did not "
         r"train .*this run would replace it", rf"Set LORA_DIR to a folder of its own \(edit it at the top of {B} or "
         r"pass --lora-dir\), or move that file out of it", setup=_foreign("models/downloaded", lora.WEIGHT_NAME),
         before_model=True),
    Case("3a-embedding-dir-holds-someone-elses-embedding", A, TRAIN[A] + ["--embedding-dir", "models/classmate"],
         r"EMBEDDING_DIR 'models/classmate' already holds 'learned_embeds.safetensors', which this course did not",
         r"Set EMBEDDING_DIR to a folder of its own .*--embedding-dir\), or move that file out of it",
         setup=_foreign("models/classmate", ti.WEIGHT_NAME), before_model=True),
    Case("3b-lora-dir-is-a-file", B, TRAIN[B] + ["--lora-dir", "models/fabric_lora/pytorch_lora_weights.safetensors"],
         r"LORA_DIR '.*pytorch_lora_weights.safetensors' is a file, not a folder",
         _FOLDER.format("LORA_DIR", B, "--lora-dir"), before_model=True),
    Case("3b-class-dir-is-a-file", B, TRAIN[B] + ["--class-data-dir", "my_notes.txt"],
         r"CLASS_DATA_DIR 'my_notes.txt' is a file, not a folder",
         _FOLDER.format("CLASS_DATA_DIR", B, "--class-data-dir"),
         setup=_write("my_notes.txt", b"ideas"), before_model=True),
    (Case("2-output-dir-read-only", E2, QUICK + ["--output-dir", "my_notes.txt/out"],  # (root ignores chmod)
          r"OUTPUT_DIR 'my_notes.txt/out' cannot be created: 'my_notes.txt' is a file",
          _FOLDER.format("OUTPUT_DIR", E2, "--output-dir"), setup=_write("my_notes.txt", b"ideas"), before_model=True)
     if IS_ROOT else
     Case("2-output-dir-read-only", E2, QUICK + ["--output-dir", "locked/out"],
          r"OUTPUT_DIR 'locked/out' cannot be created: 'locked' is not writable \(permission denied\)",
          _FOLDER.format("OUTPUT_DIR", E2, "--output-dir"), setup=_read_only_folder, before_model=True)),
    # a file where a script makes a folder, a folder where it writes a file: was "unexpected FileExistsError" /
    # "unexpected IsADirectoryError"
    Case("1-output-subfolder-is-a-file", E1, QUICK, r"'outputs/exercise1_variations' is a file, but this script "
         r"makes a folder of that name there", r"Move or rename it .*set the constant that names its folder",
         setup=_write("outputs/exercise1_variations", b"my notes")),
    Case("morph-output-file-is-a-folder", MORPH, GENERATE[MORPH], r"'outputs/dreambooth_fabric_morph.gif' is a folder, "
         r"but this script writes a file of that name there", r"Move or rename it",
         setup=_write("outputs/dreambooth_fabric_morph.gif/mine.txt", b"my notes")),
    Case("morph-output-dir-empty", MORPH, GENERATE[MORPH] + ["--output-dir", ""],
         r"OUTPUT_DIR must be the name of a file or folder, got ''", r"pass --output-dir", before_model=True),
    # ------------------------------------------------------- absurd sizes and seeds; values that passed, then crashed
    *[Case(f"{SHORT[script]}-{name}={value}", script, ARGS[script] + [lesson.dashed(name), value], rf"{name} {says}",
           rf"pass {lesson.dashed(name)}", before_model=True) for script, name, value, says in [
        (E1, "RESOLUTION", "100000", r"must be a multiple of 8 between 8 and 2048 .*got 100000"),
        (B, "RESOLUTION", "4096", r"must be a multiple of 8 between"),
        (MORPH, "FPS", "1000", r"must be a number >= 0.01 and <= 100, got 1000"),
        # a frame longer than a GIF's delay can hold (655 s): was "unexpected OverflowError" once every frame was drawn
        (MORPH, "FPS", "0.001", r"must be a number >= 0.01, got 0.001"),
        (MORPH, "GIF_SIZE", "100000", r"must be a whole number between 16 and 4096, got 100000"),
        (A, "RANDOM_SEED", "-1", r"must be a whole number >= 0, got -1"),
        (E2, "RANDOM_SEED", str(2**63), rf"must be a whole number between 0 and 4294967295, got {2**63}"),
        (B, "NUM_INFERENCE_STEPS", "100000", r"must be a whole number between 1 and 500"),
        # SD v1.5's scheduler config made DPM-Solver++ start beyond its noise levels: 1000 steps ended in "unexpected
        # IndexError" while drawing the class images, 999 drew NaN pictures
        (B, "NUM_INFERENCE_STEPS", "1000", r"must be a whole number between 1 and 500, got 1000"),
        (B, "NUM_CLASS_IMAGES", "10000000", r"must be a whole number between 0 and 10000"),
        # micro-batches summed into one update: was "unexpected OverflowError" after the model had loaded (1e30), or an
        # update that never ends (10**11), and Ctrl-C waits for the update
        (B, "GRADIENT_ACCUMULATION", "1e30", r"must be a whole number between 1 and 256, got 1000000000000000019"),
        (A, "GRADIENT_ACCUMULATION", "100000000000", r"must be a whole number between 1 and 256, got 100000000000"),
        # pictures per micro-batch: only a Linux CPU's memory check (after the model had loaded) stopped 10**30; a GPU
        # or a Mac took it
        (B, "TRAIN_BATCH_SIZE", "1e30", r"must be a whole number between 1 and 64, got 1000000000000000019\d*\. .* "
         r"For a larger effective batch, raise GRADIENT_ACCUMULATION instead \(--gradient-accumulation N\)"),
        (A, "TRAIN_BATCH_SIZE", "1000000", r"must be a whole number between 1 and 64, got 1000000\. .* raise "
         r"GRADIENT_ACCUMULATION instead"),
        (A, "NUM_VECTORS", "500", r"must be a whole number between 1 and 64"),
        (E2, "NUM_SEEDS", "100000000000", r"must be a whole number between 1 and 100"),
        (B, "LEARNING_RATE", "1e300", r"must be a number > 0 and <= 1, got 1e\+300"),
        (E2, "GUIDANCE_SCALE", "1e300", r"must be a number >= 0 and <= 100, got 1e\+300"),
        (E1, "LORA_SCALE", "-1e-3", r"must be a number >= 0, got -0\.001"),
        (MORPH, "FPS", "1e300", r"must be a number >= 0.01 and <= 100, got 1e\+300"),
        (B, "NUM_SAMPLE_SEEDS", "0", r"must be a whole number >= 1, got 0"),
        (A, "NUM_SAMPLE_SEEDS", "0", r"must be a whole number >= 1, got 0"),
        (B, "SAMPLE_PROMPTS", "", r"must be a list of non-empty texts"),
        (A, "SAMPLE_PROMPTS", "|", r"must be a list of non-empty texts"),
        (MORPH, "NUM_KEYFRAMES", "101", r"must be a whole number between 2 and 100, got 101"),
    ]],
    # a list is a figure's tiles or rows: hundreds of them cannot be looked at, nor a row of them held in memory
    *[Case(f"{SHORT[script]}-{name}-too-long", script, ARGS[script] + [lesson.dashed(name), value], rf"{name} {says}",
           rf"pass {lesson.dashed(name)}", before_model=True) for script, name, value, says in [
        (E1, "PROMPTS", "|".join(["a {} vase"] * 101), r"must be a list of at most 100 texts .*got a list of 101\."),
        (E2, "STYLES", "|".join(["ukiyo-e"] * 5000), r"must be a list of at most 100 texts .*got a list of 5000\."),
        (E2, "GUIDANCE_SCALES", ",".join(["7.5"] * 101), r"must be a list of 1 to 100 numbers .*got a list of 101\."),
    ]],
    Case("morph-frames-huge", MORPH, GENERATE[MORPH] + ["--duration-seconds", "100000"],
         r"DURATION_SECONDS x FPS gives 8e\+05 frames, more than 3000", r"Lower DURATION_SECONDS", before_model=True),
    Case("morph-frames-overflow", MORPH, GENERATE[MORPH] + ["--duration-seconds", "1e300", "--fps", "50"],
         r"DURATION_SECONDS x FPS gives 5e\+301 frames", r"Lower DURATION_SECONDS", before_model=True),
    Case("2-GUIDANCE_SCALES-inf", E2, QUICK + ["--guidance-scales", "1.5,inf"],
         r"GUIDANCE_SCALES must be a list of 1 to 100 numbers >= 0 and <= 100", r"--guidance-scales 1\.5,7\.5,12",
         before_model=True),
    Case("2-GUIDANCE_SCALES-nan", E2, QUICK + ["--guidance-scales", "nan"],
         r"GUIDANCE_SCALES must be a list of 1 to 100 numbers >= 0 and <= 100", r"--guidance-scales 1\.5,7\.5,12",
         before_model=True),
    Case("1-edited-LORA_PATH-list", E1, QUICK, r"LORA_PATH must be the name of a file or folder \(or None\), got "
         r"\['models/fabric_lora'\]", rf"Edit it at the top of {E1}",
         setup=_edited(E1, "LORA_PATH", '["models/fabric_lora"]'),
         before_model=True, env={"PYTHONPATH": str(ROOT)}),
    Case("3a-edited-TRAINING_IMAGES_DIR-None", A, TRAIN[A], r"TRAINING_IMAGES_DIR must be the name of a file or "
         r"folder, got None", rf"Edit it at the top of {A}", setup=_edited(A, "TRAINING_IMAGES_DIR", "None"),
         before_model=True, env={"PYTHONPATH": str(ROOT)}),
    Case("morph-edited-DEVICE-number", MORPH, GENERATE[MORPH], r"DEVICE must be 'auto', 'cuda', 'cuda:N', 'mps' or "
         r"'cpu', got '0'", r"DEVICE = 'auto' picks", setup=_edited(MORPH, "DEVICE", "0"),
         env={"PYTHONPATH": str(ROOT)}),
    # ------------------------------------ 3a's word names a file too (its AUTOMATIC1111 copy, <word>.safetensors)
    # (was written two folders up, outside models/; or over the LoRA in a folder the two share)
    Case("3a-placeholder-climbs-out", A, TRAIN[A] + ["--placeholder-token", "<../../escaped>"],
         r"PLACEHOLDER_TOKEN '<\.\./\.\./escaped>' cannot name the AUTOMATIC1111 copy of the embedding.*it holds a "
         r"character a file name cannot", r"Use a word of letters, digits, '-' and '_', such as '<my-fabric>'",
         before_model=True),
    Case("3a-placeholder-names-the-lora", A, TRAIN[A] + ["--embedding-dir", "models/fabric_lora",
                                                         "--placeholder-token", "<pytorch_lora_weights>"],
         r"as 'pytorch_lora_weights.safetensors' .*the name of another file of the course, which it would overwrite",
         r"such as '<my-fabric>'", before_model=True),
    # ---------------------------------------------------------------- NaN or inf weights
    Case("1-lora-with-nan", E1, QUICK + ["--lora-path", "models/nan_lora/pytorch_lora_weights.safetensors"],
         r"'models/nan_lora/pytorch_lora_weights.safetensors' holds 1 value\(s\) that are NaN or inf "
         r".*the LoRA is broken",
         r"Retrain with a lower LEARNING_RATE \(exercise3b_train_lora\.py\)",
         setup=_non_finite_copy("models/fabric_lora/pytorch_lora_weights.safetensors",
                                "models/nan_lora/pytorch_lora_weights.safetensors")),
    Case("2-embedding-with-inf", E2, QUICK + ["--part", "a", "--embedding-path", "models/inf_ti.safetensors"],
         r"'models/inf_ti.safetensors' holds 1 value\(s\) that are NaN or inf .*the embedding is broken",
         r"Retrain with a lower LEARNING_RATE \(exercise3a_train_textual_inversion\.py\)",
         setup=_non_finite_copy("models/fabric_textual_inversion/learned_embeds.safetensors",
                                "models/inf_ti.safetensors", value=float("inf"))),
    # ---------------------------------------------------------------- the base model
    Case("1-tiny-model-cut-short", E1, QUICK, r"The built-in tiny model in 'models/tiny-sd/' is damaged",
         r"Delete the folder 'models/tiny-sd/' and run again",
         setup=_truncate("models/tiny-sd/unet/diffusion_pytorch_model.safetensors", 5000)),
    Case("3b-tiny-model-config-deleted", B, TRAIN[B], r"The built-in tiny model in 'models/tiny-sd/' is damaged",
         r"Delete the folder 'models/tiny-sd/'", setup=_rm("models/tiny-sd/unet/config.json")),
    Case("morph-pocket-model-cut-short", MORPH, GENERATE[MORPH] + ["--model", "pocket", "--no-use-lora"],
         r"The pocket model in 'models/pocket-sd/' is damaged", r"Restore it with 'git checkout -- models/pocket-sd'",
         setup=_pocket_copy_cut_short),
    Case("1-tiny-model-under-a-file", E1, QUICK + ["--no-use-lora"], r"MODEL_ID 'tiny' is built into "
         r"'models/tiny-sd/', which cannot be created: 'models' is a file, not a folder",
         r"Run the script from a project folder you can write to",
         setup=lambda root: (_rm("models")(root), _write("models", b"not a folder")(root)), before_model=True),
    Case("1-model-huggingface-url", E1, QUICK + ["--model", "https://huggingface.co/stable-diffusion-v1-5/"
                                                           "stable-diffusion-v1-5"],
         r"MODEL_ID 'https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5' is a web address",
         r"Use the Hub id instead: MODEL_ID = 'stable-diffusion-v1-5/stable-diffusion-v1-5'", before_model=True),
    Case("3b-model-civitai-url", B, TRAIN[B] + ["--model", "https://civitai.com/models/4201?modelVersionId=130072"],
         r"is a web address, and the scripts do not download from web pages \(civitai",
         r"Download the \.safetensors file in your browser.*set MODEL_ID to its path", before_model=True),
    Case("1-lora-as-model", E1, QUICK + ["--model", "models/fabric_lora/pytorch_lora_weights.safetensors"],
         r"MODEL_ID file 'models/fabric_lora/pytorch_lora_weights.safetensors' is a LoRA, not a base model",
         r"Set LORA_PATH to it, and MODEL_ID to the model it was trained on", before_model=True),
    Case("3a-embedding-as-model", A,
         TRAIN[A] + ["--model", "models/fabric_textual_inversion/learned_embeds.safetensors"],
         r"is a Textual Inversion embedding, not a base model", r"Set EMBEDDING_PATH to it", before_model=True),
    # a model's own weights where a model, a LoRA or an embedding goes: a file of a diffusers folder (its unet/) or a
    # whole checkpoint was called 'a Textual Inversion embedding' (every file without LoRA layers was one), with
    # advice to set EMBEDDING_PATH to it; as EMBEDDING_PATH it was read whole once the model had loaded
    Case("1-unet-file-as-model", E1, QUICK + ["--model", "models/tiny-sd/unet/diffusion_pytorch_model.safetensors"],
         r"MODEL_ID file 'models/tiny-sd/unet/diffusion_pytorch_model.safetensors' is only the unet of the diffusers "
         r"model in 'models/tiny-sd'", r"set MODEL_ID to that folder \(the one holding model_index.json\)",
         before_model=True),
    Case("morph-checkpoint-as-lora", MORPH, GENERATE[MORPH] + ["--lora-path", "models/v1-5-pruned.safetensors"],
         r"'models/v1-5-pruned.safetensors' is not a LoRA: it is a whole Stable Diffusion checkpoint \(a base "
         r"model\): set MODEL_ID to it", r"Set LORA_PATH to a LoRA file or its folder", before_model=True,
         setup=_tensors("models/v1-5-pruned.safetensors", {
             "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
             "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 8)})),
    Case("2-vae-file-as-embedding", E2, QUICK + ["--part", "a", "--embedding-path",
                                                 "models/tiny-sd/vae/diffusion_pytorch_model.safetensors"],
         r"is not a Textual Inversion embedding: it is only the vae of the diffusers model in 'models/tiny-sd'",
         r"Set EMBEDDING_PATH to an embedding \(exercise 3a writes learned_embeds.safetensors\), or None",
         before_model=True),
    # a diffusers folder of another kind of model: was 'unexpected TypeError' once it had loaded (with a LoRA, a
    # refusal that blamed the LoRA: 'made for another base model')
    Case("1-model-sdxl-folder", E1, QUICK + ["--model", "models/sdxl-base"], r"MODEL_ID folder 'models/sdxl-base' "
         r"holds a StableDiffusionXLPipeline model \(SDXL\), but the scripts run Stable Diffusion v1.x and 2.x",
         r"Use an SD v1.x model, such as MODEL_ID = 'stable-diffusion-v1-5/stable-diffusion-v1-5'",
         setup=_sdxl_model("models/sdxl-base"), before_model=True),
    # ... and SDXL in one file: offline, 'Could not download the configuration files' for it, once it had loaded
    Case("2-model-sdxl-single-file", E2, QUICK + ["--part", "a", "--model", "models/sdxl.safetensors"],
         r"MODEL_ID file 'models/sdxl.safetensors' is a checkpoint of SDXL, but the scripts run Stable Diffusion v1.x",
         r"Use an SD v1.x model, such as MODEL_ID = 'stable-diffusion-v1-5/stable-diffusion-v1-5'", before_model=True,
         setup=_tensors("models/sdxl.safetensors", {
             "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
             "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 8),
             "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": torch.zeros(8)})),
    Case("morph-DEVICE-cuda-x", MORPH, GENERATE[MORPH] + ["--device", "cuda:x"],
         r"DEVICE must be 'auto', 'cuda', 'cuda:N', 'mps' or 'cpu', got 'cuda:x'", r"DEVICE = 'auto' picks"),
    Case("2-model-from-environment", E2, _NO_MODEL, r"MODEL_ID 'models/sd15-download' does not exist on this computer",
         r"came from the environment variable DREAMBOOTH_MODEL: change it, or unset it",
         env={"DREAMBOOTH_MODEL": "models/sd15-download"}, before_model=True),
    # ---------------------------------------------------------------- more memory than the computer has
    # (on a Linux CPU the kernel would stop the process without a word: the need is measured before the first step;
    # here TRAIN_BATCH_SIZE's largest, 64, on a computer with 400 MB free)
    Case("3b-TRAIN_BATCH_SIZE-64-in-400MB", B, TRAIN[B] + ["--train-batch-size", "64"],
         r"TRAIN_BATCH_SIZE = 64 needs about [\d.]+ [MGT]B of memory for one training step .* this computer has "
         r"[\d.]+ [KMG]B free", r"Use TRAIN_BATCH_SIZE = \d+ or less \(--train-batch-size \d+\) and raise "
         r"GRADIENT_ACCUMULATION", env={FREE_MEMORY_ENV: "400000000"}),
    Case("3a-TRAIN_BATCH_SIZE-64-in-400MB", A, TRAIN[A] + ["--train-batch-size", "64"],
         r"TRAIN_BATCH_SIZE = 64 needs about", r"Use TRAIN_BATCH_SIZE = \d+ or less",
         env={FREE_MEMORY_ENV: "400000000"}),
    # ---------------------------------------------------------------- a console that cannot print accents
    Case("1-ascii-console-error", E1, QUICK + ["--model", "modèles/布.safetensors"],
         r"MODEL_ID 'mod/xe8les//u5e03.safetensors' does not exist", r"Check the path",
         env={"PYTHONIOENCODING": "ascii"}, cold=True, before_model=True),
]


@pytest.mark.parametrize("case", INPUT_CASES, ids=lambda c: c.id)
def test_odd_input_is_refused_in_one_line_and_loses_nothing(case, student, project):
    test_failure_is_one_line_and_loses_nothing(case, student, project)


def test_input_cases_cover_every_script():
    assert len(INPUT_CASES) >= 25 and len({c.id for c in INPUT_CASES}) == len(INPUT_CASES)
    for script in SCRIPTS:
        assert sum(c.script == script for c in INPUT_CASES) >= 4, script


def _torch_save_to_a_full_disk():
    return RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1046720 vs 1046616")


@pytest.mark.parametrize("exc, says", [
    (OSError(errno.ENOSPC, "No space left on device"), "The disk is full"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "The disk is full"),
    (safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                 '"No space left on device" })'), "The disk is full"),
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), "The disk is full"),
    (_torch_save_to_a_full_disk(), "The disk is full"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 107374182400 bytes. Error code 12 (Cannot allocate memory)"),
     "The computer (RAM) ran out"),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), "The computer (RAM) ran out"),
    (RuntimeError("value cannot be converted to type float without overflow"), "A number is too large"),
    (PermissionError(errno.EACCES, "Permission denied", "outputs/exercise1_output.png"),
     "No permission to use 'outputs/exercise1_output.png' (Permission denied)"),
    (OSError(errno.EROFS, "Read-only file system", "class_images/class_00000.png"),
     "No permission to use 'class_images/class_00000.png' (Read-only file system)"),
])
def test_library_texts_for_a_full_disk_memory_and_permissions_are_explained(exc, says):
    message = lesson.explain(exc, {"BATCH_SIZE", "RESOLUTION"})
    assert message is not None and message.startswith(says) and "\n" not in message, message
    if "RAM" in says:
        assert "BATCH_SIZE" in message and "close other programs" in message.lower()


def test_disk_full_during_a_save_ends_in_one_line(student, project):
    """A save that meets a full disk (here: safetensors' own error, raised where the LoRA file is written)."""
    (project / "full_disk.py").write_text(
        "import safetensors, torch\nfrom common import lesson\nfrom common.files import atomic_path\n\n"
        "OUTPUT_DIR = 'outputs'  # where\n\n"
        "def main(argv=None):\n    lesson.configure(globals(), argv)\n"
        "    with atomic_path('outputs/x.safetensors'):\n"
        "        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: "
        "StorageFull, message: \"No space left on device\" })')\n\n"
        "if __name__ == '__main__':\n    lesson.run(main)\n", encoding="utf-8")
    before = snapshot(project)
    result = student.run(str(project / "full_disk.py"), [], project, env={"PYTHONPATH": str(ROOT)})
    assert_one_line_error(result, r"^ERROR: The disk is full", r"Free some space")
    assert_nothing_lost(before, snapshot(project))
    assert not list((project / "outputs").glob(".x.safetensors*"))  # the half-written file is gone


def test_two_runs_saving_one_file_at_once_both_finish_and_a_killed_saves_copy_is_cleaned_up(tmp_path):
    """The same script twice at once (two terminals, or a notebook beside a terminal) saves the same files. The first
    save to finish deleted every ".name.*" beside its file as a killed save's leftover, the other run's unfinished
    copy too, and that run ended in 'unexpected FileNotFoundError'. Now a copy carries its process's PID."""
    from common.files import atomic_path, save_image

    target = tmp_path / "outputs/exercise1_output.png"
    target.parent.mkdir()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])  # a run killed mid-save: its process is gone
    ended.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # another run, still saving
    try:
        killed = target.parent / f".{target.name}.{ended.pid}-k1ll.png"
        theirs = target.parent / f".{target.name}.{running.pid}-s4ve.png"
        killed.write_bytes(b"half")
        theirs.write_bytes(b"half")
        with atomic_path(target) as mine:  # this run, in the middle of its own save, while an earlier one finishes
            mine.write_bytes(b"second")
            save_image(Image.new("RGB", (8, 8)), target)
            assert mine.is_file() and theirs.is_file() and not killed.exists()
        assert target.read_bytes() == b"second"
        assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, theirs.name])
    finally:
        running.kill()
        running.wait()
    save_image(Image.new("RGB", (8, 8)), target)  # once that run is gone, its copy is a leftover like any other
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_a_killed_saves_copy_is_cleaned_up_in_a_folder_whose_name_has_brackets(tmp_path):
    """The leftovers were found with the folder's path read as a pattern too: in 'Course [2026]' ('[2026]' matches
    one character) none was ever found, and every killed save's copy stayed beside the file."""
    from common.files import save_image

    ended = subprocess.Popen([sys.executable, "-c", "pass"])  # a run killed mid-save: its process is gone
    ended.wait()
    target = tmp_path / "Course [2026]" / "outputs" / "exercise1_output.png"
    target.parent.mkdir(parents=True)
    killed = target.parent / f".{target.name}.{ended.pid}-k1ll.png"
    killed.write_bytes(b"half")
    save_image(Image.new("RGB", (8, 8)), target)
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_a_save_waits_for_a_windows_scanner_that_holds_the_file_a_moment(tmp_path, monkeypatch):
    """On Windows an antivirus scan, the search indexer or OneDrive may hold a file just written open for a moment,
    and renaming it into place fails meanwhile with PermissionError: a save (a file, or a checkpoint folder) retries
    for up to 2 s instead of ending the run. Elsewhere such an error is not passing, and is raised at once."""
    from common import files

    real, calls = os.replace, []

    def held_twice(src, dst):  # the scanner lets go after two tries
        calls.append(dst)
        if len(calls) % 3:
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                      "process", str(src))
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", held_twice)
    monkeypatch.setattr(files, "_WINDOWS", True)
    monkeypatch.setattr(files, "_RETRY_DELAYS", (0.0,) * 6)
    target = tmp_path / "outputs/exercise1_output.png"
    files.save_image(Image.new("RGB", (8, 8)), target)
    assert target.is_file() and len(calls) == 3
    folder = tmp_path / "checkpoint-000001"
    for text in ("old", "new"):
        with files.atomic_dir(folder) as tmp:
            (tmp / "state.json").write_text(text, encoding="utf-8")
    assert (folder / "state.json").read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000001", "outputs"]
    monkeypatch.setattr(files, "_WINDOWS", False)
    with pytest.raises(PermissionError):
        files.save_json({}, tmp_path / "run.json")


def test_ascii_console_trains_on_accented_file_names_and_prompts(student, project):
    (project / "training_images" / "tissé_布_broken.jpg").write_bytes(b"")  # a warning names it
    prompt = "a sks tissu à motifs 布"
    result = student.run(B, TRAIN[B] + ["--no-prior-preservation", "--max-train-steps", "1", "--instance-prompt",
                                        prompt, "--sample-prompts", f"{prompt}|a fabric pattern"], project,
                         env={"PYTHONIOENCODING": "ascii"}, cold=True)
    assert result.rc == 0, str(result)
    assert "'tiss\\xe9_\\u5e03_broken.jpg': the file is empty" in result.out  # escaped, not fatal
    assert "a sks tissu \\xe0 motifs \\u5e03" in result.out


@pytest.mark.parametrize("script", [B, A])
def test_a_path_starting_with_a_tilde_is_in_the_home_folder(script, student, project):
    """TRAINING_IMAGES_DIR = "~/photos" in the script (or quoted on the command line) was looked for in the project
    ("does not exist"), and "~/loras" made a folder named '~' there: a path starting with '~' is the home folder's,
    as MODEL_ID's already was."""
    home = project.parent / "home"
    shutil.copytree(project / "training_images", home / "photos")
    folder = {B: "--lora-dir", A: "--embedding-dir"}[script]
    before = snapshot(project)
    args = ["--max-train-steps", "1", "--training-images-dir", "~/photos", folder, "~/trained", "--output-dir", "~/out"]
    args += ["--class-data-dir", "~/class"] if script == B else []
    result = student.run(script, TRAIN[script] + args, project, env={"HOME": str(home), "USERPROFILE": str(home)})
    assert result.rc == 0, str(result)
    assert not (project / "~").exists()
    assert (home / "trained" / (lora.WEIGHT_NAME if script == B else ti.WEIGHT_NAME)).is_file()
    assert (home / "out" / "training_progress_lora" if script == B else home / "out" / "training_progress_ti").is_dir()
    assert script == A or len(list((home / "class").glob("class_*.png"))) == 2
    assert_writes_only_where_allowed(before, snapshot(project))


def test_model_from_the_environment_is_named_in_the_summary(student, project):
    result = student.run(E1, _NO_MODEL + ["--no-compare-without-token"], project, env={"DREAMBOOTH_MODEL": "tiny"})
    assert result.rc == 0, str(result)
    assert re.search(r"^  MODEL_ID +?= 'tiny'  \(from DREAMBOOTH_MODEL\)$", result.out, re.M), result.out[:2000]
    flag = student.run(E1, QUICK + ["--no-compare-without-token"], project, env={"DREAMBOOTH_MODEL": "pocket"})
    assert flag.rc == 0 and "(from DREAMBOOTH_MODEL)" not in flag.out  # --model wins, and says nothing of it


def test_missing_and_damaged_class_images_are_drawn_again_from_their_seeds(student, project):
    folder = project / "class_images"
    names = sorted(p.name for p in folder.glob("class_*.png"))
    assert names == ["class_00000.png", "class_00001.png"]
    kept = {n: np.asarray(Image.open(folder / n).convert("RGB"), np.int16) for n in names}
    (folder / names[0]).unlink()
    (folder / names[1]).write_bytes((ROOT / "training_images" / FIRST_JPG).read_bytes()[:500])
    result = student.run(B, TRAIN[B] + ["--max-train-steps", "1"], project)
    assert result.rc == 0, str(result)
    assert ("Drawing again 2 class image(s) that are missing or damaged: class_00000.png (seed 0), "
            "class_00001.png (seed 1)") in result.out
    for n in names:  # the same seed draws the same picture again
        again = np.asarray(Image.open(folder / n).convert("RGB"), np.int16)
        assert again.shape == kept[n].shape and np.abs(again - kept[n]).max() <= 2, n
    reused = student.run(B, TRAIN[B] + ["--max-train-steps", "1"], project)
    assert reused.rc == 0 and "Reusing 2 class images" in reused.out, str(reused)


def test_non_finite_pictures_are_counted_in_a_warning(tiny_pipe, capsys):
    from common import sampling

    settings = sampling.SamplingSettings(num_inference_steps=2, guidance_scale=7.5, batch_size=2)
    prompts, seeds = ["a sks african fabric pattern"] * 3, [1, 2, 3]
    reference, _ = sampling.generate(tiny_pipe, prompts, seeds, settings, progress=False)
    assert "NaN" not in capsys.readouterr().out
    broken = {"calls": 0}

    def overflow(module, args, output):  # the first batch's two pictures overflow, as fp16 can (decoded one by one)
        broken["calls"] += 1
        return output * float("nan") if broken["calls"] <= 2 else output

    hook = tiny_pipe.vae.post_quant_conv.register_forward_hook(overflow)
    try:
        images, _ = sampling.generate(tiny_pipe, prompts, seeds, settings, progress=False)
    finally:
        hook.remove()
    said = [line for line in capsys.readouterr().out.splitlines() if "Warning:" in line]
    assert len(said) == 1 and "2 of 3 image(s) came out as NaN/inf" in said[0] and "--mixed-precision no" in said[0]
    assert all(np.asarray(im).max() == 0 for im in images[:2])  # black, and said so
    assert np.abs(np.asarray(images[2], np.int16) - np.asarray(reference[2], np.int16)).max() <= 1


# ========================================================================== checkpoints and resume (issue 11)
CKPT = {B: "models/fabric_lora/checkpoints", A: "models/fabric_textual_inversion/checkpoints-ti"}
RESUME = {script: TRAIN[script] + ["--resume", "--max-train-steps", "3"] for script in (B, A)}
FOREVER = ["--max-train-steps", "100000", "--checkpoint-every", "100000", "--sample-every", "100000"]
MARKER = "RAN_CODE.txt"  # what the pickles below create in the project folder if anything ever loads them
SAFETY = r"was refused for safety: it is a pickle that asks to run Python code \(io\.open\) when loaded"


class _RunsCode:
    """Pickled, this is a program that creates a file when loaded, as a malicious .bin could do worse."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _code_pickle(path, zipped=False):
    """``path`` becomes a pickle that would create MARKER: raw (``pickle``) or as ``torch.save`` writes it."""
    def setup(root):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        if zipped:
            torch.save({"state": _RunsCode(root / MARKER)}, root / path)
        else:
            (root / path).write_bytes(pickle.dumps(_RunsCode(root / MARKER)))
    return setup


def _old_layout(folder):
    """The checkpoints as the scripts wrote them before issue 11: the step in custom_checkpoint_0.pkl (here
    one that would run code), no run.json, no train_state.json."""
    def setup(root):
        (root / folder / "run.json").unlink()
        for checkpoint in training.checkpoint_dirs(root / folder):
            (checkpoint / "train_state.json").unlink()
            _code_pickle(checkpoint.relative_to(root) / "custom_checkpoint_0.pkl")(root)
    return setup


def _copy_checkpoints(source, target):
    def setup(root):
        shutil.rmtree(root / target)
        shutil.copytree(root / source, root / target)
    return setup


def _lock(folder, **holder):
    """``folder/training.lock`` as a training writes it; by default held by this (live) test process."""
    import psutil

    def setup(root):
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": psutil.Process().create_time(),
              "script": B, "since": "2026-12-01 09:00:00"}
        (root / folder / "training.lock").write_text(json.dumps({**me, **holder}), encoding="utf-8")
    return setup


def assert_nothing_lost_or_moved_aside(before: dict, after: dict) -> None:
    """As ``assert_nothing_lost``, except that a fresh run may move an earlier run's checkpoints, whole,
    into checkpoints/previous-run-N/."""
    for path, digest in before.items():
        if after.get(path) != digest:
            head, _, rest = path.partition("/checkpoints")
            folder, _, name = rest.partition("/")
            moved = [f"{head}/checkpoints{folder}/previous-run-{n}/{name}" for n in range(1, 10)]
            assert any(after.get(p) == digest for p in moved), f"changed or removed: {path}"
    assert_writes_only_where_allowed(before, after)


def _resume_command(result, script) -> list[str]:
    """The arguments of the command a stopped run printed to continue it."""
    lines = [line.strip() for line in result.out.splitlines() if line.strip().startswith(f"python {script} ")]
    assert len(lines) == 1, str(result)
    return shlex.split(lines[0])[2:]


CHECKPOINT_CASES = [
    # ---------------------------------------------------------------- nothing read back can run code
    Case("3b-resume-code-in-optimizer", B, RESUME[B], rf"'{CKPT[B]}/checkpoint-000002/optimizer\.bin' {SAFETY}",
         rf"Delete the folder '{CKPT[B]}/checkpoint-000002' to resume from the one before \('{CKPT[B]}/"
         r"checkpoint-000001'\)", setup=_code_pickle(f"{CKPT[B]}/checkpoint-000002/optimizer.bin", zipped=True)),
    Case("3b-resume-code-in-scheduler", B, RESUME[B], rf"'{CKPT[B]}/checkpoint-000002/scheduler\.bin' {SAFETY}",
         r"or run without --resume", setup=_code_pickle(f"{CKPT[B]}/checkpoint-000002/scheduler.bin")),
    Case("3b-resume-code-in-random-states", B, RESUME[B], rf"checkpoint-000002/random_states_0\.pkl' {SAFETY}",
         r"Delete the folder", setup=_code_pickle(f"{CKPT[B]}/checkpoint-000002/random_states_0.pkl")),
    Case("3b-resume-old-layout", B, RESUME[B], rf"--resume refused '{CKPT[B]}/checkpoint-000002' for safety: it is a "
         r"checkpoint in the old layout \(custom_checkpoint_0\.pkl, no run\.json, no train_state\.json\), which "
         r"keeps its step counter in a pickle",
         r"run without --resume to start afresh \(the old checkpoints are then moved aside, not deleted\)",
         setup=_old_layout(CKPT[B]), before_model=True),
    Case("3a-resume-code-in-optimizer", A, RESUME[A], rf"'{CKPT[A]}/checkpoint-000002/optimizer\.bin' {SAFETY}",
         r"Delete the folder", setup=_code_pickle(f"{CKPT[A]}/checkpoint-000002/optimizer.bin")),
    Case("3a-resume-code-in-random-states", A, RESUME[A], rf"random_states_0\.pkl' {SAFETY}", r"Delete the folder",
         setup=_code_pickle(f"{CKPT[A]}/checkpoint-000002/random_states_0.pkl", zipped=True)),
    Case("3a-resume-pickle-beside-a-checkpoint", A, RESUME[A], r"refused .*checkpoint-000002' for safety: it is a "
         r"checkpoint in the old layout \(custom_checkpoint_0\.pkl\)", r"run without --resume to start afresh",
         setup=_code_pickle(f"{CKPT[A]}/checkpoint-000002/custom_checkpoint_0.pkl"), before_model=True),
    Case("1-code-in-lora-bin", E1, QUICK + ["--lora-path", "models/downloaded_lora.bin"],
         rf"'models/downloaded_lora\.bin' {SAFETY}", r"Use a \.safetensors LoRA from a source you trust",
         setup=_code_pickle("models/downloaded_lora.bin", zipped=True)),
    Case("1-code-in-embedding-pt", E1, QUICK + ["--embedding-path", "models/downloaded_embedding.pt"],
         rf"'models/downloaded_embedding\.pt' {SAFETY}", r"Use a \.safetensors embedding from a source you trust",
         setup=_code_pickle("models/downloaded_embedding.pt")),
    Case("morph-code-in-lora-bin", MORPH, GENERATE[MORPH] + ["--lora-path", "models/lora.bin"],
         rf"'models/lora\.bin' {SAFETY}", r"train your own with exercise3b_train_lora\.py",
         setup=_code_pickle("models/lora.bin")),
    # ---------------------------------------------------------------- a run's checkpoints belong to that run
    Case("3b-resume-changed-prompt-and-alpha", B, RESUME[B] + ["--lora-alpha", "8", "--instance-prompt",
                                                               "a sks kente pattern"],
         r"trained with other settings, which cannot change mid-run: INSTANCE_PROMPT 'a sks african fabric "
         r"pattern' -> 'a sks kente pattern', LORA_ALPHA 32\.0 -> 8\.0\.",
         r"Change them back to resume it, or run without --resume to start afresh", before_model=True),
    Case("3b-resume-changed-resolution", B, RESUME[B] + ["--resolution", "32"], r"cannot change mid-run: RESOLUTION "
         r"64 -> 32\.", r"Change them back", before_model=True),
    Case("3a-resume-changed-placeholder", A, RESUME[A] + ["--placeholder-token", "<kente>"],
         r"cannot change mid-run: PLACEHOLDER_TOKEN '<african-fabric>' -> '<kente>'\.", r"Change them back",
         before_model=True),
    Case("3b-resume-another-scripts-checkpoints", B, RESUME[B], rf"The checkpoints in '{CKPT[B]}/' were made by "
         rf"{A}, not {B}", r"Set LORA_DIR to a folder of its own \(--lora-dir\)",
         setup=_copy_checkpoints(CKPT[A], CKPT[B]), before_model=True),
    # a file deleted by hand: was "refused for safety: a checkpoint in the old layout ... in a pickle", with no pickle
    Case("3b-resume-without-run-json", B, RESUME[B], rf"--resume: '{CKPT[B]}/' has no run\.json \(deleted or moved\?\)",
         r"Put it back, or run without --resume to start afresh", setup=_remove(f"{CKPT[B]}/run.json"),
         before_model=True),
    Case("3a-resume-without-train-state", A, RESUME[A], rf"--resume: '{CKPT[A]}/checkpoint-000002' has no "
         r"train_state\.json \(deleted or moved\?\), so its step and settings are unknown",
         rf"delete the folder '{CKPT[A]}/checkpoint-000002' to resume from 'checkpoint-000001', or run without "
         r"--resume", setup=_remove(f"{CKPT[A]}/checkpoint-000002/train_state.json"), before_model=True),
    Case("3b-resume-damaged-run-json", B, RESUME[B], rf"--resume could not read '{CKPT[B]}/run\.json' "
         r"\(JSONDecodeError", r"run without --resume to start afresh", setup=_write(f"{CKPT[B]}/run.json", b"{cut"),
         before_model=True),
    # ---------------------------------------------------------------- one training per folder
    Case("3b-folder-in-use", B, TRAIN[B], rf"Another training is using '{CKPT[B]}/' right now: {B} \(PID \d+, "
         r"since 2026-12-01 09:00:00\)", r"Wait for it to finish or stop it \(Ctrl-C in its window\), or train into "
         r"another folder \(--lora-dir \.\.\.\)", setup=_lock(CKPT[B]), before_model=True),
    Case("3a-folder-in-use-on-another-computer", A, TRAIN[A], r"right now: exercise3a_train_textual_inversion\.py "
         r"\(PID 4242 on lab-pc-7,", rf"--embedding-dir \.\.\.\)\. If nothing runs there any more, delete "
         rf"'{CKPT[A]}/training\.lock'", setup=_lock(CKPT[A], pid=4242, host="lab-pc-7", script=A), before_model=True),
    # ---------------------------------------------------------------- no checkpoint holds NaN/inf weights
    Case("3b-nan-weights-in-a-checkpoint", B, TRAIN[B], r"The trained weights became NaN or infinite at step 1, "
         rf"so training stopped \(nothing was saved over your checkpoints in '{CKPT[B]}/'\)",
         r"Lower LEARNING_RATE .*then run again with --resume \(it continues from the last good checkpoint",
         env={NAN_AT_STEP_ENV: "1:weights"}),
    Case("3b-nan-weights-in-the-final-file", B, TRAIN[B] + ["--checkpoint-every", "100"], r"The trained weights "
         r"became NaN or infinite at step 2", r"Lower LEARNING_RATE", env={NAN_AT_STEP_ENV: "2:weights"}),
    Case("3a-nan-weights-on-resume", A, RESUME[A], r"The trained weights became NaN or infinite at step 3",
         r"Lower LEARNING_RATE", env={NAN_AT_STEP_ENV: "3:weights"}),
]


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=lambda c: c.id)
def test_checkpoint_failure_is_one_line_and_loses_nothing(case, student, project):
    test_failure_is_one_line_and_loses_nothing(case, student, project)
    assert not (project / MARKER).exists(), "a pickle ran code"


@posix_signals
@pytest.mark.parametrize("script, signame", [(B, "SIGTERM"), (A, "SIGHUP")])
def test_sigterm_and_sighup_save_and_print_the_command_that_continues(script, signame, student, project):
    if not hasattr(signal, signame):
        pytest.skip(f"no {signame} here")
    args = TRAIN[script] + FOREVER
    before = snapshot(project)
    run = student.start(script, args, project)
    run.wait_for("Training:", stream="err")  # the loop (and its signal guard) is running
    run.send_signal(getattr(signal, signame))
    result = run.wait()
    assert result.rc == 130 and "Traceback" not in result.out + result.err, str(result)
    assert f"{signame}" in result.out and "finishing this step and saving a checkpoint" in result.out
    assert f"  python {script} {shlex.join(args)} --resume\n" in result.out  # the options used, not "plus any"
    saved = training.checkpoint_dirs(project / CKPT[script])
    step = int(saved[-1].name.split("-")[1])
    assert len(saved) == 1 and 0 < step < 100000 and f"Stopped at step {step};" in result.out
    assert_nothing_lost_or_moved_aside(before, snapshot(project))  # (the fixture's run went to previous-run-1/)

    resumed = student.run(script, _resume_command(result, script) + ["--max-train-steps", str(step + 1)], project)
    assert resumed.rc == 0 and f"checkpoint-{step:06d}' at step {step}." in resumed.out, str(resumed)


@posix_signals
def test_a_second_training_in_one_folder_is_refused_and_a_killed_one_leaves_no_stuck_lock(student, project):
    lock = project / CKPT[B] / "training.lock"
    first = student.start(B, TRAIN[B] + FOREVER, project)
    try:
        first.wait_for("Training:", stream="err")
        live = max((project / "outputs/runs").glob("exercise3b-*")).relative_to(project).as_posix() + "/"  # newest

        def files():  # all but the first run's live log, which grows with each of its steps
            return {p: d for p, d in snapshot(project).items() if not p.startswith(live)}

        before = files()
        second = student.run(B, TRAIN[B], project, cold=True)  # (cold: the warm runner starts one run at a time)
        assert_one_line_error(second, rf"Another training is using '{CKPT[B]}/' right now: {B} \(PID {first.pid}, "
                              r"since", r"Wait for it to finish or stop it \(Ctrl-C in its window\), or train into "
                              r"another folder")
        assert "[Step 1]" not in second.out
        assert_nothing_lost(before, files())
    finally:  # the endless run never outlives the test, whatever failed above (it would block the runner)
        first.send_signal(signal.SIGKILL)
    assert first.wait().rc == -signal.SIGKILL
    assert json.loads(lock.read_text())["pid"] == first.pid  # a killed run leaves its lock behind ...
    third = student.run(B, TRAIN[B], project)  # ... which does not stop the next one
    assert third.rc == 0, str(third)
    assert not lock.exists()  # released when a run ends


def test_lora_and_embedding_sharing_a_folder_keep_to_their_own_checkpoints(student, project):
    shared = project / "models/shared"
    keep_one = ["--checkpoints-to-keep", "1"]  # pruning would delete the other's, were they in one folder
    lora_args, ti_args = TRAIN[B] + keep_one + ["--lora-dir", str(shared)], TRAIN[A] + keep_one + [
        "--embedding-dir", str(shared)]
    for script, args in ((B, lora_args), (A, ti_args)):
        assert student.run(script, args, project).rc == 0
    assert {p.name for p in shared.iterdir()} == {
        "checkpoints", "checkpoints-ti", lora.WEIGHT_NAME, ti.WEIGHT_NAME, "shared_kohya.safetensors",
        "african-fabric.safetensors", "README.md", "README_textual_inversion.md", "preview.png", "preview_embedding.png"}
    assert "a DreamBooth-LoRA" in (shared / "README.md").read_text()  # each card kept, neither overwritten
    assert "a Textual Inversion embedding" in (shared / "README_textual_inversion.md").read_text()
    theirs = {p: d for p, d in snapshot(project).items() if "/checkpoints-ti/" in p}

    again = student.run(B, lora_args, project)  # a fresh LoRA run: moves only the LoRA's earlier checkpoints
    assert again.rc == 0 and "models/shared/checkpoints/previous-run-1/" in again.out, str(again)
    resumed = student.run(B, lora_args + ["--resume", "--max-train-steps", "3"], project)
    assert resumed.rc == 0 and "shared/checkpoints/checkpoint-000002' at step 2." in resumed.out, str(resumed)
    assert all(snapshot(project).get(p) == d for p, d in theirs.items()), "3b touched 3a's checkpoints"

    ours = {p: d for p, d in snapshot(project).items() if "/checkpoints/" in p}
    resumed = student.run(A, ti_args + ["--resume", "--max-train-steps", "3"], project)
    assert resumed.rc == 0 and "shared/checkpoints-ti/checkpoint-000002' at step 2." in resumed.out, str(resumed)
    assert all(snapshot(project).get(p) == d for p, d in ours.items()), "3a touched 3b's checkpoints"


def test_a_fresh_run_moves_an_earlier_runs_checkpoints_aside_unread_and_resume_continues_its_own(student, project):
    root = project / CKPT[B]
    _old_layout(CKPT[B])(project)  # an older version's run, whose pickles would run code if loaded
    own = ("outputs/", "models/fabric_lora/pytorch_lora_weights", "models/fabric_lora/fabric_lora_kohya",
           "models/fabric_lora/README", "models/fabric_lora/preview")  # what a run writes anew, by design
    before = {p: d for p, d in snapshot(project).items() if not p.startswith(own)}
    fresh = student.run(B, TRAIN[B], project)
    assert fresh.rc == 0, str(fresh)
    assert f"the checkpoints of the earlier one were moved to '{CKPT[B]}/previous-run-1/' (--resume never" in fresh.out
    assert_nothing_lost_or_moved_aside(before, snapshot(project))
    assert (root / "previous-run-1/checkpoint-000002/custom_checkpoint_0.pkl").is_file()
    assert not (project / MARKER).exists()

    resumed = student.run(B, RESUME[B], project)
    assert resumed.rc == 0 and f"Resumed from '{CKPT[B]}/checkpoint-000002' at step 2." in resumed.out
    run = json.loads((root / "run.json").read_text())
    assert json.loads((root / "checkpoint-000003/train_state.json").read_text())["run_id"] == run["id"]
    assert run["script"] == B and run["fixed"]["LORA_RANK"] == 4

    third = student.run(B, TRAIN[B], project)
    assert third.rc == 0 and f"moved to '{CKPT[B]}/previous-run-2/'" in third.out
    assert [p.name for p in training.checkpoint_dirs(root / "previous-run-2")] == [
        "checkpoint-000001", "checkpoint-000002", "checkpoint-000003"]


def test_after_a_nan_resume_at_a_lower_learning_rate_trains_at_that_rate(student, project):
    root = project / CKPT[B]
    shutil.rmtree(root)
    args = TRAIN[B] + ["--max-train-steps", "4", "--learning-rate", "5e-3"]
    failed = student.run(B, args, project, env={NAN_AT_STEP_ENV: "3"})
    assert_one_line_error(failed, r"The loss became nan at step 3", r"Lower LEARNING_RATE .*--resume")
    assert [p.name for p in training.checkpoint_dirs(root)] == ["checkpoint-000001", "checkpoint-000002"]

    resumed = student.run(B, args + ["--resume", "--learning-rate", "5e-4"], project)  # what the message advised
    assert resumed.rc == 0, str(resumed)
    assert "--resume with new settings (in effect after step 2): LEARNING_RATE 0.005 -> 0.0005" in resumed.out
    history = json.loads((root / "checkpoint-000004/train_state.json").read_text())["history"]
    assert history["lr"] == pytest.approx([5e-3, 5e-3, 5e-4, 5e-4], rel=1e-6)
    new = project / "models/fabric_lora" / lora.WEIGHT_NAME
    assert lora.read_settings(new)["LEARNING_RATE"] == 5e-4

    old = student.run(B, args + ["--lora-dir", "models/old_rate"], project)  # the same 4 steps, all at 5e-3
    assert old.rc == 0, str(old)
    start = safetensors.torch.load_file(str(root / "checkpoint-000002" / lora.WEIGHT_NAME))
    a, b = (safetensors.torch.load_file(str(f)) for f in (new, project / "models/old_rate" / lora.WEIGHT_NAME))
    assert all(torch.isfinite(t).all() for t in a.values())
    moved_new = sum((a[k] - start[k]).abs().sum().item() for k in start)
    moved_old = sum((b[k] - start[k]).abs().sum().item() for k in start)
    assert 0.05 < moved_new / moved_old < 0.2, (moved_new, moved_old)  # AdamW steps scale with the rate: ~1/10


def test_resume_follows_a_new_max_train_steps_on_the_learning_rate_schedule(student, project):
    root = project / CKPT[A]
    shutil.rmtree(root)
    args = TRAIN[A] + ["--lr-scheduler", "linear", "--learning-rate", "1e-2"]
    assert student.run(A, args, project).rc == 0  # 2 steps: a linear decay that ends at 0
    resumed = student.run(A, args + ["--resume", "--max-train-steps", "4"], project)
    assert resumed.rc == 0 and "MAX_TRAIN_STEPS 2 -> 4" in resumed.out, str(resumed)
    history = json.loads((root / "checkpoint-000004/train_state.json").read_text())["history"]
    # Steps 1-2 on the 2-step schedule; 3-4 on the 4-step one (not at the 0 the old schedule had reached).
    assert history["lr"] == pytest.approx([1e-2, 5e-3, 5e-3, 2.5e-3], rel=1e-6)


@pytest.mark.parametrize("script", [B, A])
def test_resume_names_the_training_pictures_removed_added_or_edited_since_its_checkpoint(script, student, project):
    pictures = project / "training_images"
    same = student.run(script, RESUME[script], project)
    assert same.rc == 0 and "changed since step" not in same.out, str(same)
    removed, edited = sorted(pictures.glob("fabric_*.jpg"))[:2]
    removed.unlink()
    with Image.open(edited) as image:
        image = image.rotate(90)
    image.save(edited)
    image.save(pictures / "new.png")
    resumed = student.run(script, RESUME[script] + ["--max-train-steps", "4"], project)
    assert resumed.rc == 0, str(resumed)
    assert (f"Warning: --resume: the pictures in 'training_images/' changed since step 3: 1 removed ({removed.name}); "
            f"1 added (new.png); 1 edited ({edited.name}). The rest of the run trains on the pictures as they are "
            "now. Put them back as they were") in resumed.out
