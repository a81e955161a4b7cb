"""CPU threads: class images with PyTorch's default thread count against one thread, on an idle CPU and
while another program keeps one core busy; and what the scripts' rule (``device.choose_threads``) picks.

    python bench/bench_threads.py                      # pocket model, 4 class images x 25 steps, 5 rounds
    python bench/bench_threads.py --model tiny         # does it run? (seconds)

After untimed warm-up rounds, each round times every case once, in turn: idle CPU and busy CPU (a child process spinning on one core,
started before and stopped after that condition's cases), each with PyTorch's default thread count, with one
thread, and with the rule's choice for the moment (``busy_cores`` measured just before). Reported: the median
seconds per case over the rounds, and default/one-thread in each condition. The idle condition is only as idle
as the machine: the record notes the busy cores measured before each case. Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (puts the project root on sys.path)

import torch  # noqa: E402

import exercise3b_train_lora as ex3b  # noqa: E402
from common import device as devices  # noqa: E402
from common import models, sampling  # noqa: E402


def spin() -> None:  # the other program: one core, busy
    while True:
        pass


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pocket", help="pocket (default) or tiny: what draws the class images")
    parser.add_argument("--images", type=int, default=4, help="class images per case (default: one batch of 4)")
    parser.add_argument("--steps", type=int, default=ex3b.NUM_INFERENCE_STEPS, help="denoising steps (3b's 25)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--name", default=None, help="results file name (default: threads-<model>-cpu)")
    parser.add_argument("--results-dir", type=Path, default=harness.RESULTS_DIR, help="where <name>.json goes")
    args = parser.parse_args(argv)
    harness.require_counts(parser, args, "images", "steps", "rounds")
    return args


def main(argv=None):
    args = parse_args(argv)
    default = torch.get_num_threads()  # PyTorch's own: physical cores, or OMP_NUM_THREADS
    available = devices.available_cores()
    pipe = models.load_pipeline(args.model, dtype=torch.float32)
    sampling.use_multistep_solver(pipe)
    settings = sampling.SamplingSettings(args.steps, ex3b.GUIDANCE_SCALE, batch_size=ex3b.SAMPLE_BATCH_SIZE)
    prompts, seeds = [ex3b.CLASS_PROMPT] * args.images, list(range(args.images))
    print(f"{args.model}: {args.images} class images x {args.steps} steps; {available} cores available, "
          f"PyTorch's default {default} threads; {args.rounds} rounds")

    def draw(threads: int) -> float:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        sampling.generate(pipe, prompts, seeds, settings, progress=False)
        return time.perf_counter() - start

    times = {}  # (condition, variant) -> [seconds]
    measured = {}  # condition -> [busy cores before each rule case], [threads the rule chose]
    for round_index in range(-args.warmup, args.rounds):  # rounds < 0: untimed warm-ups
        for condition in ("idle", "busy"):
            other = multiprocessing.Process(target=spin, daemon=True) if condition == "busy" else None
            if other:
                other.start()
                time.sleep(0.5)
            try:
                busy = devices.busy_cores(0.2)
                rule = devices.choose_threads(available, default, busy)
                for variant, threads in ((f"default ({default})", default), ("1 thread", 1), ("rule", rule)):
                    seconds = draw(threads)
                    if round_index >= 0:
                        times.setdefault((condition, variant), []).append(seconds)
                if round_index >= 0:
                    measured.setdefault(condition, ([], []))
                    measured[condition][0].append(round(busy, 2))
                    measured[condition][1].append(rule)
            finally:
                if other:
                    other.terminate()
                    other.join()
    torch.set_num_threads(default)

    results, rows = {}, []
    for (condition, variant), values in times.items():
        median = statistics.median(values)
        results.setdefault(condition, {"variants": {}, "busy_cores_measured": measured[condition][0],
                                       "rule_threads": measured[condition][1]})
        results[condition]["variants"][variant] = {"times_s": values, "median_s": median,
                                                   "images_per_s": args.images / median}
        rows.append([condition, variant, median, args.images / median])
    for condition, result in results.items():
        v = result["variants"]
        result["default/1 thread"] = v[f"default ({default})"]["median_s"] / v["1 thread"]["median_s"]
        result["rule/1 thread"] = v["rule"]["median_s"] / v["1 thread"]["median_s"]
    name = args.name or f"threads-{args.model}-cpu"
    harness.print_table(f"Class images ({name}): median of {args.rounds} round(s)",
                        ["CPU", "threads", "seconds", "images/s"], rows)
    for condition, result in results.items():
        print(f"  {condition}: default/1 thread = {result['default/1 thread']:.2f}, rule/1 thread = "
              f"{result['rule/1 thread']:.2f}; busy cores measured {result['busy_cores_measured']}, "
              f"the rule chose {result['rule_threads']}")
    path = harness.write_results("threads", name, args.results_dir,
                                 {"model": args.model, "images": args.images, "steps": args.steps,
                                  "rounds": args.rounds, "available_cores": available, "torch_default": default},
                                 results, [], torch.device("cpu"))
    print(f"\nWrote {path}")
    return results


if __name__ == "__main__":
    main()
