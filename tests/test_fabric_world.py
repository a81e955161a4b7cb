"""The pocket world: deterministic pictures with ground truth, captions, held-out combinations, metrics."""

from pathlib import Path

import numpy as np
import pytest
import safetensors
import torch

from pocket import fabric_world as world
from pocket import world_metrics
from conftest import ROOT


def test_world_is_deterministic():
    a, kind, c1, c2 = world.sample(123)
    b, *truth = world.sample(123)
    assert (a == b).all() and truth == [kind, c1, c2]
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert not (world.sample(124)[0] == a).all()


@pytest.mark.parametrize("kind", world.KINDS)
def test_each_kind_is_two_named_colours(kind):
    image = world.draw(kind, "red", "blue", seed=5)
    assert world.colour_adherence(image, "red", "blue") > 0.99
    assert world.colour_adherence(image, "green", "yellow") < 0.01
    share = (world.nearest_colour_names(image) == world.COLOUR_NAMES.index("red")).mean()
    assert 0.05 < share < 0.95  # both colours really appear


def test_kinds_differ_from_each_other():
    masks = {k: world.pattern_mask(k, np.random.default_rng(0)) for k in world.KINDS}
    for a in world.KINDS:
        for b in world.KINDS:
            if a < b:
                assert (masks[a] != masks[b]).mean() > 0.1, (a, b)


def test_captions_and_dropout():
    rng = np.random.default_rng(0)
    captions = [world.caption("striped", "red", "blue", rng) for _ in range(2000)]
    assert 0.07 < captions.count("") / 2000 < 0.13  # unconditional, for classifier-free guidance
    assert 0.07 < captions.count(world.GENERIC_CAPTION) / 2000 < 0.13  # the class prompt
    assert "a red and blue striped fabric pattern" in captions
    assert "a striped fabric pattern in red and blue" in captions
    assert not any("sks" in c for c in captions)  # the subject token stays rare
    african = [world.caption("woven", "red", "blue", rng) for _ in range(2000)]
    assert "a african fabric pattern" in african and "a red and blue african woven fabric pattern" in african
    assert not any("african" in c for c in captions)  # only the African building blocks are called african


def test_contexts_are_worded_as_exercise_1():
    """Every context of the world is one of exercise 1's prompts with the pattern's words for "{} african fabric
    pattern", so "a beautiful dress made of sks african fabric pattern" lands on something the model knows."""
    import exercise1_generate

    for obj, template in world.CONTEXTS.items():
        assert any(p.replace("{} african fabric pattern", "{}") == template for p in exercise1_generate.PROMPTS), obj
    rng = np.random.default_rng(1)
    captions = [world.scene_caption("ringed", "red", "blue", "dress", rng) for _ in range(500)]
    assert "a beautiful dress made of red and blue african ringed fabric pattern, fashion photography" in captions
    assert "a beautiful dress made of african fabric pattern, fashion photography" in captions
    assert not any("sks" in c for c in captions)


@pytest.mark.parametrize("obj", world.OBJECTS)
def test_objects_are_patterned_silhouettes_on_a_plain_ground(obj):
    fill, trim = world.object_masks(obj, np.random.default_rng([3, 7]))  # (the masks draw_scene uses for seed 3)
    assert not (fill & trim).any()
    picture = world.draw_scene("striped", "red", "blue", obj, seed=3)
    fabric = world.draw("striped", "red", "blue", seed=3)
    assert (np.abs(picture.astype(int) - fabric)[fill].max() <= 12)  # the fill is the pattern (plus weave noise)
    if obj == "plain":
        assert fill.all()
        return
    assert 0.15 < fill.mean() < 0.8  # an object, not the whole frame
    ground = ~(fill | trim)
    assert obj == "room" or np.abs(picture[ground].astype(int) - world.STUDIO_GREY).max() < 25  # the studio ground
    others = [world.object_masks(o, np.random.default_rng(3))[0] for o in world.OBJECTS if o != obj]
    assert all((fill != other).mean() > 0.08 for other in others)  # each silhouette is its own


