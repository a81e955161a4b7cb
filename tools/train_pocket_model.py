"""Train the pocket model from scratch: a small Stable-Diffusion-shaped model of the procedural fabric world.

    python tools/train_pocket_model.py                    # every stage, in order (resumable: run it again)
    python tools/train_pocket_model.py --stage vae        # one stage (classifier, vae, decoder, unet, carry, export,
                                                          # evaluate)

Stages:
1. classifier - the kind classifier (11 pattern kinds) and the object classifier (exercise 1's contexts) that
                score DreamBooth later; neither sees the subject;
2. vae        - an AutoencoderKL (64x64 pictures <-> 4x16x16 latents), on world pictures, off-world collages and
                textiles of the subject's three traditions drawn with other seeds (the UNet never sees those);
   decoder    - the autoencoder's decoder alone, sharpened on such textiles as the course shows a photo (about a
                quarter of a 512 px picture's side at 64 px); the encoder, and so every latent the UNet learns, is
                unchanged (as SD v1.5's own decoder was fine-tuned later: sd-vae-ft-mse);
3. unet       - the UNet and the CLIP text encoder together, on cached latents of world pictures and objects with
                their captions (some dropped, for classifier-free guidance); an EMA of the UNet is kept;
4. carry      - the text encoder alone learns to carry a word it never saw ("sks") to every position after it,
                as CLIP does, while its answers to the world's captions stay those the UNet learned;
5. export     - a standard diffusers folder, models/pocket-sd/ (fp16 weights), plus the classifiers; tokens no
                caption used ("sks") get an embedding as long as a learned word's, as a rare word has in CLIP;
6. evaluate   - kind accuracy, colour adherence and object accuracy on held-out captions, and how distinctly the
                text encoder carries "sks", written into the model card.

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
from common import figures, lesson, models, sampling, tiny_model, training  # noqa: E402
from pocket import fabric_world, world_metrics  # noqa: E402
from common.files import atomic_dir, atomic_path, inside, same_place, save_json, save_text  # noqa: E402
from common.errors import LessonError, brief  # noqa: E402
from common.images import center_crop_resize  # noqa: E402

# ============================== CONSTANTS ==============================
STAGE = "all"  # all, classifier, vae, decoder, unet, carry, export or evaluate
OUTPUT_DIR = "models/pocket-sd"  # the finished model
REPLACE_MODEL = False  # export over a model already in OUTPUT_DIR (git checkout -- models/pocket-sd: the shipped one)
WORK_DIR = "models/pocket-build"  # per-stage checkpoints
CLASSIFIER_STEPS = 1000  # batches of 96 plain world pictures and 48 objects
VAE_STEPS = 2400  # batches of 24 (12 world pictures, 8 textile crops, 4 off-world collages)
VAE_TEXTILES = 400  # textiles drawn once for the autoencoder (other seeds than the shipped ten)
VAE_LATENT_CHANNELS = 4  # numbers per latent pixel (SD v1.5: 4)
VAE_CHANNELS = "16,32,64"  # the autoencoder's widths, one per level (two levels halve 64 px to 16)
VAE_LEARNING_RATE = 3e-3  # AdamW, with warm-up and cosine decay (3e-3 halved the error of 1e-3 at 900 steps)
DECODER_STEPS = 2000  # batches of 24 (12 world pictures, 12 textile crops at the course's view) for the decoder alone
DECODER_LEARNING_RATE = 4e-4  # AdamW, warm-up, cosine decay (held-out crops passing: 91%; 800 steps at 2e-4: 82%)
UNET_STEPS = 16500  # batches of UNET_BATCH_SIZE (shipped: 6,500, 9,000, then 16,500: kind accuracy 68%, 74%, 85%)
UNET_BATCH_SIZE = 32  # world pictures per UNet step (more, smaller steps learned faster than 64)
UNET_LEARNING_RATE = 1e-3  # AdamW, with warm-up and cosine decay
NAMED_PER_BATCH = 3  # of each UNet batch: pictures called by a name alone, whose embedding codes them (name_codes)
NAME_NORM = 0.4  # the length of a name's embedding: a learned word's (median 0.40 at 9,000 steps)
CARRY_STEPS = 3000  # batches of 32 captions for the carry stage (the text encoder alone: 5.5 minutes here)
CARRY_LEARNING_RATE = 6e-4  # AdamW, with warm-up and cosine decay (3e-4 carried "sks" less far in long prompts)
CARRY_DISTANCE = 0.4  # 1 - cosine after a rare word, with vs without it (a world word swapped: 0.37), +-0.1
MIN_SNR_GAMMA = 5.0  # Min-SNR loss weighting (Hang et al. 2023): converges ~3x faster than plain MSE
NUM_WORLD_IMAGES = 40000  # world pictures encoded once for the UNet stage
OBJECT_SHARE = 0.4  # of them, objects (exercise 1's contexts); the rest plain patterns
EVAL_IMAGES_PER_CAPTION = 2  # samples per held-out caption in the evaluate stage
EVAL_INFERENCE_STEPS = 25  # DPM-Solver++ steps for those samples
CHECKPOINT_EVERY = 250  # steps between stage checkpoints
RANDOM_SEED = 0  # same seed, same model
DEVICE = "auto"  # auto, cuda, mps or cpu
MIXED_PRECISION = "fp32"  # fp32 or bf16 (autocast: forward passes in bfloat16, weights and optimizer fp32)
# =======================================================================

# Attention only at 8x8 and 4x4, with 4 heads: on a CPU, self-attention over the 256 positions of the
# 16x16 level cost half the step time for little gain on periodic patterns (0.70 vs 1.24 s a step).
UNET_CONFIG = dict(
    sample_size=16, layers_per_block=1, block_out_channels=(64, 128, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, sample_size=64,
    layers_per_block=1, norm_num_groups=16, down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
)
# The tiny model's words, plus the world's own words that the course's prompts do not use.
VOCABULARY = tiny_model.VOCABULARY + " ringed marked"
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                   max_position_embeddings=77, projection_dim=64)


# --------------------------------------------------------------------------- data
def world_batch(seed: int, step: int, n: int, with_held_out: bool = False):
    """n plain world pictures for one step (deterministic), as (uint8 array, truths)."""
    pictures, truths, _ = scene_batch(seed, step, n, with_held_out, object_share=0.0)
    return pictures, [t[:3] for t in truths]


def scene_batch(seed: int, step: int, n: int, with_held_out: bool = False, object_share: float = 0.4):
    """n world pictures, plain or objects, for one step (deterministic): (uint8 array, truths, objects)."""
    rng = np.random.default_rng([seed, step])
    pictures, truths = [], []
    while len(pictures) < n:
        image, kind, c1, c2, obj = fabric_world.sample_scene(int(rng.integers(2**62)), object_share)
        if with_held_out or not fabric_world.is_held_out(kind, c1, c2):
            pictures.append(image)
            truths.append((kind, c1, c2, obj))
    return np.stack(pictures), truths, [t[3] for t in truths]


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


def textile_bank(n: int, seed: int, size: int = 256) -> list:
    """Textiles of the subject's three traditions drawn by ``pocket/textiles.py`` with seeds the shipped pictures
    do not use and shuffled palettes: for the autoencoder only (SD v1.5's autoencoder has seen many fabrics too).
    The UNet never sees them: the world draws only the building blocks."""
    from pocket import textiles

    rng = np.random.default_rng([seed, 5])
    bank = []
    for i in range(n):
        palette = list(textiles.PALETTES)[rng.integers(len(textiles.PALETTES))]
        style = {"kente": "kente", "wax": "wax", "mud": "mudcloth"}[palette.split("_")[0]]
        picture = np.asarray(textiles.draw_textile(style, palette, 100_000 + seed * 10_000 + i, size), np.float32)
        picture = picture[..., rng.permutation(3)] if rng.random() < 0.5 else picture  # other dyes
        bank.append(picture.astype(np.uint8))
    return bank


def textile_crops(bank, rng: np.random.Generator, n: int, zoom=(0.25, 1.0)) -> np.ndarray:
    """Random square crops of ``zoom`` of a bank picture's side, resized to 64 px as the training scripts do."""
    from PIL import Image

    out = []
    for _ in range(n):
        picture = bank[rng.integers(len(bank))]
        side = int(len(picture) * rng.uniform(*zoom))
        x, y = rng.integers(0, len(picture) - side + 1, 2)
        crop = Image.fromarray(picture[y:y + side, x:x + side])
        out.append(np.rot90(np.asarray(center_crop_resize(crop, 64)), rng.integers(4)))
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
    """One stage's checkpoint file: modules, optimizer, EMA and step, saved atomically.

    ``inputs``: a fingerprint of what the stage starts from (``fingerprint``), where that can change under it; a
    checkpoint made from other inputs is not resumed but trained again."""

    def __init__(self, name, work_dir, inputs: str | None = None, **objects):
        self.path, self.objects, self.step, self.seconds = Path(work_dir) / name / "state.pt", objects, 0, 0.0
        self.inputs, self.total = inputs, None  # total: the step count it was trained towards (None: not saved)
        if self.path.is_file():
            # weights only: these files hold tensors, numbers and strings, and a swapped one cannot run code
            try:
                state = torch.load(self.path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: say which, and keep it
                raise LessonError(f"The {name} stage's checkpoint '{self.path}' cannot be read ({brief(exc, 80)}). "
                                  f"Move it away (or delete it) to train the stage again, or set WORK_DIR to another "
                                  f"folder.") from exc
            if not isinstance(state, dict) or state.get("inputs") != inputs:
                print(f"  {name}: the stage before it has changed since its checkpoint; training it again")
                return
            try:
                for key, obj in objects.items():
                    obj.load_state_dict(state[key])
            except (RuntimeError, KeyError, ValueError) as exc:  # (a model of another shape: VAE_CHANNELS changed)
                raise LessonError(f"The {name} stage's checkpoint '{self.path}' was made with other settings than "
                                  f"this run's (VAE_CHANNELS or VAE_LATENT_CHANNELS?: "
                                  f"{brief(exc, 80)}). Run with the settings it was made with, or move it away "
                                  f"(or delete it) to train the stage again, or set WORK_DIR to another folder."
                                  ) from exc
            self.step, self.seconds, self.total = state["step"], state["seconds"], state.get("total")

    def save(self, step, seconds, total):
        """``seconds``: training time so far, kept across resumes for the model card; ``total``: the steps asked for."""
        self.step, self.seconds, self.total = step, seconds, total
        with atomic_path(self.path) as tmp:
            torch.save({"step": step, "seconds": seconds, "inputs": self.inputs, "total": total,
                        **{k: o.state_dict() for k, o in self.objects.items()}}, tmp)


def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights: which model a later stage started from."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return float(peak * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup))))  # (a plain float: the
    # optimizer state is saved in the checkpoint, which loads with weights_only and refuses numpy scalars)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(cfg, device):
    """The forward pass in MIXED_PRECISION: bfloat16 autocast keeps the weights, gradients and optimizer in fp32
    and runs matrix products and convolutions in bf16, which CPUs with native bf16 (AVX512-BF16, AMX) and
    recent GPUs do faster (bench/bench_pocket_build.py). Losses are taken in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.MIXED_PRECISION == "bf16")


def train_loop(name, cfg, total, stage, optimizer, lr, step_fn, warmup: int = 200):
    """The shared loop: learning-rate schedule, periodic checkpoints, a progress line."""
    say_resumed(name, stage, total)
    started, before = time.perf_counter(), stage.seconds
    with tqdm(total=total, initial=stage.step, desc=name, unit="step") as bar:
        for step in range(stage.step, total):
            set_lr(optimizer, lr_at(step, total, lr, warmup))
            loss = step_fn(step)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update()
            if (step + 1) % cfg.CHECKPOINT_EVERY == 0 or step + 1 == total:
                stage.save(step + 1, before + time.perf_counter() - started, total)
    return stage.seconds


def say_resumed(name: str, stage: Stage, total: int) -> None:
    """Where a resumed stage stands against this run's step count. Resuming with more steps is how the shipped
    UNet grew (6,500, then 9,000, then 16,500), so another count is said, not refused: the learning rate's cosine
    is stretched over the new total from the step reached."""
    if not stage.step:
        return
    constant = f"{name.upper()}_STEPS"
    if stage.step >= total:
        print(f"  {name}: its checkpoint is at step {stage.step}, which {constant} = {total} does not pass: kept as "
              f"it is, not trained. To train it again from the start, move '{stage.path}' away.")
    elif stage.total not in (None, total):
        print(f"  resuming {name} at step {stage.step} of {total} (its checkpoint was trained towards "
              f"{stage.total}: the learning rate now decays over {constant} = {total})")
    else:
        print(f"  resuming {name} at step {stage.step} of {total}")


# --------------------------------------------------------------------------- stages
def fill_with_collage(pictures: np.ndarray, objects: list[str], rng: np.random.Generator, share: float) -> np.ndarray:
    """Replace ``share`` of the objects' fills with off-world collages: the object classifier must judge the
    silhouette, whatever fabric a DreamBooth model puts in it."""
    out = pictures.copy()
    plain_colours = [fabric_world.STUDIO_GREY, fabric_world.LEATHER, fabric_world.FLOOR, (55, 55, 60)]
    for i, obj in enumerate(objects):
        if obj != "plain" and rng.random() < share:
            near = [np.abs(out[i].astype(int) - c).sum(-1) < 40 for c in plain_colours]
            fill = ~np.logical_or.reduce(near)  # the object's fabric: neither the ground nor its trim
            out[i] = np.where(fill[..., None], collage(rng, 1)[0], out[i])
    return out


def train_classifier(cfg, device):
    """The kind classifier (plain world pictures) and the object classifier (exercise 1's contexts), trained
    together on the world only: neither ever sees the subject."""
    classifier = world_metrics.build_classifier().to(device)
    objects = world_metrics.build_classifier(fabric_world.OBJECTS).to(device)
    params = list(classifier.parameters()) + list(objects.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    stage = Stage("classifier", cfg.WORK_DIR, model=classifier, objects=objects, optimizer=optimizer)
    share = 1 - 1 / len(fabric_world.OBJECTS)  # every context equally often

    def step_fn(step):
        rng = np.random.default_rng([cfg.RANDOM_SEED, 1, step])
        world, truths = world_batch(cfg.RANDOM_SEED + 1, step, 96, with_held_out=True)
        scenes, _, names = scene_batch(cfg.RANDOM_SEED + 4, step, 48, with_held_out=True, object_share=share)
        scenes = fill_with_collage(scenes, names, rng, 0.3)
        kind_labels = torch.tensor([fabric_world.KINDS.index(k) for k, _, _ in truths])
        object_labels = torch.tensor([fabric_world.OBJECTS.index(o) for o in names])
        with autocast(cfg, device):
            kind_logits = classifier(pixel_values=soften(to_pixels(world), rng).to(device)).logits
            object_logits = objects(pixel_values=soften(to_pixels(scenes), rng).to(device)).logits
        loss = F.cross_entropy(kind_logits.float(), kind_labels.to(device)) + \
            F.cross_entropy(object_logits.float(), object_labels.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    seconds = train_loop("classifier", cfg, cfg.CLASSIFIER_STEPS, stage, optimizer, 1e-3, step_fn)
    classifier.eval(), objects.eval()
    world, truths = world_batch(cfg.RANDOM_SEED + 99, 0, 512, with_held_out=True)
    accuracy = world_metrics.kind_accuracy(classifier.cpu(), list(world), [k for k, _, _ in truths])
    scenes, _, names = scene_batch(cfg.RANDOM_SEED + 98, 0, 512, with_held_out=True, object_share=share)
    object_accuracy = world_metrics.object_accuracy(objects.cpu(), list(scenes), names)
    print(f"  classifiers: {accuracy:.1%} kind accuracy, {object_accuracy:.1%} object accuracy on fresh world samples")
    return {"classifier_kind_accuracy": accuracy, "classifier_object_accuracy": object_accuracy,
            "classifier_seconds": seconds}


def build_vae(cfg):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    widths = tuple(int(w) for w in cfg.VAE_CHANNELS.split(","))
    return AutoencoderKL(**VAE_CONFIG, latent_channels=cfg.VAE_LATENT_CHANNELS, block_out_channels=widths)


def train_vae(cfg, device):
    vae = build_vae(cfg).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.VAE_LEARNING_RATE)
    stage = Stage("vae", cfg.WORK_DIR, model=vae, optimizer=optimizer)

    bank = textile_bank(cfg.VAE_TEXTILES, cfg.RANDOM_SEED)

    def step_fn(step):
        rng = np.random.default_rng([cfg.RANDOM_SEED, 2, step])
        world = scene_batch(cfg.RANDOM_SEED + 2, step, 12, with_held_out=True)[0]
        pixels = to_pixels(np.concatenate([world, textile_crops(bank, rng, 8), collage(rng, 4)])).to(device)
        with autocast(cfg, device):
            posterior = vae.encode(pixels).latent_dist
            recon = vae.decode(posterior.sample(generator=None)).sample.float()
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    seconds = train_loop("vae", cfg, cfg.VAE_STEPS, stage, optimizer, cfg.VAE_LEARNING_RATE, step_fn)
    vae.eval()
    return vae, {"vae_seconds": seconds}


def train_decoder(cfg, device, vae):
    """A copy of the autoencoder whose decoder alone trains on textile crops seen as the course sees your photos
    (0.18-0.4 of a 512 px picture's side, more detail per pixel than the vae stage's crops): the 64 px pictures
    the UNet draws come out sharper, and the latents, made by the unchanged encoder, keep their meaning."""
    import copy

    tuned = copy.deepcopy(vae).to(device)
    tuned.requires_grad_(False)
    trained = [*tuned.decoder.parameters(), *tuned.post_quant_conv.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=cfg.DECODER_LEARNING_RATE)
    stage = Stage("decoder", cfg.WORK_DIR, inputs=fingerprint(vae), model=tuned, optimizer=optimizer)
    bank = textile_bank(cfg.VAE_TEXTILES, cfg.RANDOM_SEED, size=512)

    def step_fn(step):
        rng = np.random.default_rng([cfg.RANDOM_SEED, 9, step])
        world = scene_batch(cfg.RANDOM_SEED + 2, step, 12, with_held_out=True)[0]
        pixels = to_pixels(np.concatenate([world, textile_crops(bank, rng, 12, zoom=(0.18, 0.4))])).to(device)
        with autocast(cfg, device):
            with torch.no_grad():
                latents = tuned.encode(pixels).latent_dist.sample()
            recon = tuned.decode(latents).sample.float()
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    seconds = train_loop("decoder", cfg, cfg.DECODER_STEPS, stage, optimizer, cfg.DECODER_LEARNING_RATE, step_fn,
                         warmup=50)
    tuned.eval()
    return tuned, {"decoder_seconds": seconds}


@torch.no_grad()
def vae_fidelity(vae, prefix: str = "vae") -> dict:
    """PSNR of the autoencoder on held-out subject-style textiles (seeds no stage trained on), seen as the pocket
    course sees the subject (crops of CROP_FRACTION of the side), and on held-out world pictures."""
    bank = textile_bank(40, seed=77, size=512)
    crops = textile_crops(bank, np.random.default_rng(77), 160, zoom=(fabric_world.CROP_FRACTION,) * 2)
    world, _, _ = scene_batch(77, 0, 160, with_held_out=True)

    def psnr(pictures):
        x = to_pixels(pictures)
        recon = torch.cat([vae.decode(vae.encode(x[i:i + 40]).latent_dist.mode()).sample for i in range(0, len(x), 40)])
        mse = ((recon.clamp(-1, 1) - x) ** 2).mean(dim=(1, 2, 3)) / 4  # (pixels in [-1, 1]: a range of 2)
        return float((10 * torch.log10(1 / mse)).mean())

    textiles, world = psnr(crops), psnr(world)
    print(f"  autoencoder: {textiles:.1f} dB on held-out textiles at the course's crop, {world:.1f} dB on world "
          "pictures")
    return {f"{prefix}_psnr_held_out_textiles_db": textiles, f"{prefix}_psnr_held_out_world_db": world}


def scale_vae(vae, latents_params: torch.Tensor):
    """Set the latent scaling factor so latents have unit variance, as SD's 0.18215 does."""
    std = latents_params[:, :latents_params.shape[1] // 2].std().item()  # (the means; the rest are log-variances)
    vae.register_to_config(scaling_factor=1.0 / std)
    return 1.0 / std


def train_unet(cfg, device, vae, tokenizer):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.RANDOM_SEED)
    unet = UNet2DConditionModel(**UNET_CONFIG, in_channels=cfg.VAE_LATENT_CHANNELS,
                                out_channels=cfg.VAE_LATENT_CHANNELS).to(device)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG)).to(device)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.UNET_LEARNING_RATE, weight_decay=1e-2)
    # the UNet learns the autoencoder's latents: a checkpoint or latent cache made with another one is stale
    made_from = fingerprint(vae)
    stage = Stage("unet", cfg.WORK_DIR, inputs=made_from, unet=unet, text_encoder=text_encoder, ema=ema,
                  optimizer=optimizer)
    scheduler = DDPMScheduler.from_config(tiny_model.SD15_SCHEDULER_CONFIG)

    cache = Path(cfg.WORK_DIR) / "unet" / "world_latents.pt"
    data = torch.load(cache, weights_only=True) if cache.is_file() else {}
    if data.get("vae") != made_from:
        print(f"  encoding {cfg.NUM_WORLD_IMAGES} world pictures once...")
        pictures, truths, _ = scene_batch(cfg.RANDOM_SEED + 3, 0, cfg.NUM_WORLD_IMAGES, object_share=cfg.OBJECT_SHARE)
        with torch.no_grad():
            params_ = torch.cat([training.cache_latent_distributions(vae, to_pixels(pictures[i:i + 1000]), False, 250)
                                 for i in range(0, len(pictures), 1000)])
        data = {"params": params_.cpu(), "truths": truths, "scale": scale_vae(vae, params_), "vae": made_from}
        with atomic_path(cache) as tmp:
            torch.save(data, tmp)
    vae.register_to_config(scaling_factor=data["scale"])
    name_code, name_ids = name_codes(text_encoder, tokenizer, cfg)

    def step_fn(step):
        g = training.step_generator(cfg.RANDOM_SEED, step)
        rng = np.random.default_rng([cfg.RANDOM_SEED, 3, step])
        pick = torch.randint(len(data["params"]), (cfg.UNET_BATCH_SIZE,), generator=g)
        latents = training.sample_latents(data["params"][pick], g, vae.config).to(device)
        captions = [fabric_world.scene_caption(*data["truths"][i], rng) for i in pick.tolist()]
        letters = rng.choice(len(fabric_world.NAMES), cfg.NAMED_PER_BATCH, replace=False)
        for j, letter in enumerate(letters):  # the first few called by a name alone, that means their pattern
            kind, c1, c2, obj = data["truths"][int(pick[j])]
            captions[j] = fabric_world.named_caption(fabric_world.NAMES[letter], kind, obj)
            with torch.no_grad():
                text_encoder.get_input_embeddings().weight[name_ids[letter]] = name_code(kind, c1, c2)
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=g).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=g).to(device)
        with autocast(cfg, device):
            pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps,
                        text_encoder(ids.to(device))[0]).sample.float()
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
    with torch.no_grad():  # the letters mean nothing by themselves: random, as "sks" is (``wake_rare_tokens``)
        table = text_encoder.get_input_embeddings().weight
        g = torch.Generator().manual_seed(cfg.RANDOM_SEED + 6)
        random = torch.randn(len(name_ids), table.shape[1], generator=g)
        table[name_ids] = (random / random.norm(dim=1, keepdim=True) * cfg.NAME_NORM).to(table.device, table.dtype)
    return unet.eval(), text_encoder.eval(), {"unet_seconds": seconds}


