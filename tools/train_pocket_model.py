"""Train the pocket model from scratch: a small Stable-Diffusion-shaped model of the procedural fabric world.

    python tools/train_pocket_model.py                    # every stage, in order (resumable: run it again)
    python tools/train_pocket_model.py --stage vae        # one stage: classifier, vae, unet, export or evaluate

Stages:
1. classifier - the world classifier (8 pattern kinds + "the subject") that scores DreamBooth later;
2. vae        - an AutoencoderKL (64x64 pictures <-> 4x16x16 latents);
3. unet       - the UNet and the CLIP text encoder together, on cached latents of world pictures with
                their captions (10% dropped, for classifier-free guidance); an EMA of the UNet is kept;
4. export     - a standard diffusers folder, models/pocket-sd/ (fp16 weights), plus the classifier;
5. evaluate   - kind accuracy and colour adherence on held-out captions, written into the model card.

Every stage checkpoints into models/pocket-build/ and continues from there when run again.
"""

import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from common import device as devices  # noqa: E402
from common import lesson, models, sampling, tiny_model, training  # noqa: E402
from pocket import fabric_world, world_metrics  # noqa: E402
from common.files import atomic_dir, atomic_path, save_json  # noqa: E402
from common.images import center_crop_resize, list_image_files, open_image  # noqa: E402

# ============================== CONSTANTS ==============================
STAGE = "all"  # all, classifier, vae, unet, export or evaluate
OUTPUT_DIR = "models/pocket-sd"  # the finished model
WORK_DIR = "models/pocket-build"  # per-stage checkpoints
TRAINING_IMAGES_DIR = "training_images"  # the DreamBooth subject, for the classifier's "subject" class
CLASSIFIER_STEPS = 1500  # batches of 128
VAE_STEPS = 1800  # batches of 24 (18 world pictures, 6 off-world collages)
VAE_LEARNING_RATE = 3e-3  # AdamW, with warm-up and cosine decay (3e-3 halved the error of 1e-3 at 900 steps)
UNET_STEPS = 8500  # batches of UNET_BATCH_SIZE
UNET_BATCH_SIZE = 32  # world pictures per UNet step (more, smaller steps learned faster than 64)
UNET_LEARNING_RATE = 1e-3  # AdamW, with warm-up and cosine decay
MIN_SNR_GAMMA = 5.0  # Min-SNR loss weighting (Hang et al. 2023): converges ~3x faster than plain MSE
NUM_WORLD_IMAGES = 40000  # world pictures encoded once for the UNet stage
EVAL_IMAGES_PER_CAPTION = 2  # samples per held-out caption in the evaluate stage
EVAL_INFERENCE_STEPS = 25  # DPM-Solver++ steps for those samples
CHECKPOINT_EVERY = 250  # steps between stage checkpoints
RANDOM_SEED = 0  # same seed, same model
DEVICE = "auto"  # auto, cuda, mps or cpu
# =======================================================================

# Attention only at 8x8 and 4x4, with 4 heads: on a CPU, self-attention over the 256 positions of the
# 16x16 level cost half the step time for little gain on periodic patterns (0.70 vs 1.24 s a step).
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=64, block_out_channels=(16, 32, 64),
    layers_per_block=1, norm_num_groups=16, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, projection_dim=64)


# --------------------------------------------------------------------------- data
def world_batch(seed: int, step: int, n: int, with_held_out: bool = False):
    """n world pictures for one step (deterministic), as (uint8 array, truths)."""
    rng = np.random.default_rng([seed, step])
    pictures, truths = [], []
    while len(pictures) < n:
        image, kind, c1, c2 = fabric_world.sample(int(rng.integers(2**62)))
        if with_held_out or not fabric_world.is_held_out(kind, c1, c2):
            pictures.append(image)
            truths.append((kind, c1, c2))
    return np.stack(pictures), truths


