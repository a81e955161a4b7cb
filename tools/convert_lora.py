"""Convert a LoRA between the layouts the course meets: kohya (AUTOMATIC1111, ComfyUI), diffusers and PEFT.

    python tools/convert_lora.py models/fabric_lora models/fabric_lora.safetensors --to kohya
    python tools/convert_lora.py ../shared/seed/fabric_lora models/fabric_lora_diffusers --to diffusers
    python tools/convert_lora.py downloaded_lora.safetensors models/downloaded_peft --to peft

IN is a LoRA file or folder in any layout the scripts load (``common.lora.find_lora_file``). OUT is, for
``--to kohya``, one ``.safetensors`` file; for ``--to diffusers``, a folder holding
``pytorch_lora_weights.safetensors`` (what ``pipe.load_lora_weights(folder)`` reads); for ``--to peft``, a
folder holding ``adapter_model.safetensors`` + ``adapter_config.json``. An existing OUT is replaced (a folder
as a whole, and only when it holds nothing but a LoRA) only with ``--force``.

No base model is loaded: the layouts differ only in how they name each layer's (down, up) and where they keep
its alpha, and diffusers converts names on the state dict alone (``lora_state_dict`` reads kohya's, as
``load_lora_weights`` does; ``convert_unet_state_dict_to_peft`` / ``convert_state_dict_to_peft`` give PEFT's;
``convert_state_dict_to_kohya``, in ``lora.save_kohya``, writes kohya's). Loading into a pipeline instead would
need SD v1.5 (4 GB) to convert a 3 MB file, and would lose the alphas (diffusers gives every layer a file's
commonest alpha; ``load_lora`` folds kohya's into the weights). Here every tensor is copied as it is and every
layer keeps its alpha exactly: kohya stores one per layer; diffusers' header and PEFT's config store ``r`` and
``lora_alpha``, with ``rank_pattern`` / ``alpha_pattern`` for the layers that differ. No shapes can mismatch
here either: ``load_lora`` refuses a LoRA made for another base model when it is used.
"""

import argparse
import math
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import lesson  # noqa: E402
from common.errors import LessonError  # noqa: E402

PARTS = ("unet", "text_encoder")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one readable line, like every other failure
        raise LessonError(f"command line: {message}. 'python {self.prog} --help' says how to use it.")


def convert(argv=None) -> Path:
    """Read IN, write OUT in the layout asked for; returns OUT."""
    parser = Parser(prog="tools/convert_lora.py", description="\n\n".join(__doc__.split("\n\n")[:2]),
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    allow_abbrev=False)  # (a typo must not become --force)
    parser.add_argument("IN", help="the LoRA: a file, or a folder holding one")
    parser.add_argument("OUT", help="kohya: the .safetensors file to write; diffusers, peft: the folder to write")
    parser.add_argument("--to", required=True, choices=["kohya", "diffusers", "peft"], help="the layout to write")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (a folder as a whole)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    args = parser.parse_args(argv)
    for name in ("IN", "OUT"):  # (Path("") is ".", the folder you are in: for OUT, the whole project)
        if not getattr(args, name).strip():
            raise LessonError(f"{name} must be the name of a file or folder, got {getattr(args, name)!r}. "
                              f"'python {parser.prog} --help' says how to use it.")
    from common import files, lora  # torch and diffusers: after --help has answered

    if Path(args.IN).is_file() and files.adapter_kind(args.IN) == "embedding":
        raise LessonError(f"'{args.IN}' holds no LoRA layers (it is a Textual Inversion embedding, or a whole model). "
                          "Give the tool a LoRA file or folder.")
    layout, file = lora.find_lora_file(args.IN, "IN")  # refuses a missing IN, a folder without a LoRA, a damaged file
    out = Path(args.OUT)
    check_out(out, args.to, file, args.force)
    weights, alphas = read(layout, file)
    if not alphas:
        raise LessonError(f"'{file}' holds no LoRA layers (no lora_down/lora_up or lora_A/lora_B weights). "
                          "Give the tool a LoRA file or folder.")
    if args.to == "peft" and any(m.startswith("text_encoder.") for m in alphas):
        raise LessonError(f"'{file}' also changes the text encoder, and a PEFT adapter folder holds one model (the "
                          "UNet). Convert it --to diffusers or --to kohya instead: both keep every layer.")
    if args.to == "kohya":
        lora.save_kohya(weights, alphas, out)
    else:
        with files.atomic_dir(out) as tmp:
            (write_diffusers if args.to == "diffusers" else write_peft)(weights, alphas, tmp)
    ranks = sorted({weights[f"{m}.lora_A.weight"].shape[0] for m in alphas})
    print(f"{layout} '{file}' -> {args.to} '{out}': {len(alphas)} layers "
          f"({sum(m.startswith('unet.') for m in alphas)} in the UNet), rank {'/'.join(map(str, ranks))}, "
          f"alpha {'/'.join(f'{a:g}' for a in sorted(set(alphas.values())))}.")
    return out