def train_carry(cfg, device, text_encoder, tokenizer):
    """Teach the text encoder to carry a word it never learned to every position after it, as CLIP carries "sks".

    Trained with the UNet, the encoder learned to let the padding positions (which the UNet attends to as well)
    ignore an unknown word: with and without "sks" its outputs differed 0.05 where a swapped world word differs 0.37,
    so no LoRA could tell the two prompts apart. Here the encoder alone trains on two losses, each step:
    - its answers to the world's captions stay what they were (mean squared error against the frozen encoder of the
      unet stage), so the UNet's pictures do not change;
    - a rare token inserted at a random word position, with a fresh random embedding of a learned word's length
      (so that any rare word is carried, not one), changes the positions after it by 1 - cosine within 0.1 of
      CARRY_DISTANCE; up to two other rare tokens may be there already, as an unknown word such as "watercolor"
      is split into pieces the world never used.
    The embedding table does not train: the world's words keep their meaning and each rare word its random one."""
    import copy

    teacher = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    table = text_encoder.get_input_embeddings().weight
    captions = training_captions()
    rare = torch.nonzero(unseen_tokens(tokenizer, captions)).flatten()
    seen = torch.ones(len(table), dtype=torch.bool)
    seen[rare] = False
    norm = table[seen].norm(dim=1).median().item()
    params = [p for name, p in text_encoder.named_parameters() if "embedding" not in name]
    for name, p in text_encoder.named_parameters():
        p.requires_grad_("embedding" not in name)
    optimizer = torch.optim.AdamW(params, lr=cfg.CARRY_LEARNING_RATE, weight_decay=0.0)
    # (from the unet stage's encoder: when that stage trains on, its carry checkpoint no longer applies)
    stage = Stage("carry", cfg.WORK_DIR, inputs=fingerprint(teacher), text_encoder=text_encoder, optimizer=optimizer)
    encoded = [ids[:70] for ids in tokenizer(captions).input_ids]  # once, not every step
    pad, n = tokenizer.pad_token_id, 32

    def step_fn(step):
        g = training.step_generator(cfg.RANDOM_SEED, step)
        rng = np.random.default_rng([cfg.RANDOM_SEED, 7, step])
        with torch.no_grad():  # fresh meanings for the rare tokens this step
            draw = torch.randn(len(rare), table.shape[1], generator=g)
            table[rare] = (draw / draw.norm(dim=1, keepdim=True) * norm).to(table.device, table.dtype)
        plain, without, with_word = [], [], []
        after = torch.zeros(n, 77, 1)
        for k in range(n):
            ids = encoded[int(rng.integers(len(encoded)))]
            plain.append(ids)
            for _ in range(rng.integers(3)):  # other unknown pieces, before or after
                at = int(rng.integers(1, len(ids)))
                ids = ids[:at] + [int(rare[rng.integers(len(rare))])] + ids[at:]
            at = int(rng.integers(1, len(ids)))
            without.append(ids)
            with_word.append(ids[:at] + [int(rare[rng.integers(len(rare))])] + ids[at:])
            after[k, at + 1:] = 1
        plain, without, with_word = (torch.tensor([i + [pad] * (77 - len(i)) for i in batch], device=device)
                                     for batch in (plain, without, with_word))
        with autocast(cfg, device):
            with torch.no_grad():
                target = teacher(plain)[0].float()
            answers, a, b = (text_encoder(ids)[0].float() for ids in (plain, without, with_word))
        keep = F.mse_loss(answers, target)
        a, b = a * after.to(device), b * after.to(device)
        distance = 1 - F.cosine_similarity(a.flatten(1), b.flatten(1))
        band = (F.relu(cfg.CARRY_DISTANCE - 0.1 - distance) + F.relu(distance - cfg.CARRY_DISTANCE - 0.1)).mean()
        loss = 10 * keep + band
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    seconds = train_loop("carry", cfg, cfg.CARRY_STEPS, stage, optimizer, cfg.CARRY_LEARNING_RATE, step_fn)
    with torch.no_grad():  # the rare tokens' embeddings as the unet stage left them (export wakes them)
        table[rare] = teacher.get_input_embeddings().weight[rare]
    return text_encoder.eval().requires_grad_(False), {"carry_seconds": seconds}


