"""LoRA: small trainable matrices beside the UNet's frozen attention weights.

A LoRA layer replaces ``W x`` with ``W x + (alpha / r) * B A x``, where A is r x d_in and B is
d_out x r with a small rank r (4 in the course). Only A and B train; W stays frozen, so the file is a
few megabytes and can be combined with other LoRAs. PEFT provides the layers; diffusers saves and
loads them. This module only chooses the settings and handles the file layouts students meet:

- diffusers' format (``pytorch_lora_weights.safetensors``, what exercise 3b writes, and what
  ``pipe.load_lora_weights(folder)`` reads);
- PEFT's layout (``adapter_model.safetensors`` + ``adapter_config.json``), as the course published
  its LoRA. Plain ``load_lora_weights`` loads 0 layers from it, so we apply it through diffusers'
  PEFT integration with its own config (rank, alpha and all) - the same layers PEFT would build;
- kohya / AUTOMATIC1111 single files (``lora_unet_...`` keys with ``.alpha``), which diffusers converts.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import safetensors.torch
import torch

from common import pickles
from common.errors import LessonError, brief, warn
from common.files import (SETTINGS_KEY, adapter_kind, atomic_path, model_file_advice, require_readable, require_suffix,
                          safetensors_keys)

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as in the course
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LEGACY_WEIGHT_NAME = "pytorch_lora_weights.bin"  # a pickle: read weights-only
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
LORA_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # what read_weights reads
ADAPTER_NAME = "fabric"
TRAIN_SCRIPT = "exercise3b_train_lora.py"  # named in the advice: how to make a LoRA


# --------------------------------------------------------------------------- training side
def add_lora(unet, rank: int, alpha: float, target_modules=TARGET_MODULES):
    """Inject LoRA layers into the UNet's attention projections. Returns the ``LoraConfig``.

    Gaussian init for A and zeros for B: the model starts exactly where the base model is.
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    unet.add_adapter(config)
    return config


def lora_layer_names(model, adapter_name: str | None = None) -> list[str]:
    """Names of the modules that carry a LoRA (of ``adapter_name``, or of any adapter)."""
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)
            and (adapter_name in module.lora_A if adapter_name is not None else len(module.lora_A) > 0)]


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The LoRA weights in PEFT naming (``...to_q.lora_A.weight``), detached fp32 copies on the CPU."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def adapter_metadata(config) -> dict:
    """The LoraConfig fields a loader needs. Kept minimal so an older PEFT can read the file too."""
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules)}


