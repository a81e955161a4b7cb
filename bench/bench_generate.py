"""Generation cost: our batched paths against one pipeline call per image, and FAST_MODE against the default.

    python bench/bench_generate.py                                          # tiny: does it run? (seconds)
    python bench/bench_generate.py --arch sd15-shapes --resolution 256 --steps 4 --parts morph --frames 8  # CPU
    python bench/bench_generate.py --arch sd15-shapes --device cuda --resolution 512 --precision fp16  # GPU

Four parts, each a pair of variants timed on the same pipeline (round-robin, except FAST_MODE):

- class:     3b's class images - ``prior.ensure_class_images`` with ``sampling.generate`` in batches of
             SAMPLE_BATCH_SIZE, as exercise 3b calls it (PNG files and manifest included) - against one
             ``pipe(CLASS_PROMPT)`` call per image, each saved;
- exercise1: exercise 1 with a random fabric LoRA loaded by ``personalize.load_adapters``: each prompt
             encoded once (``sampling.encode_prompts``) and ``sampling.generate`` in batches of BATCH_SIZE,
             against ``pipe(prompt)`` once per image;
- morph:     the morph's keyframe noises and SLERP loop (``sampling.keyframe_latents``, ``loop_latents``)
             denoised by ``sampling.generate`` in batches of BATCH_SIZE, against ``pipe(PROMPT, latents=frame)``
             once per frame;
- fast:      exercise 1's default (NUM_INFERENCE_STEPS at GUIDANCE_SCALE) against FAST_MODE
             (``fast_mode.enable_fast_mode``: LCM-LoRA stacked on the fabric LoRA, LCMScheduler, FAST_STEPS
             at FAST_GUIDANCE_SCALE, AutoencoderTiny). Nothing can be downloaded, so the LCM-LoRA and the
             tiny autoencoder are random ones of the real shapes (rank 64 on the LCM-LoRA's 278 layers;
             TAESD's configuration), saved in a temporary folder and loaded through the script's path.

Steps, guidance, batch sizes and prompts are the scripts' constants unless an option says otherwise.
Reports images (frames) per second and the ratio ours/loop, prints a table and writes
bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (puts the project root on sys.path)

import torch  # noqa: E402

import exercise1_generate  # noqa: E402
import exercise3b_train_lora  # noqa: E402
import generate_dreambooth_morph  # noqa: E402
from common import device as devices  # noqa: E402
from common import fast_mode, lesson, lora, models, personalize, prior, sampling  # noqa: E402
from common.files import save_image  # noqa: E402

PARTS = ("class", "exercise1", "morph", "fast")  # in this order: class images use the base model, fast comes last
LCM_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
LCM_RANK = 64  # latent-consistency/lcm-lora-sdv1-5: 67M parameters on these layers


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    harness.add_common_arguments(parser)
    parser.set_defaults(warmup=1)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which parts (default {','.join(PARTS)})")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each variant (default 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps for class, exercise1 and morph (default: each script's own)")
    parser.add_argument("--batch", type=int, default=None,
                        help="images per pipeline call on our side (default: each script's own)")
    parser.add_argument("--images", type=int, default=9, help="exercise-1 images (default 9, the course's grid)")
    parser.add_argument("--frames", type=int, default=16, help="morph frames (default 16; the course's loop: 450)")
    parser.add_argument("--class-images", type=int, default=8, help="class images (default 8; 3b makes 100)")
    parser.add_argument("--fast-images", type=int, default=2, help="images for the FAST_MODE comparison")
    parser.add_argument("--fast-default-steps", type=int, default=None,
                        help="the default side of the FAST_MODE comparison (default: exercise 1's own, 30)")
    args = parser.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not args.parts or any(x not in PARTS for x in args.parts):
        parser.error(f"--parts takes some of {', '.join(PARTS)}, got {','.join(args.parts)!r}")
    harness.require_counts(parser, args, "repeats", "images", "frames", "class_images", "fast_images", "steps",
                           "batch", "fast_default_steps")
    return args


def main(argv=None):
    args = parse_args(argv)
    # Each script's constants as its main() reads them (the {} of its prompts filled with SUBJECT_TOKEN).
    # (--threads: the benchmark keeps PyTorch's thread count as it started, OMP_NUM_THREADS or its default)
    ex1, morph, ex3b = (lesson.configure(vars(script), ["--threads", str(torch.get_num_threads())]) for script in (
        exercise1_generate, generate_dreambooth_morph, exercise3b_train_lora))
    runtime = devices.pick_runtime(args.device, args.precision)
    device = runtime.device
    notes = [w for w in [harness.busy_warning(device)] if w]
    for line in notes:
        print(f"Note: {line}")

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        workdir = Path(tmp)
        print(f"Building {args.arch} ...")
        pipe = harness.load_pipeline(args.arch, runtime.dtype, workdir).to(device)
        sampling.use_multistep_solver(pipe)  # as every generation script does
        resolution = args.resolution or models.native_resolution(pipe)
        name = args.name or harness.default_name("generate", args, runtime, resolution)
        run = SimpleNamespace(pipe=pipe, args=args, device=device, resolution=resolution, workdir=workdir,
                              loaded=None, name=name, part=None)
        print(f"{args.arch} at {resolution} px on {device} ({str(runtime.dtype).replace('torch.', '')})")

        results = {}
        for part in [p for p in PARTS if p in args.parts]:
            if part != "class" and run.loaded is None:  # exercise 1, the morph and FAST_MODE run personalised
                run.loaded = personalize.load_adapters(pipe, random_lora(pipe, workdir / "fabric_lora",
                                                                         ex3b.LORA_RANK, lora.TARGET_MODULES), 1.0)
            print(f"\nPart '{part}'")
            run.part = part
            results[part] = {"class": class_images, "exercise1": exercise1, "morph": morph_frames,
                             "fast": fast}[part](run, ex1=ex1, morph=morph, ex3b=ex3b)

    rows = []
    for part, result in results.items():
        for variant, r in result["variants"].items():
            rows.append([part, variant, r["count"], r["steps"], r["batch"], r["median_s"], r["per_s"],
                         harness.gib(r["peak_memory_bytes"])])
    harness.print_table(f"Generation ({name}): median of {args.repeats} run(s)",
                        ["part", "variant", "images", "steps", "batch", "seconds", "images/s", "peak memory"], rows)
    for part, result in results.items():
        print(f"  {part}: " + "   ".join(f"{k} = {v:.3f}" for k, v in result["ratios"].items()))
    settings = {"arch": args.arch, "resolution": resolution, "precision": str(runtime.dtype).replace("torch.", ""),
                "device": str(device), "parts": args.parts, "warmup": args.warmup, "repeats": args.repeats,
                "memory": harness.PeakMemory(device).kind, "scheduler": "DPMSolverMultistepScheduler (dpmsolver++)",
                "fabric_lora_rank": ex3b.LORA_RANK}
    path = harness.write_results("generate", name, args.results_dir, settings, results, notes, device)
    print(f"\nWrote {path}")
    return SimpleNamespace(path=path, results=results)


# --------------------------------------------------------------------------- the parts
def class_images(run, ex3b, **_):
    """3b's class images: ensure_class_images + generate (batched), against one call per image."""
    pipe, args, res = run.pipe, run.args, run.resolution
    steps, guidance = args.steps or ex3b.NUM_INFERENCE_STEPS, ex3b.GUIDANCE_SCALE
    batch = args.batch or ex3b.SAMPLE_BATCH_SIZE
    settings = sampling.SamplingSettings(steps, guidance, height=res, width=res, batch_size=batch)
    recipe = prior.class_image_recipe(args.arch, ex3b.CLASS_PROMPT, res, steps, guidance)
    folders = (run.workdir / f"class_images_{i}" for i in itertools.count())

    def ours(count, steps_override=None):
        s = settings if steps_override is None else _with_steps(settings, steps_override, count)
        r = recipe if steps_override is None else {**recipe, "num_inference_steps": steps_override}
        folder = next(folders)
        prior.ensure_class_images(folder, r, count, batch_size=s.batch_size,
                                  generate_fn=lambda prompts, seeds: sampling.generate(pipe, prompts, seeds, s,
                                                                                       progress=False)[0])
        shutil.rmtree(folder)

    def loop(count, steps_override=None):
        folder = next(folders)
        for seed in range(count):
            image = pipe(ex3b.CLASS_PROMPT, num_inference_steps=steps_override or steps, guidance_scale=guidance,
                         height=res, width=res, generator=devices.generator(seed)).images[0]
            save_image(image, folder / f"class_{seed:05d}.png")
        shutil.rmtree(folder)

    return _compare(run, ours, loop, args.class_images, steps, batch, "images")


