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
        return [Image.new("RGB", (64, 64), (s % 255, 0, 0)) for s in seeds]  # the recipes' size
    return generate


def test_class_images_are_made_once_and_reused(tmp_path):
    recipe = prior.class_image_recipe("tiny", "a fabric pattern", 64, 25, 7.5)
    calls = []
    files = prior.ensure_class_images(tmp_path, recipe, 5, _fake_generator(calls))
    assert len(files) == 5 and all(p.is_file() for p in files) and sum(calls, []) == [0, 1, 2, 3, 4]
    assert calls == [[0, 1, 2, 3], [4]]  # drawn (and saved) a batch at a time
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["recipe"] == recipe and manifest["seeds"] == [0, 1, 2, 3, 4]
    # same recipe: reused; more wanted: only the missing ones are drawn
    calls.clear()
    prior.ensure_class_images(tmp_path, recipe, 5, _fake_generator(calls))
    assert calls == []
    files = prior.ensure_class_images(tmp_path, recipe, 7, _fake_generator(calls))
    assert calls[-1] == [5, 6] and len(files) == 7


def test_manifest_mismatch_regenerates_and_keeps_the_old_ones(tmp_path, capsys):
    calls = []
    prior.ensure_class_images(tmp_path, prior.class_image_recipe("tiny", "a fabric pattern", 64, 25, 7.5), 3,
                              _fake_generator(calls))
    other = prior.class_image_recipe("stable-diffusion-v1-5/stable-diffusion-v1-5", "a fabric pattern", 64, 25, 7.5)
    prior.ensure_class_images(tmp_path, other, 3, _fake_generator(calls))
    assert len(calls) == 2 and calls[1] == [0, 1, 2]  # regenerated
    assert "model='tiny'" in capsys.readouterr().out
    assert len(list((tmp_path / "replaced-1").glob("*.png"))) == 3  # set aside, not deleted
    assert json.loads((tmp_path / "manifest.json").read_text())["recipe"]["model"].startswith("stable")


def test_images_without_manifest_are_not_silently_reused(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "mystery.png")
    calls = []
    prior.ensure_class_images(tmp_path, prior.class_image_recipe("tiny", "a fabric pattern", 64, 25, 7.5), 2,
                              _fake_generator(calls))
    assert calls == [[0, 1]]
    assert (tmp_path / "replaced-1" / "mystery.png").is_file()


def _recipe(resolution=64):
    return prior.class_image_recipe("tiny", "a fabric pattern", resolution, 25, 7.5)


def test_missing_damaged_or_wrong_size_class_images_are_drawn_again_from_their_own_seeds(tmp_path, capsys):
    calls = []
    files = prior.ensure_class_images(tmp_path, _recipe(), 6, _fake_generator(calls))
    kept = {p.name: p.read_bytes() for p in files}
    files[1].unlink()  # deleted
    files[3].write_bytes(files[3].read_bytes()[:40])  # cut short
    Image.new("RGB", (8, 8)).save(files[4])  # not the recipe's size
    calls.clear()
    again = prior.ensure_class_images(tmp_path, _recipe(), 6, _fake_generator(calls))
    assert sum(calls, []) == [1, 3, 4]
    said = capsys.readouterr().out
    assert "Drawing again 3 class image(s) that are missing or damaged: class_00001.png (seed 1), class_00003.png " \
           "(seed 3), class_00004.png (seed 4)" in said
    assert again == files and all(p.read_bytes() == kept[p.name] for p in again)  # seed i gives image i again
    assert len(set(p.name for p in again)) == 6  # no duplicate stands in for a missing one


def test_an_interrupted_run_keeps_the_batches_it_drew(tmp_path):
    calls = []

    def dies_on_the_third_batch(prompts, seeds):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fake_generator(calls)(prompts, seeds)

    try:
        prior.ensure_class_images(tmp_path, _recipe(), 10, dies_on_the_third_batch, batch_size=3)
    except KeyboardInterrupt:
        pass
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"] == [f"class_{i:05d}.png" for i in range(6)] and manifest["seeds"] == list(range(6))
    calls.clear()
    files = prior.ensure_class_images(tmp_path, _recipe(), 10, _fake_generator(calls), batch_size=3)
    assert sum(calls, []) == [6, 7, 8, 9] and len(files) == 10 and all(p.is_file() for p in files)