def save_lora(unet, folder, config, settings: dict | None = None) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` in diffusers' format, atomically.

    The safetensors header carries the LoRA config (so rank and alpha load right) and the training
    settings (so a student can see how a file was made).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    header = {"format": "pt",
              LORA_ADAPTER_METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in adapter_metadata(config).items()}),
              SETTINGS_KEY: json.dumps(settings or {}, default=str)}

    def write(weights, filename):
        with atomic_path(filename) as tmp:
            safetensors.torch.save_file(weights, str(tmp), metadata=header)

    Path(folder).mkdir(parents=True, exist_ok=True)
    # PEFT key names ("...to_q.lora_A.weight"), which diffusers loads as they are, for any target module.
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=lora_state_dict(unet),
        weight_name=WEIGHT_NAME, save_function=write, safe_serialization=True)
    return Path(folder) / WEIGHT_NAME


def kohya_path(lora_dir) -> Path:
    """Where the kohya copy goes: in the LoRA's folder, named after it (LORA_DIR "." or "models/x/.." is named
    after the folder it stands for, not "")."""
    lora_dir = Path(lora_dir)
    return lora_dir / f"{lora_dir.resolve().name or 'lora'}_kohya.safetensors"


def export_kohya(unet, path, config) -> Path:
    """A single file with kohya-style keys and alphas, for AUTOMATIC1111 and ComfyUI."""
    weights = {f"unet.{k}": v for k, v in lora_state_dict(unet).items()}
    return save_kohya(weights, {k.removesuffix(".lora_A.weight"): config.lora_alpha
                                for k in weights if k.endswith(".lora_A.weight")}, path)


def save_kohya(weights: dict[str, torch.Tensor], alphas: dict[str, float], path) -> Path:
    """Write ``weights`` (PEFT naming, "unet." / "text_encoder." in front) in kohya's layout, atomically: one
    ``lora_unet_...`` / ``lora_te_...`` layer per module, with its own ``.alpha`` from ``alphas`` (module name
    -> alpha: kohya applies ``alpha / rank * up @ down``, layer by layer)."""
    from diffusers.utils import convert_state_dict_to_kohya

    kohya = {}
    for module, alpha in alphas.items():  # diffusers' converter, layer by layer: it writes alpha = rank
        layer = convert_state_dict_to_kohya({f"{module}.lora_{ab}.weight": weights[f"{module}.lora_{ab}.weight"]
                                             for ab in "AB"})
        kohya.update({k: torch.tensor(float(alpha)) if k.endswith(".alpha") else v for k, v in layer.items()})
    # SD v1.x has one text encoder, which kohya, AUTOMATIC1111 and ComfyUI call "lora_te_text_model_..."
    # (diffusers writes SDXL's "lora_te1_"; transformers 5 names the CLIP text model's modules without "text_model.")
    kohya = {re.sub(r"^lora_te_(?!text_model_)", "lora_te_text_model_", re.sub(r"^lora_te1_", "lora_te_", k)): v
             for k, v in kohya.items()}
    ranks = {v.shape[0] for k, v in kohya.items() if k.endswith(".lora_down.weight")}

    def one(values):  # kohya's own word for per-layer values
        return f"{values.pop():g}" if len(values) == 1 else "Dynamic"

    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": one(ranks),
                "ss_network_alpha": one({float(a) for a in alphas.values()}), "ss_base_model_version": "sd_v1"}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(kohya, str(tmp), metadata=metadata)
    return Path(path)


def load_lora_checkpoint(unet, folder) -> None:
    """Put the LoRA weights saved by ``save_lora`` in ``folder`` back into a UNet that already has the
    adapter (resuming training)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state, _ = StableDiffusionPipeline.lora_state_dict(str(folder), weight_name=WEIGHT_NAME)
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing or getattr(result, "unexpected_keys", None):
        raise LessonError(f"The checkpoint in '{folder}' does not fit this LoRA (was LORA_RANK or MODEL_ID changed?). "
                          "Start afresh without --resume, or restore the settings it was made with.")


def read_settings(path) -> dict:
    """The training settings stored in a LoRA file's header by ``save_lora`` ({} if none)."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(SETTINGS_KEY, "{}"))


# --------------------------------------------------------------------------- loading, whatever the layout
def find_lora_file(path, constant: str = "LORA_PATH") -> tuple[str, Path]:
    """Which layout ``path`` holds: ("peft" | "diffusers" | "kohya", the weights file). Refuses what it
    cannot load. ``constant``: what the advice calls the path (a tool names its argument).

    Only file headers are read (once per file: ``files.safetensors_keys``), so the generation scripts call
    this before any model loads, and hand its answer to ``load_lora``.
    """
    path = Path(path)
    if not path.exists():
        raise LessonError(f"No LoRA at '{path}'. Train one first with 'python {TRAIN_SCRIPT}' "
                          "(or download the course's and put it there).")
    if path.is_file():
        require_suffix(path, LORA_SUFFIXES, "a LoRA", constant, f"exercise 3b writes {WEIGHT_NAME}")
        require_readable(path, TRAIN_SCRIPT)
        if adapter_kind(path) == "embedding":
            raise LessonError(f"'{path}' is a Textual Inversion embedding, not a LoRA. Set EMBEDDING_PATH to it, "
                              f"and {constant} to the LoRA folder.")
        if adapter_kind(path) == "model":
            raise LessonError(f"'{path}' is not a LoRA: it {model_file_advice(path)} Set {constant} to a LoRA file "
                              f"or its folder (exercise 3b writes {WEIGHT_NAME}).")
        if path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file():
            return "peft", _check_peft_config(path)
        return _file_layout(path), path
    if (path / WEIGHT_NAME).is_file():  # what exercise 3b writes (and what load_lora_weights picks)
        if (path / PEFT_WEIGHTS).is_file():  # (the course's LoRA downloaded into the folder 3b trains into)
            warn(f"'{path}' holds two LoRAs: exercise 3b's {WEIGHT_NAME} (used) and {PEFT_WEIGHTS} (the course's "
                 f"layout). To use the other one, set {constant} to '{path / PEFT_WEIGHTS}'.")
        return _file_layout(require_readable(path / WEIGHT_NAME, TRAIN_SCRIPT)), path / WEIGHT_NAME
    if (path / LEGACY_WEIGHT_NAME).is_file():  # what diffusers' DreamBooth-LoRA example wrote until 0.19
        return "diffusers", path / LEGACY_WEIGHT_NAME
    if (path / PEFT_WEIGHTS).is_file():
        if not (path / PEFT_CONFIG).is_file():
            raise LessonError(f"'{path / PEFT_WEIGHTS}' needs its '{PEFT_CONFIG}' beside it (it holds the rank "
                              "and alpha). Download both files.")
        return "peft", _check_peft_config(require_readable(path / PEFT_WEIGHTS, TRAIN_SCRIPT))
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))  # (.x: unfinished saves)
    candidates = [p for p in files if adapter_kind(p) not in ("embedding", "model")]
    if len(candidates) == 1:
        return _file_layout(require_readable(candidates[0], TRAIN_SCRIPT)), candidates[0]
    if not candidates:
        embeddings = [p for p in files if adapter_kind(p) == "embedding"]
        embeddings = f" It holds only a Textual Inversion embedding ({embeddings[0].name}): set EMBEDDING_PATH to " \
            "it." if embeddings else ""
        raise LessonError(f"The folder '{path}' holds no LoRA weights (.safetensors).{embeddings} Train a LoRA with "
                          f"'python exercise3b_train_lora.py', or point {constant} at the right folder or file.")
    raise LessonError(f"The folder '{path}' holds several LoRA files ({', '.join(p.name for p in candidates)}); "
                      f"set {constant} to the one you mean.")


def _check_peft_config(weights: Path) -> Path:
    """A PEFT folder's adapter_config.json can be read, and its rank is the rank of the weights beside it (both
    from the files' text and headers, before any model loads): a damaged config, or one from another LoRA, ended
    in 'unexpected JSONDecodeError' or 'unexpected RuntimeError: ... size mismatch' once the model had loaded."""
    from peft import LoraConfig

    config_file = weights.parent / PEFT_CONFIG
    try:
        if not isinstance(json.loads(config_file.read_text(encoding="utf-8")), dict):
            raise ValueError("it is not a JSON object")
        config = LoraConfig.from_pretrained(str(weights.parent))
    except Exception as exc:  # noqa: BLE001 - any unreadable config gets the same advice
        raise LessonError(f"'{config_file}' is not a readable PEFT config ({brief(exc, 100)}): it is damaged or "
                          f"incompletely downloaded. Download both files of the LoRA again ('{PEFT_WEIGHTS}' and "
                          f"'{PEFT_CONFIG}').") from exc
    if config.rank_pattern:  # (ranks per layer, by patterns PEFT resolves when it loads: left to it)
        return weights
    with safetensors.safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            rank, said = f.get_slice(key).get_shape()[0], config.r
            if rank != said:
                raise LessonError(f"'{config_file}' says rank r = {said}, but '{weights}' holds rank {rank} (in "
                                  f"'{module}'): the two files are not of one LoRA. Download both files of the "
                                  f"LoRA again, together.")
    return weights


def fold_kohya_alphas(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya's rule, layer by layer: W + alpha / rank * up @ down. diffusers gives every layer the file's most
    common alpha (PEFT ignores its per-layer alphas), so a file whose alphas differ per layer (kohya's
    ``resize_lora.py --dynamic_method``) would load at the wrong strength. Fold each layer's alpha / rank into
    its up matrix and set its alpha to its rank: the strength is then in the weights, whatever the loader does.
    """
    folded = dict(weights)
    for key in [k for k in weights if k.endswith(".alpha")]:
        prefix = key.removesuffix(".alpha")
        down, up = weights.get(f"{prefix}.lora_down.weight"), weights.get(f"{prefix}.lora_up.weight")
        if down is None or up is None:
            continue
        rank = down.shape[0]
        folded[f"{prefix}.lora_up.weight"] = (up.float() * (float(weights[key]) / rank)).to(up.dtype)
        folded[key] = torch.tensor(float(rank))
    return folded


def _lora_layers(pipe, adapter_name: str):
    """The LoRA layers of ``adapter_name`` in the pipeline's UNet and text encoder."""
    from peft.tuners.lora import LoraLayer

    for model in (pipe.unet, getattr(pipe, "text_encoder", None)):
        for module in (model.modules() if model is not None else ()):
            if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
                yield module


def _file_layout(path: Path) -> str:
    """kohya/AUTOMATIC1111 files name their layers ``lora_unet_...`` / ``lora_te_...``; diffusers' do not.
    A .safetensors file with no tensors at all is refused here, before any model loads."""
    keys = safetensors_keys(path)
    if keys == []:
        raise LessonError(f"'{path}' holds no weights (a .safetensors file with no tensors in it): it was saved "
                          f"empty or cut short. Get the LoRA again, or train your own with {TRAIN_SCRIPT}.")
    keys = keys or []
    return "kohya" if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys) else "diffusers"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors as they are stored (.bin / .pt through the weights-only reader); refuses a damaged one."""
    try:
        return safetensors.torch.load_file(str(path)) if path.suffix == ".safetensors" else \
            pickles.load(path, "Use a .safetensors LoRA from a source you trust, or train your own with "
                               "exercise3b_train_lora.py.")
    except LessonError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise LessonError(f"'{path}' is not a readable LoRA file ({type(exc).__name__}: {str(exc)[:100]}). "
                          "It may be damaged or incompletely downloaded: get it again.") from exc


def require_finite(tensors: dict, file: Path, what: str, script: str) -> None:
    """Refuse weights holding NaN or inf: loaded, they would turn every picture black (or into noise)."""
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            count = int((~torch.isfinite(value)).sum())
            raise LessonError(f"'{file}' holds {count} value(s) that are NaN or inf (not a number), in '{key}': "
                              f"{what} is broken, usually by a training run that diverged. Retrain with a lower "
                              f"LEARNING_RATE ({script}), or use another file.")


def peft_names(state: dict) -> dict:
    """A LoRA state dict ("unet." / "text_encoder." in front) in PEFT's naming ("...lora_A.weight"), by diffusers'
    own converters (the old attention-processor names and "lora_linear_layer" ones too). Other keys are dropped."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    def part(name):
        return {k: v for k, v in state.items() if k.startswith(f"{name}.")}

    return {**(convert_unet_state_dict_to_peft(part("unet")) if part("unet") else {}),
            **(convert_state_dict_to_peft(part("text_encoder"), original_type=StateDictType.DIFFUSERS_OLD)
               if part("text_encoder") else {})}


def check_layer_pairs(weights: dict, path, down: str = ".lora_A.", up: str = ".lora_B.") -> None:
    """Refuse a damaged LoRA layer: one of its two matrices without the other, whole numbers where a LoRA holds
    decimal ones, or halves that disagree on the rank (down is r x in, up is out x r; a conv's up is out x r x 1 x
    1). ``down`` / ``up`` mark the halves in the keys (PEFT's lora_A / lora_B, kohya's lora_down / lora_up). Needs
    no model: PEFT would fill a missing half with random numbers, quietly, and a converter would copy the damage."""
    for key, value in weights.items():
        half, other = (down, up) if down in key else (up, down) if up in key else (None, None)
        if half is None or not isinstance(value, torch.Tensor):
            continue
        pair = key.replace(half, other)
        partner = weights.get(pair)
        a, b = (value, partner) if half == down else (partner, value)
        problem = (f"holds only one of its two matrices ('{key}' without '{pair}')" if partner is None
                   else f"holds {value.dtype}/{partner.dtype} numbers, not the decimal ones of a LoRA"
                   if not (value.is_floating_point() and partner.is_floating_point())
                   else f"holds tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}, not two matrices"
                   if a.ndim < 2 or b.ndim < 2
                   else f"holds matrices of ranks {a.shape[0]} and {b.shape[1]}, which must be equal"
                   if a.shape[0] != b.shape[1] else None)
        if problem:
            raise LessonError(f"'{path}' is damaged: its layer '{key.split(half)[0]}' {problem}. Get the LoRA "
                              f"again, or retrain with {TRAIN_SCRIPT}.")


def _check_shapes(unet, peft_state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a damaged LoRA (``check_layer_pairs``), and one made for another base model (e.g. SDXL), naming
    both shapes."""
    check_layer_pairs(peft_state, path)
    modules = dict(unet.named_modules())
    for key, value in peft_state.items():
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        module = modules.get(name)
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, torch.nn.Linear) and value.shape[1] != layer.in_features:
            raise LessonError(
                f"'{path.name}' was made for another base model: its layer '{name}' takes inputs of width "
                f"{value.shape[1]}, this model's takes {layer.in_features}. (SD v1.5 uses 768-wide text features, "
                "SD 2.x 1024, SDXL 2048.) Use a LoRA trained on this MODEL_ID, or the MODEL_ID it was trained on.")


def load_lora(pipe, path, scale: float = 1.0, adapter_name: str = ADAPTER_NAME, found=None) -> int:
    """Load a LoRA (any layout above) into ``pipe.unet`` (and ``pipe.text_encoder``, when it has layers for it) at
    ``scale``; return how many layers it patched, in both.

    ``found``: what ``find_lora_file(path)`` already answered, so the folder is not searched again.
    Refuses to continue when nothing was patched, instead of quietly running the base model.
    """
    layout, file = found or find_lora_file(path)
    if layout == "peft":
        from peft import LoraConfig

        state = {k.removeprefix("base_model.model."): v for k, v in read_weights(file).items()}
        require_finite(state, file, "the LoRA", TRAIN_SCRIPT)
        config = LoraConfig.from_pretrained(str(file.parent)).to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        _check_shapes(pipe.unet, state, file)
        pipe.unet.load_lora_adapter(state, prefix=None, adapter_name=adapter_name, metadata=config)
    else:
        # Our .safetensors load from the file, whose header holds rank and alpha (save_lora); a kohya file's
        # alphas are folded in first; a .bin or .pt goes through the weights-only reader, never a full unpickler.
        source = str(file.parent) if layout == "diffusers" and file.suffix == ".safetensors" else None
        weights = None if source else read_weights(file)
        if layout == "kohya":
            weights = fold_kohya_alphas(weights)
        elif weights is not None and not any(k.startswith(("unet.", "text_encoder.")) for k in weights):
            weights = {f"unet.{k}": v for k, v in weights.items()}  # diffusers 0.16's save_attn_procs: UNet only
        state, _ = (pipe.lora_state_dict(source, weight_name=file.name) if source
                    else pipe.lora_state_dict(dict(weights)))
        require_finite(state, file, "the LoRA", TRAIN_SCRIPT)
        named = peft_names(state)
        check_layer_pairs(named, file)  # (the text encoder's layers too: load_lora_weights loads them)
        _check_shapes(pipe.unet, {k.removeprefix("unet."): v for k, v in named.items() if k.startswith("unet.")}, file)
        try:
            if source:
                pipe.load_lora_weights(source, weight_name=file.name, adapter_name=adapter_name)
            else:
                with warnings.catch_warnings():  # (PEFT's note on the per-layer alphas it ignores: folded above)
                    warnings.filterwarnings("ignore", message=".*alpha_pattern keys.*")
                    pipe.load_lora_weights(dict(weights), adapter_name=adapter_name)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise LessonError(f"'{file}' could not be applied to this model ({str(exc)[:160]}): it was made for "
                              "another kind of model (SD 3, FLUX...) or is not a LoRA. Use a LoRA trained on this "
                              f"MODEL_ID (for SD v1.5, an SD 1.5 LoRA; or your own, with {TRAIN_SCRIPT}).") from exc
        if layout == "kohya":  # each layer's alpha/rank is in its up matrix now: every layer at scale 1
            for module in _lora_layers(pipe, adapter_name):
                module.lora_alpha[adapter_name] = module.r[adapter_name]
    patched = sum(1 for _ in _lora_layers(pipe, adapter_name))  # (a kohya LoRA may train the text encoder alone)
    if patched == 0:
        raise LessonError(f"'{file}' patched 0 layers of the UNet or the text encoder: its keys do not match this "
                          f"model. Use a LoRA trained on this MODEL_ID (retrain with {TRAIN_SCRIPT}).")
    pipe.set_adapters([adapter_name], adapter_weights=[scale])
    return patched