def main(argv=None) -> int:
    convert(argv)
    return 0


def check_out(out: Path, to: str, file: Path, force: bool) -> None:
    """Refuse an OUT of the wrong kind, the LoRA being read, or (without --force) anything already there."""
    from common import files

    if to == "kohya" and (out.is_dir() or out.suffix != ".safetensors"):
        what = "a folder" if out.is_dir() else "not a .safetensors name"
        raise LessonError(f"--to kohya writes one file, and OUT '{out}' is {what}. Name the file to write, "
                          "e.g. 'models/my_lora_kohya.safetensors'.")
    if to != "kohya" and (out.is_file() or out.suffix == ".safetensors"):
        raise LessonError(f"--to {to} writes a folder, and OUT '{out}' is a file name. Name the folder to write, "
                          f"e.g. 'models/my_lora_{to}'.")
    if files.same_place(out, file) or (to != "kohya" and files.inside(file.parent, out)):
        raise LessonError(f"OUT '{out}' would replace the LoRA being converted ('{file}'). Choose another OUT.")
    if out.exists() and (out.is_file() or any(out.iterdir())) and not force:
        raise LessonError(f"OUT '{out}' already exists{'' if out.is_file() else ' and is not empty'}. Choose another "
                          "OUT, or add --force to replace it.")
    if force and out.is_dir():  # --force replaces a LoRA folder as a whole: never one that holds other things
        others = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if not is_lora_output(p))
        if others:
            raise LessonError(f"OUT '{out}' holds {len(others)} thing(s) that are not a LoRA ({', '.join(others[:3])}"
                              f"{' ...' if len(others) > 3 else ''}), which --force would delete with the folder. "
                              "Choose another OUT: a new folder, or one holding only a LoRA.")


def is_lora_output(path: Path) -> bool:
    """Whether ``path``, in an OUT folder, is what a LoRA folder holds (so --force may replace it): a LoRA
    .safetensors or .bin file, PEFT's config, a model card, or a save's hidden leftover."""
    from common import files, lora

    if path.name.startswith("."):
        return True
    if not path.is_file():
        return False
    return (path.name in (lora.PEFT_CONFIG, "README.md", lora.LEGACY_WEIGHT_NAME)
            or files.adapter_kind(path) == "lora")


