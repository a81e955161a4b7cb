"""Lesson-script plumbing: constants in, validated, and every failure one readable line out.

``configure(globals(), argv)`` reads the script's CONSTANTS block *when it is called* (so a test can
change them and call ``main()``) and applies command-line overrides (``common.configurator``); the
``require_*`` checks validate them by name before any model loads; ``print_summary``, ``step`` and
``print_reflection`` are what the student reads; ``run(main)`` turns any :class:`LessonError` (or a known
library failure) into one line, ``--debug`` adds the traceback.
"""

from __future__ import annotations

import errno
import math
import os
import re
import sys
import traceback
from pathlib import Path

from common import configurator
from common.errors import LessonError, brief, warn

Config = configurator.Config
dashed = configurator.dashed
MODEL_ENV_VAR = configurator.MODEL_ENV_VAR


def configure(script_globals: dict, argv: list[str] | None = None, description: str | None = None) -> Config:
    """The script's CONSTANTS as they are now, with ``argv`` overrides applied (``common.configurator``).

    ``--model`` is an alias of ``--model-id``; DREAMBOOTH_MODEL stands in for it. ``--debug`` and
    ``--threads N`` are accepted everywhere; PyTorch's CPU threads are set here (``device.use_threads``:
    ``--threads N``, else one per free core). In a script with SUBJECT_TOKEN, ``{}`` in its prompts becomes
    that token (``fill_token``). The scripts import the libraries only after this returns, so that
    ``--help`` answers at once.
    """
    robust_console()
    cfg = configurator.configure(script_globals, argv, description, os.environ)
    from common import device  # (imports torch: after the command line is read)

    device.use_threads(cfg.threads)
    if hasattr(cfg, "SUBJECT_TOKEN"):
        fill_token(cfg, "SUBJECT_TOKEN")
    if int(os.environ.get("RANK", "0")) > 0:  # under accelerate launch / torchrun, only the first process talks
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # (not cp1252: it must take any prompt's characters)
    _ORIGIN.clear()  # so that an error about MODEL_ID can say it came from DREAMBOOTH_MODEL
    _ORIGIN.update({name: source for name, source in cfg.SOURCES.items() if not source.startswith("-")})
    _quiet_libraries(cfg.DEBUG)
    warn_if_elsewhere(script_globals.get("__file__"))
    return cfg


PROJECT_FOLDERS = ("training_images", "models", "outputs", "class_images")  # what a project folder holds


def warn_if_elsewhere(script) -> None:
    """Say so when a script runs from another folder than its project's (``python ~/course/exercise1_generate.py``
    from the home folder): its relative paths (training_images/, models/, outputs/) are read and written in the
    current folder, so a LoRA trained in the project is "not there". Silent where the current folder is a project
    folder of its own (it holds one of PROJECT_FOLDERS)."""
    if not script:
        return
    script = Path(script).resolve()
    project = next((p for p in script.parents if (p / "common").is_dir()), script.parent)  # (tools/, bench/)
    here = Path.cwd()
    if project == here.resolve() or any((here / name).is_dir() for name in PROJECT_FOLDERS):
        return
    warn(f"{script.name} runs from '{here}', not from its project folder '{project}': the folders it reads and "
         f"writes (training_images/, models/, outputs/) are taken from '{here}'. To use the project's, 'cd' into "
         f"'{project}' first and run it from there.")


_ORIGIN: dict[str, str] = {}  # constant -> environment variable it was read from, in the running script


def fill_token(cfg: Config, token: str) -> None:
    """``{}`` in every text constant (or list of texts) becomes the value of the constant ``token``:
    "a {} african fabric pattern" with SUBJECT_TOKEN = "sks" reads "a sks african fabric pattern", so the
    word is typed once and ``--subject-token ohwx`` changes every prompt. Text without ``{}`` stays as written."""
    word = getattr(cfg, token)
    if not isinstance(word, str) or "{" in word or "}" in word:  # (require_token says what is wrong with it)
        return
    word = tidy_token(word)
    setattr(cfg, token, word)
    for name, value in cfg.as_dict().items():
        if isinstance(value, str):
            setattr(cfg, name, value.replace("{}", word))
        elif isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
            setattr(cfg, name, type(value)(v.replace("{}", word) for v in value))


