"""Where the base model comes from, and the built-in ``tiny`` stand-in for Stable Diffusion v1.5.

``MODEL_ID`` accepts, in every script:

- a Hub id, by default ``stable-diffusion-v1-5/stable-diffusion-v1-5`` (the course's
  ``runwayml/stable-diffusion-v1-5`` was removed from the Hub in 2024 and is read as an alias);
- a local diffusers folder (one with ``model_index.json``);
- a single ``.safetensors`` / ``.ckpt`` checkpoint file, as model sites publish them;
- ``tiny``: a Stable-Diffusion-shaped pipeline with small random weights, built offline into
  ``models/tiny-sd/``. Its pictures are noise by design: it exists to check the machinery fast;
- ``pocket``: the small model trained on a procedural fabric world (``models/pocket-sd/``).

Whatever the source, the result is a plain ``diffusers.StableDiffusionPipeline``: the code that runs on
``tiny`` here is the code that runs SD v1.5 on a student's GPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import LessonError

DEFAULT_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ALIASES = {"runwayml/stable-diffusion-v1-5": DEFAULT_MODEL_ID}
TINY_DIR = Path("models/tiny-sd")
POCKET_DIR = Path("models/pocket-sd")
TINY_VERSION = "1"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")

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


@dataclass
class ModelSource:
    kind: str  # "hub", "folder", "single_file", "tiny" or "pocket"
    location: str
    note: str = ""


def resolve(model_id: str) -> ModelSource:
    """Work out what MODEL_ID names, without loading anything."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise LessonError("MODEL_ID is empty. Use a Hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5', "
                          "a local folder, a .safetensors file, or 'tiny'.")
    model_id = model_id.strip()
    if re.match(r"(?i)^[a-z][a-z0-9+.-]*://", model_id) or \
            model_id.lower().startswith(("www.", "huggingface.co/", "hf.co/")):
        raise LessonError(_web_address_advice(model_id))
    if model_id.lower() == "tiny":
        return ModelSource("tiny", str(TINY_DIR))
    if model_id.lower() == "pocket":
        return ModelSource("pocket", str(POCKET_DIR))
    if model_id in ALIASES:
        new = ALIASES[model_id]
        return ModelSource("hub", new, f"Note: '{model_id}' was removed from the Hub in 2024; using its copy '{new}'.")
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise LessonError(f"MODEL_ID folder '{path}' is not a diffusers model (it has no model_index.json). "
                              "Point it at the folder that holds model_index.json, or at a .safetensors file.")
        return ModelSource("folder", str(path))
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise LessonError(f"MODEL_ID file '{path}' is not a .safetensors or .ckpt checkpoint. Point MODEL_ID at "
                              "one, or at a diffusers folder (with model_index.json), a Hub id, or 'tiny'.")
        _refuse_adapter(path)
        return ModelSource("single_file", str(path))
    first = model_id.replace("\\", "/").split("/")[0]
    # "models/my-sd" reads like a Hub id (owner/name), but the project's models/ folder says it is a path.
    local_parent = "/" in model_id and first in ("models", "outputs") and Path(first).is_dir()
    looks_like_path = (model_id.startswith((".", "/", "~")) or "\\" in model_id or ":" in model_id
                       or model_id.lower().endswith(CHECKPOINT_SUFFIXES) or model_id.count("/") > 1 or local_parent)
    if looks_like_path:
        raise LessonError(f"MODEL_ID '{model_id}' does not exist on this computer. Check the path "
                          f"(relative paths start from {Path.cwd()}"
                          + (f", where '{first}/' is a folder" if local_parent else "") + "), or use a Hub id, or 'tiny'.")
    if model_id.count("/") != 1:
        raise LessonError(f"MODEL_ID '{model_id}' is not a Hub id (owner/name), an existing folder or file, "
                          "or 'tiny'/'pocket'. The course uses 'stable-diffusion-v1-5/stable-diffusion-v1-5'.")
    return ModelSource("hub", model_id)


def _web_address_advice(url: str) -> str:
    """MODEL_ID given as a web address: say what to write instead (the scripts never download from pages)."""
    match = re.match(r"(?i)^(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/(?!spaces/|datasets/)"
                     r"([\w.-]+)/([\w.-]+)(?:/(?:blob|resolve)/[^/]+/(\S+))?", url)
    if match:
        hub_id, file = f"{match.group(1)}/{match.group(2)}", match.group(3)
        if file and file.lower().endswith(CHECKPOINT_SUFFIXES):
            return (f"MODEL_ID '{url}' is a web address of one file. Use the Hub id instead: MODEL_ID = '{hub_id}' "
                    f"(--model {hub_id}), or download '{file.split('/')[-1]}' and set MODEL_ID to its path.")
        return f"MODEL_ID '{url}' is a web address. Use the Hub id instead: MODEL_ID = '{hub_id}' (--model {hub_id})."
    return (f"MODEL_ID '{url}' is a web address, and the scripts do not download from web pages (civitai and other "
            "sites). Download the .safetensors file in your browser, put it in models/, and set MODEL_ID to its path, "
            "e.g. 'models/my-model.safetensors'.")