def read(layout: str, file: Path):
    """The LoRA as (weights, alphas): weights in PEFT's naming with the part in front
    ("unet.<module>.lora_A.weight", "text_encoder.<module>.lora_B.weight"), alphas {"unet.<module>": alpha},
    each layer's strength being alpha / rank (kohya's rule, which PEFT's lora_alpha / r is too)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from common import lora

    configs, alphas = {}, {}
    if layout == "kohya":
        raw = lora.read_weights(file)
        check_layers(file, raw, ".lora_down.weight", ".lora_up.weight", ".alpha")
        if any(re.search(r"^lora_te2_|_(input_blocks|middle_block|output_blocks)_", k) for k in raw):
            raise LessonError(f"'{file}' is a LoRA for SDXL (or names its layers the original Stable Diffusion way): "
                              "this tool converts LoRAs for Stable Diffusion v1.x, with kohya's usual layer names.")
        weights = {}
        for down in [k for k in raw if k.endswith(".lora_down.weight")]:  # diffusers' reader, layer by layer
            name = down.removesuffix(".lora_down.weight")
            layer = to_peft(StableDiffusionPipeline.lora_state_dict(
                {down: raw[down], f"{name}.lora_up.weight": raw[f"{name}.lora_up.weight"]})[0])
            weights.update(layer)
            alphas[next(iter(layer)).rsplit(".lora_", 1)[0]] = float(raw.get(f"{name}.alpha", raw[down].shape[0]))
    elif layout == "peft":
        weights = {f"unet.{k.removeprefix('base_model.model.')}": v for k, v in lora.read_weights(file).items()}
        configs["unet"] = LoraConfig.from_pretrained(str(file.parent))
    elif file.suffix == ".safetensors":  # diffusers' own reader; the header holds rank and alpha (save_lora)
        weights, _, metadata = StableDiffusionPipeline.lora_state_dict(
            str(file.parent), weight_name=file.name, return_lora_metadata=True)
        for part in PARTS:
            fields = {k.removeprefix(f"{part}."): v for k, v in (metadata or {}).items() if k.startswith(f"{part}.")}
            if fields:
                configs[part] = LoraConfig(**fields)
    else:  # pytorch_lora_weights.bin (read weights-only); diffusers 0.16 wrote the UNet's without "unet."
        weights = lora.read_weights(file)
        if not any(k.startswith(PARTS) for k in weights):
            weights = {f"unet.{k}": v for k, v in weights.items()}
    weights = to_peft(weights)
    check_layers(file, weights, ".lora_A.weight", ".lora_B.weight")
    lora.require_finite(weights, file, "the LoRA", lora.TRAIN_SCRIPT)
    for module in [k.removesuffix(".lora_A.weight") for k in weights if k.endswith(".lora_A.weight")]:
        part, name = module.split(".", 1)
        alphas.setdefault(module, alpha_of(configs.get(part), name, weights[f"{module}.lora_A.weight"].shape[0]))
    return weights, alphas


def to_peft(state: dict) -> dict:
    """diffusers' names (the old attention-processor ones too) -> PEFT's (``lora.peft_names``); refuses other parts."""
    from common import lora

    other = [k for k in state if not k.startswith(PARTS)] + [k for k in state if k.startswith("text_encoder_2.")]
    if other:
        raise LessonError(f"'{other[0]}' belongs to neither the UNet nor the text encoder of Stable Diffusion v1.x "
                          "(an SDXL LoRA, or not a LoRA for Stable Diffusion): this tool cannot convert it.")
    return lora.peft_names(state)


def check_layers(file: Path, weights: dict, down: str, up: str, *extra: str) -> None:
    """Refuse what is not a plain LoRA layer (DoRA, LoHa, LoKr, biases), and a damaged layer
    (``lora.check_layer_pairs``): no library complained, and the file written was as damaged as the one read."""
    from common import lora

    for key in weights:
        if not key.endswith((down, up, *extra)):
            raise LessonError(f"'{file}' holds '{key}', which is not a plain LoRA layer (DoRA, LoHa, LoKr and LoRA "
                              "biases are other kinds of adapter): this tool converts plain LoRA only.")
    lora.check_layer_pairs(weights, file, down.removesuffix("weight"), up.removesuffix("weight"))


def alpha_of(config, module: str, rank: int) -> float:
    """A layer's alpha as PEFT would set it from ``config`` (rsLoRA's alpha / sqrt(rank) as kohya's alpha / rank);
    alpha = rank (strength 1) where no config says otherwise, as in diffusers and kohya."""
    from peft.utils.other import get_pattern_key

    if config is None:
        return float(rank)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return float(alpha * math.sqrt(rank) if config.use_rslora else alpha)


def lora_config(weights: dict, alphas: dict, part: str) -> dict:
    """LoraConfig's fields for one part: its commonest rank and alpha, patterns for the layers that differ.
    PEFT finds modules by the end of their names, so the text encoder's are given without "text_model."
    (transformers 5 names CLIP's modules without it, 4 with it: these match both)."""
    name = lambda module: module.split(".", 1)[1].removeprefix("text_model.")  # noqa: E731
    ranks = {name(m): weights[f"{m}.lora_A.weight"].shape[0] for m in alphas if m.startswith(f"{part}.")}
    alpha = {name(m): a for m, a in alphas.items() if m.startswith(f"{part}.")}
    r, lora_alpha = (Counter(values.values()).most_common(1)[0][0] for values in (ranks, alpha))
    return {"r": r, "lora_alpha": lora_alpha, "rank_pattern": {m: v for m, v in ranks.items() if v != r},
            "alpha_pattern": {m: v for m, v in alpha.items() if v != lora_alpha}, "target_modules": sorted(ranks)}


def write_diffusers(weights: dict, alphas: dict, folder: Path) -> None:
    """diffusers' own writer; rank and alpha go in the file's header, which load_lora_weights applies."""
    from diffusers import StableDiffusionPipeline

    from common import lora

    layers = {part: {k.removeprefix(f"{part}."): v for k, v in weights.items() if k.startswith(f"{part}.")}
              for part in PARTS}
    StableDiffusionPipeline.save_lora_weights(
        str(folder), weight_name=lora.WEIGHT_NAME, safe_serialization=True,
        unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["text_encoder"],
        unet_lora_adapter_metadata=lora_config(weights, alphas, "unet") if layers["unet"] else None,
        text_encoder_lora_adapter_metadata=lora_config(weights, alphas, "text_encoder") if layers["text_encoder"]
        else None)


def write_peft(weights: dict, alphas: dict, folder: Path) -> None:
    """PEFT's layout, as ``PeftModel.save_pretrained`` writes it: the config by PEFT's own writer, the weights
    under PEFT's "base_model.model." names."""
    import safetensors.torch
    from peft import LoraConfig

    from common import lora

    LoraConfig(**lora_config(weights, alphas, "unet")).save_pretrained(str(folder))
    safetensors.torch.save_file({f"base_model.model.{k.removeprefix('unet.')}": v for k, v in weights.items()},
                                str(folder / lora.PEFT_WEIGHTS), metadata={"format": "pt"})


if __name__ == "__main__":
    lesson.run(main)