def robust_console() -> None:
    """A console that cannot show a character (PYTHONIOENCODING=ascii, a cp1252 Windows console) shows
    it escaped instead of ending the run with UnicodeEncodeError over a file name or a prompt."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", "") == "strict":
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a closed or unusual stream: leave it as it is
                pass


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
            # CRITICAL, not ERROR: a library logs an error just before raising it (diffusers' "Loading fabric was
            # unsuccessful with the following error: ..."), and run() turns that exception into the one message
            lib.set_verbosity(lib.CRITICAL)
            lib.disable_progress_bar()
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(diffusers|transformers|accelerate)")


# --------------------------------------------------------------------------- validation (before any model loads)
def _shown(value) -> str:
    """A value as a message shows it: a whole number of hundreds of digits, or a long list, by its length alone."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"a whole number of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, (tuple, list)) and len(value) > 12:
        return f"a list of {len(value)}"
    return repr(value)


def fail(cfg: Config, name: str, must: str, advice: str = ""):
    """Refuse the constant ``name``: what it must be, what it is, and where to change it (then ``advice``)."""
    value = getattr(cfg, name)
    raise LessonError(f"{name} {must}, got {_shown(value)}. Edit it at the top of {cfg.SCRIPT} or pass {dashed(name)}."
                      + (f" {advice}" if advice else ""))


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # a whole number beyond any float ("1" and 400 zeros on the command line)
        return False


def _as_number(cfg: Config, name: str, kind):
    value = getattr(cfg, name)
    if isinstance(value, str):  # a student may write LEARNING_RATE = "1e-4"
        try:
            value = kind(value)
        except ValueError:
            fail(cfg, name, "must be a number")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(cfg, name, "must be a number")
    if not _finite(value):
        fail(cfg, name, "must be a number" + (" of at most 308 digits" if isinstance(value, int) else ""))
    if kind is int and int(value) != value:
        fail(cfg, name, "must be a whole number")
    setattr(cfg, name, kind(value))
    return kind(value)


def require_int(cfg: Config, *names: str, minimum: int = 1, maximum: int | None = None,
                allow_none: bool = False, advice: str = "") -> None:
    """Each named constant is a whole number >= minimum (and <= maximum, else ``advice`` follows the refusal;
    or None when allowed)."""
    for name in names:
        if allow_none and getattr(cfg, name) is None:
            continue
        value = _as_number(cfg, name, int)
        if value < minimum:
            fail(cfg, name, f"must be a whole number >= {minimum}")
        if maximum is not None and value > maximum:
            fail(cfg, name, f"must be a whole number between {minimum} and {maximum}", advice)


def require_float(cfg: Config, *names: str, minimum: float = 0.0, above: bool = False,
                  maximum: float | None = None, allow_none: bool = False) -> None:
    """Each named constant is a number >= minimum (> minimum when ``above``; <= maximum when given; or None
    when allowed)."""
    for name in names:
        if allow_none and getattr(cfg, name) is None:
            continue
        value = _as_number(cfg, name, float)
        if value < minimum or (above and value == minimum):
            fail(cfg, name, f"must be a number {'>' if above else '>='} {minimum:g}")
        if maximum is not None and value > maximum:
            fail(cfg, name, f"must be a number {'>' if above else '>='} {minimum:g} and <= {maximum:g}")


