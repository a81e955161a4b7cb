"""Run a lesson script the way a student does (``python script.py args`` in a project folder), fast.

Every run is its own process, with its own exit code, stdout and stderr, its own signals and its own
peak memory. Starting Python and importing torch, diffusers and transformers takes ~5 s on a slow CPU,
which would make a table of ~70 fault cases take minutes, so by default a *warm* Python does the
imports once and ``fork()``s a fresh child for each run. The child then does what ``python script.py``
does after its imports: sets ``sys.argv``, the working folder and the environment, and runs the script
as ``__main__`` (``runpy``); its exit status is reported exactly as the shell would see it.

``cold=True`` (or the environment variable ``FAULTS_COLD=1`` for every run) starts a real
``sys.executable script.py`` instead: needed where an environment variable is read at import time
(``HF_HUB_OFFLINE``), and a way to check that warm and cold runs agree.

A run whose environment asks for a fault (``fault_hooks.ENV_VARS``) gets the tests' fault hooks: a warm
child installs them before running the script; a cold run finds ``tests/hooks/sitecustomize.py``, which
installs them, first on its PYTHONPATH.

Run as a program, this module is the warm server: it reads one JSON request a line on stdin, forks,
answers ``{"pid": ...}`` at once and ``{"rc": ..., "maxrss_kb": ...}`` when the child has ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import fault_hooks

ROOT = Path(__file__).resolve().parents[1]
HOOKS_DIR = Path(__file__).resolve().parent / "hooks"  # sitecustomize.py: the fault hooks in a cold run
COLD_ENV = "FAULTS_COLD"
CAN_FORK = hasattr(os, "fork") and hasattr(os, "wait4")  # (not on Windows: every run is cold there)


@dataclass
class Result:
    rc: int  # as the shell sees it: the exit code, or -N when killed by signal N
    out: str
    err: str
    maxrss_kb: int  # the process's peak resident memory

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("ERROR:")]

    def __str__(self) -> str:  # what a failed assertion shows
        return f"rc={self.rc}\n--- stdout ---\n{self.out[-3000:]}\n--- stderr ---\n{self.err[-3000:]}"


class Run:
    """One script running in its own process: ``pid``, ``output_so_far()``, ``wait()``."""

    def __init__(self, pid: int, out_path: Path, err_path: Path, finish):
        self.pid, self._out, self._err, self._finish = pid, out_path, err_path, finish

    def output_so_far(self, stream: str = "out") -> str:
        path = self._out if stream == "out" else self._err
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def wait_for(self, text: str, stream: str = "out", timeout: float = 900) -> None:
        """Block until ``text`` appears in stdout (or ``stream="err"``): the script reached that point."""
        deadline = time.monotonic() + timeout
        while text not in self.output_so_far(stream):
            if time.monotonic() > deadline:
                seen = self.output_so_far(stream)[-2000:]
                self.send_signal(signal.SIGKILL)
                self.wait()
                raise TimeoutError(f"{text!r} never appeared:\n{seen}")
            time.sleep(0.05)

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 1200) -> Result:
        rc, maxrss = self._finish(timeout)
        read = lambda p: p.read_text(encoding="utf-8", errors="replace")  # noqa: E731
        return Result(rc, read(self._out), read(self._err), maxrss)


class Student:
    """Starts lesson scripts as separate processes; warm (forked from a preloaded Python) by default."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._server: subprocess.Popen | None = None
        self._count = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public
    def start(self, script: str, args: list[str], cwd: Path, env: dict | None = None, cold: bool = False) -> Run:
        self._count += 1
        out, err = self.log_dir / f"{self._count:03d}.out", self.log_dir / f"{self._count:03d}.err"
        environment = {k: v for k, v in os.environ.items() if k not in ("PYTEST_CURRENT_TEST", "DREAMBOOTH_MODEL")}
        environment.update(PYTHONUNBUFFERED="1", **(env or {}))
        if fault_hooks.wanted(environment):  # (a PYTHONPATH the test set is kept, after the hooks)
            environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOKS_DIR), environment.get("PYTHONPATH")]))
        command = [str(ROOT / script), *map(str, args)]
        if cold or os.environ.get(COLD_ENV) == "1" or not CAN_FORK:
            return self._start_cold(command, Path(cwd), environment, out, err)
        return self._start_warm(command, Path(cwd), environment, out, err)

    def run(self, script: str, args: list[str], cwd: Path, env: dict | None = None, cold: bool = False,
            timeout: float = 1200) -> Result:
        return self.start(script, args, cwd, env, cold).wait(timeout)

    def close(self) -> None:
        if self._server is not None:
            self._server.stdin.close()
            try:
                self._server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._server.kill()
            self._server = None

    # ------------------------------------------------------------------ cold: a real `python script.py`
    @staticmethod
    def _start_cold(command, cwd, env, out, err) -> Run:
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen([sys.executable, *command], cwd=cwd, env=env, stdout=o, stderr=e,
                                    stdin=subprocess.DEVNULL)

        def finish(timeout):
            if not hasattr(os, "wait4"):  # Windows: no resource usage to read
                try:
                    return proc.wait(timeout), 0
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise TimeoutError(f"{command[0]} ran past {timeout} s") from None
            deadline = time.monotonic() + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
                    return proc.returncode, usage.ru_maxrss
                if time.monotonic() > deadline:
                    proc.kill()
                    os.wait4(proc.pid, 0)
                    proc.returncode = -9
                    raise TimeoutError(f"{command[0]} ran past {timeout} s")
                time.sleep(0.05)

        return Run(proc.pid, out, err, finish)

    # ------------------------------------------------------------------ warm: forked from a preloaded Python
    def _server_process(self) -> subprocess.Popen:
        if self._server is None or self._server.poll() is not None:
            self._server = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ))
            ready = self._server.stdout.readline()
            if json.loads(ready or "{}").get("ready") is not True:
                raise RuntimeError(f"the warm Python did not start: {ready!r}")
        return self._server

    def _start_warm(self, command, cwd, env, out, err) -> Run:
        self._lock.acquire()  # one child at a time: the server answers in order
        server = self._server_process()
        server.stdin.write(json.dumps({"argv": command, "cwd": str(cwd), "env": env, "stdout": str(out),
                                       "stderr": str(err)}) + "\n")
        server.stdin.flush()
        pid = json.loads(server.stdout.readline())["pid"]
        answer = {}

        def read_answer():
            answer.update(json.loads(server.stdout.readline() or '{"rc": null}'))

        reader = threading.Thread(target=read_answer, daemon=True)
        reader.start()

        def finish(timeout):
            try:
                reader.join(timeout)
                if reader.is_alive():
                    os.kill(pid, signal.SIGKILL)
                    reader.join(30)
                    raise TimeoutError(f"{command[0]} ran past {timeout} s")
                return answer["rc"], answer["maxrss_kb"]
            finally:
                if self._lock.locked():
                    self._lock.release()

        return Run(pid, out, err, finish)