def exercise1(run, ex1, **_):
    """Exercise 1: prompts encoded once, batched generate; against pipe(prompt) per image."""
    pipe, args, res = run.pipe, run.args, run.resolution
    steps, guidance = args.steps or ex1.NUM_INFERENCE_STEPS, ex1.GUIDANCE_SCALE
    batch = args.batch or ex1.BATCH_SIZE
    prompts = list(itertools.islice(itertools.cycle(ex1.PROMPTS), args.images))
    seeds = [ex1.RANDOM_SEED + i for i in range(len(prompts))]
    ours, loop = _exercise1_variants(pipe, prompts, seeds, steps, guidance, batch, res)
    return _compare(run, ours, loop, len(prompts), steps, batch, "images")


def morph_frames(run, morph, **_):
    """The morph: SLERP latents denoised in batches; against pipe(PROMPT, latents=frame) per frame."""
    pipe, args, res = run.pipe, run.args, run.resolution
    steps, guidance = args.steps or morph.NUM_INFERENCE_STEPS, morph.GUIDANCE_SCALE
    batch = args.batch or morph.BATCH_SIZE
    settings = sampling.SamplingSettings(steps, guidance, height=res, width=res, batch_size=batch)

    def latents_for(count):  # the script's step 4 (both variants walk the same loop)
        key_seeds = [morph.RANDOM_SEED + k for k in range(min(morph.NUM_KEYFRAMES, count))]
        return sampling.loop_latents(sampling.keyframe_latents(pipe, key_seeds, res, res), count)

    def ours(count, steps_override=None):
        s = settings if steps_override is None else _with_steps(settings, steps_override, count)
        embeddings = sampling.encode_prompts(pipe, [morph.PROMPT], guidance=guidance > 1)
        sampling.generate(pipe, [morph.PROMPT] * count, [morph.RANDOM_SEED] * count, s, embeddings=embeddings,
                          latents=latents_for(count), progress=False)

    def loop(count, steps_override=None):
        latents = latents_for(count)
        for i in range(count):
            pipe(morph.PROMPT, latents=latents[i:i + 1].to(run.device, pipe.unet.dtype),
                 num_inference_steps=steps_override or steps, guidance_scale=guidance, height=res, width=res,
                 generator=devices.generator(morph.RANDOM_SEED))

    result = _compare(run, ours, loop, args.frames, steps, batch, "frames")
    frames = 450  # the course's loop: 15 s at 30 fps
    result["morph_450_frames_s_extrapolated"] = frames / result["variants"]["ours"]["per_s"]
    result["morph_450_frames_note"] = f"{frames} frames at {steps} steps, from the measured frames/s (generation only)"
    return result