# Seeds go to torch.Generator.manual_seed, which takes 64 bits, and scripts add small offsets to them.
MAX_SEED = 2**32 - 1
MAX_RESOLUTION = 2048  # SD v1.5 draws 512, SDXL 1024: beyond 2048 the UNet's memory grows past any GPU
# Images generated at once: beyond this nothing is faster, and on a Linux CPU a batch that outgrows the memory is
# stopped by the kernel without a word (where a GPU's error lets generation halve its batch and go on).
MAX_BATCH = 64
# Denoising steps: DPM-Solver++ draws well in 20-50. Past 500, SD v1.5's scheduler config ('leading' timesteps, offset
# 1) makes it start beyond the 1000 trained noise levels: 999 steps drew NaN (black) pictures, 1000 an IndexError.
MAX_STEPS = 500
# Micro-batches summed into one update (the course's 4): a larger mean gradient of 5-20 pictures is no better, an update
# of millions never ends (Ctrl-C waits for it), and beyond 2**63 accelerate's division overflows.
MAX_ACCUMULATION = 256
# Pictures in one training micro-batch (TRAIN_BATCH_SIZE; 3b adds as many class images): the course trains on 5-20, and
# memory grows with every one; a larger effective batch is GRADIENT_ACCUMULATION's, in the memory of one micro-batch.
# (The memory check, training.check_step_memory, measures only on a Linux CPU: a GPU or a Mac took 10**30.)
MAX_TRAIN_BATCH = 64
MAX_FAST_STEPS = 50  # LCMScheduler refuses more steps than the 50 it was distilled from
# Numbers far beyond these overflow float32 inside torch ("value cannot be converted to type float without
# overflow") or only ever give black pictures and NaN losses.
MAX_GUIDANCE = 100  # the course uses 1.5 to 20
MAX_LORA_SCALE = 100  # 1 = as trained
MAX_LEARNING_RATE = 1.0  # the course uses 1e-4 (LoRA) and 5e-4 (Textual Inversion)
# Below this a run trains silently: AdamW moves each weight by about LEARNING_RATE per update, so 1e-7 over 3b's 200
# updates moves a weight by at most 2e-5, a thousandth of what LoRA and embedding weights learn (1e-3 to 1e-1). The
# course's rates are 1000x and 5000x this.
MIN_LEARNING_RATE = 1e-7
# Items of a list constant (PROMPTS, STYLES, GUIDANCE_SCALES, keyframes): each is a tile or a row of a figure, and a
# figure of hundreds of them is too big to look at (or, one row of 512-px tiles, to hold in memory).
MAX_LIST = 100


def require_learning_rate(cfg: Config, course: float) -> None:
    """LEARNING_RATE is a number > 0 and <= MAX_LEARNING_RATE; far below any sensible rate (MIN_LEARNING_RATE) it
    trains and saves without a word while the weights hardly move, so say so (``course``: the script's default)."""
    require_float(cfg, "LEARNING_RATE", above=True, maximum=MAX_LEARNING_RATE)
    rate = cfg.LEARNING_RATE
    if rate < MIN_LEARNING_RATE:
        steps = getattr(cfg, "MAX_TRAIN_STEPS", None)
        moved = f" ({steps} x {rate:g} = {steps * rate:.1g} at most)" if isinstance(steps, int) else ""
        warn(f"LEARNING_RATE {rate:g} is far below any rate that trains (under {MIN_LEARNING_RATE:g}): AdamW moves "
             f"each weight by about LEARNING_RATE per update, so in MAX_TRAIN_STEPS updates the weights will hardly "
             f"move{moved} and the result will look like the base model. The course's is {course:g}: set "
             f"LEARNING_RATE = {course:g} (--learning-rate {course:g}).")


def require_seed(cfg: Config, *names: str) -> None:
    require_int(cfg, *names, minimum=0, maximum=MAX_SEED)


def require_multiple_of(cfg: Config, name: str, factor: int, allow_none: bool = True,
                        maximum: int = MAX_RESOLUTION) -> None:
    if allow_none and getattr(cfg, name) is None:
        return
    require_int(cfg, name, minimum=factor)
    if getattr(cfg, name) % factor:
        fail(cfg, name, f"must be a multiple of {factor} (the VAE shrinks images {factor}x)")
    if getattr(cfg, name) > maximum:
        fail(cfg, name, f"must be a multiple of {factor} between {factor} and {maximum} (512 for SD v1.5; "
                        "larger pictures need more memory than any GPU has)")


def require_choice(cfg: Config, name: str, choices) -> None:
    """The named constant is one of ``choices``; text is read as written in any case, with spaces around it
    (" Cosine" is "cosine")."""
    value = getattr(cfg, name)
    if isinstance(value, str):
        value = next((c for c in choices if isinstance(c, str) and c.lower() == value.strip().lower()), value)
        setattr(cfg, name, value)
    if value not in choices:
        fail(cfg, name, "must be one of " + ", ".join(map(repr, choices)))