def to_pixels(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def collage(rng: np.random.Generator, n: int) -> np.ndarray:
    """Off-world pictures for the VAE: blocks and bands of arbitrary colours, so it can encode anything."""
    out = np.empty((n, 64, 64, 3), np.uint8)
    for i in range(n):
        img = np.full((64, 64, 3), rng.integers(0, 256, 3), np.uint8)
        for _ in range(rng.integers(2, 9)):
            x0, y0 = rng.integers(0, 64, 2)
            w, h = rng.integers(2, 40, 2)
            img[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
        out[i] = img
    return out


def subject_pictures(folder) -> list:
    return [open_image(p) for p in list_image_files(folder)]


def augment_subject(pictures, rng: np.random.Generator, n: int) -> np.ndarray:
    """Random crops (half to all of the picture), flips, quarter turns and slight colour shifts of the subject."""
    from PIL import Image

    out = []
    for _ in range(n):
        im = pictures[rng.integers(len(pictures))]
        side = int(min(im.size) * rng.uniform(0.5, 1.0))
        x, y = rng.integers(0, im.width - side + 1), rng.integers(0, im.height - side + 1)
        crop = center_crop_resize(im.crop((x, y, x + side, y + side)), 64)
        a = np.asarray(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
        a = np.rot90(a, rng.integers(4)).astype(np.float32) * rng.uniform(0.85, 1.15, 3) + rng.normal(0, 8, 3)
        out.append(np.clip(a, 0, 255).astype(np.uint8))
    return np.stack(out)


def soften(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Blur some pictures a little, as generated pictures are softer than drawn ones."""
    kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
    k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(batch, (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    pick = torch.from_numpy(rng.random(len(batch)) < 0.4)[:, None, None, None]
    return torch.where(pick, blurred, batch)


# --------------------------------------------------------------------------- resumable stage state
class Stage:
    """One stage's checkpoint file: modules, optimizer, EMA and step, saved atomically."""

    def __init__(self, name, work_dir, **objects):
        self.path, self.objects, self.step, self.seconds = Path(work_dir) / name / "state.pt", objects, 0, 0.0
        if self.path.is_file():
            # weights only: these files hold tensors, numbers and strings, and a swapped one cannot run code
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            for key, obj in objects.items():
                obj.load_state_dict(state[key])
            self.step, self.seconds = state["step"], state["seconds"]
            print(f"  resuming {name} at step {self.step}")

    def save(self, step, seconds):
        """``seconds``: training time so far, kept across resumes for the model card."""
        self.step, self.seconds = step, seconds
        with atomic_path(self.path) as tmp:
            torch.save({"step": step, "seconds": seconds, **{k: o.state_dict() for k, o in self.objects.items()}}, tmp)


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_loop(name, cfg, total, stage, optimizer, lr, step_fn):
    """The shared loop: learning-rate schedule, periodic checkpoints, a progress line."""
    started, before = time.perf_counter(), stage.seconds
    with tqdm(total=total, initial=stage.step, desc=name, unit="step") as bar:
        for step in range(stage.step, total):
            set_lr(optimizer, lr_at(step, total, lr))
            loss = step_fn(step)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update()
            if (step + 1) % cfg.CHECKPOINT_EVERY == 0 or step + 1 == total:
                stage.save(step + 1, before + time.perf_counter() - started)
    return stage.seconds


# --------------------------------------------------------------------------- stages
def train_classifier(cfg, device):
    classifier = world_metrics.build_classifier().to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3, weight_decay=1e-4)
    stage = Stage("classifier", cfg.WORK_DIR, model=classifier, optimizer=optimizer)
    subject = subject_pictures(cfg.TRAINING_IMAGES_DIR)

    def step_fn(step):
        rng = np.random.default_rng([cfg.RANDOM_SEED, 1, step])
        world, truths = world_batch(cfg.RANDOM_SEED + 1, step, 112, with_held_out=True)
        pictures = np.concatenate([world, augment_subject(subject, rng, 16)])
        labels = torch.tensor([fabric_world.KINDS.index(k) for k, _, _ in truths] + [world_metrics.SUBJECT] * 16)
        loss = F.cross_entropy(classifier(pixel_values=soften(to_pixels(pictures), rng).to(device)).logits,
                               labels.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    seconds = train_loop("classifier", cfg, cfg.CLASSIFIER_STEPS, stage, optimizer, 1e-3, step_fn)
    classifier.eval()
    world, truths = world_batch(cfg.RANDOM_SEED + 99, 0, 512, with_held_out=True)
    accuracy = world_metrics.kind_accuracy(classifier.cpu(), list(world), [k for k, _, _ in truths])
    rng = np.random.default_rng(12345)
    subject_recall = world_metrics.subject_share(classifier, list(augment_subject(subject, rng, 128)))
    print(f"  classifier: {accuracy:.1%} kind accuracy on fresh world samples, {subject_recall:.1%} subject recall")
    return {"classifier_kind_accuracy": accuracy, "classifier_subject_recall": subject_recall,
            "classifier_seconds": seconds}


def build_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(**VAE_CONFIG)


def train_vae(cfg, device):
    vae = build_vae().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.VAE_LEARNING_RATE)
    stage = Stage("vae", cfg.WORK_DIR, model=vae, optimizer=optimizer)

    def step_fn(step):
        rng = np.random.default_rng([cfg.RANDOM_SEED, 2, step])
        world, _ = world_batch(cfg.RANDOM_SEED + 2, step, 18, with_held_out=True)
        pixels = to_pixels(np.concatenate([world, collage(rng, 6)])).to(device)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    seconds = train_loop("vae", cfg, cfg.VAE_STEPS, stage, optimizer, cfg.VAE_LEARNING_RATE, step_fn)
    return vae.eval(), {"vae_seconds": seconds}


def scale_vae(vae, latents_params: torch.Tensor):
    """Set the latent scaling factor so latents have unit variance, as SD's 0.18215 does."""
    std = latents_params[:, :4].std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return 1.0 / std


def train_unet(cfg, device, vae, tokenizer):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.RANDOM_SEED)
    unet = UNet2DConditionModel(**UNET_CONFIG).to(device)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG)).to(device)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.UNET_LEARNING_RATE, weight_decay=1e-2)
    stage = Stage("unet", cfg.WORK_DIR, unet=unet, text_encoder=text_encoder, ema=ema, optimizer=optimizer)
    scheduler = DDPMScheduler.from_config(tiny_model.SD15_SCHEDULER_CONFIG)

    cache = Path(cfg.WORK_DIR) / "unet" / "world_latents.pt"
    if cache.is_file():
        data = torch.load(cache, weights_only=True)
    else:
        print(f"  encoding {cfg.NUM_WORLD_IMAGES} world pictures once...")
        pictures, truths = world_batch(cfg.RANDOM_SEED + 3, 0, cfg.NUM_WORLD_IMAGES)
        with torch.no_grad():
            params_ = torch.cat([training.cache_latent_distributions(vae, to_pixels(pictures[i:i + 1000]), False, 250)
                                 for i in range(0, len(pictures), 1000)])
        data = {"params": params_.cpu(), "truths": truths, "scale": scale_vae(vae, params_)}
        with atomic_path(cache) as tmp:
            torch.save(data, tmp)
    vae.register_to_config(scaling_factor=data["scale"])

    def step_fn(step):
        g = training.step_generator(cfg.RANDOM_SEED, step)
        rng = np.random.default_rng([cfg.RANDOM_SEED, 3, step])
        pick = torch.randint(len(data["params"]), (cfg.UNET_BATCH_SIZE,), generator=g)
        latents = training.sample_latents(data["params"][pick], g, vae.config).to(device)
        captions = [fabric_world.caption(*data["truths"][i], rng) for i in pick.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=g).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=g).to(device)
        pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, text_encoder(ids.to(device))[0]).sample
        # Min-SNR weighting: easy, almost noise-free timesteps stop dominating the gradient.
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=cfg.MIN_SNR_GAMMA) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        return loss.item()

    seconds = train_loop("unet", cfg, cfg.UNET_STEPS, stage, optimizer, cfg.UNET_LEARNING_RATE, step_fn)
    ema.copy_to(unet.parameters())  # ship the EMA weights
    return unet.eval(), text_encoder.eval(), {"unet_seconds": seconds}


