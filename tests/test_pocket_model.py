"""The shipped pocket model: a standard diffusers folder that draws its world, judged by its classifier."""

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
    assert size <= 30 * 2**20


@needs_pocket
def test_classifier_beats_chance_on_fresh_world_samples():
    classifier = world_metrics.load_classifier(POCKET / "world_classifier").float()
    samples = [fabric_world.sample(10_000_000 + i) for i in range(64)]  # seeds no training run used
    accuracy = world_metrics.kind_accuracy(classifier, [s[0] for s in samples], [s[1] for s in samples])
    assert accuracy > 0.8  # chance is 1 in 11
    objects = world_metrics.load_classifier(POCKET / "object_classifier").float()
    scenes = [fabric_world.sample_scene(10_000_000 + i, object_share=0.9) for i in range(64)]
    assert world_metrics.object_accuracy(objects, [s[0] for s in scenes], [s[4] for s in scenes]) > 0.8  # chance 1 in 6


def draw_and_classify(monkeypatch, prompts, classifier: str):
    """The pocket model's pictures of ``prompts`` (seeds 0, 1, ...; 12 DPM-Solver++ steps) and the label the
    shipped ``classifier`` folder gives each."""
    monkeypatch.chdir(ROOT)
    pipe = models.load_pipeline("pocket")
    sampling.use_multistep_solver(pipe)
    judge = world_metrics.load_classifier(POCKET / classifier).float()
    images, _ = sampling.generate(pipe, prompts, list(range(len(prompts))), sampling.SamplingSettings(12, 7.5),
                                  progress=False)
    return images, [judge.config.id2label[int(i)] for i in world_metrics.classify(judge, images)]


@needs_pocket
def test_pocket_draws_the_requested_kind(monkeypatch):
    kinds = [k for k in fabric_world.KINDS for _ in range(2)]  # every kind, two seeds each
    images, labels = draw_and_classify(monkeypatch, [f"a red and white {k} fabric pattern" for k in kinds],
                                       "world_classifier")
    # Its kind accuracy on held-out captions is 85% (its card), below the 90% the issue asks (README, The pocket model):
    # 22 pictures give a bound well clear of both that and chance (1 in 11), whichever seeds a kind gets.
    assert sum(a == b for a, b in zip(labels, kinds)) >= 11, list(zip(kinds, labels))
    assert world_metrics.mean_colour_adherence(images, [("red", "white")] * len(kinds)) > 0.5


@needs_pocket
def test_pocket_draws_the_asked_context(monkeypatch):
    """Exercise 1's contexts: "a beautiful dress made of ... fabric pattern" draws a dress, and so on."""
    asked = ["dress", "vase", "handbag", "room", "basket", "plain"]
    _, found = draw_and_classify(monkeypatch, [fabric_world.CONTEXTS[o].format("red and white striped fabric pattern")
                                               for o in asked], "object_classifier")
    assert sum(a == b for a, b in zip(found, asked)) >= 4, found