def require_text(cfg: Config, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, str) or not value.strip():
            fail(cfg, name, "must be non-empty text")


def require_text_list(cfg: Config, *names: str) -> None:
    """Each named constant is a non-empty list (or tuple) of at most MAX_LIST non-empty texts, e.g. PROMPTS."""
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, str):  # one prompt given on its own: a list of one
            value = (value,)
            setattr(cfg, name, value)
        if not isinstance(value, (tuple, list)) or not value or not all(
                isinstance(v, str) and v.strip() for v in value):
            fail(cfg, name, "must be a list of non-empty texts (on the command line: separated by |)")
        if len(value) > MAX_LIST:
            fail(cfg, name, f"must be a list of at most {MAX_LIST} texts (one picture each)")


def tidy_token(word: str) -> str:
    """The subject's word as it goes into the prompts: " sks " and "my  fabric" become "sks" and "my fabric" (stray
    spaces would otherwise be typed into every prompt, and a word with spaces around it names no file)."""
    return " ".join(word.split())


def require_token(cfg: Config, *names: str) -> None:
    """The words that name the subject (SUBJECT_TOKEN, PLACEHOLDER_TOKEN) are the words written where ``{}``
    stands in the prompts: text with a letter or digit in it, and no braces of its own ("{}" or "{style}" would
    be read as another place to fill). Several words are allowed: the paper's identifier may be a few rare tokens."""
    for name in names:
        require_text(cfg, name)
        setattr(cfg, name, tidy_token(getattr(cfg, name)))
        word = getattr(cfg, name)
        if "{" in word or "}" in word:
            fail(cfg, name, "must not contain { or }, which mark in the prompts where the word goes (try 'sks')")
        if not re.search(r"\w", word):
            fail(cfg, name, "must contain a letter or a digit, so that it can be found in a prompt (try 'sks')")


def require_model_id(cfg: Config) -> None:
    """MODEL_ID names something loadable (a typo'd path or a web address is refused before anything loads).
    Spellings of one model become one ('TINY' -> 'tiny', './models/my-sd/' -> 'models/my-sd'), so that --resume
    and the class images' cache know it for the same."""
    from common.models import resolve

    require_text(cfg, "MODEL_ID")
    source = resolve(cfg.MODEL_ID)
    if source.kind in ("tiny", "pocket"):
        cfg.MODEL_ID = source.kind
    elif source.kind in ("folder", "single_file"):
        cfg.MODEL_ID = Path(source.location).as_posix()
    else:
        cfg.MODEL_ID = cfg.MODEL_ID.strip()


def require_path(cfg: Config, *names: str, allow_none: bool = False) -> None:
    """Each named constant names a file or folder: text (a number typed on the command line is read as a name).
    A path starting with "~" is made the home folder's, as the shell would (in the script, or quoted on the
    command line, Python would otherwise read and write a folder named "~" in the project)."""
    for name in names:
        value = getattr(cfg, name)
        if value is None and allow_none:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
            setattr(cfg, name, value)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
            setattr(cfg, name, value)
        if not isinstance(value, str) or not value.strip():
            fail(cfg, name, "must be the name of a file or folder" + (" (or None)" if allow_none else ""))
        if value.startswith("~"):
            setattr(cfg, name, os.path.expanduser(value))


