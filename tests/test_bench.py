"""The benchmarks run on the tiny model and write valid JSON. Timings are never asserted."""

import json
import math

from bench import bench_generate, bench_judge, bench_pocket_build, bench_threads, bench_train


def _record(path):
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["machine"]["cpu_count"] >= 1 and record["machine"]["device"] == "cpu"
    assert record["libraries"]["torch"] and record["libraries"]["diffusers"]
    return record


def _positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_bench_train_times_one_step_of_each_variant(workdir, tmp_path):
    out = bench_train.main(["--arch", "tiny", "--device", "cpu", "--warmup", "0", "--steps", "1",
                                     "--results-dir", str(tmp_path / "results")])
    assert out.path == tmp_path / "results" / "train-tiny-cpu-64px-fp32.json"
    record = _record(out.path)
    assert record["benchmark"] == "train"
    assert record["settings"]["steps"] == 1 and record["settings"]["resolution"] == 64
    for loop, unet_batch in (("3b", 2), ("3a", 1)):  # 3b: one instance + one class image per UNet call
        result = record["results"][loop]
        assert set(result["variants"]) == {"ours", "floor", "course"}
        for variant in result["variants"].values():
            assert len(variant["times_s"]) == 1 and _positive(variant["median_s"])
            assert variant["peak_memory_bytes"] > 0
        assert _positive(result["ratios"]["ours/floor"]) and _positive(result["ratios"]["ours/course"])
        assert result["unet_batch"] == unet_batch
    assert record["results"]["3b"]["trainable_parameters"] > record["results"]["3a"]["trainable_parameters"]


def test_bench_generate_runs_each_part_once(workdir, tmp_path):
    out = bench_generate.main([
        "--arch", "tiny", "--device", "cpu", "--warmup", "0", "--steps", "1", "--images", "2", "--frames", "2",
        "--class-images", "2", "--fast-images", "1", "--fast-default-steps", "2", "--batch", "2",
        "--name", "generate-test", "--results-dir", str(tmp_path / "results")])
    record = _record(tmp_path / "results" / "generate-test.json")
    assert out.path.name == "generate-test.json" and record["benchmark"] == "generate"
    results = record["results"]
    assert set(results) == {"class", "exercise1", "morph", "fast"}
    for part in ("class", "exercise1", "morph"):
        ours, loop = results[part]["variants"]["ours"], results[part]["variants"]["per_call_loop"]
        assert ours["count"] == loop["count"] == 2 and ours["batch"] == 2 and loop["batch"] == 1
        assert _positive(ours["per_s"]) and _positive(loop["per_s"])
    fast = results["fast"]["variants"]
    assert fast["default"]["steps"] == 2 and fast["fast_mode"]["steps"] == 4  # exercise 1's FAST_STEPS
    assert _positive(results["morph"]["morph_450_frames_s_extrapolated"])
    assert not list(workdir.glob("class_images*")) and not (workdir / "outputs").exists()  # wrote only results


def test_bench_threads_times_each_thread_count_idle_and_busy(workdir, tmp_path):
    import torch

    before = torch.get_num_threads()
    results = bench_threads.main(["--model", "tiny", "--images", "1", "--steps", "1", "--rounds", "1",
                                  "--warmup", "0", "--results-dir", str(tmp_path / "results")])
    record = _record(tmp_path / "results" / "threads-tiny-cpu.json")
    assert record["benchmark"] == "threads" and set(record["results"]) == {"idle", "busy"}
    for condition in results.values():
        assert len(condition["variants"]) == 3 and all(_positive(v["median_s"]) for v in condition["variants"].values())
        assert _positive(condition["default/1 thread"]) and condition["rule_threads"][0] >= 1
    assert torch.get_num_threads() == before  # the benchmark gives PyTorch its thread count back


def test_bench_judge_times_both_searches_and_they_agree(tmp_path):
    from pocket import subject_judge

    before = subject_judge.nearest
    assert bench_judge.main(["--crops", "2", "--fills", "1", "--rounds", "1", "--name", "judge-test",
                             "--results-dir", str(tmp_path / "results")]) == 0
    record = _record(tmp_path / "results" / "judge-test.json")
    assert record["benchmark"] == "judge" and record["results"]["same_distances"] is True
    assert all(_positive(record["results"][v]["median_s"]) for v in ("kept", "recomputed"))
    assert _positive(record["results"]["kept_over_recomputed"])
    assert subject_judge.nearest is before  # the benchmark puts the search back


def test_bench_pocket_build_times_every_stage_in_both_precisions(tmp_path):
    assert bench_pocket_build.main(["--rounds", "1", "--steps", "1", "--quality-steps", "0", "--num-world-images",
                                    "32", "--vae-textiles", "2", "--name", "pocket-test",
                                    "--results-dir", str(tmp_path / "results")]) == 0
    record = _record(tmp_path / "results" / "pocket-test.json")
    results = record["results"]
    assert record["benchmark"] == "pocket-build" and set(bench_pocket_build.STAGES) == set(results)
    for stage in bench_pocket_build.STAGES:
        timing = results[stage]
        assert _positive(timing["fp32_s_per_step"]) and _positive(timing["bf16_s_per_step"])
        assert len(timing["fp32_times"]) == len(timing["bf16_times"]) == 1
    # (the quality runs, --quality-steps, train the vae and unet stages from scratch: minutes, not run here)