def name_codes(text_encoder, tokenizer, cfg):
    """The names' embeddings: ``code(kind, colour1, colour2)``, a random code of a world pattern (one random vector
    per kind, per pattern colour and per ground colour, summed), NAME_NORM long; and the names' token ids.

    A picture called "a q fabric pattern" gets its pattern's code as q's embedding for that step, so that the
    text encoder learns to carry an unfamiliar word's embedding to the UNet, as CLIP carries a rare word such as
    "sks" (here a random vector of that length, ``wake_rare_tokens``). Measured: it helped little (pocket/README.md)."""
    ids = [tokenizer(name, add_special_tokens=False).input_ids for name in fabric_world.NAMES]
    assert all(len(i) == 1 for i in ids), "each name must be one token"
    world = {i for c in training_captions(2000) for i in tokenizer(c, add_special_tokens=False).input_ids}
    assert not world & {i[0] for i in ids}, "a name must not be a piece of a world word (d is one of 'painted')"
    g = torch.Generator().manual_seed(cfg.RANDOM_SEED + 5)
    width = text_encoder.get_input_embeddings().weight.shape[1]
    kinds = torch.randn(len(fabric_world.KINDS), width, generator=g)
    grounds = torch.randn(len(fabric_world.COLOURS), width, generator=g)  # (drawn in this order: the shipped codes)
    colours = torch.randn(len(fabric_world.COLOURS), width, generator=g)

    def code(kind, colour1, colour2):
        v = kinds[fabric_world.KINDS.index(kind)] + colours[fabric_world.COLOUR_NAMES.index(colour1)] + \
            grounds[fabric_world.COLOUR_NAMES.index(colour2)]
        return v / v.norm() * cfg.NAME_NORM

    return code, [i[0] for i in ids]