def fast(run, ex1, **_):
    """Exercise 1's default settings against FAST_MODE (measured in that order: FAST_MODE changes the pipe)."""
    pipe, args, res = run.pipe, run.args, run.resolution
    steps = args.fast_default_steps or ex1.NUM_INFERENCE_STEPS
    batch = args.batch or ex1.BATCH_SIZE
    prompts = list(itertools.islice(itertools.cycle(ex1.PROMPTS), args.fast_images))
    seeds = [ex1.RANDOM_SEED + i for i in range(len(prompts))]
    default, _ = _exercise1_variants(pipe, prompts, seeds, steps, ex1.GUIDANCE_SCALE, batch, res)
    before = _measure_one(run, "default", default, len(prompts), steps, batch)

    lcm_dir, taesd_dir = fast_mode_weights(pipe, run.workdir, run.args.arch)
    print("  " + fast_mode.enable_fast_mode(pipe, run.loaded.adapters, lcm_dir, taesd_dir))
    fast_run, _ = _exercise1_variants(pipe, prompts, seeds, ex1.FAST_STEPS, ex1.FAST_GUIDANCE_SCALE, batch, res)
    after = _measure_one(run, "fast_mode", fast_run, len(prompts), ex1.FAST_STEPS, batch)
    variants = {"default": before, "fast_mode": after}
    return {"variants": variants, "ratios": {"fast_mode/default images/s": after["per_s"] / before["per_s"]},
            "note": "measured one after the other, not round-robin: FAST_MODE changes the pipeline; the LCM-LoRA "
                    "and the tiny autoencoder are random, with the real ones' shapes"}