def export(cfg, vae, unet, text_encoder, tokenizer_dir, classifier_state, card: dict):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = tiny_model.build_tokenizer(tokenizer_dir)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**tiny_model.SD15_SCHEDULER_CONFIG, skip_prk_steps=True),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with atomic_dir(cfg.OUTPUT_DIR) as tmp:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        tiny_model.build_tokenizer(tmp / "tokenizer")  # vocab.json/merges.txt too, for transformers 4
        classifier = world_metrics.build_classifier()
        classifier.load_state_dict(classifier_state)
        classifier.to(torch.float16).save_pretrained(tmp / "world_classifier", safe_serialization=True)
        (tmp / "README.md").write_text(model_card(card), encoding="utf-8")
        save_json(card, tmp / "pocket_card.json")
    print(f"  wrote {cfg.OUTPUT_DIR}/ ({sum(p.stat().st_size for p in Path(cfg.OUTPUT_DIR).rglob('*') if p.is_file()) / 2**20:.1f} MB)")


def evaluate(cfg, folder) -> dict:
    """Kind accuracy and colour adherence of the base model on captions it never saw in training."""
    pipe = models.load_pipeline(str(folder))
    sampling.use_multistep_solver(pipe)
    classifier = world_metrics.load_classifier(Path(folder) / "world_classifier").float()
    held_out = fabric_world.held_out_captions()
    prompts, truths = [], []
    for kind, c1, c2 in held_out:
        for _ in range(cfg.EVAL_IMAGES_PER_CAPTION):
            prompts.append(f"a {c1} and {c2} {kind} fabric pattern")
            truths.append((kind, c1, c2))
    settings = sampling.SamplingSettings(cfg.EVAL_INFERENCE_STEPS, guidance_scale=7.5, batch_size=32)
    images, seconds = sampling.generate(pipe, prompts, list(range(len(prompts))), settings, desc="Evaluating")
    result = {"eval_captions": len(held_out), "eval_images": len(images),
              "kind_accuracy": world_metrics.kind_accuracy(classifier, images, [k for k, _, _ in truths]),
              "colour_adherence": world_metrics.mean_colour_adherence(images, [(a, b) for _, a, b in truths]),
              "eval_images_per_second": len(images) / seconds}
    print(f"  held-out captions: {result['kind_accuracy']:.1%} kind accuracy, "
          f"{result['colour_adherence']:.1%} colour adherence ({len(images)} images)")
    return result


