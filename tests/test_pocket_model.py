"""The shipped pocket model: a standard diffusers folder that draws its world, judged by its classifier."""

from pathlib import Path

import pytest
import torch

from common import models, sampling
from pocket import fabric_world, world_metrics
from conftest import ROOT

POCKET = ROOT / "models" / "pocket-sd"
needs_pocket = pytest.mark.skipif(not (POCKET / "model_index.json").is_file(), reason="pocket model not present")


@needs_pocket
def test_shipped_weights_load_with_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(POCKET))
    assert models.native_resolution(pipe) == 64
    assert len(pipe.tokenizer.tokenize("sks")) == 1  # the rare token exists, untrained
    size = sum(p.stat().st_size for p in POCKET.rglob("*") if p.is_file())
    assert size <= 20 * 2**20


@needs_pocket
def test_classifier_beats_chance_on_fresh_world_samples():
    classifier = world_metrics.load_classifier(POCKET / "world_classifier").float()
    samples = [fabric_world.sample(10_000_000 + i) for i in range(64)]  # seeds no training run used
    accuracy = world_metrics.kind_accuracy(classifier, [s[0] for s in samples], [s[1] for s in samples])
    assert accuracy > 0.8  # chance is 1 in 9


@needs_pocket
def test_pocket_draws_the_requested_kind(monkeypatch):
    monkeypatch.chdir(ROOT)
    pipe = models.load_pipeline("pocket")
    sampling.use_multistep_solver(pipe)
    classifier = world_metrics.load_classifier(POCKET / "world_classifier").float()
    kinds = ["striped", "checked", "dotted", "zigzag"]
    prompts = [f"a red and white {k} fabric pattern" for k in kinds]
    images, _ = sampling.generate(pipe, prompts, [0, 1, 2, 3], sampling.SamplingSettings(12, 7.5), progress=False)
    labels = [world_metrics.LABELS[i] for i in world_metrics.classify(classifier, images)]
    assert sum(a == b for a, b in zip(labels, kinds)) >= 3, labels
    assert world_metrics.mean_colour_adherence(images, [("red", "white")] * 4) > 0.5