# --------------------------------------------------------------------------- helpers
def _exercise1_variants(pipe, prompts, seeds, steps, guidance, batch, res):
    settings = sampling.SamplingSettings(steps, guidance, height=res, width=res, batch_size=batch)

    def ours(count, steps_override=None):  # exercise 1's steps 3 and 4
        s = settings if steps_override is None else _with_steps(settings, steps_override, count)
        embeddings = sampling.encode_prompts(pipe, prompts[:count], guidance=guidance > 1)
        sampling.generate(pipe, prompts[:count], seeds[:count], s, embeddings=embeddings, progress=False)

    def loop(count, steps_override=None):
        for prompt, seed in zip(prompts[:count], seeds[:count]):
            pipe(prompt, num_inference_steps=steps_override or steps, guidance_scale=guidance, height=res, width=res,
                 generator=devices.generator(seed))

    return ours, loop


def _with_steps(settings, steps, count):
    return sampling.SamplingSettings(steps, settings.guidance_scale, height=settings.height, width=settings.width,
                                     batch_size=min(settings.batch_size, count))


def _warm(run, fn):
    """Untimed warm-up runs of one image at one denoising step: first calls page the weights in and set up
    kernels and allocators; one image keeps it cheap (a batch would cost a VAE decode per image)."""
    for _ in range(run.args.warmup):
        fn(1, 1)


def _compare(run, ours, loop, count, steps, batch, unit):
    """Round-robin ``repeats`` runs of both variants over ``count`` images; rates and the ratio."""
    _warm(run, ours)
    _warm(run, loop)
    variants = [harness.Variant("ours", lambda i: ours(count)), harness.Variant("per_call_loop", lambda i: loop(count))]
    harness.measure(variants, 0, run.args.repeats, run.device,
                    profile_to=run.args.results_dir / f"{run.name}.{run.part}" if run.args.profile else None)
    out = {}
    for v, b in zip(variants, (batch, 1)):
        out[v.name] = {**v.summary(), "count": count, "unit": unit, "steps": steps, "batch": min(b, count),
                       "per_s": count / v.median}
    return {"variants": out, "ratios": {f"ours/per_call_loop {unit}/s": out["ours"]["per_s"] /
                                        out["per_call_loop"]["per_s"]}}


def _measure_one(run, name, fn, count, steps, batch):
    _warm(run, fn)
    variant = harness.Variant(name, lambda i: fn(count))
    harness.measure([variant], 0, run.args.repeats, run.device,
                    profile_to=run.args.results_dir / f"{run.name}.{run.part}" if run.args.profile else None)
    return {**variant.summary(), "count": count, "unit": "images", "steps": steps, "batch": min(batch, count),
            "per_s": count / variant.median}


def random_lora(pipe, folder: Path, rank: int, targets, seed: int = 0) -> Path:
    """A LoRA file of the right shapes for ``pipe.unet`` with random values (diffusers layout, no metadata:
    alpha = rank). PEFT lays the layers out on an empty copy of the UNet, so nothing large is allocated."""
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    with init_empty_weights():
        shell = UNet2DConditionModel.from_config(pipe.unet.config)
    lora.add_lora(shell, rank, rank, targets)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in get_peft_model_state_dict(shell).items()}
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state, weight_name=lora.WEIGHT_NAME)
    return Path(folder)


def fast_mode_weights(pipe, workdir: Path, arch: str) -> tuple[Path, Path]:
    """Local stand-ins for FAST_MODE's downloads: an LCM-LoRA (the real one's layers and rank on SD v1.5's
    shapes; a small one on tiny) and an AutoencoderTiny (TAESD's configuration; 4x on tiny, like its VAE)."""
    from diffusers import AutoencoderTiny

    if arch == "tiny":
        lcm = random_lora(pipe, workdir / "lcm-lora", 4, ("to_q", "to_v", "proj_in", "proj_out", "ff.net.2"), seed=5)
        taesd = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                                num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1))
    else:
        lcm = random_lora(pipe, workdir / "lcm-lora", LCM_RANK, LCM_TARGETS, seed=5)
        taesd = AutoencoderTiny()  # its defaults are madebyollin/taesd's configuration
    taesd.save_pretrained(str(workdir / "taesd"))
    return lcm, workdir / "taesd"


if __name__ == "__main__":
    main()