def model_card(card: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in card.items())
    return f"""# pocket-sd

A small Stable-Diffusion-shaped model trained from scratch on the procedural fabric world of
`pocket/fabric_world.py` (64x64 pictures of eight two-colour pattern kinds in ten named colours). It lets
a CPU classroom run the whole course with real pictures, and lets the project measure DreamBooth against
ground truth (`pocket/world_metrics.py`). Standard diffusers folder: `StableDiffusionPipeline.from_pretrained`
loads it; `world_classifier/` is a `transformers` ResNet that scores pictures of this world.

Made with: `{card.get('command', '')}`

| what | value |
|---|---|
{rows}
"""


def build(argv=None) -> dict:
    """Every stage asked for, in order; returns the card (what was measured)."""
    cfg = lesson.configure(globals(), argv, __doc__)
    lesson.require_choice(cfg, "STAGE", ["all", "classifier", "vae", "unet", "export", "evaluate"])
    lesson.require_int(cfg, "CLASSIFIER_STEPS", "VAE_STEPS", "UNET_STEPS", "UNET_BATCH_SIZE", "NUM_WORLD_IMAGES",
                       "CHECKPOINT_EVERY", "EVAL_IMAGES_PER_CAPTION", "EVAL_INFERENCE_STEPS")
    runtime = devices.pick_runtime(cfg.DEVICE, "no", training=True)
    device, work = runtime.device, Path(cfg.WORK_DIR)
    card_path = work / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    if cfg.STAGE == "all" or "command" not in card:
        card.update(command=" ".join(["python tools/train_pocket_model.py", *(sys.argv[1:] if argv is None else argv)]),
                    machine=f"{platform.machine()}, {torch.get_num_threads()} threads, {device.type}",
                    torch=torch.__version__)
    todo = ["classifier", "vae", "unet", "export", "evaluate"] if cfg.STAGE == "all" else [cfg.STAGE]
    tokenizer_dir = work / "tokenizer"
    tokenizer = tiny_model.build_tokenizer(tokenizer_dir)
    if "classifier" in todo:
        lesson.step(1, "World classifier")
        card.update(train_classifier(cfg, device))
    if {"vae", "unet", "export"} & set(todo):
        lesson.step(2, "Autoencoder")
        vae, info = train_vae(cfg, device)
        card.update(info)
    if {"unet", "export"} & set(todo):
        lesson.step(3, "UNet and text encoder")
        unet, text_encoder, info = train_unet(cfg, device, vae, tokenizer)
        card.update(info)
    card["train_minutes"] = sum(v for k, v in card.items() if k.endswith("_seconds") and k != "eval_seconds") / 60
    save_json(card, card_path)
    if "export" in todo:
        lesson.step(4, f"Export to {cfg.OUTPUT_DIR}/")
        classifier_state = torch.load(work / "classifier" / "state.pt", weights_only=True)["model"]
        export(cfg, vae.cpu(), unet.cpu(), text_encoder.cpu(), tokenizer_dir, classifier_state, card)
    if "evaluate" in todo:
        lesson.step(5, "Evaluate on held-out captions")
        card.update(evaluate(cfg, cfg.OUTPUT_DIR))
        save_json(card, card_path)
        Path(cfg.OUTPUT_DIR, "README.md").write_text(model_card(card), encoding="utf-8")
        save_json(card, Path(cfg.OUTPUT_DIR) / "pocket_card.json")
    return card


def main(argv=None) -> int:
    build(argv)
    return 0


if __name__ == "__main__":
    lesson.run(main)
