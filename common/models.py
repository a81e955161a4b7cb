"""Where the base model comes from: a Hub id, a folder, a single file, ``tiny`` or ``pocket``.

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

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import LessonError, warn
from common.tiny_model import TINY_DIR, ensure_tiny_model

DEFAULT_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ALIASES = {"runwayml/stable-diffusion-v1-5": DEFAULT_MODEL_ID}
POCKET_DIR = Path("models/pocket-sd")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")

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
                              + (_whole_model_above(path) or "Point it at the folder that holds model_index.json, "
                                                                 "or at a .safetensors file."))
        _require_sd_pipeline(path)
        return ModelSource("folder", str(path))
    if path.is_file():
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise LessonError(_other_file_advice(path))
        if path.suffix.lower() == ".ckpt":
            stat = path.stat()
            _require_readable_ckpt(path, stat.st_size, stat.st_mtime_ns)
        _refuse_adapter(path)
        _require_sd_checkpoint(path)
        return ModelSource("single_file", str(path))
    if looks_like_path(model_id):
        raise LessonError(f"MODEL_ID '{model_id}' does not exist on this computer. Check the path "
                          f"({where_relative(model_id)}), or use a Hub id, or 'tiny'.")
    if model_id.count("/") != 1:
        raise LessonError(f"MODEL_ID '{model_id}' is not a Hub id (owner/name), an existing folder or file, "
                          "or 'tiny'/'pocket'. The course uses 'stable-diffusion-v1-5/stable-diffusion-v1-5'.")
    return ModelSource("hub", model_id)


def _local_parent(name: str) -> str | None:
    """"models" for "models/my-sd": it reads like a Hub id (owner/name), but the project's models/ (or outputs/)
    folder says it is a path."""
    first = name.replace("\\", "/").split("/")[0]
    return first if "/" in name and first in ("models", "outputs") and Path(first).is_dir() else None


def looks_like_path(name: str) -> bool:
    """Whether ``name`` (not found on this computer) was meant as a local path rather than a Hub id (owner/name):
    it starts with . / or ~, holds a backslash or a colon, ends like a checkpoint, has more than one '/', or starts
    in the project's models/ or outputs/ folder. Such a name is a typo, and is refused before anything loads."""
    return (name.startswith((".", "/", "~")) or "\\" in name or ":" in name
            or name.lower().endswith(CHECKPOINT_SUFFIXES) or name.count("/") > 1 or _local_parent(name) is not None)


def where_relative(name: str) -> str:
    """Where a relative path starts from, for a message about ``name`` that does not exist."""
    parent = _local_parent(name)
    return f"relative paths start from {Path.cwd()}" + (f", where '{parent}/' is a folder" if parent else "")


# The pipelines whose folders hold what StableDiffusionPipeline loads (SD v1.x and 2.x); and the names of others.
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
OTHER_PIPELINES = {"StableDiffusionXL": "SDXL", "StableDiffusion3": "Stable Diffusion 3", "Flux": "FLUX",
                   "StableDiffusionInpaint": "an inpainting model", "LatentConsistencyModel": "an LCM-distilled model"}


def _whole_model_above(path: Path) -> str:
    """Advice for a MODEL_ID that is a part of a diffusers model (its unet/ folder, its model_index.json): the
    folder above that holds the whole model, which is what MODEL_ID names."""
    for folder in (path.parent, path.parent.parent):
        if folder != path and (folder / "model_index.json").is_file():
            return f"It is a part of the diffusers model in '{folder}': set MODEL_ID = '{folder}' (--model {folder})."
    return ""


def _require_sd_pipeline(folder: Path) -> None:
    """A diffusers folder of another kind of model (SDXL, SD 3, FLUX...) is refused by its model_index.json:
    StableDiffusionPipeline loads its parts by name, the ones it does not know left out, and the run ended in
    'unexpected TypeError' once the model had loaded (or, with a LoRA, in a refusal that blamed the LoRA)."""
    try:
        name = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):  # (unreadable: loading it says what is wrong)
        return
    if not isinstance(name, str) or name in SD_PIPELINES:
        return
    what = next((f" ({v})" for k, v in OTHER_PIPELINES.items() if name.startswith(k)), "")
    raise LessonError(f"MODEL_ID folder '{folder}' holds a {name} model{what}, but the scripts run Stable Diffusion "
                      "v1.x and 2.x models (StableDiffusionPipeline in its model_index.json): this one is built "
                      f"otherwise. Use an SD v1.x model, such as MODEL_ID = '{DEFAULT_MODEL_ID}' (the course's), "
                      "or 'pocket' (built in).")


