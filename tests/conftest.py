"""Shared test fixtures: a project folder in a temporary directory with the tiny model built once."""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_SEED = ROOT.parent / "shared" / "seed"  # the course's published files, beside a developer's checkout
sys.path.insert(0, str(ROOT))  # the lesson scripts, common/, bench/ and tools/ import as modules
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network

from common import tiny_model  # noqa: E402

needs_shared = pytest.mark.skipif(not SHARED_SEED.is_dir(), reason="../shared/seed (course files) not present")
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard (requirements-test.txt) is not installed")


def read_tensorboard_run(folder):
    """A run folder's event files (LOG_WITH = "tensorboard"), read by TensorBoard's own reader, every value kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0}).Reload()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The built-in tiny model, built once per test session."""
    return tiny_model.ensure_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="session")
def subject_judge_of_training_images():
    """The pocket subject judge of the shipped training_images/, built once per test session (about 20 s; its
    per-object fill thresholds are calibrated on first use and kept): every test that judges the subject shares it."""
    from pocket import subject_judge

    return subject_judge.load(ROOT / "training_images")


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_dir) -> Path:
    """A fresh project folder (training_images/ and models/tiny-sd/), made the current directory."""
    shutil.copytree(tiny_dir, tmp_path / "models" / "tiny-sd")
    shutil.copytree(ROOT / "training_images", tmp_path / "training_images")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DREAMBOOTH_MODEL", raising=False)
    return tmp_path


def fake_pocket(project, card: dict) -> Path:
    """The tiny model standing in for the pocket model in ``project`` (a ``workdir``): its models/tiny-sd
    copied to models/pocket-sd, with ``card`` as its pocket_card.json (crop_fraction, known_words...)."""
    import json

    pocket = Path(project) / "models" / "pocket-sd"
    shutil.copytree(Path(project) / "models" / "tiny-sd", pocket)
    (pocket / "pocket_card.json").write_text(json.dumps(card), encoding="utf-8")
    return pocket


@pytest.fixture
def fault_hooks(monkeypatch):
    """tests/fault_hooks.py installed for this test only (in this process); set its environment variables
    (``monkeypatch.setenv(fault_hooks.NAN_AT_STEP_ENV, "5")``) to inject a fault."""
    import fault_hooks

    fault_hooks.install(monkeypatch.setattr)
    return fault_hooks


@pytest.fixture
def tiny_pipe(tiny_dir):
    """A fresh tiny StableDiffusionPipeline loaded with plain diffusers."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe
