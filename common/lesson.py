"""Lesson-script plumbing: constants in, validated, and every failure one readable line out.

``configure(globals(), argv)`` reads the script's CONSTANTS block *when it is called* (so a test can
change them and call ``main()``) and applies command-line overrides (``common.configurator``); the
``require_*`` checks validate them by name before any model loads; ``print_summary``, ``step`` and
``print_reflection`` are what the student reads; ``run(main)`` turns any :class:`LessonError` (or a known
library failure) into one line, ``--debug`` adds the traceback.
"""

from __future__ import annotations

import math
import os
import re
import sys
import traceback

from common import configurator
from common.errors import LessonError, brief

Config = configurator.Config
dashed = configurator.dashed
MODEL_ENV_VAR = configurator.MODEL_ENV_VAR


def configure(script_globals: dict, argv: list[str] | None = None, description: str | None = None) -> Config:
    """The script's CONSTANTS as they are now, with ``argv`` overrides applied (``common.configurator``).

    ``--model`` is an alias of ``--model-id``; DREAMBOOTH_MODEL stands in for it. ``--debug`` is accepted
    everywhere. Libraries are imported only after the command line is read, so ``--help`` answers at once.
    """
    cfg = configurator.configure(script_globals, argv, description, os.environ)
    if int(os.environ.get("RANK", "0")) > 0:  # under accelerate launch / torchrun, only the first process talks
        sys.stdout = open(os.devnull, "w")
    _quiet_libraries(cfg.DEBUG)
    return cfg


def _quiet_libraries(debug: bool) -> None:
    """Library chatter (loading bars, deprecation notes) hides the lesson's own output; --debug brings it back."""
    import warnings

    import diffusers
    import transformers

    for lib in (diffusers.utils.logging, transformers.utils.logging):
        if debug:
            lib.set_verbosity_info()
            lib.enable_progress_bar()
        else:
            lib.set_verbosity_error()
            lib.disable_progress_bar()
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers|accelerate)")


# --------------------------------------------------------------------------- validation (before any model loads)
def _fail(cfg: Config, name: str, must: str):
    value = getattr(cfg, name)
    raise LessonError(f"{name} {must}, got {value!r}. Edit it at the top of {cfg.SCRIPT} or pass {dashed(name)}.")


def _as_number(cfg: Config, name: str, kind):
    value = getattr(cfg, name)
    if isinstance(value, str):  # a student may write LEARNING_RATE = "1e-4"
        try:
            value = kind(value)
        except ValueError:
            _fail(cfg, name, "must be a number")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(cfg, name, "must be a number")
    if kind is int and int(value) != value:
        _fail(cfg, name, "must be a whole number")
    setattr(cfg, name, kind(value))
    return kind(value)


def require_int(cfg: Config, *names: str, minimum: int = 1, allow_none: bool = False) -> None:
    """Each named constant is a whole number >= minimum (or None when allowed)."""
    for name in names:
        if allow_none and getattr(cfg, name) is None:
            continue
        if _as_number(cfg, name, int) < minimum:
            _fail(cfg, name, f"must be a whole number >= {minimum}")


def require_float(cfg: Config, *names: str, minimum: float = 0.0, above: bool = False) -> None:
    """Each named constant is a number >= minimum (> minimum when ``above``)."""
    for name in names:
        value = _as_number(cfg, name, float)
        if value < minimum or (above and value == minimum):
            _fail(cfg, name, f"must be a number {'>' if above else '>='} {minimum:g}")


def require_multiple_of(cfg: Config, name: str, factor: int, allow_none: bool = True) -> None:
    if allow_none and getattr(cfg, name) is None:
        return
    require_int(cfg, name, minimum=factor)
    if getattr(cfg, name) % factor:
        _fail(cfg, name, f"must be a multiple of {factor} (the VAE shrinks images {factor}x)")


def require_choice(cfg: Config, name: str, choices) -> None:
    if getattr(cfg, name) not in choices:
        _fail(cfg, name, "must be one of " + ", ".join(map(repr, choices)))


def require_text(cfg: Config, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, str) or not value.strip():
            _fail(cfg, name, "must be non-empty text")


def require_text_list(cfg: Config, *names: str) -> None:
    """Each named constant is a non-empty list (or tuple) of non-empty texts, e.g. PROMPTS."""
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, str):  # one prompt given on its own: a list of one
            value = (value,)
            setattr(cfg, name, value)
        if not isinstance(value, (tuple, list)) or not value or not all(
                isinstance(v, str) and v.strip() for v in value):
            _fail(cfg, name, "must be a list of non-empty texts (on the command line: separated by |)")


# --------------------------------------------------------------------------- what the student sees
def print_summary(cfg: Config, title: str, names: list[str]) -> None:
    """The run summary a script prints first: what it will do, with which constants."""
    print("=" * 72)
    print(title)
    print("=" * 72)
    width = max(map(len, names))
    for name in names:
        source = cfg.SOURCES.get(name) if hasattr(cfg, "SOURCES") else None
        print(f"  {name:<{width}} = {getattr(cfg, name)!r}" + (f"  (from {source})" if source else ""))
    others = [name for name in getattr(cfg, "SOURCES", {}) if name not in names]
    if others:  # every override is shown, as nanoGPT's configurator prints each one
        print("  also set: " + ", ".join(f"{name} = {getattr(cfg, name)!r} (from {cfg.SOURCES[name]})"
                                          for name in others))
    print()


def step(number: int | str, text: str) -> None:
    """A numbered lesson step, as the course text numbers them."""
    print(f"\n[Step {number}] {text}")


def print_reflection(questions: list[str]) -> None:
    print("\n" + "-" * 72 + "\nReflection questions\n" + "-" * 72)
    for i, q in enumerate(questions, 1):
        print(f"  {i}. {q}")
    print()


# --------------------------------------------------------------------------- the entry point
# Out-of-memory advice, one tip per constant: a script is told only about the constants it has.
OOM_TIPS = (
    ("TRAIN_BATCH_SIZE", "TRAIN_BATCH_SIZE = 1 (--train-batch-size 1; raise GRADIENT_ACCUMULATION to compensate)"),
    ("BATCH_SIZE", "a smaller BATCH_SIZE (--batch-size 1)"),
    ("SAMPLE_BATCH_SIZE", "SAMPLE_BATCH_SIZE = 1 (--sample-batch-size 1)"),
    ("GRADIENT_CHECKPOINTING", "GRADIENT_CHECKPOINTING = True (--gradient-checkpointing)"),
    ("RESOLUTION", "a smaller RESOLUTION (--resolution 384 or 256)"),
    ("USE_8BIT_ADAM", "USE_8BIT_ADAM = True (--use-8bit-adam; needs bitsandbytes)"),
    ("FAST_MODE", "FAST_MODE = True (--fast-mode)"),
)


def out_of_memory_advice(constants=None, what: str = "The GPU") -> str:
    """What to try when memory runs out, naming only ``constants`` the script has (all tips when None)."""
    tips = [tip for name, tip in OOM_TIPS if constants is None or name in constants]
    return (f"{what} ran out of memory. Try, one at a time: " + "; ".join(tips)
            + f". Close other programs that use the {'GPU' if what == 'The GPU' else 'memory'}.")



def explain(exc: BaseException, constants=None) -> str | None:
    """A one-line explanation for failures a student can cause outside our own checks (None if unknown).

    ``constants``: the names of the running script's constants, so that advice names only what it has.
    """
    if isinstance(exc, LessonError):
        return str(exc)
    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, MemoryError):
        return out_of_memory_advice(constants, "The computer (RAM)")
    if name == "OutOfMemoryError" or "out of memory" in text.lower():
        return out_of_memory_advice(constants)
    if isinstance(exc, OSError) and exc.errno == 28:
        return "The disk is full. Free some space (old class_images/ or models/ checkpoints) and run again."
    return None


def one_line(message: str) -> str:
    """The message on one line (a library's text inside it may have brought line breaks)."""
    return re.sub(r"\s*\n\s*", " ", message.strip())


def run(main) -> None:
    """Call ``main()``; turn any failure into one readable line and a non-zero exit code."""
    debug = "--debug" in sys.argv[1:]
    try:
        code = main()
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("\nStopped (Ctrl-C).", file=sys.stderr)
        sys.exit(130)
    except BaseException as exc:  # noqa: BLE001 - this is the last line of defence for students
        constants = {k for k in getattr(main, "__globals__", {}) if k.isupper()} or None
        message = explain(exc, constants)
        if debug:
            traceback.print_exc()
        if message is None:
            message = (f"unexpected {brief(exc, 300)}. Run again with --debug for the full traceback, "
                       "and include it if you ask for help.")
        print(f"\nERROR: {one_line(message)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # main() may return its results (for tests)