# ====================================================================== the warm server
def _child(request: dict) -> None:
    """In the forked child: become ``python script.py args`` and never return."""
    import atexit
    import io
    import runpy
    import traceback

    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        fd_in = os.open(os.devnull, os.O_RDONLY)
        fd_out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        fd_err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, target in ((fd_in, 0), (fd_out, 1), (fd_err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                      write_through=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh Python
        if fault_hooks.wanted():  # (what tests/hooks/sitecustomize.py does in a cold run)
            fault_hooks.install()
        script = request["argv"][0]
        sys.argv = list(request["argv"])
        sys.path[0] = str(Path(script).parent)  # what `python script.py` puts first
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
        except BaseException:  # noqa: BLE001 - an uncaught exception, as Python reports it
            traceback.print_exc()
            code = 1
        try:
            atexit._run_exitfuncs()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(code)


def _serve() -> None:
    sys.path[0] = str(ROOT)  # (not tests/, where this file is)
    # What every lesson script imports before its first line runs: imported once, here.
    import common  # noqa: F401  (first, as its settings for the libraries' logging must come first)
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import matplotlib  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from accelerate import Accelerator  # noqa: F401
    from diffusers import (AutoencoderTiny, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: F401
                           LCMScheduler, StableDiffusionPipeline)
    from diffusers.optimization import get_scheduler  # noqa: F401
    from diffusers.training_utils import cast_training_params  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    from common import (animation, comparison, device, fast_mode, figures, files, folder_lock, images,  # noqa: F401
                        lesson, lora, model_card, models, personalize, pickles, prior, sampling,
                        textual_inversion, tiny_model, training)

    channel = sys.stdout
    print(json.dumps({"ready": True}), file=channel, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        channel.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), file=channel, flush=True)
        _, status, usage = os.wait4(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}), file=channel,
              flush=True)


if __name__ == "__main__":
    _serve()