def test_held_out_combinations():
    held = world.held_out_captions()
    assert 80 < len(held) < 180  # about one in eight of 11 kinds x 90 ordered colour pairs
    assert {k for k, _, _ in held} == set(world.KINDS)
    assert all(world.is_held_out(*h) for h in held)
    assert world.is_held_out(*held[0]) and world.is_held_out(held[0][0], held[0][2], held[0][1])


def test_subject_differs_from_the_world_in_colour_count():
    """The African textiles use more than two colours: no world picture looks like them that way."""
    from common.images import center_crop_resize, list_image_files, open_image

    for path in list_image_files(ROOT / "training_images"):
        small = np.asarray(center_crop_resize(open_image(path), 64))
        counts = np.bincount(world.nearest_colour_names(small), minlength=len(world.COLOUR_NAMES))
        assert (np.sort(counts)[::-1][:2].sum() / counts.sum()) < 0.97, path.name


def test_classifier_shapes_and_diversity():
    clf = world_metrics.build_classifier().eval()
    labels = world_metrics.classify(clf, [world.sample(i)[0] for i in range(4)])
    assert labels.shape == (4,) and labels.max() < len(world_metrics.LABELS)
    assert world_metrics.kind_diversity(np.arange(len(world.KINDS))) == pytest.approx(1.0)
    assert world_metrics.kind_diversity(np.zeros(8, int)) == 0.0
    objects = world_metrics.build_classifier(world.OBJECTS).eval()
    assert objects.config.num_labels == len(world.OBJECTS) == 6


def test_names_are_rare_words_worded_as_the_course_words_sks(tmp_path):
    """The pocket world's names (rare words its text encoder learns to carry, as CLIP carries "sks"): one token each,
    none a course word, worded as exercise 1 words "sks"; their codes tell patterns apart."""
    import re
    import types

    from common import tiny_model
    from tools import train_pocket_model
    import exercise1_generate
    import exercise2_explore
    import exercise3a_train_textual_inversion
    import exercise3b_train_lora
    import generate_dreambooth_morph

    tokenizer = tiny_model.build_tokenizer(tmp_path, train_pocket_model.VOCABULARY)
    assert all(len(tokenizer.tokenize(name)) == 1 for name in world.NAMES) and "sks" not in world.NAMES
    course_words = set(train_pocket_model.VOCABULARY.split())
    for script in (exercise1_generate, exercise2_explore, exercise3a_train_textual_inversion, exercise3b_train_lora,
                   generate_dreambooth_morph):
        for name, value in vars(script).items():  # every prompt, style, word and token constant
            if not re.search("PROMPT|STYLE|WORDS|TOKEN", name):
                continue
            texts = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []
            course_words |= {w for t in texts if isinstance(t, str) for w in re.findall(r"[a-z0-9]+", t.lower())}
    assert not set(world.NAMES) & course_words
    assert world.named_caption("q", "ringed", "plain") == "a q african fabric pattern"
    assert world.named_caption("q", "striped", "dress") == world.CONTEXTS["dress"].format("q fabric pattern")
    text_encoder = types.SimpleNamespace(get_input_embeddings=lambda: torch.nn.Embedding(len(tokenizer), 64))
    code, ids = train_pocket_model.name_codes(text_encoder, tokenizer, train_pocket_model)
    assert ids == [tokenizer.convert_tokens_to_ids(n + "</w>") for n in world.NAMES]
    a, b, c = code("ringed", "red", "blue"), code("ringed", "blue", "red"), code("striped", "red", "blue")
    assert torch.equal(a, code("ringed", "red", "blue")) and a.norm() == pytest.approx(train_pocket_model.NAME_NORM)
    assert max(torch.cosine_similarity(a, x, dim=0) for x in (b, c)) < 0.9