def test_class_folder_may_not_be_or_hold_or_sit_in_the_training_images(tmp_path, monkeypatch):
    import pytest

    from common import lesson
    from common.errors import LessonError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "training_images").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "training_images")

    def check(klass):
        cfg = lesson.Config(SCRIPT="x.py", CLASS_DATA_DIR=klass, TRAINING_IMAGES_DIR="training_images")
        lesson.require_apart(cfg, "CLASS_DATA_DIR", "TRAINING_IMAGES_DIR", nested=True)

    for klass, how in [("training_images", "is the same folder as"), ("link", "is the same folder as"),
                       ("./training_images/", "is the same folder as"), ("training_images/class", "is inside"),
                       (".", "contains"), (str(tmp_path), "contains")]:
        with pytest.raises(LessonError, match=f"CLASS_DATA_DIR '{klass}' {how} TRAINING_IMAGES_DIR 'training_images'"):
            check(klass)
    check("class_images")  # its own folder: fine
    check("training_images_class")  # a name that merely starts the same


def test_a_damaged_manifest_is_no_manifest(tmp_path):
    calls = []
    prior.ensure_class_images(tmp_path, _recipe(), 2, _fake_generator(calls))
    for damaged in ("[1, 2]", '{"recipe": [], "files": 3}', '{"recipe": {}, "files": {"a": 1}}', "{not json"):
        (tmp_path / "manifest.json").write_text(damaged)
        calls.clear()
        files = prior.ensure_class_images(tmp_path, _recipe(), 2, _fake_generator(calls))
        assert sum(calls, []) == [0, 1] and all(p.is_file() for p in files), damaged


def test_class_images_of_a_replaced_model_folder_are_drawn_again(tmp_path, tiny_dir, capsys):
    """The pocket model is updated by git pull, and a student may replace a model folder, under the same name:
    class images drawn by the earlier weights are set aside, not reused. A Hub id keeps the recipe it had."""
    import shutil

    from safetensors.torch import load_file, save_file

    from common import models

    folder = tmp_path / "my-model"
    shutil.copytree(tiny_dir, folder)
    before = models.weights_fingerprint(str(folder))
    assert before == models.weights_fingerprint(str(folder))  # (the same files: the same fingerprint)
    recipe = prior.class_image_recipe(models.describe_source(str(folder)), "a fabric pattern", 64, 25, 7.5, before)
    calls = []
    prior.ensure_class_images(tmp_path / "class", recipe, 2, _fake_generator(calls))
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[len(tensors) // 2]  # (one in the middle of the file)
    tensors[name] = tensors[name] + 0.5  # retrained: same names, same sizes, other numbers
    save_file(tensors, weights)
    after = models.weights_fingerprint(str(folder))
    assert after != before
    recipe = prior.class_image_recipe(models.describe_source(str(folder)), "a fabric pattern", 64, 25, 7.5, after)
    prior.ensure_class_images(tmp_path / "class", recipe, 2, _fake_generator(calls))
    assert calls == [[0, 1], [0, 1]] and "model_weights=" in capsys.readouterr().out
    assert models.weights_fingerprint("stable-diffusion-v1-5/stable-diffusion-v1-5") is None
    assert "model_weights" not in prior.class_image_recipe("a/b", "a fabric pattern", 512, 25, 7.5, None)


def test_a_folder_named_in_another_case_is_the_same_folder_on_a_mac(tmp_path, monkeypatch):
    """macOS' disks ignore case: CLASS_DATA_DIR or OUTPUT_DIR 'Training_Images' is the training pictures' folder,
    but the paths differ as text, and the check compared them so (the outputs were then trained on). The files'
    identity decides now; here os.path.samefile finds names as such a disk does."""
    import os
    from pathlib import Path

    import pytest

    from common import images, lesson
    from common.errors import LessonError

    real = os.path.samefile

    def on_a_mac(path):  # the file or folder a name finds on a case-insensitive disk
        found, path = Path("/"), Path(os.path.abspath(path))
        for part in path.parts[1:]:
            same = [c for c in found.iterdir() if c.name.lower() == part.lower()] if found.is_dir() else []
            found = same[0] if same else found / part
        return found

    monkeypatch.setattr(os.path, "samefile", lambda a, b: real(on_a_mac(a), on_a_mac(b)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "training_images").mkdir()
    for klass, how in [("Training_Images", "is the same folder as"), ("TRAINING_IMAGES/class", "is inside")]:
        cfg = lesson.Config(SCRIPT="x.py", CLASS_DATA_DIR=klass, TRAINING_IMAGES_DIR="training_images")
        with pytest.raises(LessonError, match=f"CLASS_DATA_DIR '{klass}' {how} TRAINING_IMAGES_DIR"):
            lesson.require_apart(cfg, "CLASS_DATA_DIR", "TRAINING_IMAGES_DIR", nested=True)
    monkeypatch.setattr(images, "COURSE_IMAGES_DIR", str(tmp_path / "training_images"))
    with pytest.raises(LessonError, match="OUTPUT_DIR 'Training_Images' is"):
        images.require_apart_from_course_images(lesson.Config(SCRIPT="x.py", OUTPUT_DIR="Training_Images"),
                                                "OUTPUT_DIR")
