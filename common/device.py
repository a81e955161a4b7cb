"""Which accelerator to run on, and in which precision.

CUDA first (fp16, or bf16 where the card supports it, with TF32 matmuls on), then Apple's MPS, then
the CPU in fp32. ``DEVICE`` and ``MIXED_PRECISION`` ("auto" by default) override the choice.
Attention uses PyTorch's fused scaled-dot-product kernel (diffusers' default processor on torch 2).
On a CPU, ``use_threads`` chooses how many threads PyTorch computes with (``--threads N`` overrides).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import torch

from common.errors import LessonError

DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # weights of the frozen models; trainable LoRA/embedding stays fp32
    mixed_precision: str  # what accelerate calls it: "no", "fp16" or "bf16"


def pick_runtime(device: str = "auto", mixed_precision: str = "auto", training: bool = False,
                 verbose: bool = True) -> Runtime:
    """Choose device and precision; print one line saying what was chosen."""
    device = "auto" if device is None else str(device).strip().lower()  # (a number typed by mistake is refused below)
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device.startswith("cuda") and not re.fullmatch(r"cuda(:\d+)?", device):
        raise LessonError(f"DEVICE must be 'auto', 'cuda', 'cuda:N', 'mps' or 'cpu', got {device!r}. "
                          "DEVICE = 'auto' picks the best one there is.")
    if training and device.startswith("cuda:"):  # accelerate places each training process itself
        raise LessonError(f"DEVICE = {device!r} cannot choose the GPU for training (accelerate does). Set "
                          f"DEVICE = 'cuda' and run with CUDA_VISIBLE_DEVICES={device.split(':')[1]} in front of the "
                          "command, or 'accelerate launch --gpu_ids N' for several GPUs.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LessonError("DEVICE is 'cuda' but PyTorch sees no NVIDIA GPU. Install a CUDA build of PyTorch "
                          "(https://pytorch.org/get-started/locally/) or set DEVICE = 'auto' to use what you have.")
    if device == "mps" and not torch.backends.mps.is_available():
        raise LessonError("DEVICE is 'mps' but this PyTorch has no Apple-GPU support. Set DEVICE = 'auto'.")
    if not (device.startswith("cuda") or device in ("mps", "cpu")):
        raise LessonError(f"DEVICE must be 'auto', 'cuda', 'cuda:N', 'mps' or 'cpu', got {device!r}. "
                          "DEVICE = 'auto' picks the best one there is.")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise LessonError(f"DEVICE is {device!r}, but PyTorch sees {torch.cuda.device_count()} NVIDIA GPU(s), numbered "
                          "from 0. Use 'cuda:0' (or 'cuda', or 'auto').")

    mp = "auto" if mixed_precision is None else str(mixed_precision).strip().lower()
    if mp == "auto":
        if dev.type == "cuda":
            mp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif dev.type == "mps" and not training:
            mp = "fp16"  # accelerate's mixed-precision training on MPS is unreliable; inference is fine
        else:
            mp = "no"
    if mp not in DTYPES:
        raise LessonError(f"MIXED_PRECISION must be 'auto', 'no', 'fp16' or 'bf16', got {mixed_precision!r}.")
    if mp == "fp32":
        mp = "no"
    if dev.type == "cpu" and mp == "fp16":
        raise LessonError("MIXED_PRECISION = 'fp16' needs a GPU; on the CPU use 'no' (or 'bf16').")

    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    runtime = Runtime(dev, DTYPES[mp], mp)
    if verbose:
        print(describe(runtime))
    return runtime


def describe(runtime: Runtime) -> str:
    dev = runtime.device
    text = f"Device: {dev.type}"
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        text += f" ({torch.cuda.get_device_name(index)}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB)"
    elif dev.type == "cpu":
        count = torch.get_num_threads()
        text += f" ({count} thread{'s' if count != 1 else ''}" + (f": {THREADS.reason}" if THREADS.reason else "") + ")"
    return text + f" | precision: {str(runtime.dtype).replace('torch.', '')}"


def generator(seed: int) -> torch.Generator:
    """A CPU generator: the same seed gives the same starting noise on every device."""
    return torch.Generator("cpu").manual_seed(int(seed))


# --------------------------------------------------------------------------- CPU threads
# PyTorch splits each big operation over its threads and waits for the slowest one. A thread that shares its
# core with another busy program runs at half speed or less, and the whole operation waits for it: on this
# project's 2-core CPU, with other programs keeping the cores busy, PyTorch's default of 2 threads drew the
# pocket model's class images 4.5 to 19 times slower than 1 thread (bench/bench_threads.py, bench/README.md).
# So the scripts use one thread per core that is free now, and --threads N chooses for them.
@dataclass
class ThreadChoice:
    count: int | None = None  # None: not chosen (PyTorch's own default)
    reason: str = ""  # why, for the Device line


THREADS = ThreadChoice()  # what use_threads chose in this process
_AUTO = ThreadChoice()  # the rule's choice, measured once per process
_TORCH_DEFAULT: list[int] = []  # PyTorch's own thread count, read before we first change it


def available_cores() -> int:
    """The cores this process may run on: a container, taskset or job scheduler may allow fewer than the
    machine has (os.sched_getaffinity, Linux), else every core the machine has (macOS, Windows)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def busy_cores(seconds: float = 0.1) -> float:
    """How many of this process's cores other programs keep busy now: the busy time of those cores in
    /proc/stat over ``seconds``, less this process's own. 0.0 where /proc/stat does not exist (not Linux)."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def busy_seconds():  # (busy time of our cores, our own CPU time)
        ticks = 0
        with open("/proc/stat", encoding="ascii") as stat:
            for line in stat:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and (cores is None or int(name[3:]) in cores):
                    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
                    ticks += user + nice + system + irq + softirq + steal
        own = os.times()
        return ticks / os.sysconf("SC_CLK_TCK"), own.user + own.system

    try:
        (busy0, own0), start = busy_seconds(), time.perf_counter()
        time.sleep(seconds)
        (busy1, own1), elapsed = busy_seconds(), time.perf_counter() - start
    except (OSError, ValueError, AttributeError):
        return 0.0
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / elapsed


def choose_threads(available: int, torch_default: int, busy: float) -> int:
    """The rule: one thread per core that is free now (``available`` cores less the ``busy`` ones, rounded),
    at most PyTorch's own default (its count of physical cores, or OMP_NUM_THREADS when that is set: a
    second thread on a hyper-threaded core adds nothing to these kernels), and at least one."""
    free = available - int(busy + 0.5)
    return max(1, min(free, torch_default))


def use_threads(threads: int | None = None) -> int:
    """Set PyTorch's CPU thread count: ``threads`` (--threads N) when given, else ``choose_threads`` for this
    machine now, measured once per process (so that every run in one process computes alike). Returns it."""
    if not _TORCH_DEFAULT:
        _TORCH_DEFAULT.append(torch.get_num_threads())
    if threads is not None:
        THREADS.count, THREADS.reason = threads, "from --threads"
    else:
        if _AUTO.count is None:
            available, busy = available_cores(), busy_cores()
            _AUTO.count = choose_threads(available, _TORCH_DEFAULT[0], busy)
            _AUTO.reason = f"{available} core{'s' if available != 1 else ''}, {busy:.1f} busy with other programs"
        THREADS.count, THREADS.reason = _AUTO.count, _AUTO.reason + "; --threads N to change"
    torch.set_num_threads(THREADS.count)
    return THREADS.count