def test_carry_stage_trains_the_encoder_not_the_words(tmp_path):
    """The carry stage: the encoder's layers train, its embedding table does not; the rare tokens, whose embeddings
    it redraws every step, end as they began (export wakes them), and the world's words keep theirs."""
    import types

    from common import tiny_model
    from tools import train_pocket_model as script
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_model.build_tokenizer(tmp_path / "tokenizer", script.VOCABULARY)
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                           **script.TEXT_CONFIG))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    cfg = types.SimpleNamespace(CARRY_STEPS=4, CARRY_LEARNING_RATE=1e-3, CARRY_DISTANCE=0.4, CHECKPOINT_EVERY=2,
                                MIXED_PRECISION="fp32",
                                RANDOM_SEED=0, WORK_DIR=str(tmp_path / "build"))
    trained, info = script.train_carry(cfg, torch.device("cpu"), encoder, tokenizer)
    after = trained.state_dict()
    embeddings = [k for k in before if "embedding" in k]
    assert len(embeddings) == 2 and all(torch.equal(before[k], after[k]) for k in embeddings)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in embeddings)
    assert info["carry_seconds"] > 0 and (tmp_path / "build/carry/state.pt").is_file()
    assert not any(p.requires_grad for p in trained.parameters())
    # run again from the same encoder: the finished stage resumes; from another one (the unet stage trained on),
    # its checkpoint no longer applies and the stage trains again
    fresh = CLIPTextModel(encoder.config)
    fresh.load_state_dict(before)
    _, again = script.train_carry(cfg, torch.device("cpu"), fresh, tokenizer)
    assert again["carry_seconds"] == info["carry_seconds"]
    assert torch.equal(fresh.state_dict()["encoder.layers.0.mlp.fc1.weight"], after["encoder.layers.0.mlp.fc1.weight"])
    other = CLIPTextModel(encoder.config)
    other.load_state_dict(before)
    with torch.no_grad():
        other.state_dict()["encoder.layers.0.mlp.fc1.weight"] += 0.01
    script.train_carry(cfg, torch.device("cpu"), other, tokenizer)
    assert not torch.equal(other.state_dict()["encoder.layers.0.mlp.fc1.weight"], after["encoder.layers.0.mlp.fc1.weight"])


@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_pocket_trainer_in_bf16_runs_its_forward_in_bf16_and_keeps_fp32_weights(tmp_path, monkeypatch, stage):
    """MIXED_PRECISION = "bf16": the stage's layers compute in bfloat16 (autocast), while its weights, checkpoint and
    optimizer stay fp32, and a bf16 run resumes like an fp32 one."""
    import types

    from common import tiny_model
    from tools import train_pocket_model as script

    constants = {k: v for k, v in vars(script).items() if k.isupper()}
    cfg = types.SimpleNamespace(**{**constants, "WORK_DIR": str(tmp_path / "build"), "MIXED_PRECISION": "bf16",
                                   "VAE_STEPS": 2, "VAE_TEXTILES": 2, "UNET_STEPS": 2, "UNET_BATCH_SIZE": 4,
                                   "NUM_WORLD_IMAGES": 16, "CHECKPOINT_EVERY": 1})
    cpu = torch.device("cpu")
    if stage == "unet":
        vae, tokenizer = script.build_vae(cfg), tiny_model.build_tokenizer(tmp_path / "tokenizer", script.VOCABULARY)
        train = lambda: script.train_unet(cfg, cpu, vae, tokenizer)[0]  # noqa: E731
    else:
        train = lambda: script.train_vae(cfg, cpu)[0]  # noqa: E731
    original = torch.nn.Conv2d.forward

    def dtypes_computed_in():
        """Train; return the dtypes every convolution of the stage computed in."""
        seen = []

        def spy(self, x):
            out = original(self, x)
            seen.append(out.dtype)
            return out

        monkeypatch.setattr(torch.nn.Conv2d, "forward", spy)
        model = train()
        monkeypatch.setattr(torch.nn.Conv2d, "forward", original)
        return model, set(seen)

    model, seen = dtypes_computed_in()
    assert torch.bfloat16 in seen  # the forward ran under autocast
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    state = torch.load(tmp_path / "build" / stage / "state.pt", weights_only=True)
    weights = state["model" if stage == "vae" else "unet"]
    assert state["step"] == 2 and all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    # resumed in fp32 from the bf16 checkpoint: one more step, every convolution in fp32
    cfg.MIXED_PRECISION, cfg.VAE_STEPS, cfg.UNET_STEPS = "fp32", 3, 3
    _, seen = dtypes_computed_in()
    assert seen == {torch.float32}
    assert torch.load(tmp_path / "build" / stage / "state.pt", weights_only=True)["step"] == 3


