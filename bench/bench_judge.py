"""The pocket subject judge's search: scoring with the reference patches' squared lengths kept (as
``SubjectJudge.patch_distance`` does) against recomputing them for every nearest-patch search (as it did before).

    python bench/bench_judge.py                 # 64 held-out crops + 60 held-out fills per round, 5 rounds
    python bench/bench_judge.py --rounds 1      # does it run?

Both variants judge the same pictures with the same judge and give the same distances (checked); one untimed
warm-up round builds every object's fill threshold first. Reported: median seconds per round and kept/recomputed.
Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (puts the project root on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pocket import fabric_world, subject_judge  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=64, help="held-out crops judged per round")
    parser.add_argument("--fills", type=int, default=12, help="held-out fills per object judged per round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--name", default="judge-cpu", help="the record's name")
    parser.add_argument("--results-dir", type=Path, default=harness.RESULTS_DIR, help="where <name>.json goes")
    args = parser.parse_args(argv)
    harness.require_counts(parser, args, "crops", "fills", "rounds")
    device = torch.device("cpu")

    judge = subject_judge.load(harness.ROOT / "training_images")
    objects = fabric_world.OBJECTS[1:]
    crops = judge.held_out(args.crops, 1)
    fills = {obj: judge.held_out_fills(args.fills, 1, obj) for obj in objects}
    kept_nearest = subject_judge.nearest
    scores = {}

    def recomputing(samples, references, chunk=512, squared=None):  # the search before: lengths every time
        return kept_nearest(samples, references, chunk)

    def judge_all(name):
        def run(_):
            scores[name] = np.concatenate([judge.score(crops)["distance"]] +
                                          [judge.score_object(fills[obj], obj)["distance"] for obj in objects])
        return run

    variants = [harness.Variant("kept", judge_all("kept"),
                                place=lambda: setattr(subject_judge, "nearest", kept_nearest)),
                harness.Variant("recomputed", judge_all("recomputed"),
                                place=lambda: setattr(subject_judge, "nearest", recomputing))]
    try:
        harness.measure(variants, warmup=1, repeats=args.rounds, device=device)
    finally:
        subject_judge.nearest = kept_nearest
    same = bool(np.allclose(scores["kept"], scores["recomputed"], rtol=1e-5, atol=1e-6))
    ratio = variants[0].median / variants[1].median
    harness.print_table("Subject judge, seconds per round (median)", ["variant", "median s", "kept/recomputed"],
                        [[v.name, v.median, ratio if v.name == "kept" else None] for v in variants])
    print(f"  same distances: {same}")
    path = harness.write_results("judge", args.name, args.results_dir,
                                 {"crops": args.crops, "fills_per_object": args.fills, "rounds": args.rounds,
                                  "view": judge.view},
                                 {**{v.name: v.summary() for v in variants}, "kept_over_recomputed": ratio,
                                  "same_distances": same}, [], device)
    print(f"  wrote {path}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
