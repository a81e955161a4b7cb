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
- ``check_constants`` is the part of ``validate()`` the generation scripts share, ``load_base_model``
  their step 1, and ``personalize`` their step 2: the above, from the script's constants, and FAST_MODE's
  LCM-LoRA stacked on top.
- ``note_unknown_words`` says, after the run summary, which prompt words the model never learned (the
  pocket model's card lists the words it knows; ``unknown_words`` compares them).
- ``lora_path=None`` is the base model *on purpose* (``USE_LORA = False`` in the scripts).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from common import device, fast_mode, images, lesson, lora, models, sampling, textual_inversion
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
    steps: int = 0  # what to sample with (``personalize``: FAST_MODE changes them)
    guidance: float = 0.0

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


def check_adapter_files(lora_path, embedding_path=None) -> tuple[tuple[str, Path] | None, Path | None]:
    """Refuse missing or unreadable files before any model loads. ``lora_path=None`` means no LoRA, on purpose.

    Returns what was found: the LoRA's (layout, file) and the embedding file, each None where none was asked for.
    """
    found_lora = found_embedding = None
    if lora_path is not None and not Path(lora_path).exists():
        raise LessonError(
            f"No LoRA at '{lora_path}' (LORA_PATH). Train one first: 'python exercise3b_train_lora.py' "
            "('--model tiny' gives a quick toy one), or download the course's into that folder (see README). "
            "To look at the base model on purpose instead, set USE_LORA = False (--no-use-lora).")
    if lora_path is not None:
        found_lora = lora.find_lora_file(lora_path)  # the folder's layout is readable (PEFT config present, one file)
    if embedding_path is not None and not Path(embedding_path).exists():
        raise LessonError(
            f"No embedding at '{embedding_path}' (EMBEDDING_PATH). Train one with "
            "'python exercise3a_train_textual_inversion.py', or set EMBEDDING_PATH = None.")
    if embedding_path is not None:
        found_embedding = textual_inversion.find_embedding_file(embedding_path)  # one readable file, not a LoRA
    return found_lora, found_embedding


def load_adapters(pipe, lora_path=None, lora_scale: float = 1.0, embedding_path=None) -> Personalization:
    """Load the LoRA (at ``lora_scale``) and the embedding into ``pipe``; print and return what was loaded."""
    found_lora, found_embedding = check_adapter_files(lora_path, embedding_path)
    loaded = Personalization()
    if found_lora is not None:
        loaded.lora_layout, loaded.lora_file = found_lora
        loaded.lora_layers = lora.load_lora(pipe, lora_path, lora_scale, found=found_lora)
        loaded.lora_scale = lora_scale
        loaded.adapters = {lora.ADAPTER_NAME: lora_scale}
    if found_embedding is not None:
        loaded.embedding_file = Path(embedding_path)
        loaded.tokens = [textual_inversion.load_embedding(pipe, found_embedding)]
    for line in loaded.describe():
        print(f"  {line}")
    return loaded


def check_constants(cfg) -> None:
    """The constants every generation script shares, checked before any model loads (each script's
    ``validate()`` checks its own first): the model, the sampling settings, the output folder, and the
    LoRA and embedding files, which must exist now rather than after a 4 GB download (and FAST_MODE's
    add-ons, where they are local paths)."""
    lesson.require_text(cfg, "MODEL_ID")
    lesson.require_token(cfg, "SUBJECT_TOKEN")
    lesson.require_int(cfg, "BATCH_SIZE", maximum=lesson.MAX_BATCH)
    lesson.require_int(cfg, "NUM_INFERENCE_STEPS", maximum=lesson.MAX_STEPS)
    lesson.require_int(cfg, "FAST_STEPS", maximum=lesson.MAX_FAST_STEPS)
    lesson.require_seed(cfg, "RANDOM_SEED")
    lesson.require_float(cfg, "GUIDANCE_SCALE", "FAST_GUIDANCE_SCALE", maximum=lesson.MAX_GUIDANCE)
    lesson.require_float(cfg, "LORA_SCALE", maximum=lesson.MAX_LORA_SCALE)
    lesson.require_multiple_of(cfg, "RESOLUTION", 8)
    lesson.require_path(cfg, "LORA_PATH", "EMBEDDING_PATH", allow_none=True)
    lesson.require_writable_dir(cfg, "OUTPUT_DIR")
    images.require_apart_from_course_images(cfg, "OUTPUT_DIR")
    lesson.require_model_id(cfg)
    check_adapter_files(cfg.LORA_PATH if cfg.USE_LORA else None, cfg.EMBEDDING_PATH)
    if cfg.FAST_MODE:
        fast_mode.check_ids(cfg)
        for name, fast in (("NUM_INFERENCE_STEPS", "FAST_STEPS"), ("GUIDANCE_SCALE", "FAST_GUIDANCE_SCALE")):
            if name in cfg.SOURCES:  # (asked for on the command line, where FAST_MODE samples with its own)
                warn(f"{cfg.SOURCES[name]} is not used in FAST_MODE, which samples with {fast} "
                     f"({getattr(cfg, fast):g}): set {lesson.dashed(fast)} instead.")


def guidance_in_use(cfg) -> dict[str, float]:
    """The one guidance scale a script samples with, as ``check_guidance`` takes it: FAST_GUIDANCE_SCALE in
    FAST_MODE, else GUIDANCE_SCALE."""
    name = "FAST_GUIDANCE_SCALE" if cfg.FAST_MODE else "GUIDANCE_SCALE"
    return {f"{name} {getattr(cfg, name):g}": getattr(cfg, name)}


def check_guidance(scales: dict[str, float], negative_prompt: str = "") -> None:
    """Warn, before any model loads, where a guidance scale will not do what it says: diffusers switches
    classifier-free guidance off at a scale of 1 or less, so 0 draws what 1 draws (not the prompt-free picture),
    and NEGATIVE_PROMPT, which works only through guidance, does nothing there. ``scales``: what -> its scale."""
    below = [what for what, scale in scales.items() if scale < 1]
    if below:
        warn(f"{', '.join(below)} draw(s) exactly what a guidance scale of 1 draws: diffusers switches classifier-free "
             "guidance off at 1 or less (a scale below 1 does not weaken the prompt). Use 1 for no guidance, or more.")
    off = [what for what, scale in scales.items() if scale <= 1]
    if negative_prompt and off:
        warn(f"NEGATIVE_PROMPT is ignored at {', '.join(off)}: it works only through classifier-free guidance, "
             "which a guidance scale of 1 or less switches off. Raise the scale above 1 (7.5 is the course's) "
             "to steer away from it.")


def load_base_model(cfg):
    """Step 1 of the generation scripts: the device (DEVICE, MIXED_PRECISION), then MODEL_ID on it, with
    DPM-Solver++ as its scheduler (deterministic, and 25-30 steps do what SD's default needed 50 for).
    Returns ``(pipe, resolution)``: RESOLUTION, or the model's own (512 for SD v1.5)."""
    runtime = device.pick_runtime(cfg.DEVICE, cfg.MIXED_PRECISION)
    print(f"  Model: {models.describe_source(cfg.MODEL_ID)}")
    pipe = models.load_pipeline(cfg.MODEL_ID, runtime.dtype, safety_checker=cfg.SAFETY_CHECKER).to(runtime.device)
    sampling.use_multistep_solver(pipe)
    models.check_resolution(cfg.RESOLUTION, pipe)
    return pipe, cfg.RESOLUTION or models.native_resolution(pipe)


def personalize(pipe, cfg) -> Personalization:
    """Step 2 of the generation scripts: load what the constants name (LORA_PATH unless USE_LORA is off,
    at LORA_SCALE; EMBEDDING_PATH), then, with FAST_MODE, stack the LCM-LoRA on top.

    ``steps`` and ``guidance`` of the result are what to sample with: NUM_INFERENCE_STEPS and
    GUIDANCE_SCALE, or FAST_STEPS and FAST_GUIDANCE_SCALE in FAST_MODE.
    """
    loaded = load_adapters(pipe, cfg.LORA_PATH if cfg.USE_LORA else None, cfg.LORA_SCALE, cfg.EMBEDDING_PATH)
    warn_if_other_resolution(loaded, cfg.RESOLUTION or models.native_resolution(pipe))
    loaded.steps, loaded.guidance = cfg.NUM_INFERENCE_STEPS, cfg.GUIDANCE_SCALE
    if cfg.FAST_MODE:
        print("  " + fast_mode.enable_fast_mode(pipe, loaded.adapters, cfg.LCM_LORA_ID, cfg.TINY_VAE_ID))
        loaded.steps, loaded.guidance = cfg.FAST_STEPS, cfg.FAST_GUIDANCE_SCALE
    return loaded


def without_token(prompt: str, token: str) -> str:
    """The prompt with the subject token removed wherever CLIP reads it as a word (``sampling.word_pattern``: any
    case, beside punctuation): "a dress of sks african fabric" -> "a dress of african fabric", "sks, a dress" ->
    "a dress"."""
    text = re.sub(r"\s+", " ", sampling.word_pattern(token).sub("", prompt))
    return re.sub(r"\s+([,.;:!?])", r"\1", text).strip().lstrip(",.;:!? ")


def trained_word(lora_file) -> str | None:
    """The SUBJECT_TOKEN exercise 3b trained ``lora_file`` with (kept in its header), or None where it does not say
    (a LoRA from elsewhere, a .bin file)."""
    try:
        word = lora.read_settings(lora_file).get("SUBJECT_TOKEN")
    except Exception:  # noqa: BLE001 - no header, or not ours: nothing to compare with
        return None
    return word if isinstance(word, str) and word.strip() else None


def trained_resolution(path) -> int | None:
    """The size in pixels exercise 3b or 3a trained the LoRA or embedding file ``path`` at (kept in its header:
    ``resolution``, or a whole RESOLUTION where an older file has no ``resolution``), or None where it does not say
    (a file from elsewhere, a .bin, an older file trained at RESOLUTION = None, the model's own size)."""
    try:
        settings = lora.read_settings(path)
    except Exception:  # noqa: BLE001 - no header, or not ours: nothing to compare with
        return None
    for key in ("resolution", "RESOLUTION"):
        value = settings.get(key) if isinstance(settings, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def warn_if_other_resolution(loaded: Personalization, resolution: int) -> None:
    """Say when the LoRA or the embedding was trained at another size than the one the pictures are drawn at
    (3b at --resolution 384, exercise 1 at 512): it learned the subject's details at that scale, and shows them
    at another one, or barely."""
    files = [("LoRA", "exercise 3b", loaded.lora_file), ("embedding", "exercise 3a", loaded.embedding_file)]
    for what, script, path in files:
        if path is None:
            continue
        if Path(path).is_dir():
            path = textual_inversion.find_embedding_file(path)
        trained = trained_resolution(path)
        if trained is not None and trained != resolution:
            warn(f"the {what} '{loaded.lora_file if what == 'LoRA' else path}' was trained at {trained}x{trained} "
                 f"({script}'s RESOLUTION, kept in the file), but the pictures are drawn at {resolution}x{resolution} "
                 f"now: it learned its subject at that size, and may show it at another scale, or barely. Set "
                 f"RESOLUTION = {trained} (--resolution {trained}), or train it again at {resolution}.")


def warn_if_unused(prompts: list[str], loaded: Personalization, subject_token: str) -> None:
    """A personalisation only shows where its word is in the prompt: say so when none of them use it, and when
    the LoRA was trained on another word than SUBJECT_TOKEN (3b run with --subject-token ohwx, 1 with 'sks')."""
    def used(word):
        return any(sampling.mentions(p, word) for p in prompts)

    trained = trained_word(loaded.lora_file) if loaded.lora_file is not None else None
    if trained is not None and trained != subject_token and not used(trained):
        warn(f"the LoRA '{loaded.lora_file}' was trained on the word {trained!r} (exercise 3b's SUBJECT_TOKEN, "
             f"kept in the file), but SUBJECT_TOKEN here is {subject_token!r} and no prompt contains {trained!r}: "
             f"the pictures will barely show what it learned. Set SUBJECT_TOKEN = {trained!r} "
             f"(--subject-token {shlex.quote(trained)}).")
    words = [subject_token] if loaded.lora_file is not None else []
    words += loaded.tokens
    for word in words:
        if not used(word):
            warn(f"no prompt contains {word!r}: the pictures will barely show what it learned.")


def unknown_words(prompts, known: set[str], ignore: str = "") -> list[tuple[str, list[str]]]:
    """(prompt, its words the model never learned) for each prompt that has any, in order.

    Words are compared in lower case without punctuation ("Watercolor," is "watercolor"); the words of
    ``ignore`` (SUBJECT_TOKEN: the word the LoRA teaches) never count as unknown."""
    def words(text):
        return re.findall(r"[^\W_]+", text.lower())

    skip = set(words(ignore)) | {w.lower() for w in known}
    found = []
    for prompt in prompts:
        new = [w for w in dict.fromkeys(words(prompt)) if w not in skip]
        if new:
            found.append((prompt, new))
    return found


def note_unknown_words(cfg, prompts, shown: int = 4) -> None:
    """After the run summary: which prompts hold words the model never learned (the pocket model's card lists the
    words it knows; for any other model nothing is printed). At most ``shown`` prompts are listed."""
    known = models.known_words(cfg.MODEL_ID)
    if known is None:
        return
    found = unknown_words(prompts, known, cfg.SUBJECT_TOKEN)
    if not found:
        return
    print(f"Note: the pocket model never learned some words of {len(found)} of the {len(prompts)} prompts (its "
          "world's captions do not have them); it draws those prompts as a plain pattern:")
    for prompt, new in found[:shown]:
        text = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        print(f'  "{text}": {", ".join(new)}')
    if len(found) > shown:
        print(f"  ... and {len(found) - shown} more")
    print()