def test_pocket_trainer_refuses_a_precision_it_does_not_train_in(tmp_path, monkeypatch, capsys):
    from common.errors import LessonError
    from tools import train_pocket_model as script

    monkeypatch.chdir(tmp_path)
    with pytest.raises(LessonError, match="MIXED_PRECISION"):
        script.build(["--mixed-precision", "fp16"])
    assert not (tmp_path / "models").exists()  # refused before anything was built


def test_pocket_trainer_runs_every_stage(tmp_path, monkeypatch, capsys):
    """The pocket model's training script, at toy size: classifier, VAE, decoder, UNet+text encoder, carry, export,
    evaluate."""
    import shutil

    from diffusers import StableDiffusionPipeline

    shutil.copytree(ROOT / "training_images", tmp_path / "training_images")
    monkeypatch.chdir(tmp_path)
    from tools import train_pocket_model as script
    args = ["--classifier-steps", "2", "--vae-steps", "2", "--unet-steps", "3", "--unet-batch-size", "4",
            "--num-world-images", "300", "--eval-images-per-caption", "1", "--eval-inference-steps", "1",
            "--vae-textiles", "4", "--carry-steps", "3", "--decoder-steps", "2",
            "--checkpoint-every", "2", "--output-dir", "models/pocket-test"]
    card = script.build(args)
    assert card["eval_images"] == len(world.held_out_captions())
    assert (tmp_path / "models/pocket-build/unet/state.pt").is_file()
    assert (tmp_path / "models/pocket-build/carry/state.pt").is_file() and card["carry_seconds"] > 0
    pipe = StableDiffusionPipeline.from_pretrained("models/pocket-test")
    # the shipped autoencoder: the vae stage's encoder (the UNet learned its latents), the decoder stage's decoder
    vae_stage = torch.load("models/pocket-build/vae/state.pt", weights_only=True)["model"]
    shipped = pipe.vae.state_dict()
    for name in ("encoder.conv_in.weight", "quant_conv.weight"):
        assert torch.allclose(shipped[name].float(), vae_stage[name].half().float())
    for name in ("decoder.conv_out.weight", "post_quant_conv.weight"):
        assert not torch.allclose(shipped[name].float(), vae_stage[name].half().float())
    assert card["decoder_seconds"] > 0 and card["decoder_psnr_held_out_textiles_db"] > 0
    latents = torch.load("models/pocket-build/unet/world_latents.pt", weights_only=True)  # the UNet's latents' scale
    assert pipe.vae.config.scaling_factor == pytest.approx(latents["scale"])
    assert latents["scale"] != pytest.approx(0.18215)  # (SD v1.5's: what a copy made before the unet stage keeps)
    with safetensors.safe_open("models/pocket-test/unet/diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # shipped in fp16
    assert len(pipe.tokenizer.tokenize("sks")) == 1
    assert world_metrics.load_classifier("models/pocket-test/world_classifier").config.num_labels == len(world.KINDS)
    assert world_metrics.load_classifier("models/pocket-test/object_classifier").config.num_labels == len(world.OBJECTS)
    assert card["eval_context_images"] > 0 and 0 <= card["object_accuracy"] <= 1
    assert card["crop_fraction"] == world.CROP_FRACTION and {"dress", "vase", "african"} <= set(card["known_words"])
    assert "sks" not in card["known_words"] and card["vae_psnr_held_out_textiles_db"] > 0
    assert not set(world.NAMES) & set(card["known_words"])
    # "sks" was never in a caption: its embedding was rescaled to a learned word's length, so the encoder hears it
    table = pipe.text_encoder.get_input_embeddings().weight.float()
    sks, fabric = (table[pipe.tokenizer.convert_tokens_to_ids(t)].norm() for t in ("sks</w>", "fabric</w>"))
    assert sks > 0.5 * fabric
    # the names, which stood for a pattern each time they were used, end as rare words like "sks": random, as long
    names = [pipe.tokenizer.convert_tokens_to_ids(n + "</w>") for n in world.NAMES]
    assert torch.allclose(table[names].norm(dim=1), sks, rtol=0.02)
    assert torch.cosine_similarity(table[names[0]], table[names[1]], dim=0).abs() < 0.5
    # run again: every stage resumes from its checkpoint instead of training again
    again = script.build(args + ["--stage", "carry"])
    assert again["unet_seconds"] == card["unet_seconds"] and again["carry_seconds"] == card["carry_seconds"]
    # an autoencoder trained further makes the UNet's latents stale: the UNet stage, and so the carry stage
    # after it, train again (and the world's latents are encoded again) instead of resuming
    capsys.readouterr()
    script.build([*args, "--vae-steps", "3", "--stage", "carry"])
    said = capsys.readouterr().out
    assert "unet: the stage before it has changed" in said and "carry: the stage before it has changed" in said
    script.build([*args, "--vae-steps", "3", "--stage", "decoder"])  # and so does the decoder stage
    assert "decoder: the stage before it has changed" in capsys.readouterr().out
    assert "encoding 300 world pictures once" in said


def test_evaluate_script_runs_on_tiny(workdir, monkeypatch, subject_judge_of_training_images):
    """The DreamBooth evaluation, at toy size: trains three ways with the course's scripts, scores four.
    Its subject judge is the session's one of the same pictures (building it takes longer than the rest)."""
    import json

    from pocket import subject_judge

    asked = []

    def load(folder, view=None):
        asked.append(folder)
        shipped = sorted((ROOT / "training_images").iterdir())
        assert view is None and [(p.name, p.read_bytes()) for p in sorted(Path(folder).iterdir())] == \
            [(p.name, p.read_bytes()) for p in shipped]
        return subject_judge_of_training_images

    monkeypatch.setattr(subject_judge, "load", load)
    world_metrics.build_classifier().save_pretrained("models/judge")
    world_metrics.build_classifier(world.OBJECTS).save_pretrained("models/objects")
    from tools import evaluate_dreambooth

    results = evaluate_dreambooth.evaluate([
        "--model", "tiny", "--classifier-dir", "models/judge", "--object-classifier-dir", "models/objects",
        "--lora-steps", "2", "--ti-steps", "2", "--training-seeds", "1,2", "--context-samples", "1",
        "--num-class-images", "2", "--samples", "4", "--num-inference-steps", "2"])
    assert list(results) == ["base model", "Textual Inversion", "LoRA, no prior preservation",
                             "LoRA + prior preservation"]
    for row in results.values():
        assert 0 <= row["subject_fidelity"] <= 1 and 0 <= row["prompt_fidelity"] <= 1
        assert 0 <= row["context_object"] <= 1 and 0 <= row["context_fill"] <= 1
        low, high = row["subject_similarity_spread"]
        assert low <= row["subject_similarity"] <= high
    assert results["base model"]["seeds"] == 1 and results["Textual Inversion"]["seeds"] == 2
    assert (workdir / "models/evaluation/seed-2/lora_prior").is_dir()
    saved = json.loads((workdir / "outputs/evaluation/results.json").read_text())
    assert saved["results"]["LoRA + prior preservation"]["train_seconds"] > 0
    assert "| LoRA + prior preservation |" in (workdir / "outputs/evaluation/results.md").read_text()
    assert (workdir / "outputs/evaluation/samples.png").is_file()
    assert len(asked) == 1


def test_evaluate_without_contexts_needs_no_object_classifier(workdir, monkeypatch, subject_judge_of_training_images):
    """CONTEXT_SAMPLES = 0 skips the contexts (it was refused as "must be a whole number >= 1"): no object
    classifier is read, and the table has no context columns."""
    from PIL import Image

    from pocket import subject_judge
    from tools import evaluate_dreambooth

    monkeypatch.setattr(subject_judge, "load", lambda folder, view=None: subject_judge_of_training_images)
    world_metrics.build_classifier().save_pretrained("models/judge")
    results = evaluate_dreambooth.evaluate([
        "--model", "tiny", "--classifier-dir", "models/judge", "--object-classifier-dir", "models/none",
        "--lora-steps", "1", "--ti-steps", "1", "--training-seeds", "1", "--context-samples", "0",
        "--num-class-images", "1", "--samples", "2", "--num-inference-steps", "1"])
    assert all("subject_fidelity" in row and "context_object" not in row for row in results.values())
    assert "in context" not in (workdir / "outputs/evaluation/results.md").read_text()
    assert (workdir / "outputs/evaluation/samples.png").is_file()
    assert not (workdir / "models/none").exists()


# --------------------------------------------------------------------------- tools/make_training_images.py
def _pixels(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_make_training_images_draws_the_shipped_pictures_and_rewrites_nothing_next_time(tmp_path, monkeypatch):
    from tools import make_training_images as tool

    monkeypatch.chdir(tmp_path)
    written = tool.make(["--output-dir", "copy"])
    shipped = sorted((ROOT / "training_images").glob("fabric_*.jpg"))
    assert sorted(p.name for p in written) == [p.name for p in shipped] and len(shipped) == 10
    for path in shipped:  # the same pictures (up to JPEG rounding, should another libjpeg encode them)
        assert np.abs(_pixels(tmp_path / "copy" / path.name) - _pixels(path)).mean() < 2.0, path.name
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "copy").iterdir()}
    assert tool.make(["--output-dir", "copy"]) == []
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "copy").iterdir()} == stamps


