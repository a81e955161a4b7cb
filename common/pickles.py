"""Reading pickle-based files (.bin, .pt, .pkl) without letting them run code.

A pickle is a small program: loading one with plain ``torch.load(..., weights_only=False)`` can run
any Python function it names, so a downloaded (or swapped) .bin file could delete files or install
something. Every pickle the scripts read goes through :func:`load`: torch's weights-only unpickler,
with the few numpy types accelerate's own files need, as accelerate itself loads them. A file that
names a function to call is refused by name, for safety, rather than reported as "damaged".
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path

from common.errors import LessonError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
SAFE_NAMES = ("torch.", "collections.OrderedDict", "numpy.", "_codecs.encode")  # what weights-only files name


def load(path, advice: str):
    """``torch.load`` of ``path``, weights only (tensors, numbers, strings, lists, dicts).

    Raises ``LessonError`` (ending with ``advice``) for a file that asks to run code; other failures
    (a damaged file) propagate for the caller to explain.
    """
    from accelerate.utils import load as accelerate_load  # weights_only=True plus accelerate's numpy allowances

    try:
        with warnings.catch_warnings():  # (torch warns about pickle protocols; the outcome is what matters)
            warnings.simplefilter("ignore")
            return accelerate_load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        called = names_called(path)
        if called is None:
            raise
        raise LessonError(f"'{path}' was refused for safety: it is a pickle that asks to run Python code "
                          f"({called}) when loaded, and only plain weights are read from .bin/.pt/.pkl files. "
                          f"Do not load it elsewhere either. {advice}") from None


def names_called(path) -> str | None:
    """The callables a pickle would import (e.g. 'posix.system'), or None when it is not a readable
    pickle at all (damaged). Reads the opcodes only (``pickletools``); nothing is executed."""
    data = Path(path).read_bytes()
    if zipfile.is_zipfile(io.BytesIO(data)):  # torch.save's format: the pickle is the archive's data.pkl
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            inner = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not inner:
                return None
            data = archive.read(inner[0])
    try:
        names, _ = read_opcodes(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - not a complete pickle: damaged, not dangerous
        return None
    return ", ".join(dict.fromkeys(unsafe_names(names) or names)) if names else None


def read_opcodes(stream) -> tuple[list[str], list[str]]:
    """What the next pickle in ``stream`` names, read from its opcodes only (nothing runs): the callables it would
    import ('torch._utils._rebuild_tensor_v2', or 'posix.system') and the strings it holds (a state dict's keys,
    the weights' names). Raises on a pickle cut short or garbled."""
    names, strings = [], []
    for opcode, arg, _ in pickletools.genops(stream):
        if opcode.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return names, strings


def unsafe_names(names) -> list[str]:
    """Those of ``names`` (callables a pickle imports) that a weights-only file does not need."""
    return [n for n in names if not n.startswith(SAFE_NAMES)]