@needs_pocket
def test_the_text_encoder_carries_sks(monkeypatch):
    """"sks" was never in a caption, yet the text encoder's output with and without it differs about as much as with
    one world word swapped for another, at the prompt's own positions and over all 77 positions the UNet attends to
    (the carry stage taught the padding after the end token to hear it): DreamBooth can bind it. In exercise 1's
    contexts whose words the model knows it carries less far, but far more than before the carry stage (0.01-0.05)."""
    import json

    import torch.nn.functional as F

    import exercise1_generate

    monkeypatch.chdir(ROOT)
    from tools.train_pocket_model import token_signal

    pipe = models.load_pipeline("pocket")
    signal = token_signal(pipe)
    assert signal["prompt_distance_sks"] >= 0.5 * signal["prompt_distance_swapped_word"], signal
    assert signal["text_distance_sks"] >= 0.5 * signal["text_distance_swapped_word"], signal
    from common import personalize

    prompts = [p.format("sks") for p in exercise1_generate.PROMPTS]
    unknown = {p for p, _ in personalize.unknown_words(prompts, models.known_words("pocket"), "sks")}
    known = [t for t, p in zip(exercise1_generate.PROMPTS, prompts) if p not in unknown]
    ids = pipe.tokenizer([p.format("sks") for p in known] + [p.replace("{} ", "") for p in known],
                         padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h = pipe.text_encoder(ids)[0].float().flatten(1)
    distance = 1 - F.cosine_similarity(h[:len(known)], h[len(known):])
    assert len(known) == 6 and distance.mean() >= 0.25 * signal["text_distance_swapped_word"], distance
    card = json.loads((POCKET / "pocket_card.json").read_text())
    assert models.native_crop_fraction("pocket") == card["crop_fraction"] == fabric_world.CROP_FRACTION
    assert "sks" not in card["known_words"] and "dress" in card["known_words"]


@pytest.mark.parametrize("args, says", [
    # each was taken as it came and ended, after the stages before it, as 'unexpected ValueError/IndexError' or a
    # torch error
    (["--vae-channels", "abc"], r"VAE_CHANNELS must be 3 widths separated by commas, each a multiple of 16"),
    (["--vae-channels", "16,32"], r"VAE_CHANNELS must be 3 widths"),
    (["--vae-latent-channels", "0"], r"VAE_LATENT_CHANNELS must be a whole number >= 1, got 0"),
    (["--random-seed", "-1"], r"RANDOM_SEED must be a whole number >= 0, got -1"),
    (["--vae-learning-rate", "nan"], r"VAE_LEARNING_RATE must be a number, got nan"),
    (["--object-share", "5"], r"OBJECT_SHARE must be a number >= 0 and <= 1, got 5.0"),
    (["--work-dir", "card.txt"], r"WORK_DIR 'card.txt' is a file, not a folder"),
])
def test_build_refuses_odd_constants_before_any_stage(workdir, monkeypatch, args, says):
    from common.errors import LessonError
    from tools import train_pocket_model

    (workdir / "card.txt").write_text("not a folder")
    monkeypatch.setattr(train_pocket_model.devices, "pick_runtime", lambda *a, **k: pytest.fail("it started"))
    with pytest.raises(LessonError, match=says):
        train_pocket_model.build(["--stage", "vae", *args])


def test_a_stage_checkpoint_of_another_shape_is_refused_and_kept(tmp_path):
    """A vae checkpoint made with other VAE_CHANNELS: was 'unexpected RuntimeError: Error(s) in loading state_dict'."""
    from common.errors import LessonError
    from tools import train_pocket_model as tpm

    first = torch.nn.Linear(4, 8)
    stage = tpm.Stage("vae", tmp_path, model=first)
    stage.save(3, 1.0, 10)
    kept = stage.path.read_bytes()
    with pytest.raises(LessonError, match=r"vae stage's checkpoint .* was made with other settings than this run's "
                                          r"\(VAE_CHANNELS or VAE_LATENT_CHANNELS\?.*or set WORK_DIR to another"):
        tpm.Stage("vae", tmp_path, model=torch.nn.Linear(4, 16))
    assert stage.path.read_bytes() == kept  # not replaced: set back, it resumes
    assert tpm.Stage("vae", tmp_path, model=torch.nn.Linear(4, 8)).step == 3
    stage.path.write_bytes(b"not a checkpoint")  # damaged: one message, and the file is left for the user
    with pytest.raises(LessonError, match=r"vae stage's checkpoint .* cannot be read .*Move it away"):
        tpm.Stage("vae", tmp_path, model=first)
    assert stage.path.read_bytes() == b"not a checkpoint"


@pytest.mark.parametrize("stage, says", [
    # was 'unexpected FileNotFoundError' after the vae, decoder, unet and carry stages had trained (hours)
    ("export", r"The export stage needs the classifier stage's checkpoint .*--stage classifier first"),
    # was "MODEL_ID 'models/pocket-sd' does not exist": a constant this script does not have
    ("evaluate", r"The evaluate stage scores the model in OUTPUT_DIR 'models/pocket-sd', which holds none"),
])
def test_a_stage_whose_earlier_stage_never_ran_is_refused_first(workdir, monkeypatch, stage, says):
    from common.errors import LessonError
    from tools import train_pocket_model

    for step in ("train_vae", "train_decoder", "train_unet", "train_carry", "evaluate"):
        monkeypatch.setattr(train_pocket_model, step, lambda *a, **k: pytest.fail("a stage ran"))
    with pytest.raises(LessonError, match=says):
        train_pocket_model.build(["--stage", stage])


def test_a_resumed_stage_says_where_it_stands_against_this_runs_step_count(tmp_path, capsys):
    """Resumed with another UNET_STEPS (how the shipped UNet grew: 6,500, 9,000, 16,500) or with fewer steps than
    its checkpoint has, a stage went on, or stopped, without a word."""
    from tools import train_pocket_model as tpm

    weights, ran = torch.nn.Linear(2, 2), []
    for total in (6, 9, 3):  # each from step 4 of a run towards 6
        tpm.Stage("unet", tmp_path, model=weights).save(4, 1.0, 6)
        stage = tpm.Stage("unet", tmp_path, model=weights)
        tpm.train_loop("unet", tpm, total, stage, torch.optim.SGD(weights.parameters()), 0.1,
                       lambda step: ran.append(step) or 0.0)
    said = capsys.readouterr().out
    assert ran == [4, 5, 4, 5, 6, 7, 8]  # from its step to this run's total, and nothing past it
    assert "resuming unet at step 4 of 6\n" in said
    assert "resuming unet at step 4 of 9 (its checkpoint was trained towards 6: the learning rate now decays " \
           "over UNET_STEPS = 9)" in said
    assert "unet: its checkpoint is at step 4, which UNET_STEPS = 3 does not pass: kept as it is, not trained" in said


def test_export_over_a_model_already_in_output_dir_needs_replace_model(workdir, monkeypatch):
    """A trial build with a few steps exported over the shipped models/pocket-sd without a word; now it is refused
    before any stage trains, unless REPLACE_MODEL is set, and the model is kept."""
    from common.errors import LessonError
    from tools import train_pocket_model

    class Started(Exception):
        pass

    def started(*a, **k):
        raise Started

    output = workdir / "models" / "pocket-sd"
    output.mkdir(parents=True)
    (output / "model_index.json").write_text("{}")
    (output / ".DS_Store").write_bytes(b"")  # (what macOS' Finder leaves: not a thing of the user's to keep)
    monkeypatch.setattr(train_pocket_model, "train_classifier", started)
    for stage in ("all", "export"):
        with pytest.raises(LessonError, match=r"OUTPUT_DIR 'models/pocket-sd' already holds a model .* pass "
                                              r"--replace-model to replace it"):
            train_pocket_model.build(["--stage", stage, "--device", "cpu"])
    assert (output / "model_index.json").read_text() == "{}"
    with pytest.raises(Started):  # asked for: it goes on to train
        train_pocket_model.build(["--stage", "all", "--device", "cpu", "--replace-model"])
    with pytest.raises(Started):  # elsewhere: nothing is replaced, nothing to ask
        train_pocket_model.build(["--stage", "all", "--device", "cpu", "--output-dir", "models/mine"])
    # export replaces the folder as a whole: never one that holds other things, or the build's own checkpoints
    (output / "my_notes.txt").write_text("mine")
    for args, says in ((["--replace-model"], r"'models/pocket-sd' holds 1 thing\(s\) that are not part of a pocket "
                                             r"model \(my_notes.txt\)"),
                       (["--output-dir", "models", "--work-dir", "build"],
                        r"'models' holds \d thing\(s\) that are not part of a pocket model \(.*pocket-sd/, tiny-sd/\)"),
                       (["--output-dir", "models"], r"'models' holds WORK_DIR 'models/pocket-build'"),
                       (["--output-dir", "models/pocket-build"], r"'models/pocket-build' is WORK_DIR"),
                       (["--output-dir", "build", "--work-dir", "build/stages"], r"'build' holds WORK_DIR")):
        with pytest.raises(LessonError, match=r"OUTPUT_DIR " + says):
            train_pocket_model.build(["--stage", "all", "--device", "cpu", *args])
    assert (output / "my_notes.txt").read_text() == "mine" and (workdir / "models" / "tiny-sd").is_dir()