def _writable_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be written to or created, or None when it can."""
    if folder.exists() and not folder.is_dir():
        return "is a file, not a folder"
    existing = folder
    while not existing.exists():  # the nearest part of the path that is there
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"cannot be created: '{existing}' is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return ("is not writable (permission denied)" if existing == folder
                else f"cannot be created: '{existing}' is not writable (permission denied)")
    return None


def require_writable_dir(cfg: Config, *names: str) -> None:
    """Each named constant is a folder this run can write into, or create (checked before any model loads,
    so that a typo does not cost a model download and an hour of training)."""
    require_path(cfg, *names)
    for name in names:
        problem = _writable_problem(Path(getattr(cfg, name)).expanduser())
        if problem:
            raise LessonError(f"{name} '{getattr(cfg, name)}' {problem}. Set {name} to a folder you can write to "
                              f"(edit it at the top of {cfg.SCRIPT} or pass {dashed(name)}).")
    model_id = getattr(cfg, "MODEL_ID", None)
    if isinstance(model_id, str) and model_id.strip().lower() == "tiny":
        from common.tiny_model import TINY_DIR, tiny_model_is_built

        if not tiny_model_is_built() and _writable_problem(TINY_DIR):
            raise LessonError(f"MODEL_ID 'tiny' is built into '{TINY_DIR}/', which {_writable_problem(TINY_DIR)}. "
                              "Run the script from a project folder you can write to.")


def require_apart(cfg: Config, name: str, other: str, nested: bool = False) -> None:
    """Folder ``name`` is not folder ``other`` (symlinks followed); with ``nested``, neither holds the other.

    Written into the training pictures' folder, a script's outputs would be trained on next time."""
    from common.files import inside, same_place

    mine, theirs = getattr(cfg, name), getattr(cfg, other)
    how = ("is the same folder as" if same_place(mine, theirs) else "is inside" if nested and inside(mine, theirs)
           else "contains" if nested and inside(theirs, mine) else None)
    if how:
        raise LessonError(f"{name} '{getattr(cfg, name)}' {how} {other} '{getattr(cfg, other)}': what this script "
                          f"writes there would be mixed with your pictures (and trained on, or moved aside with old "
                          f"files). Set {name} to a folder of its own (edit it at the top of {cfg.SCRIPT} or pass "
                          f"{dashed(name)}).")


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


def file_size(path) -> str:
    """A file's size as the run prints it ("227.4 KB"); "?" when it is not there."""
    from common.files import human_size

    path = Path(path)
    return human_size(path.stat().st_size) if path.is_file() else "?"


def print_files(paths) -> None:
    """What the run wrote, each file with its size (a folder by its name alone)."""
    print("Files written:")
    for path in map(Path, paths):
        print(f"  {path}" + (f"  ({file_size(path)})" if path.is_file() else ""))


class _AsWritten(dict):
    def __missing__(self, name):  # a placeholder the run did not measure stays as written
        return "{" + name + "}"