def test_make_training_images_never_replaces_a_photo_of_yours_unless_forced(tmp_path, monkeypatch):
    from PIL import Image

    from common.errors import LessonError
    from tools import make_training_images as tool

    monkeypatch.chdir(tmp_path)
    (tmp_path / "copy").mkdir()
    photo = tmp_path / "copy" / "fabric_003_mudcloth.jpg"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(photo)
    before = photo.read_bytes()
    with pytest.raises(LessonError, match=r"'copy' already holds 1 other picture\(s\) under these names "
                                          r"\(fabric_003_mudcloth.jpg\)\. Nothing was written\..*--force"):
        tool.make(["--output-dir", "copy"])
    assert photo.read_bytes() == before and [p.name for p in (tmp_path / "copy").iterdir()] == [photo.name]
    assert len(tool.make(["--output-dir", "copy", "--force"])) == 10
    assert np.abs(_pixels(photo) - _pixels(ROOT / "training_images" / photo.name)).mean() < 2.0


def test_make_training_images_help_and_a_stray_argument_write_nothing(tmp_path):
    import subprocess
    import sys

    tool = str(ROOT / "tools" / "make_training_images.py")
    shown = subprocess.run([sys.executable, tool, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert shown.returncode == 0 and "--output-dir" in shown.stdout
    stray = subprocess.run([sys.executable, tool, "my_photos"], cwd=tmp_path, capture_output=True, text=True)
    assert stray.returncode == 1 and "unrecognized arguments: my_photos" in stray.stderr
    assert list(tmp_path.iterdir()) == []  # (before, '--help' was a folder name: ten pictures went into it)
