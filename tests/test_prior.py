"""Prior preservation: the loss term, and class images that are reused only when they fit."""

import json

import torch
import torch.nn.functional as F
from PIL import Image

from common import prior


def test_prior_loss_matches_reference():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    total, inst, pri = prior.prior_preservation_loss(pred, target, num_instance=3, prior_loss_weight=0.7)
    ref_inst = ((pred[:3] - target[:3]) ** 2).mean()
    ref_prior = ((pred[3:] - target[3:]) ** 2).mean()
    assert torch.allclose(inst, ref_inst) and torch.allclose(pri, ref_prior)
    assert torch.allclose(total, ref_inst + 0.7 * ref_prior)
    # without class rows it is the plain DreamBooth (instance) loss
    total, inst, pri = prior.prior_preservation_loss(pred[:3], target[:3], 3, 1.0)
    assert torch.allclose(total, F.mse_loss(pred[:3], target[:3])) and pri == 0


def _fake_generator(calls):
    def generate(prompts, seeds):
        calls.append(list(seeds))
        return [Image.new("RGB", (16, 16), (s % 255, 0, 0)) for s in seeds]
    return generate


def test_class_images_are_made_once_and_reused(tmp_path):
    recipe = prior.class_image_recipe("tiny", "a fabric pattern", 64, 25, 7.5)
    calls = []
    files = prior.ensure_class_images(None, tmp_path, recipe, 5, _fake_generator(calls))
    assert len(files) == 5 and all(p.is_file() for p in files) and calls == [[0, 1, 2, 3, 4]]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["recipe"] == recipe and manifest["seeds"] == [0, 1, 2, 3, 4]
    # same recipe: reused; more wanted: only the missing ones are drawn
    prior.ensure_class_images(None, tmp_path, recipe, 5, _fake_generator(calls))
    assert len(calls) == 1
    files = prior.ensure_class_images(None, tmp_path, recipe, 7, _fake_generator(calls))
    assert calls[-1] == [5, 6] and len(files) == 7


def test_manifest_mismatch_regenerates_and_keeps_the_old_ones(tmp_path, capsys):
    calls = []
    prior.ensure_class_images(None, tmp_path, prior.class_image_recipe("tiny", "a fabric pattern", 64, 25, 7.5), 3,
                              _fake_generator(calls))
    other = prior.class_image_recipe("stable-diffusion-v1-5/stable-diffusion-v1-5", "a fabric pattern", 64, 25, 7.5)
    prior.ensure_class_images(None, tmp_path, other, 3, _fake_generator(calls))
    assert len(calls) == 2  # regenerated
    assert "model='tiny'" in capsys.readouterr().out
    assert len(list((tmp_path / "replaced-1").glob("*.png"))) == 3  # set aside, not deleted
    assert json.loads((tmp_path / "manifest.json").read_text())["recipe"]["model"].startswith("stable")


def test_images_without_manifest_are_not_silently_reused(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "mystery.png")
    calls = []
    prior.ensure_class_images(None, tmp_path, prior.class_image_recipe("tiny", "a fabric pattern", 64, 25, 7.5), 2,
                              _fake_generator(calls))
    assert calls == [[0, 1]]
    assert (tmp_path / "replaced-1" / "mystery.png").is_file()
