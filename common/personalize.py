"""Personalising a loaded pipeline: the LoRA (and, optionally, a Textual Inversion embedding).

The generation scripts all start the same way: load the base model, then teach it "sks" by loading
what exercise 3b (LoRA) or 3a (Textual Inversion) trained. This module does that one job and always
says what it loaded, because the course's own scripts quietly fell back to the base model when the
LoRA was missing, and a student then studied pictures that had never seen their fabric.

- ``check_adapter_files`` runs before any model loads: a missing LoRA stops the script at once, with
  how to get one, instead of after a 4 GB download.
- ``load_adapters`` applies the LoRA through :func:`common.lora.load_lora` (diffusers, PEFT and kohya
  layouts; it refuses a file that patches nothing) and the embedding through
  :func:`common.textual_inversion.load_embedding` (ours, the course's, AUTOMATIC1111's).
- ``lora_path=None`` is the base model *on purpose* (``USE_LORA = False`` in the scripts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors

from common import lora, textual_inversion
from common.errors import LessonError, warn


@dataclass
class Personalization:
    """What ``load_adapters`` put into the pipeline."""

    lora_file: Path | None = None
    lora_layout: str = ""
    lora_layers: int = 0
    lora_scale: float = 0.0
    embedding_file: Path | None = None
    tokens: list[str] = field(default_factory=list)  # the word(s) to prompt with, from the embedding
    adapters: dict[str, float] = field(default_factory=dict)  # active LoRA adapters -> weight (for stacking)

    def describe(self) -> list[str]:
        lines = []
        if self.lora_file is None:
            lines.append("LoRA: none - this is the BASE model, on purpose (USE_LORA = False)")
        else:
            lines.append(f"LoRA: {self.lora_file} ({self.lora_layout} layout): {self.lora_layers} layers patched, "
                         f"scale {self.lora_scale:g}")
        if self.embedding_file is not None:
            lines.append(f"Embedding: {self.embedding_file}: token(s) {', '.join(self.tokens)}")
        return lines


def check_adapter_files(lora_path, embedding_path=None) -> None:
    """Refuse missing files before any model loads. ``lora_path=None`` means no LoRA, on purpose."""
    if lora_path is not None and not Path(lora_path).exists():
        raise LessonError(
            f"No LoRA at '{lora_path}' (LORA_PATH). Train one first: 'python exercise3b_train_lora.py' "
            "('--model tiny' gives a quick toy one), or download the course's into that folder (see README). "
            "To look at the base model on purpose instead, set USE_LORA = False (--no-use-lora).")
    if lora_path is not None:
        lora.find_lora_file(lora_path)  # the folder's layout is readable (PEFT config present, one file, ...)
    if embedding_path is not None and not Path(embedding_path).exists():
        raise LessonError(
            f"No embedding at '{embedding_path}' (EMBEDDING_PATH). Train one with "
            "'python exercise3a_train_textual_inversion.py', or set EMBEDDING_PATH = None.")
    if embedding_path is not None:
        textual_inversion.find_embedding_file(embedding_path)  # one readable file, not a LoRA


def load_adapters(pipe, lora_path=None, lora_scale: float = 1.0, embedding_path=None) -> Personalization:
    """Load the LoRA (at ``lora_scale``) and the embedding into ``pipe``; print and return what was loaded."""
    check_adapter_files(lora_path, embedding_path)
    loaded = Personalization()
    if lora_path is not None:
        loaded.lora_layout, loaded.lora_file = lora.find_lora_file(lora_path)
        if loaded.lora_layout == "file":
            loaded.lora_layout = "kohya" if _is_kohya(loaded.lora_file) else "diffusers"
        loaded.lora_layers = lora.load_lora(pipe, lora_path, lora_scale)
        loaded.lora_scale = lora_scale
        loaded.adapters = {lora.ADAPTER_NAME: lora_scale}
    if embedding_path is not None:
        loaded.embedding_file = Path(embedding_path)
        loaded.tokens = [textual_inversion.load_embedding(pipe, embedding_path)]
    for line in loaded.describe():
        print(f"  {line}")
    return loaded


def _is_kohya(path: Path) -> bool:
    """kohya/AUTOMATIC1111 files name their layers ``lora_unet_...`` / ``lora_te_...``."""
    if path.suffix != ".safetensors":
        return False
    with safetensors.safe_open(str(path), framework="pt") as f:
        return any(k.startswith(("lora_unet_", "lora_te_")) for k in f.keys())


def without_token(prompt: str, token: str) -> str:
    """The prompt with the subject token removed: "a dress of sks african fabric" -> "a dress of african fabric"."""
    return re.sub(r"\s+", " ", re.sub(rf"(?<!\S){re.escape(token)}(?!\S)", "", prompt)).strip()


def warn_if_unused(prompts: list[str], loaded: Personalization, subject_token: str) -> None:
    """A personalisation only shows where its word is in the prompt: say so when none of them use it."""
    words = [subject_token] if loaded.lora_file is not None else []
    words += loaded.tokens
    for word in words:
        if not any(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", p) for p in prompts):
            warn(f"no prompt contains {word!r}: the pictures will barely show what it learned.")