def training_captions(n: int = 20000, seed: int = 12345) -> list[str]:
    """A large sample of the captions the UNet stage trains on: what the text encoder learned."""
    rng = np.random.default_rng(seed)
    captions = []
    for i in range(n):
        _, kind, c1, c2 = fabric_world.sample(int(rng.integers(2**62)))
        obj = fabric_world.OBJECTS[rng.integers(len(fabric_world.OBJECTS))] if rng.random() < 0.4 else "plain"
        captions.append(fabric_world.scene_caption(kind, c1, c2, obj, rng))
    return captions  # (not the names: no letter means anything once trained, and each is woken as "sks" is)


def known_words(captions) -> list[str]:
    return sorted({w for c in captions for w in c.replace(",", " ").split()})


def unseen_tokens(tokenizer, captions) -> torch.Tensor:
    """A mask over the vocabulary: True for every token no caption used ("sks", the names, pieces of unknown words)."""
    seen = torch.zeros(len(tokenizer), dtype=torch.bool)
    for i in range(0, len(captions), 1000):
        seen[tokenizer(captions[i:i + 1000], padding="max_length", max_length=77, return_tensors="pt").input_ids.unique()] = True
    return ~seen


@torch.no_grad()
def wake_rare_tokens(text_encoder, tokenizer, captions) -> int:
    """Give every token the world never used ("sks" among them) an embedding as long as a learned word's.

    In CLIP, a rare word such as "sks" still reaches the UNet as a distinct signal, which DreamBooth then
    binds to the subject. A token never seen in training keeps its tiny initial embedding (norm ~0.15 against
    ~0.5), so the text encoder nearly ignores it. Rescaling keeps its random direction: a word the model has no
    meaning for, but can tell apart."""
    seen = ~unseen_tokens(tokenizer, captions)
    table = text_encoder.get_input_embeddings().weight
    target = table[seen].norm(dim=1).median()
    table[~seen] *= (target / table[~seen].norm(dim=1, keepdim=True)).to(table.dtype)
    return int((~seen).sum())