def print_reflection(questions: list[str], **measured) -> None:
    """The script's REFLECTION questions, numbered. A question's ``{name}`` is filled with what this run
    measured (``measured``: the LoRA file's size, the UNet's...), so that it quotes this model, not SD v1.5."""
    print("\n" + "-" * 72 + "\nReflection questions\n" + "-" * 72)
    for i, q in enumerate(questions, 1):
        try:
            q = q.format_map(_AsWritten(measured))
        except (ValueError, IndexError, AttributeError):  # a question a student wrote with other braces: as written
            pass
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
    lower = text.lower()
    if isinstance(exc, MemoryError) or any(s in lower for s in RAM_TEXTS) or (
            isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return out_of_memory_advice(constants, "The computer (RAM)")
    if name == "OutOfMemoryError" or "out of memory" in lower:
        return out_of_memory_advice(constants)
    if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or any(s in lower for s in DISK_TEXTS):
        return DISK_FULL
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and exc.filename:
        return (f"No permission to use '{exc.filename}' ({exc.strerror}). Make it readable and writable for you, or "
                "set the constant that names it (OUTPUT_DIR, the other ..._DIR and ..._PATH ones) to a place you own.")
    too_long = _too_long_for_windows(exc)
    if too_long:
        return too_long
    in_the_way = _in_the_way(exc)
    if in_the_way:
        return in_the_way
    if "without overflow" in lower:  # a constant far too large for float32 arithmetic
        return (f"A number is too large for the model's arithmetic ({brief(exc, 100)}). Use values in the range "
                "the course suggests (GUIDANCE_SCALE 1-20, LEARNING_RATE 1e-5 to 1e-3, LORA_SCALE 0-2) and run again.")
    if isinstance(exc, UnicodeError) and "codec" in lower:
        return (f"A text could not be encoded or decoded ({brief(exc, 120)}). Save the script as UTF-8, or set "
                "the environment variable PYTHONIOENCODING=utf-8 (or PYTHONUTF8=1) and run again.")
    return None


_WINDOWS = os.name == "nt"
WINDOWS_MAX_PATH = 260  # characters in a whole path, unless Windows' long paths are switched on


def _too_long_for_windows(exc: BaseException) -> str | None:
    """Windows refuses a path of 260 characters or more (248 for a folder), unless long paths are switched on, and
    says only 'No such file or directory' (or WinError 206): a project deep in OneDrive meets it in a checkpoint's
    temporary file, whose parents all exist."""
    if not _WINDOWS or not isinstance(exc, OSError) or not (exc.errno == errno.ENOENT
                                                            or getattr(exc, "winerror", None) == 206):
        return None
    long = [p for p in (exc.filename, exc.filename2) if p and len(os.path.abspath(os.fsdecode(p))) >= 248]
    if not long:
        return None
    path = os.path.abspath(os.fsdecode(long[0]))
    return (f"'{path}' is {len(path)} characters long, and Windows refuses paths of about {WINDOWS_MAX_PATH} or more "
            "unless long paths are switched on. Move the project folder nearer the top of the drive (C:\\course), or "
            "set its ..._DIR constants to shorter folders, or switch long paths on (search 'Enable Win32 long "
            "paths' / LongPathsEnabled), and run again.")


def _in_the_way(exc: BaseException) -> str | None:
    """A file where a script makes a folder (outputs/exercise1_variations as a file: FileExistsError,
    NotADirectoryError), or a folder where it writes a file (IsADirectoryError): which one, and what to do."""
    if not isinstance(exc, OSError) or exc.errno not in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR) \
            or not exc.filename:
        return None
    if exc.errno == errno.EISDIR:  # (os.replace(tmp, target) names the target second)
        folder = next((Path(p) for p in (exc.filename2, exc.filename) if p and Path(p).is_dir()), None)
        if folder is None:
            return None
        what = f"'{folder}' is a folder, but this script writes a file of that name there"
    else:
        path = Path(os.fsdecode(exc.filename))
        blocker = next((p for p in (path, *path.parents) if p.is_file()), None)
        if blocker is None:  # (a folder that already exists, say: not a file in the way)
            return None
        what = f"'{blocker}' is a file, but this script makes a folder of that name there"
    return (f"{what}. Move or rename it (nothing of yours was overwritten), or set the constant that names its "
            "folder (OUTPUT_DIR, or the other ..._DIR ones) to another folder, and run again.")


# What the libraries say when memory or disk runs out, in words of their own:
RAM_TEXTS = ("defaultcpuallocator: can't allocate memory", "cannot allocate memory")
DISK_TEXTS = ("no space left on device", "disk quota exceeded", "file write failed", "storagefull",
              "unexpected pos")  # torch.save's PytorchStreamWriter ("file write failed", "unexpected pos")
DISK_FULL = ("The disk is full. Free some space (old class_images/ or models/*/checkpoints/) and run again, or "
             "set OUTPUT_DIR and the other ..._DIR constants to a disk with room.")


def one_line(message: str) -> str:
    """The message on one line, as plain text: a library's text inside it may have brought line breaks and
    terminal colour codes (which a log file or a Windows console shows as garbage)."""
    plain = re.sub(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07", "", message)
    return re.sub(r"\s*\n\s*", " ", plain.strip())


def run(main) -> None:
    """Call ``main()``, which returns the exit code; turn any failure into one readable line and exit 1."""
    debug = "--debug" in sys.argv[1:]
    robust_console()
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
        for name, variable in _ORIGIN.items():
            if re.search(rf"\b{name}\b", message):
                message += (f" ({name} = {os.environ.get(variable, '')!r} came from the environment variable "
                            f"{variable}: change it, or unset it to use the value in the script.)")
        print(f"\nERROR: {one_line(message)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)  # main()'s exit code: 0, or 130 after a training stopped by Ctrl-C