def _refuse_adapter(path: Path) -> None:
    """A LoRA or an embedding is not a base model: say where it goes instead (headers only are read)."""
    from common import files

    keys = files.safetensors_keys(path) if path.suffix.lower() == ".safetensors" else None
    if not keys or len(keys) > 2000:  # a whole model has ~1000 tensors; an adapter a few hundred at most
        return
    if any(k.startswith(("unet.", "text_encoder.", "vae.", "model.diffusion_model.", "first_stage_model.",
                         "cond_stage_model.")) and "lora" not in k for k in keys):
        return
    kind, constant = (("a LoRA", "LORA_PATH") if files.adapter_kind(path) == "lora"
                      else ("a Textual Inversion embedding", "EMBEDDING_PATH"))
    raise LessonError(f"MODEL_ID file '{path}' is {kind}, not a base model. Set {constant} to it, and MODEL_ID to the "
                      "model it was trained on ('stable-diffusion-v1-5/stable-diffusion-v1-5', or 'tiny').")


def tiny_model_is_built(folder: Path = TINY_DIR) -> bool:
    marker = Path(folder) / "tiny_version.txt"
    return (Path(folder) / "model_index.json").is_file() and marker.is_file() and \
        marker.read_text().strip() == TINY_VERSION


def load_pipeline(model_id: str, dtype: torch.dtype = torch.float32, safety_checker: bool = False):
    """Load MODEL_ID as a ``StableDiffusionPipeline`` on the CPU in ``dtype`` (move it with ``.to``).

    ``safety_checker=False`` skips loading the checker (training and class images never need it).
    """
    from diffusers import StableDiffusionPipeline

    source = resolve(model_id)
    if source.note:
        print(source.note)
    if source.kind == "tiny":
        ensure_tiny_model(TINY_DIR)
    if source.kind == "pocket" and not (POCKET_DIR / "model_index.json").is_file():
        raise LessonError(f"The pocket model is not in {POCKET_DIR}/. It ships with the project: restore it with "
                          "'git checkout -- models/pocket-sd', or train it with 'python tools/train_pocket_model.py'.")
    extra = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    try:
        if source.kind == "single_file":
            pipe = StableDiffusionPipeline.from_single_file(source.location, torch_dtype=dtype, **extra)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(source.location, torch_dtype=dtype, **extra)
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one readable line
        raise LessonError(_explain_load_failure(model_id, source, exc)) from exc
    pipe.set_progress_bar_config(disable=True)  # the scripts show their own progress
    return pipe


def _explain_load_failure(model_id: str, source: ModelSource, exc: Exception) -> str:
    text = str(exc)
    reason = text.splitlines()[0][:160] if text else type(exc).__name__
    if source.kind == "tiny":  # built by us: rebuilding is the fix, whatever broke it
        return (f"The built-in tiny model in '{source.location}/' is damaged ({reason}). Delete the folder "
                f"'{source.location}/' and run again: it is rebuilt in a few seconds.")
    if source.kind == "pocket":  # shipped with the project: git has the good copy
        return (f"The pocket model in '{source.location}/' is damaged ({reason}). Restore it with "
                f"'git checkout -- {Path(source.location).as_posix()}' (or train it again with "
                "'python tools/train_pocket_model.py').")
    offline = any(s in text for s in ("connect", "cached", "offline", "resolve", "Network", "network"))
    if source.kind == "hub" and ("401" in text or "gated" in text.lower() or "token" in text.lower()):
        return (f"The Hub refused access to '{source.location}'. Log in with 'hf auth login' "
                "(and accept the model's licence on its Hub page), or use a local folder, a .safetensors file, or 'tiny'.")
    if source.kind == "hub" and ("404" in text or "not found" in text.lower()) and not offline:
        return f"MODEL_ID '{model_id}' was not found on the Hugging Face Hub. Check the spelling, or use 'pocket' (built in)."
    if source.kind in ("hub", "single_file") and offline:
        what = "the model" if source.kind == "hub" else "the configuration files a single-file checkpoint needs"
        return (f"Could not download {what} for MODEL_ID '{model_id}': the Hugging Face Hub cannot be reached "
                "and nothing is cached. Connect to the internet (run 'hf auth login' if the model asks), "
                "or set MODEL_ID to a local diffusers folder, or use MODEL_ID = 'pocket' (built in, works offline, draws real "
                "pictures on a CPU).")
    return (f"Could not load MODEL_ID '{model_id}' ({source.kind}): {text.splitlines()[0] if text else type(exc).__name__}. "
            "If it is a local folder or file, it may be incomplete or damaged: download it again, or use 'tiny'.")


def native_resolution(pipe) -> int:
    """The image size the UNet was built for (512 for SD v1.5, 64 for tiny)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def describe_source(model_id: str) -> str:
    source = resolve(model_id)
    return {"tiny": "built-in tiny model (random weights: its pictures are noise by design)",
            "pocket": "pocket model (trained on a procedural fabric world)"}.get(source.kind, source.location)


# --------------------------------------------------------------------------- the built-in tiny model
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
        "# tiny-sd\n\nBuilt by `common/models.py` (MODEL_ID = 'tiny'): Stable Diffusion v1.5's architecture at toy "
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
