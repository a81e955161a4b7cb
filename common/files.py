"""Saving files so that an interrupted save never destroys a good one.

Every write goes to a temporary file beside the target and is renamed into place (``os.replace`` is
atomic on the same filesystem, on Windows too). A crash mid-save leaves the previous file intact, and
the next save of the same file removes the temporary one the crash left behind. Every rename into
place goes through ``commit``.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from common.errors import LessonError


_UMASK = os.umask(0)
os.umask(_UMASK)


_WINDOWS = os.name == "nt"
_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.5, 0.75)  # seconds: 2 in all


def _replace(src, dst) -> None:
    """``os.replace``, retried for up to 2 s on Windows: an antivirus scan, the search indexer or OneDrive may hold
    a file just written (or the one it replaces) open for a moment, and the rename fails meanwhile with
    PermissionError ('Access is denied', 'being used by another process'). pip retries its renames for the same."""
    for delay in _RETRY_DELAYS if _WINDOWS else ():
        try:
            return os.replace(src, dst)
        except PermissionError:
            time.sleep(delay)
    os.replace(src, dst)


def commit(tmp, path) -> None:
    """Put the finished temporary file or folder ``tmp`` in place of ``path``: the step a crash must not split.

    A file is replaced in one atomic rename. A folder cannot replace another in one step, so an old
    ``path`` is renamed aside first (".name.old-PID"), then deleted.
    """
    path = Path(path)
    if Path(tmp).is_dir() and path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        _replace(path, old)
        _replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        _replace(tmp, path)


_SAVING: set[Path] = set()  # this process's temporary files and folders not yet renamed into place


def _prefix(path: Path) -> str:
    """A temporary copy's name starts ".name.PID-": the next save of ``path`` deletes the copies of processes that
    are gone (killed mid-save), never one that another run still writes (the same script twice at once)."""
    return f".{path.name}.{os.getpid()}-"


def _still_saving(leftover: Path, path: Path) -> bool:
    if leftover in _SAVING:
        return True
    pid = leftover.name[len(path.name) + 2:].partition("-")[0]
    if not pid.isdigit() or int(pid) == os.getpid():  # (a copy named before PIDs were, or this process's own)
        return False
    import psutil  # (installed with accelerate)

    return psutil.pid_exists(int(pid))


def _remove_leftovers(path: Path) -> None:
    """Delete the temporary copies of ``path`` (".name.PID-xxxx") that an interrupted save left behind, except those
    of saves still running (another process's, or this one's). Called only once a new ``path`` is in place."""
    for old in path.parent.glob(f".{glob.escape(path.name)}.*"):  # (the folder's own name is no pattern: "Course [1]")
        if _still_saving(old, path):
            continue
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    _SAVING.add(Path(tmp))
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; give them the usual permissions
        commit(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _SAVING.discard(Path(tmp))
    _remove_leftovers(path)


@contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` as a whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes folders private; give them the usual permissions
    _SAVING.add(tmp)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _SAVING.discard(tmp)
    _remove_leftovers(path)


def save_image(image, path, **options) -> Path:
    """Save a PIL image atomically (format from the file suffix; ``options`` go to PIL, e.g. quality)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=_pil_format(path), **options)
    return path


def save_text(text: str, path) -> Path:
    """Write ``text`` (UTF-8) atomically: a run stopped mid-write leaves the old file, not half of the new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_json(data, path) -> Path:
    return save_text(json.dumps(data, indent=2, default=str), path)


def _pil_format(path: Path) -> str:
    return {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".gif": "GIF", ".webp": "WEBP"}.get(
        path.suffix.lower(), "PNG")


# --------------------------------------------------------------------------- adapter files' headers
SETTINGS_KEY = "dreambooth_training_settings"  # the header entry of each LoRA and embedding this course writes


def safetensors_keys(path) -> list[str] | None:
    """The tensor names in a .safetensors file (its header only), or None when it cannot be read.

    A generation run asks about the same LoRA or embedding several times (checked before the model loads,
    then loaded); each file's header is read once, while the file stays as it is."""
    shapes = safetensors_shapes(path)
    return list(shapes) if shapes is not None else None


