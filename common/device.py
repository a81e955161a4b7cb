"""Which accelerator to run on, and in which precision.

CUDA first (fp16, or bf16 where the card supports it, with TF32 matmuls on), then Apple's MPS, then
the CPU in fp32. ``DEVICE`` and ``MIXED_PRECISION`` ("auto" by default) override the choice.
Attention uses PyTorch's fused scaled-dot-product kernel (diffusers' default processor on torch 2).
"""

from __future__ import annotations

import re
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
    device = "auto" if device is None else str(device).lower()  # (a number typed by mistake is refused below)
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

    mp = "auto" if mixed_precision is None else str(mixed_precision).lower()
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
        text += f" ({torch.get_num_threads()} threads)"
    return text + f" | precision: {str(runtime.dtype).replace('torch.', '')}"


def generator(seed: int) -> torch.Generator:
    """A CPU generator: the same seed gives the same starting noise on every device."""
    return torch.Generator("cpu").manual_seed(int(seed))

