"""What the benchmarks share: the models they time, the clock, peak memory, the table and the JSON file.

Two architectures, both built without a download:

- ``tiny``: the built-in tiny model (``models/tiny-sd``, as ``--model tiny`` loads it). Seconds: it checks
  that a benchmark runs, its timings say little;
- ``sd15-shapes``: Stable Diffusion v1.5's real UNet, VAE and text encoder (``common.models``' configs)
  with random weights. Speed and memory depend on the shapes, not on the values.

Variants of one benchmark run round-robin (A, B, C, A, B, C, ...): on a shared machine a burst of other
work then slows every variant alike, and the ratios stay meaningful even when the seconds are not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import diffusers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import sd15_shapes  # noqa: E402  (beside this file)
from common import models  # noqa: E402
from common.files import save_json  # noqa: E402

diffusers.utils.logging.disable_progress_bar()  # the loading bars would bury the benchmark's own lines
transformers.utils.logging.disable_progress_bar()

ARCHES = ("tiny", "sd15-shapes")
RESULTS_DIR = ROOT / "bench" / "results"
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "Pillow")


# --------------------------------------------------------------------------- options
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=ARCHES, default="tiny", help="model shapes to time (default: tiny)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image size in pixels (default: the model's own: 64 tiny, 512 sd15-shapes)")
    parser.add_argument("--precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
                        help="as the scripts' MIXED_PRECISION (auto: fp16/bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (as the scripts' DEVICE)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--name", default=None, help="results file name (default: made from the settings)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where <name>.json goes")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, run each variant once more under torch.profiler and write its "
                             "top operators to <results-dir>/<name>.<variant>.profile.txt")


def require_counts(parser: argparse.ArgumentParser, args, *names: str) -> None:
    """Each named option (None: not given) is at least 1, and --warmup at least 0; else the parser's error."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if getattr(args, "warmup", 0) < 0:
        parser.error("--warmup must be 0 or more")


def default_name(kind: str, args, runtime, resolution: int, *extra: str) -> str:
    precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[runtime.dtype]
    return "-".join([kind, args.arch, runtime.device.type, f"{resolution}px", precision, *extra])


# --------------------------------------------------------------------------- models
def load_pipeline(arch: str, dtype: torch.dtype, workdir: Path):
    """The pipeline to time, on the CPU in ``dtype``: ``tiny`` exactly as the scripts load it
    (``models/tiny-sd`` relative to the current folder, built once), or SD v1.5's shapes."""
    if arch == "tiny":
        return models.load_pipeline("tiny", dtype=dtype)
    pipe = sd15_shapes.build_sd15_shapes_pipeline(Path(workdir) / "tokenizer")
    return pipe.to(dtype=dtype)


# --------------------------------------------------------------------------- clock and memory
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class PeakMemory:
    """Peak memory since the last ``reset``: max allocated on CUDA; on the CPU the process's peak resident
    set (Linux: VmHWM, which writing 5 to /proc/self/clear_refs resets; elsewhere the process's peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._linux = Path("/proc/self/clear_refs").exists()
        if device.type == "cuda":
            self.kind = "CUDA max allocated"
        elif self._linux:
            self.kind = "peak RSS (VmHWM, reset before each timed run)"
        else:
            self.kind = "peak RSS of the process (not resettable on this OS)"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._linux:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self._linux = False
                self.kind = "peak RSS of the process (not resettable here)"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._linux:
            status = Path("/proc/self/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+)\s+kB", status).group(1)) * 1024
        import resource  # (not on Windows)

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class Variant:
    """One way of doing the same work. ``run(i)`` does one timed unit (an optimizer step, a whole batch
    of images); ``place()`` (untimed) first puts the models where this variant keeps them."""

    name: str
    run: Callable[[int], object]
    place: Callable[[], None] = lambda: None
    times: list[float] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def summary(self) -> dict:
        return {"median_s": self.median, "times_s": self.times, "peak_memory_bytes": max(self.peaks),
                "peak_memory_gib": round(max(self.peaks) / 2**30, 3)}


def measure(variants: list[Variant], warmup: int, repeats: int, device: torch.device,
            log: Callable[[str], None] = print, profile_to: Path | None = None) -> None:
    """Round-robin: ``warmup`` untimed rounds, then ``repeats`` timed ones; fills each variant's times.
    With ``profile_to`` (a path prefix), one more run of each variant is profiled (see ``profile``)."""
    memory = PeakMemory(device)
    for round_index in range(warmup + repeats):
        timed = round_index >= warmup
        for variant in variants:
            variant.place()
            synchronize(device)
            memory.reset()
            start = time.perf_counter()
            variant.run(round_index)
            synchronize(device)
            seconds = time.perf_counter() - start
            if timed:
                variant.times.append(seconds)
                variant.peaks.append(memory.peak())
            log(f"  {'round' if timed else 'warm-up'} {round_index + 1 - (warmup if timed else 0)}: "
                f"{variant.name:<14} {seconds:8.3f} s")
    if profile_to is not None:
        for variant in variants:
            log(f"  profiled: {profile(variant, warmup + repeats, device, profile_to)}")


def profile(variant: Variant, index: int, device: torch.device, prefix: Path) -> Path:
    """One more run under ``torch.profiler``; its operators by self time go to <prefix>.<variant>.profile.txt."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    variant.place()
    with torch_profile(activities=activities) as prof:
        variant.run(index)
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path = Path(f"{prefix}.{variant.name}.profile.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=key, row_limit=30), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the record
def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": _memory_gib(), "device": str(device)}
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def busy_warning(device: torch.device) -> str | None:
    """A line when other work is using the CPU: timings are then not the machine's, only ratios hold."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        return (f"the CPU is busy (load average {load:.1f} on {cores} cores) before the benchmark starts: "
                "seconds will be slower than this machine can do; ratios of round-robin variants hold better.")
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def library_versions() -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_results(kind: str, name: str, results_dir: Path, settings: dict, results: dict, notes: list[str],
                  device: torch.device) -> Path:
    """bench/results/<name>.json: what ran where, with which libraries and settings, and what it measured."""
    record = {"benchmark": kind, "name": name, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else "",
              "machine": machine_info(device), "libraries": library_versions(), "settings": settings,
              "results": results, "notes": notes}
    path = Path(results_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_json(record, path)


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[_cell(c) for c in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, row in enumerate(cells):
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)


def gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"