def safetensors_shapes(path) -> dict[str, tuple[int, ...]] | None:
    """Each tensor's name and shape in a .safetensors file (its header only: no tensor is read), or None."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    header = _header(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    return dict(header) if header is not None else None


@functools.lru_cache(maxsize=64)
def _header(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
    import safetensors

    try:
        with safetensors.safe_open(path, framework="pt") as f:
            return tuple((k, tuple(f.get_slice(k).get_shape())) for k in f.keys())
    except Exception:  # noqa: BLE001 - damaged, cut short, or not safetensors at all
        return None


def require_suffix(path, suffixes: tuple[str, ...], what: str, constant: str, written: str) -> Path:
    """Refuse a file whose name does not end in one of ``suffixes``: read by the wrong reader (a text, a picture,
    or "X.SAFETENSORS" as a pickle), it failed as if it were damaged. ``what``: "a LoRA", "an embedding"."""
    path = Path(path)
    if path.suffix in suffixes:
        return path
    if path.suffix.lower() in suffixes:
        raise LessonError(f"'{path}' ends in '{path.suffix}': rename it to end in '{path.suffix.lower()}' (lower "
                          f"case: the loaders go by the ending as written) and set {constant} to the renamed file.")
    raise LessonError(f"'{path}' is not {what} file: {what} is a {'/'.join(suffixes)} file ({written}). Set "
                      f"{constant} to the file or its folder.")


def require_readable(path, script: str) -> Path:
    """Refuse a .safetensors file whose header cannot be read (cut short by a download, or not one at all)."""
    path = Path(path)
    if path.suffix == ".safetensors" and safetensors_keys(path) is None:
        raise LessonError(f"'{path}' is not a readable .safetensors file ({path.stat().st_size} bytes): it is damaged "
                          f"or incompletely downloaded. Download it again, or retrain with {script}.")
    return path


def require_replaceable(path, constant: str, script: str) -> None:
    """Refuse an output folder (a training's LORA_DIR, EMBEDDING_DIR) where the .safetensors file a run saves,
    ``path``, exists and was not written by this course (a downloaded LoRA or a classmate's embedding: its header has
    no SETTINGS_KEY): the run would replace it without a word. Called before any model loads. An unreadable file
    holds nothing to keep."""
    import safetensors

    from common.configurator import dashed

    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            ours = SETTINGS_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - missing, damaged or not safetensors
        return
    if not ours:
        raise LessonError(f"{constant} '{path.parent}' already holds '{path.name}', which this course did not train "
                          f"(a download, or someone else's): this run would replace it. Set {constant} to a folder "
                          f"of its own (edit it at the top of {script} or pass {dashed(constant)}), or move that file "
                          "out of it, and run again.")


def adapter_kind(path) -> str | None:
    """What a .safetensors file holds, from its header: "lora" (``lora_`` layers or kohya ``.alpha`` values),
    "model" (a model's own layers, ``<layer>.weight``: a whole checkpoint, or one part of a diffusers folder),
    "embedding" (Textual Inversion: a tensor per token, or AUTOMATIC1111's ``emb_params``), or None
    (unreadable, empty, or not .safetensors)."""
    keys = safetensors_keys(path) if Path(path).suffix == ".safetensors" else None
    if not keys:
        return None
    if any("lora" in k or k.endswith(".alpha") for k in keys):
        return "lora"
    # (an embedding's names are its words; a model's are its layers' parameters)
    return "model" if any(k.endswith((".weight", ".bias")) for k in keys) else "embedding"


# Where a whole Stable Diffusion checkpoint (one file, as model sites publish them) keeps its three models.
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")


def model_file_advice(path) -> str:
    """What a file of a model's own weights (``adapter_kind`` "model") is, and where it goes ("is ...", to follow
    its name): a whole checkpoint is a MODEL_ID; one part of a diffusers folder (unet/, vae/, text_encoder/) is not,
    but the folder is."""
    path = Path(path)
    keys = safetensors_keys(path) or []
    if any(k.startswith(CHECKPOINT_PREFIXES) for k in keys):
        return "is a whole Stable Diffusion checkpoint (a base model): set MODEL_ID to it."
    folder = path.resolve().parent.parent
    if (folder / "model_index.json").is_file():
        return (f"is only the {path.parent.name} of the diffusers model in '{path.parent.parent}': set "
                f"MODEL_ID to that folder (the one holding model_index.json).")
    return (f"holds one part of a model ({len(keys)} layer weights such as '{keys[0]}'), not a whole base "
            "model: set MODEL_ID to the diffusers folder it came from (the one holding model_index.json), or to a "
            "whole .safetensors checkpoint.")


def human_size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if num_bytes < 1024 or unit == "TB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024


def same_place(a, b) -> bool:
    """Whether two paths name one file or folder, by its identity rather than its spelling: resolve() follows
    symlinks, but on macOS' case-insensitive disks 'Training_Images' is 'training_images' (and a hard link is its
    file) while the two differ as text."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:  # (one of them does not exist: then they differ)
        return False


def inside(a, b) -> bool:
    """Whether ``a`` is ``b`` or lies (or would lie, once made) inside it, by identity as ``same_place``."""
    a = Path(a).expanduser().resolve()
    return any(same_place(p, b) for p in (a, *a.parents))


def slug(text: str, drop: tuple[str, ...] = (), max_words: int = 4, max_chars: int = 60) -> str:
    """A short file-name-safe name for a prompt: "a beautiful dress made of ..." -> "beautiful_dress_made".

    Words in ``drop`` (e.g. the subject phrase every prompt shares) and short filler words are left out. At most
    ``max_chars`` characters: a long word (a pasted code, words run together) made names no file system holds
    (255 bytes at most), with the save's own marks added.
    """
    import re

    filler = {"a", "an", "the", "of", "in", "on", "with", "and", "as", "by", "for", "to", "at", "from", "made"}
    skip = filler | {w.lower() for w in drop}
    words = [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in skip]
    return "_".join(words[:max_words])[:max_chars].rstrip("_") or "image"
