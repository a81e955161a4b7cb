"""Concept 4 side by side: the base model, Textual Inversion and LoRA on the same prompts and seeds.

Every row fills the prompts' "{}" with its own words for the fabric: the base model gets the plain
class words ("african fabric"), Textual Inversion its placeholder ("<african-fabric>"), and LoRA its
subject token before the class words ("sks african fabric"). A prompt without "{}" (such as "a fabric
pattern") is the same in every row, and shows what each method did to the rest of the language.
The caption gives each method's file size and training time, read from the file's header where our
scripts store it.
"""

from __future__ import annotations

from pathlib import Path

from common import figures, lora, sampling
from common.files import human_size, save_image

ROWS = ("base model", "Textual Inversion", "LoRA")


def _duration(seconds) -> str:
    if seconds is None:
        return "unknown (not in the file)"
    minutes = seconds / 60
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def describe_file(method: str, file: Path) -> str:
    """'LoRA: 3.1 MB (pytorch_lora_weights.safetensors), training time 22 min' - one caption line."""
    try:
        seconds = lora.read_settings(file).get("training_seconds")
    except Exception:  # noqa: BLE001 - a .pt or foreign file: no header to read
        seconds = None
    return f"{method}: {human_size(file.stat().st_size)} ({file.name}), training time {_duration(seconds)}"


def save_ti_vs_lora(pipe, ti_token: str, ti_file, lora_path, prompts: list[str], seeds: list[int],
                    settings: sampling.SamplingSettings, path, class_words: str = "african fabric") -> Path:
    """Draw the three rows with one pipeline and save the captioned grid at ``path``.

    ``pipe`` already knows ``ti_token`` (trained in it, or loaded with ``textual_inversion.load_embedding``).
    The LoRA at ``lora_path`` is loaded first (so a LoRA for another model fails before any drawing),
    switched off for the first two rows, and removed again at the end.
    """
    lora_file = lora.find_lora_file(lora_path)[1]
    lora_words = f"{lora.read_settings(lora_file).get('SUBJECT_TOKEN', 'sks')} {class_words}"
    lora.load_lora(pipe, lora_path)
    images, labels = [], []
    try:
        for name, words in zip(ROWS, (class_words, ti_token, lora_words)):
            (pipe.enable_lora if name == "LoRA" else pipe.disable_lora)()
            row = [p.replace("{}", words) for p in prompts]
            images += sampling.generate(pipe, row, seeds, settings, desc=f"Comparison: {name}")[0]
            labels += [f"{p} (seed {s})" for p, s in zip(row, seeds)]
    finally:
        pipe.delete_adapters(lora.ADAPTER_NAME)
    grid = figures.image_grid(images, cols=len(prompts), labels=labels, row_labels=list(ROWS),
                              title="Textual Inversion vs LoRA: same prompts, same seeds")
    caption = ["Base model: nothing trained, nothing to download.",
               describe_file("Textual Inversion (one new word, nothing else changes)", Path(ti_file)),
               describe_file("LoRA (adapters in the UNet's attention layers)", lora_file)]
    return save_image(figures.add_caption(grid, caption), path)
