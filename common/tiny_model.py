"""The built-in ``tiny`` model: Stable Diffusion v1.5's architecture at toy size, built offline.

``MODEL_ID = "tiny"`` builds it once into ``models/tiny-sd/`` as a standard diffusers folder: real
diffusers and transformers classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer)
with small deterministic random weights, so the machinery runs in seconds on any CPU. Its pictures are
noise by design. Its tokenizer (``build_tokenizer``) knows the course's words and "sks" as single tokens;
the pocket model's trainer (``tools/train_pocket_model.py``) reuses it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

TINY_DIR = Path("models/tiny-sd")
TINY_VERSION = "1"

# Words the tiny (and pocket) tokenizer knows as single tokens: the course's prompts, the pocket
# world's captions, and the rare subject token "sks". Anything else falls back to characters.
VOCABULARY = """
a an the of in on with and made as by for to at from photo photograph picture painting art artwork style
sks african fabric fabrics pattern patterns textile textiles cloth print wax kente mudcloth
beautiful dress fashion photography wallpaper room watercolor handbag leather vase ceramic cyberpunk city
woven basket abstract plain modern interior design pillow shirt scarf quilt tapestry rug curtain
oil impressionist cubist pop pixel ukiyo renaissance minimalist sketch pencil stained glass mosaic
striped checked dotted zigzag diamond wavy triangle crossed stripes checks dots zigzags diamonds waves
red blue yellow green black white orange purple brown pink gold colorful vibrant bright
blurry distorted low quality high detailed ugly spacecraft ancient temple underwater close up
"""


# Stable Diffusion v1.5's noise schedule (its scheduler_config.json): the tiny and pocket models share it.
SD15_SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             num_train_timesteps=1000, steps_offset=1, set_alpha_to_one=False)


def tiny_model_is_built(folder: Path = TINY_DIR) -> bool:
    marker = Path(folder) / "tiny_version.txt"
    return (Path(folder) / "model_index.json").is_file() and marker.is_file() and \
        marker.read_text().strip() == TINY_VERSION


def build_tokenizer(folder: Path, words: str = VOCABULARY):
    """A CLIP BPE tokenizer whose vocabulary holds every byte plus ``words`` as whole tokens.

    Merges are added until each word encodes as one token (checked), so "sks" stays a single token.
    Saved as vocab.json/merges.txt and loaded with ``from_pretrained`` (the file arguments of the
    constructor are ignored by transformers 5).
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    wordlist = sorted(set(words.split()))

    def write_and_load():
        specials = {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
        (folder / "vocab.json").write_text(json.dumps({**vocab, **specials}), encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
                  "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return CLIPTokenizer.from_pretrained(str(folder))

    for _ in range(8):  # each pass appends merges after the existing ones, so earlier words stay whole
        tokenizer = write_and_load()
        split = {w: tokenizer.tokenize(w) for w in wordlist}
        split = {w: toks for w, toks in split.items() if len(toks) > 1}
        if not split:
            return tokenizer
        for toks in split.values():
            current = toks[0]
            for nxt in toks[1:]:
                if (current, nxt) not in merges:
                    merges.append((current, nxt))
                current += nxt
                vocab.setdefault(current, len(vocab))
    raise RuntimeError(f"tokenizer build did not converge for: {sorted(split)}")


def build_tiny_pipeline(tokenizer_dir: Path, seed: int = 0):
    """The tiny Stable-Diffusion-shaped pipeline: real diffusers/transformers classes, small random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(Path(tokenizer_dir))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
            block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    scheduler = PNDMScheduler(**SD15_SCHEDULER_CONFIG, skip_prk_steps=True)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def ensure_tiny_model(folder: Path = TINY_DIR) -> Path:
    """Write the tiny model once as a standard diffusers folder (atomically: built aside, then renamed)."""
    folder = Path(folder)
    if tiny_model_is_built(folder):
        return folder
    print(f"Building the built-in tiny model in {folder}/ (once, a few seconds, no download)...")
    staging = folder.with_name(folder.name + f".building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    # The tokenizer folder keeps vocab.json/merges.txt (what transformers 4 reads) beside tokenizer.json.
    pipe = build_tiny_pipeline(staging / "tokenizer")
    pipe.save_pretrained(staging, safe_serialization=True)
    (staging / "tiny_version.txt").write_text(TINY_VERSION + "\n")
    (staging / "README.md").write_text(
        "# tiny-sd\n\nBuilt by `common/tiny_model.py` (MODEL_ID = 'tiny'): Stable Diffusion v1.5's architecture at toy "
        "size with deterministic random weights. It checks the machinery; its pictures are noise by design.\n")
    if folder.exists():
        shutil.rmtree(folder)
    try:
        os.replace(staging, folder)
    except OSError:  # another process (e.g. a second GPU under accelerate launch) finished first
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "model_index.json").is_file():
            raise
    return folder
