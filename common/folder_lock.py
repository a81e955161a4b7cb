"""One training per folder at a time: a lock file that a killed run does not leave stuck.

``claim(folder, ...)`` creates ``folder/training.lock`` with ``os.open(O_CREAT | O_EXCL)`` (atomic on
every OS, Windows and network drives included), holding the process's PID, start time and host. A
second training is refused while that process lives; a lock whose process has died (killed, crashed,
the computer restarted) is stale and taken over. The lock is removed when the process exits.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path

from common.errors import LessonError
from common.lesson import dashed

LOCK_FILE = "training.lock"

_held: dict[Path, dict] = {}  # the locks this process holds, and what it wrote in them


def _process_started(pid: int) -> float | None:
    """When process ``pid`` started, or None if it is gone (a zombie counts as gone)."""
    import psutil  # (installed with accelerate)

    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


def _same_time(a, b) -> bool:
    return a is not None and b is not None and abs(a - b) < 1.0


def claim(root: Path, script: str, folder_option: str) -> None:
    """Create ``root/training.lock`` (O_EXCL: only one process can), or refuse while a live run holds it.

    A lock whose process has died (killed, crashed) is stale and taken over: it holds the PID and the
    process's start time, so a PID reused by another program does not keep it alive.
    """
    lock = root / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_started(os.getpid()),
          "script": script, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # being written this instant, or left empty by a crash
                if time.time() - _mtime(lock) < 10:
                    time.sleep(0.1)
                    continue
                holder = {}
            same_host = holder.get("host") == me["host"]
            alive = same_host and _same_time(_process_started(int(holder.get("pid", 0))), holder.get("started"))
            mine = alive and holder.get("pid") == me["pid"]
            if holder and not mine and (alive or not same_host):
                where = "" if same_host else f" on {holder.get('host')}"
                raise LessonError(
                    f"Another training is using '{root}/' right now: {holder.get('script')} (PID {holder.get('pid')}"
                    f"{where}, since {holder.get('since')}). Wait for it to finish or stop it (Ctrl-C in its window), "
                    f"or train into another folder ({dashed(folder_option)} ...)."
                    + ("" if same_host else f" If nothing runs there any more, delete '{lock}'."))
            lock.unlink(missing_ok=True)  # stale (or our own, from an earlier main() in this process)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        if lock not in _held:
            atexit.register(_unlock, lock)
        _held[lock] = me
        return
    raise LessonError(f"Could not take '{lock}' (another training keeps starting there). Try again, or delete it.")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # (removed meanwhile)
        return 0.0


def _unlock(lock: Path) -> None:
    try:
        if json.loads(lock.read_text(encoding="utf-8")) == _held.get(lock):
            lock.unlink()
    except (OSError, ValueError):
        pass