# What diffusers' from_single_file takes a checkpoint for (its ``infer_diffusers_model_type``), where that is not
# SD v1.x or 2.x ("v1", "v2"): the kind of model, by the start of diffusers' name for it.
OTHER_CHECKPOINTS = {"xl_inpaint": "an SDXL inpainting model", "xl": "SDXL", "playground": "SDXL (Playground v2.5)",
                     "sd35": "Stable Diffusion 3.5", "sd3": "Stable Diffusion 3", "flux": "FLUX",
                     "inpainting": "an inpainting model", "controlnet": "a ControlNet", "upscale": "an upscaler"}


def _require_sd_checkpoint(path: Path) -> None:
    """A single-file checkpoint of another kind of model (SDXL, SD 3, FLUX...) is refused, as its diffusers folder is
    by ``_require_sd_pipeline``: from_single_file read it as SD v1.x only once it had loaded, or, offline, asked
    for the other model's configuration files from the Hub. Its kind is what diffusers makes of the tensors' names
    and shapes in the file's header (no tensor is read); a .ckpt file (a pickle, no header) is looked at by
    ``_require_readable_ckpt``."""
    from common import files

    shapes = files.safetensors_shapes(path) if path.suffix.lower() == ".safetensors" else None
    _refuse_other_kind(path, shapes)


