"""The paper's metrics (tools/paper_metrics.py) on random tiny DINO and CLIP models, offline.

The tiny models are the real transformers classes (ViTModel, CLIPModel, their processors, a CLIP
tokenizer) at toy size with random weights, saved with ``save_pretrained`` and loaded through the
module from their folders, as a user loads the Hub's. Their scores mean nothing; what is checked is
how the scores are put together: pairs, averages, self-pairs, symmetry, and the refusals.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.errors import LessonError
from tools.paper_metrics import PaperMetrics

TOL = 1e-4  # float32 arithmetic in another order (batches, BLAS threads) differs in the 6th digit


def build_tiny_metric_models(folder):
    """A random tiny DINO (ViTModel + ViTImageProcessor) and CLIP (CLIPModel + CLIPProcessor with the tiny
    model's tokenizer), saved as transformers folders. Returns (dino folder, clip folder)."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig,
                              ViTImageProcessor, ViTModel)

    from common import tiny_model

    dino_dir, clip_dir = folder / "tiny-dino", folder / "tiny-clip"
    tokenizer = tiny_model.build_tokenizer(folder / "tokenizer")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64), add_pooling_layer=False).save_pretrained(dino_dir)
        CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4),
            projection_dim=16)).save_pretrained(clip_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(dino_dir)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(clip_dir)
    return dino_dir, clip_dir


@pytest.fixture(scope="module")
def tiny_metric_dirs(tmp_path_factory):
    return build_tiny_metric_models(tmp_path_factory.mktemp("metric-models"))


@pytest.fixture(scope="module")
def judge(tiny_metric_dirs):
    return PaperMetrics.load(*map(str, tiny_metric_dirs), batch_size=3)  # batches of 3: several per call


def pictures(n, seed=0, size=48):
    """``n`` different random-blob pictures (RGB, not square-cropped by the caller)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)  # coarse blobs survive the resize to 32 px
        out.append(Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR))
    return out


def test_identical_sets_score_one(judge):
    real = pictures(1)
    assert judge.dino(real * 3, real) == pytest.approx(1.0, abs=TOL)
    assert judge.clip_i(real * 3, real) == pytest.approx(1.0, abs=TOL)


def test_real_vs_real_leaves_out_self_pairs(judge):
    real = pictures(4, seed=1)
    ref = judge.real_vs_real(real)
    for key, embed in (("dino", judge.dino_embeddings), ("clip_i", judge.clip_image_embeddings)):
        e = embed(real)
        sims = (e @ e.T).numpy()
        off = sims[~np.eye(4, dtype=bool)]
        assert ref[key] == pytest.approx(off.mean(), abs=TOL)
        assert ref[key] < 1 - 1e-3  # different pictures: self-pairs (each 1.0) would have lifted it
        assert ref[key] < sims.mean()  # the mean with the diagonal is higher
    with pytest.raises(LessonError, match="at least 2 real images"):
        judge.real_vs_real(real[:1])


def test_scores_match_a_direct_computation(judge, tiny_metric_dirs):
    """DINO, CLIP-I and CLIP-T against the transformers models used by hand, on a few pictures."""
    from transformers import AutoImageProcessor, AutoProcessor, CLIPModel, ViTModel

    dino_dir, clip_dir = map(str, tiny_metric_dirs)
    generated, real = pictures(3, seed=2), pictures(2, seed=3)
    texts = ["a red fabric pattern", "a blue dress", "a red fabric pattern"]
    vit = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval()
    vit_proc = AutoImageProcessor.from_pretrained(dino_dir)
    clip, clip_proc = CLIPModel.from_pretrained(clip_dir).eval(), AutoProcessor.from_pretrained(clip_dir)

    def unit(x):
        x = x if isinstance(x, torch.Tensor) else x.pooler_output  # transformers 4 / 5
        return x / x.norm(dim=-1, keepdim=True)

    def dino(ims):
        return unit(vit(**vit_proc(images=ims, return_tensors="pt")).last_hidden_state[:, 0])

    def clip_image(ims):
        return unit(clip.get_image_features(**clip_proc.image_processor(images=ims, return_tensors="pt")))

    with torch.no_grad():
        dg, dr, cg, cr = dino(generated), dino(real), clip_image(generated), clip_image(real)
        ct = unit(clip.get_text_features(**clip_proc.tokenizer(texts, padding=True, return_tensors="pt")))
    pairs = [(i, j) for i in range(3) for j in range(2)]
    assert judge.dino(generated, real) == pytest.approx(np.mean([float(dg[i] @ dr[j]) for i, j in pairs]), abs=TOL)
    assert judge.clip_i(generated, real) == pytest.approx(np.mean([float(cg[i] @ cr[j]) for i, j in pairs]), abs=TOL)
    assert judge.clip_t(generated, texts) == pytest.approx(np.mean([float(cg[i] @ ct[i]) for i in range(3)]), abs=TOL)
    # averaged over pairs, so symmetric in its two sets; and each image is scored with its own text only
    assert judge.dino(real, generated) == pytest.approx(judge.dino(generated, real), abs=TOL)
    assert judge.clip_i(real, generated) == pytest.approx(judge.clip_i(generated, real), abs=TOL)
    assert judge.clip_t(generated[::-1], texts[::-1]) == pytest.approx(judge.clip_t(generated, texts), abs=TOL)
    assert judge.clip_t(generated, texts[1:] + texts[:1]) != pytest.approx(judge.clip_t(generated, texts), abs=TOL)


def test_embeddings_are_unit_vectors_batch_independent(judge):
    images = pictures(7, seed=4)
    e = judge.clip_image_embeddings(images)
    assert e.shape == (7, 16) and torch.allclose(e.norm(dim=-1), torch.ones(7), atol=1e-5)
    single = torch.cat([judge.clip_image_embeddings([im]) for im in images])
    assert torch.allclose(e, single, atol=TOL)
    assert judge.dino_embeddings(images).shape == (7, 32)


def test_missing_or_unreachable_weights_are_one_line_refusals(tmp_path, tiny_metric_dirs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    cases = [
        (("nobody-here/no-such-dino", "x"),
         r"DINO_MODEL 'nobody-here/no-such-dino' .*Hub cannot be reached.*hf download"
         r".*--dino-model models/no-such-dino"),
        (("models/dino-vits16", "x"), r"DINO_MODEL 'models/dino-vits16' does not exist on this computer"),
        ((str(tiny_metric_dirs[0]), "./no/clip"), r"CLIP_MODEL './no/clip' does not exist on this computer"),
        ((str(tiny_metric_dirs[0]), "nobody-here/no-such-clip"), r"CLIP_MODEL .*cannot be reached.*--clip-model"),
        ((str(tiny_metric_dirs[1]), "x"), r"DINO_MODEL '.*tiny-clip' is a 'clip' model, not a ViT \(DINO\) model"),
        ((str(tmp_path / "models"), "x"), r"Could not load DINO_MODEL folder .* must hold a transformers model"),
    ]
    for (dino, clip), message in cases:
        with pytest.raises(LessonError, match=message) as caught:
            PaperMetrics.load(dino, clip)
        assert "\n" not in str(caught.value)


def test_evaluate_reports_the_papers_metrics_on_tiny(workdir, tiny_metric_dirs):
    """evaluate_dreambooth --metrics paper end to end: the tiny diffusion model, the tiny metric models."""
    from tools import evaluate_dreambooth

    dino_dir, clip_dir = map(str, tiny_metric_dirs)
    results = evaluate_dreambooth.evaluate([
        "--model", "tiny", "--metrics", "paper", "--dino-model", dino_dir, "--clip-model", clip_dir,
        "--lora-steps", "1", "--ti-steps", "1", "--num-class-images", "1", "--samples", "2",
        "--num-inference-steps", "1"])
    assert list(results) == ["base model", "Textual Inversion", "LoRA, no prior preservation",
                             "LoRA + prior preservation"]
    for row in results.values():
        for key in ("dino", "clip_i", "clip_t", "pres"):
            assert -1 <= row[key] <= 1, (key, row)
        assert "subject_fidelity" not in row  # the pocket world's judge was not asked
    saved = json.loads((workdir / "outputs/evaluation/results.json").read_text())
    real = saved["real_images"]
    assert 0 < real["dino"] < 1 - 1e-3 and 0 < real["clip_i"] < 1 - 1e-3  # ten different pictures, no self-pairs
    assert saved["paper_table_1"]["DreamBooth (Stable Diffusion)"]["dino"] == 0.668
    table = (workdir / "outputs/evaluation/results.md").read_text()
    assert "| LoRA + prior preservation |" in table and "| real images (training pictures) |" in table
    assert "0.668" in table and "0.885" in table  # the paper's figures beside ours


@pytest.mark.parametrize("args, says", [
    # no colours: was 'unexpected ZeroDivisionError' once every method had trained (10 minutes on pocket)
    (["--colour-pairs", ""], r"COLOUR_PAIRS must be a list of non-empty texts"),
    # a seed exercise 3b refuses: was its RANDOM_SEED message ('Edit it at the top of exercise3b_train_lora.py')
    (["--training-seeds", "-1"], r"TRAINING_SEEDS must be one or more different whole numbers between 0 and "
                                 r"4294967295 .*--training-seeds 42,43,44\), got \(-1,\)"),
    # one seed twice: trained twice into one folder, and scored as two runs of one
    (["--training-seeds", "42,42"], r"TRAINING_SEEDS must be one or more different whole numbers"),
    # the training pictures' folder: trained into it, and the next 3b run would train on the LoRAs' pictures
    (["--work-dir", "training_images"], r"WORK_DIR 'training_images' is 'training_images/', the folder of your "
                                        r"training pictures.*--work-dir\)\.$"),
    (["--output-dir", "./training_images/"], r"OUTPUT_DIR '\./training_images/' is 'training_images/'"),
    # no bound: 10**9 denoising steps never ended; 1000 drew NaN pictures or ended in an IndexError (lesson.MAX_STEPS)
    (["--num-inference-steps", "1000"], r"NUM_INFERENCE_STEPS must be a whole number between 1 and 500, got 1000"),
    # sampling constants exercise 3a and 3b check: were taken as they came, and used only after all the training
    (["--guidance-scale", "nan"], r"GUIDANCE_SCALE must be a number, got nan"),
    (["--guidance-scale", "-5"], r"GUIDANCE_SCALE must be a number >= 0, got -5.0"),
    (["--random-seed", "1.5"], r"RANDOM_SEED must be a whole number, got 1.5"),
    (["--random-seed", "-1"], r"RANDOM_SEED must be a whole number >= 0, got -1"),
])
def test_evaluate_refuses_odd_constants_before_anything_loads(workdir, monkeypatch, args, says):
    from tools import evaluate_dreambooth

    monkeypatch.setattr(evaluate_dreambooth, "train_all", lambda *a: pytest.fail("it trained"))
    monkeypatch.setattr(evaluate_dreambooth.world_metrics, "load_classifier", lambda *a: pytest.fail("a judge loaded"))
    with pytest.raises(LessonError, match=says):
        evaluate_dreambooth.evaluate(["--model", "tiny", *args])


def test_evaluate_stops_when_ctrl_c_stops_a_training(workdir, monkeypatch):
    """Exercise 3b catches Ctrl-C and returns stopped=True: evaluate went on to train the next method and scored
    the half-trained LoRA beside the others."""
    from types import SimpleNamespace

    from tools import evaluate_dreambooth

    calls = []
    monkeypatch.setattr(evaluate_dreambooth.exercise3b_train_lora, "train",
                        lambda argv: calls.append("3b") or SimpleNamespace(stopped=True))
    monkeypatch.setattr(evaluate_dreambooth.exercise3a_train_textual_inversion, "train",
                        lambda argv: pytest.fail("it trained on after Ctrl-C"))
    monkeypatch.setattr(evaluate_dreambooth, "score", lambda *a, **k: pytest.fail("it scored after Ctrl-C"))
    cfg = SimpleNamespace(MODEL_ID="tiny", OUTPUT_DIR="outputs/evaluation", DEVICE="cpu", NUM_CLASS_IMAGES=1,
                          LORA_STEPS=1, LORA_LEARNING_RATE=1e-4, TI_STEPS=1, TI_LEARNING_RATE=5e-3)
    with pytest.raises(KeyboardInterrupt):
        evaluate_dreambooth.train_all(cfg, workdir / "models" / "evaluation", 42)
    assert calls == ["3b"]
