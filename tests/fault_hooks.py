"""The faults the tests inject into a training run, kept out of the lesson code.

The lesson modules hold no test switch. ``install()`` wraps four of their functions, and the wrappers
do nothing unless an environment variable asks for a fault:

- ``DREAMBOOTH_INJECT_NAN_AT_STEP``: "5" makes the loss of step 5 NaN (``training.check_finite`` sees it
  times NaN), "5:inf" infinite, "5:weights" one trained weight NaN when step 5's weights are checked
  (``training.check_weights_finite``, before every save), as an overflowing update would.
- ``DREAMBOOTH_KILL_DURING_SAVE``: a save whose final path contains this text kills its own process
  (SIGKILL: no clean-up, no ``finally``) with everything written, just before ``files.commit`` renames
  it into place, as a power cut would.
- ``DREAMBOOTH_FREE_MEMORY``: bytes; ``training.available_memory`` says no more than this is free, as on a
  smaller computer (``training.check_step_memory`` then refuses a micro-batch that does not fit there).

Where it is installed: ``tests/student.py`` calls ``install()`` in a warm run's forked child, and puts
``tests/hooks/`` (whose ``sitecustomize.py`` calls it) on a cold run's PYTHONPATH, when one of these
variables is set; in-process tests use the ``fault_hooks`` fixture (conftest.py).
"""

from __future__ import annotations

import functools
import os
import signal
from pathlib import Path

NAN_AT_STEP_ENV = "DREAMBOOTH_INJECT_NAN_AT_STEP"
KILL_DURING_SAVE_ENV = "DREAMBOOTH_KILL_DURING_SAVE"
FREE_MEMORY_ENV = "DREAMBOOTH_FREE_MEMORY"
ENV_VARS = (NAN_AT_STEP_ENV, KILL_DURING_SAVE_ENV, FREE_MEMORY_ENV)


def wanted(environ=os.environ) -> bool:
    """Whether ``environ`` asks for a fault (the runners install the hooks only then)."""
    return any(environ.get(name) for name in ENV_VARS)


def _nan_loss(check_finite):
    @functools.wraps(check_finite)
    def wrapper(loss, step, checkpoint_dir):
        at, _, value = os.environ.get(NAN_AT_STEP_ENV, "").partition(":")
        if at == str(step) and value != "weights":
            loss = loss * float(value or "nan")
        return check_finite(loss, step, checkpoint_dir)
    return wrapper


def _nan_weights(check_weights_finite):
    @functools.wraps(check_weights_finite)
    def wrapper(params, step, checkpoint_dir):
        import torch  # (here: student.py's warm server must import common before the libraries)

        params = list(params)
        if os.environ.get(NAN_AT_STEP_ENV) == f"{step}:weights":
            with torch.no_grad():
                params[0].view(-1)[0] = float("nan")
        return check_weights_finite(params, step, checkpoint_dir)
    return wrapper


def _kill_before_commit(commit):
    @functools.wraps(commit)
    def wrapper(tmp, path):
        pattern = os.environ.get(KILL_DURING_SAVE_ENV)
        if pattern and pattern in Path(path).as_posix():
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
        return commit(tmp, path)
    return wrapper


def _less_memory(available_memory):
    @functools.wraps(available_memory)
    def wrapper():
        free, cap = available_memory(), os.environ.get(FREE_MEMORY_ENV)
        return free if not cap or free is None else min(free, int(cap))
    return wrapper


def install(patch=setattr) -> None:
    """Wrap the lesson functions (once; the wrappers read the environment at each call). ``patch`` sets
    the wrapped one on its module: pytest's ``monkeypatch.setattr`` puts the original back after the test."""
    from common import files, training

    for module, name, wrap in ((training, "check_finite", _nan_loss), (training, "check_weights_finite", _nan_weights),
                               (files, "commit", _kill_before_commit),
                               (training, "available_memory", _less_memory)):
        original = getattr(module, name)
        if not getattr(original, "_fault_hook", False):
            wrapped = wrap(original)
            wrapped._fault_hook = True
            patch(module, name, wrapped)