def _refuse_other_kind(path: Path, shapes: dict | None) -> None:
    """Refuse a checkpoint whose tensors' shapes (name -> shape) diffusers takes for another kind of model than
    SD v1.x or 2.x."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not shapes:
        return
    try:
        kind = infer_diffusers_model_type({k: SimpleNamespace(shape=v) for k, v in shapes.items()})
    except Exception:  # noqa: BLE001 - a header diffusers cannot place (a damaged file): loading says what is wrong
        return
    if kind in ("v1", "v2"):
        return
    what = next((v for k, v in OTHER_CHECKPOINTS.items() if kind.startswith(k)), f"a '{kind}' model")
    raise LessonError(f"MODEL_ID file '{path}' is a checkpoint of {what}, but the scripts run Stable Diffusion v1.x "
                      f"and 2.x models: this one is built otherwise. Use an SD v1.x model, such as MODEL_ID = "
                      f"'{DEFAULT_MODEL_ID}' (the course's), or 'pocket' (built in).")


def _other_file_advice(path: Path) -> str:
    """MODEL_ID names a file that is not a .safetensors or .ckpt checkpoint: say what it is, where that can be told
    from its name and place (a .bin/.pt/.pth is a pickle; none is opened), and what to point MODEL_ID at instead."""
    what = (f"a PyTorch pickle ({path.suffix}), which the scripts do not load as a base model"
            if path.suffix.lower() in (".bin", ".pt", ".pth", ".pkl") else "not a .safetensors or .ckpt checkpoint")
    name = path.name.lower()
    instead = _whole_model_above(path) or (
        "Its name says it is a LoRA: set LORA_PATH to it, and MODEL_ID to the model it was trained on."
        if "lora" in name
        else "Its name says it is a Textual Inversion embedding: set EMBEDDING_PATH to it, and MODEL_ID to the model "
             "it was trained on." if "embed" in name
        else "A whole model comes as one .safetensors (or .ckpt) file or a diffusers folder (with model_index.json): "
             "point MODEL_ID at one, or use a Hub id, or 'pocket' (built in).")
    return f"MODEL_ID file '{path}' is {what}. {instead}"


@functools.lru_cache(maxsize=8)  # (resolve runs several times a script; a file that passed is looked at once)
def _require_readable_ckpt(path: Path, size: int, mtime_ns: int) -> None:
    """A .ckpt file is a pickle (torch.save's zip of one, most often), with no header to read: look at it before
    any model loads, without running it. An empty file, a Git LFS pointer, a zip of something else or a file of
    neither kind is refused by what it is (from_single_file said only 'Unable to load weights', after the model's
    step had begun); a pickle that names functions to call is refused for safety (``pickles``); one that holds no
    Stable Diffusion weights (a LoRA, an embedding, a VAE saved as .ckpt) says so, rather than asking the Hub for a
    configuration offline. What kind of model the rest is, is read from the tensors' shapes through diffusers' own
    loader (weights only, memory-mapped: no tensor is read) and refused as ``_require_sd_checkpoint`` refuses."""
    import io
    import zipfile

    from common import pickles

    again = "Download it again (a .safetensors version where the site offers one), or use 'pocket' (built in)."
    if size == 0:
        raise LessonError(f"MODEL_ID file '{path}' is empty (0 bytes): an interrupted download or copy. {again}")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise LessonError(f"MODEL_ID file '{path}' is a Git LFS pointer ({size} bytes), not the checkpoint: the "
                          "repository was cloned without git-lfs. Run 'git lfs install' and 'git lfs pull' in it, "
                          "or download the file itself.")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                inner = [n for n in names if n.endswith("data.pkl")]
                stream = io.BytesIO(archive.read(inner[0]) if inner else b"")
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise LessonError(f"MODEL_ID file '{path}' is a damaged zip archive ({exc}). {again}") from None
        if not inner:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise LessonError(f"MODEL_ID file '{path}' is a zip archive of {shown or 'nothing'}, not a PyTorch "
                              f"checkpoint (which holds a data.pkl). Unpack it if a model is inside, or "
                              f"{again[0].lower()}{again[1:]}")
        pickles_in_it = 1
    elif head[:1] == b"\x80":  # a pickle starts with its protocol (torch's legacy format: magic number, protocol,
        stream, pickles_in_it = open(path, "rb"), 4  # system info, then the weights' pickle; then raw tensor bytes)
    elif head.startswith(b"PK"):  # a zip's first bytes, its directory (at the end) missing: cut short
        raise LessonError(f"MODEL_ID file '{path}' is a PyTorch zip cut short ({size} bytes, its end missing): an "
                          f"interrupted download or copy. {again}")
    else:
        raise LessonError(f"MODEL_ID file '{path}' is not a checkpoint: it is neither a PyTorch zip nor a pickle "
                          f"(damaged, or another kind of file named .ckpt). {again}")
    try:
        with stream:
            for number in range(pickles_in_it):
                if number and not stream.peek(1)[:1]:  # (a plain pickle: one, then the end of the file)
                    break
                called, strings = pickles.read_opcodes(stream)  # (the weights' pickle is the last one)
                unsafe = pickles.unsafe_names(called)
                if any(n.startswith(("pytorch_lightning.", "lightning.")) for n in unsafe):
                    raise LessonError(
                        f"MODEL_ID file '{path}' holds PyTorch Lightning's training state beside the weights (an "
                        f"original training checkpoint), which takes Python code to load, and the scripts read plain "
                        f"weights only. Use the model's .safetensors file, or its diffusers folder, or 'pocket'.")
                if unsafe:
                    raise LessonError(
                        f"MODEL_ID file '{path}' was refused for safety: it is a pickle that asks to run Python code "
                        f"({', '.join(dict.fromkeys(unsafe))}) when loaded, and only plain weights are read. Do not "
                        "load it elsewhere either. Use the model's .safetensors file, or 'pocket' (built in).")
    except LessonError:
        raise
    except Exception:  # noqa: BLE001 - a pickle cut short: damaged
        raise LessonError(f"MODEL_ID file '{path}' is damaged: its pickle is cut short or garbled. {again}") from None
    if not any(k.startswith("model.diffusion_model.") for k in strings):
        lora_like = any("lora" in k for k in strings)
        what = ("a LoRA (set LORA_PATH to it)" if lora_like else
                "an embedding (set EMBEDDING_PATH to it)" if "string_to_param" in strings else
                "a part of a model, or something else")
        raise LessonError(f"MODEL_ID file '{path}' holds no Stable Diffusion UNet (no 'model.diffusion_model.' "
                          f"weights): it is not a whole base model but {what}. Set MODEL_ID to a whole SD v1.x "
                          f"checkpoint or folder, such as '{DEFAULT_MODEL_ID}' (the course's), or 'pocket' (built in).")
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    try:
        checkpoint = load_single_file_checkpoint(str(path))  # (torch.load, weights_only=True, memory-mapped)
    except Exception:  # noqa: BLE001 - loading says what is wrong
        return
    shapes = {k: tuple(v.shape) for k, v in checkpoint.items() if hasattr(v, "shape")}
    del checkpoint
    _refuse_other_kind(path, shapes)


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
    """A LoRA, an embedding or one part of a diffusers model (its unet/ file) is not a base model: say where it goes
    instead (headers only are read)."""
    from common import files

    keys = files.safetensors_keys(path) if path.suffix.lower() == ".safetensors" else None
    if not keys or len(keys) > 2000:  # a whole model has ~1000 tensors; an adapter a few hundred at most
        return
    kind = files.adapter_kind(path)
    if kind == "model":
        if any(k.startswith(files.CHECKPOINT_PREFIXES + ("unet.", "text_encoder.", "vae.")) for k in keys):
            return  # (a whole model in one file: from_single_file says whether it can read it)
        raise LessonError(f"MODEL_ID file '{path}' {files.model_file_advice(path)}")
    kind, constant = ("a LoRA", "LORA_PATH") if kind == "lora" else ("a Textual Inversion embedding", "EMBEDDING_PATH")
    raise LessonError(f"MODEL_ID file '{path}' is {kind}, not a base model. Set {constant} to it, and MODEL_ID to the "
                      "model it was trained on ('stable-diffusion-v1-5/stable-diffusion-v1-5', or 'tiny').")


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


def check_resolution(resolution: int | None, pipe) -> None:
    """Warn when RESOLUTION is far from the size the model learned (``native_resolution``): beyond twice it, every
    picture costs (RESOLUTION / native)^2 as much and the model repeats and breaks its shapes; below half, a
    picture has too few latent pixels to hold one. ``None`` is the model's own size."""
    native = native_resolution(pipe)
    if resolution and not native / 2 <= resolution <= native * 2:
        ratio = resolution / native
        effect = (f"each picture costs about {ratio ** 2:.0f}x the time and memory, and the model repeats and breaks "
                  "its shapes" if ratio > 1 else f"a picture is only {resolution // pipe.vae_scale_factor}x"
                  f"{resolution // pipe.vae_scale_factor} latent pixels, too few for the shapes it learned")
        warn(f"RESOLUTION {resolution} is far from the {native} px this model learned: {effect}. "
             "RESOLUTION = None (--resolution none) uses the model's own size.")


# What the pocket model's card (models/pocket-sd/pocket_card.json, written by tools/train_pocket_model.py) says
# about how to use it. Every other model has no card: SD v1.5 sees whole photos and knows every English word.
POCKET_CARD = "pocket_card.json"


def _pocket_card(model_id: str) -> dict:
    """The pocket model's card as a dict; {} for any other model, or when the card is not there."""
    if resolve(model_id).kind != "pocket":
        return {}
    path = POCKET_DIR / POCKET_CARD
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise LessonError(f"The pocket model's card '{path}' cannot be read ({exc}). Restore it with "
                          f"'git checkout -- {POCKET_DIR.as_posix()}'.") from exc
    return card if isinstance(card, dict) else {}


def native_crop_fraction(model_id: str) -> float:
    """The share of each training picture's side one training crop shows, for this model (CROP_FRACTION = None).

    1.0 (the whole picture) for SD v1.5 and every other model. The pocket model draws 64 px pictures, in which
    the weave of a 512 px photo is finer than a pixel: it trains on crops, as through a magnifying glass, and
    its card says how large (``crop_fraction``; 1.0 when the card does not say).
    """
    value = _pocket_card(model_id).get("crop_fraction", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise LessonError(f"The pocket model's card '{POCKET_DIR / POCKET_CARD}' gives crop_fraction {value!r}, not "
                          "a number between 0 and 1. Set CROP_FRACTION yourself, or restore the card with "
                          f"'git checkout -- {POCKET_DIR.as_posix()}'.")
    return float(value)


def known_words(model_id: str) -> set[str] | None:
    """Every word the model's text encoder was trained on, lower case: the pocket model's card lists them
    (``known_words``: the words of its world's captions). None when unknown: any other model, or no list."""
    words = _pocket_card(model_id).get("known_words")
    if not isinstance(words, (list, tuple)):
        return None
    return {str(w).lower() for w in words}


def weights_fingerprint(model_id: str) -> str | None:
    """A short fingerprint of a local model's drawing weights (its UNet, text encoder and VAE files: names, sizes
    and bytes; of a file over 64 MB its first and last 64 MB, which any retraining changes), so that pictures an
    earlier version drew are not taken for this one's: the pocket model, or a folder a student replaces, changes
    under the same name. None for a Hub id (fixed under its name)."""
    import hashlib

    source = resolve(model_id)
    root = Path(source.location)
    if source.kind == "hub" or not root.exists():
        return None
    files = [root] if root.is_file() else sorted(
        p for part in ("unet", "text_encoder", "vae") for p in (root / part).glob("*") if p.is_file()
        and p.suffix in (".safetensors", ".bin", ".ckpt"))
    digest, edge = hashlib.sha256(), 64 * 2**20  # (SD v1.5's 3.4 GB UNet: 128 MB read, not all of it)
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.relative_to(root).as_posix() if root.is_dir() else path.name}:{size}".encode())
        with open(path, "rb") as f:
            digest.update(f.read(edge))
            f.seek(max(size - edge, edge))
            digest.update(f.read())
    return digest.hexdigest()[:16]


def describe_source(model_id: str) -> str:
    source = resolve(model_id)
    return {"tiny": "built-in tiny model (random weights: its pictures are noise by design)",
            "pocket": "pocket model (trained on a procedural fabric world)"}.get(source.kind, source.location)