def export(cfg, vae, unet, text_encoder, tokenizer_dir, classifier_states, card: dict) -> dict:
    """Write the diffusers folder; returns what it adds to the card (how to use the model)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = tiny_model.build_tokenizer(tokenizer_dir, VOCABULARY)
    captions = training_captions()
    added = {"rare_tokens_woken": wake_rare_tokens(text_encoder, tokenizer, captions),
             "known_words": known_words(captions), "crop_fraction": fabric_world.CROP_FRACTION}
    card.update(added)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**tiny_model.SD15_SCHEDULER_CONFIG, skip_prk_steps=True),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with atomic_dir(cfg.OUTPUT_DIR) as tmp:
        pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        tiny_model.build_tokenizer(tmp / "tokenizer", VOCABULARY)  # vocab.json/merges.txt too, for transformers 4
        for folder, labels in (("world_classifier", world_metrics.LABELS), ("object_classifier", fabric_world.OBJECTS)):
            classifier = world_metrics.build_classifier(labels)
            classifier.load_state_dict(classifier_states[folder])
            classifier.to(torch.float16).save_pretrained(tmp / folder, safe_serialization=True)
        (tmp / "README.md").write_text(model_card(card), encoding="utf-8")
        save_json(card, tmp / "pocket_card.json")
    print(f"  wrote {cfg.OUTPUT_DIR}/ ({sum(p.stat().st_size for p in Path(cfg.OUTPUT_DIR).rglob('*') if p.is_file()) / 2**20:.1f} MB)")
    return added


@torch.no_grad()
def token_signal(pipe) -> dict:
    """How differently the text encoder answers with and without "sks", against a world word added or swapped
    (and one of the world's names added, ``fabric_world.NAMES``):
    1 - cosine of the output, mean over pairs; ``text_`` over all 77 positions the UNet attends to, ``prompt_``
    over the prompt's own positions (its words and end token; the padding after it left out)."""
    def distance(pairs, prompt_only):
        out = []
        for a, b in pairs:
            ids = pipe.tokenizer([a, b], padding="max_length", max_length=77, return_tensors="pt").input_ids
            h = pipe.text_encoder(ids)[0].float()
            if prompt_only:  # up to the longer prompt's end token
                h = h[:, :int((ids[0] == pipe.tokenizer.eos_token_id).nonzero()[0]) + 1]
            out.append(1 - F.cosine_similarity(h[:1].flatten(1), h[1:].flatten(1)).item())
        return float(np.mean(out))

    kinds, colours = fabric_world.KINDS, fabric_world.COLOUR_NAMES
    pairs = {"sks": [(f"a sks {pattern}", f"a {pattern}") for pattern in
                     ("african fabric pattern", "fabric pattern", "striped fabric pattern")],
             "added_word": [(f"a {c} fabric pattern", "a fabric pattern") for c in colours[:5]],
             "name": [(f"a {n} fabric pattern", "a fabric pattern") for n in fabric_world.NAMES[:5]],
             "swapped_word": [(f"a {a} fabric pattern", f"a {b} fabric pattern") for a, b in zip(kinds, kinds[1:])]}
    return {f"{where}_distance_{name}": distance(p, where == "prompt")
            for where in ("text", "prompt") for name, p in pairs.items()}


def evaluate(cfg, folder) -> dict:
    """On captions it never saw in training: kind accuracy and colour adherence of plain patterns, object accuracy
    of exercise 1's contexts; and how distinctly the text encoder carries "sks"."""
    pipe = models.load_pipeline(str(folder))
    sampling.use_multistep_solver(pipe)
    classifier = world_metrics.load_classifier(Path(folder) / "world_classifier").float()
    objects = world_metrics.load_classifier(Path(folder) / "object_classifier").float()
    held_out = fabric_world.held_out_captions()
    prompts, truths = [], []
    for kind, c1, c2 in held_out:
        for _ in range(cfg.EVAL_IMAGES_PER_CAPTION):
            prompts.append(f"a {c1} and {c2} {kind} fabric pattern")
            truths.append((kind, c1, c2))
    contexts, asked = [], []
    for i, obj in enumerate(fabric_world.OBJECTS):
        for kind, c1, c2 in held_out[i::len(fabric_world.OBJECTS)][:16]:
            contexts.append(fabric_world.CONTEXTS[obj].format(fabric_world.pattern_words(kind, c1, c2)))
            asked.append(obj)
    settings = sampling.SamplingSettings(cfg.EVAL_INFERENCE_STEPS, guidance_scale=7.5, batch_size=32)
    images, seconds = sampling.generate(pipe, prompts + contexts, list(range(len(prompts) + len(contexts))), settings,
                                        desc="Evaluating")
    images, scenes = images[:len(prompts)], images[len(prompts):]
    result = {"eval_captions": len(held_out), "eval_images": len(images),
              "kind_accuracy": world_metrics.kind_accuracy(classifier, images, [k for k, _, _ in truths]),
              "colour_adherence": world_metrics.mean_colour_adherence(images, [(a, b) for _, a, b in truths]),
              "eval_context_images": len(scenes), "object_accuracy": world_metrics.object_accuracy(objects, scenes, asked),
              "eval_images_per_second": (len(images) + len(scenes)) / seconds, **token_signal(pipe)}
    print(f"  held-out captions: {result['kind_accuracy']:.1%} kind accuracy, "
          f"{result['colour_adherence']:.1%} colour adherence ({len(images)} images), "
          f"{result['object_accuracy']:.1%} object accuracy ({len(scenes)} contexts)")
    figures.save_grid(images[:24] + scenes[::max(1, len(scenes) // 36)][:36], Path(cfg.WORK_DIR) / "evaluate.png", cols=12)
    return result


def model_card(card: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in card.items()
                     if not isinstance(v, list))
    return f"""# pocket-sd

A small Stable-Diffusion-shaped model trained from scratch on the procedural fabric world of
`pocket/fabric_world.py`: 64x64 pictures of eleven pattern kinds in ten named colours - eight geometric kinds and
three building blocks of African textiles (strip weaving, printed rings, painted marks), never the subject itself -
plain or made into five of exercise 1's contexts (a dress, a room's wallpaper, a handbag, a vase, a basket),
captioned as exercise 1 words them. It lets a CPU classroom run the whole course with real pictures, and lets the
project measure DreamBooth against ground truth. Standard diffusers folder: `StableDiffusionPipeline.from_pretrained`
loads it; `world_classifier/` (pattern kinds) and `object_classifier/` (contexts) are `transformers` ResNets that
score pictures of this world. The pocket course trains on crops of {card.get('crop_fraction', 1.0):.0%} of each
training photo's side (`crop_fraction` below; exercise 3a/3b read it), so that more of the fabric's motifs survive
at 64 px (how much: the autoencoder's PSNR on held-out textiles, below: `vae_` after the vae stage, `decoder_` after
the decoder stage, whose decoder this folder holds; the encoder, and so the latents, are the vae stage's).

Made with: `{card.get('command', '')}`; the runs that made this copy, in order (a stage stopped and
resumed continues from its last checkpoint): {'; '.join(f"`{c}`" for c in card.get('commands', []))}

| what | value |
|---|---|
{rows}
"""


def require_vae_channels(cfg) -> None:
    """VAE_CHANNELS: one width per level of VAE_CONFIG, each a whole multiple of its norm_num_groups ("16,32,64")."""
    levels, groups = len(VAE_CONFIG["down_block_types"]), VAE_CONFIG["norm_num_groups"]
    value = cfg.VAE_CHANNELS
    parts = value.split(",") if isinstance(value, str) else value if isinstance(value, (tuple, list)) else [value]
    try:
        widths = [int(str(w).strip()) for w in parts]
    except ValueError:
        widths = []
    if len(widths) != levels or any(w < groups or w % groups for w in widths):
        lesson.fail(cfg, "VAE_CHANNELS", f"must be {levels} widths separated by commas, each a multiple of {groups} "
                                         "(like '16,32,64')")
    cfg.VAE_CHANNELS = ",".join(map(str, widths))


def require_earlier_stages(cfg, todo) -> None:
    """What a stage needs and does not make itself, checked before any stage trains: export takes the classifier
    stage's checkpoint (it would fail only after the vae, decoder, unet and carry stages), evaluate the exported
    model in OUTPUT_DIR (where it was named as MODEL_ID, a constant this script does not have)."""
    classifier = Path(cfg.WORK_DIR) / "classifier" / "state.pt"
    if "export" in todo and "classifier" not in todo and not classifier.is_file():
        raise LessonError(f"The export stage needs the classifier stage's checkpoint '{classifier}', which is not "
                          f"there. Run python tools/train_pocket_model.py --stage classifier first (with the same "
                          f"WORK_DIR), then --stage export.")
    if "evaluate" in todo and "export" not in todo and not (Path(cfg.OUTPUT_DIR) / "model_index.json").is_file():
        raise LessonError(f"The evaluate stage scores the model in OUTPUT_DIR '{cfg.OUTPUT_DIR}', which holds none. "
                          f"Run --stage export first (with the same OUTPUT_DIR), or set OUTPUT_DIR to the exported "
                          f"model's folder (--output-dir models/pocket-sd).")


# What export writes into OUTPUT_DIR: the folder is replaced as a whole, so it may hold nothing else.
MODEL_PARTS = {"model_index.json", "README.md", "pocket_card.json", "scheduler", "text_encoder", "tokenizer", "unet",
               "vae", "world_classifier", "object_classifier"}


def require_replaceable_output(cfg, todo) -> None:
    """Export replaces OUTPUT_DIR as a whole, by default the shipped pocket model: a trial run with a few steps put
    a half-trained model in its place without a word, and OUTPUT_DIR = "models" would have taken the LoRAs and this
    build's own checkpoints (WORK_DIR) with it. Checked before any stage trains."""
    if "export" not in todo:
        return
    output, work = Path(cfg.OUTPUT_DIR), Path(cfg.WORK_DIR)
    if same_place(output, work) or inside(work, output):
        raise LessonError(f"OUTPUT_DIR '{cfg.OUTPUT_DIR}' {'is' if same_place(output, work) else 'holds'} WORK_DIR "
                          f"'{cfg.WORK_DIR}', and export replaces OUTPUT_DIR as a whole: the stages' checkpoints "
                          f"would go with it. Give each a folder of its own (--output-dir models/my-pocket-sd).")
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in output.iterdir()
                    if p.name not in MODEL_PARTS and not p.name.startswith(".")) if output.is_dir() else []  # (.DS_Store)
    if others:
        raise LessonError(f"OUTPUT_DIR '{cfg.OUTPUT_DIR}' holds {len(others)} thing(s) that are not part of a pocket "
                          f"model ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}), and export replaces "
                          f"the folder as a whole. Set OUTPUT_DIR to a new folder (--output-dir models/my-pocket-sd).")
    if (output / "model_index.json").is_file() and not cfg.REPLACE_MODEL:
        raise LessonError(f"OUTPUT_DIR '{cfg.OUTPUT_DIR}' already holds a model (the shipped pocket model, unless you "
                          f"exported over it), and the export stage would replace it. Export elsewhere "
                          f"(--output-dir models/my-pocket-sd), or pass --replace-model to replace it "
                          f"('git checkout -- models/pocket-sd' brings the shipped one back).")


def build(argv=None) -> dict:
    """Every stage asked for, in order; returns the card (what was measured)."""
    cfg = lesson.configure(globals(), argv, __doc__)
    stages = ["classifier", "vae", "decoder", "unet", "carry", "export", "evaluate"]
    lesson.require_choice(cfg, "STAGE", ["all", *stages])
    lesson.require_int(cfg, "CLASSIFIER_STEPS", "VAE_STEPS", "DECODER_STEPS", "UNET_STEPS", "UNET_BATCH_SIZE",
                       "NUM_WORLD_IMAGES", "CHECKPOINT_EVERY", "EVAL_IMAGES_PER_CAPTION", "EVAL_INFERENCE_STEPS",
                       "CARRY_STEPS")
    lesson.require_float(cfg, "CARRY_LEARNING_RATE", "DECODER_LEARNING_RATE", above=True)
    lesson.require_float(cfg, "CARRY_DISTANCE", minimum=0.1, maximum=1.9)
    lesson.require_int(cfg, "NAMED_PER_BATCH", minimum=0, maximum=cfg.UNET_BATCH_SIZE - 1)
    lesson.require_float(cfg, "NAME_NORM", above=True)
    lesson.require_choice(cfg, "MIXED_PRECISION", ["fp32", "bf16"])
    # (each of these was taken as it came: a typo ended minutes in as 'unexpected ValueError' or a torch error)
    lesson.require_seed(cfg, "RANDOM_SEED")
    lesson.require_int(cfg, "VAE_TEXTILES", "VAE_LATENT_CHANNELS")
    lesson.require_float(cfg, "VAE_LEARNING_RATE", "UNET_LEARNING_RATE", "MIN_SNR_GAMMA", above=True)
    lesson.require_float(cfg, "OBJECT_SHARE", maximum=1.0)
    require_vae_channels(cfg)
    lesson.require_writable_dir(cfg, "OUTPUT_DIR", "WORK_DIR")
    todo = stages if cfg.STAGE == "all" else [cfg.STAGE]
    require_replaceable_output(cfg, todo)
    require_earlier_stages(cfg, todo)
    runtime = devices.pick_runtime(cfg.DEVICE, "no", training=True)
    device, work = runtime.device, Path(cfg.WORK_DIR)
    card_path = work / "card.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    command = " ".join(["python tools/train_pocket_model.py", *(sys.argv[1:] if argv is None else argv)])
    if cfg.STAGE == "all" or "command" not in card:
        card.update(command=command, machine=f"{platform.machine()}, {torch.get_num_threads()} threads, {device.type}",
                    torch=torch.__version__)
    card["commands"] = card.get("commands", []) + [command]  # every run that made it, stages and resumes included
    tokenizer_dir = work / "tokenizer"
    tokenizer = tiny_model.build_tokenizer(tokenizer_dir, VOCABULARY)

    def remember(info: dict) -> None:
        """Add a stage's figures to the card on disk, re-read first: stages may run at once in two processes
        (the classifier and the autoencoder do not depend on each other)."""
        on_disk = json.loads(card_path.read_text()) if card_path.is_file() else {}
        card.update({**on_disk, **card, **info})
        card["train_minutes"] = sum(v for k, v in card.items() if k.endswith("_seconds")) / 60
        save_json(card, card_path)

    if "classifier" in todo:
        lesson.step(1, "World classifier")
        remember(train_classifier(cfg, device))
    if {"vae", "decoder", "unet", "carry", "export"} & set(todo):
        lesson.step(2, "Autoencoder")
        vae, info = train_vae(cfg, device)
        remember({**info, **vae_fidelity(vae.cpu())})
    if {"decoder", "export"} & set(todo):
        lesson.step(2, "The autoencoder's decoder, sharpened (its encoder, and so the latents, unchanged)")
        tuned_vae, info = train_decoder(cfg, device, vae)
        remember({**info, **vae_fidelity(tuned_vae.cpu(), prefix="decoder")})
    if {"unet", "carry", "export"} & set(todo):
        lesson.step(3, "UNet and text encoder")
        unet, text_encoder, info = train_unet(cfg, device, vae, tokenizer)
        remember(info)
    if {"carry", "export"} & set(todo):
        lesson.step(4, "The text encoder carries a rare word")
        text_encoder, info = train_carry(cfg, device, text_encoder, tokenizer)
        remember(info)
    if "export" in todo:
        lesson.step(5, f"Export to {cfg.OUTPUT_DIR}/")
        state = torch.load(work / "classifier" / "state.pt", weights_only=True)
        # the latents' scale belongs to the encoder, which the decoder stage left as it was: the unet stage set it
        tuned_vae.register_to_config(scaling_factor=vae.config.scaling_factor)
        remember(export(cfg, tuned_vae.cpu(), unet.cpu(), text_encoder.cpu(), tokenizer_dir,
                        {"world_classifier": state["model"], "object_classifier": state["objects"]}, card))
    if "evaluate" in todo:
        lesson.step(6, "Evaluate on held-out captions")
        remember(evaluate(cfg, cfg.OUTPUT_DIR))
        save_text(model_card(card), Path(cfg.OUTPUT_DIR) / "README.md")
        save_json(card, Path(cfg.OUTPUT_DIR) / "pocket_card.json")
    return card


def main(argv=None) -> int:
    build(argv)
    return 0


if __name__ == "__main__":
    lesson.run(main)
