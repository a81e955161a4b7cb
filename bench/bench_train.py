"""Training cost: our 3b and 3a steps against the compute floor and the course's loop.

    python bench/bench_train.py                                             # tiny: does it run? (seconds)
    python bench/bench_train.py --arch sd15-shapes --resolution 256         # issue 5's CPU targets
    python bench/bench_train.py --arch sd15-shapes --device cuda --resolution 512 --precision fp16 \\
        --gradient-checkpointing                                            # the GPU targets

For each loop (3b: DreamBooth-LoRA with prior preservation; 3a: Textual Inversion) three variants
train the same model, round-robin, and each is timed per optimizer step:

- ours:   the scripts' own step: their update, ``training.optimizer_step`` (``accumulate``,
          ``step_generator``, ``check_finite``, ``backward``, optimizer and LR scheduler steps, the
          losses read back for the log), around their loss (``dreambooth_loss`` /
          ``textual_inversion_loss``), after their step-5 setup (``add_lora_and_optimizer`` /
          ``train_only_new_vectors``), with the scripts' cached latents and prompt embeddings;
- floor:  one bare UNet forward and backward over the same batch, inputs already on the device, with
          the same LoRA (3b) or the same gradient down to the new token's vector (3a), same precision:
          what any loop must pay;
- course: 3b: Concept 3 of the course as written - every step the VAE encodes the instance and the
          class image and the text encoder encodes both prompts, and the UNet runs once for the
          instance image and once more for the class image (``instance_loss + weight * prior_loss``).
          3a: the course shows no loop; we time the usual recipe (diffusers' textual_inversion.py):
          VAE and tokenizer every step, the whole token table trained, its other rows restored after
          each step.

Reports median seconds per optimizer step, ours/floor, ours/course and peak memory (RSS on the CPU,
max allocated on CUDA), prints a table and writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (puts the project root on sys.path)
import sd15_shapes  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402
from diffusers.training_utils import free_memory  # noqa: E402

import exercise3a_train_textual_inversion as ex3a  # noqa: E402
import exercise3b_train_lora as ex3b  # noqa: E402
from common import device as devices  # noqa: E402
from common import images, lesson, models, training  # noqa: E402
from common import textual_inversion as ti  # noqa: E402

LOOPS = ("3a", "3b")  # 3a first: 3b then adds its LoRA to the same UNet


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    harness.add_common_arguments(parser)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant (default 5)")
    parser.add_argument("--batch", type=int, default=1,
                        help="TRAIN_BATCH_SIZE: instance images per micro-batch (3b adds as many class images)")
    parser.add_argument("--accumulation", type=int, default=1,
                        help="micro-batches per optimizer step, for every variant (the scripts: 3b 1, 3a 4)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as GRADIENT_CHECKPOINTING")
    parser.add_argument("--loops", default="3b,3a", help="which loops: 3b, 3a or both (default 3b,3a)")
    parser.add_argument("--training-images", type=Path, default=harness.ROOT / "training_images",
                        help="instance images (default: the project's training_images/)")
    args = parser.parse_args(argv)
    args.loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    if not args.loops or any(x not in LOOPS for x in args.loops):
        parser.error(f"--loops takes 3b, 3a or 3b,3a, got {','.join(args.loops)!r}")
    harness.require_counts(parser, args, "steps", "batch", "accumulation")
    return args


def main(argv=None):
    args = parse_args(argv)
    # Each script's constants as its main() reads them ({} filled in), with this benchmark's checkpointing.
    # (--threads: the benchmark keeps PyTorch's thread count as it started, OMP_NUM_THREADS or its default)
    checkpointing = ["--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing",
                     "--threads", str(torch.get_num_threads())]
    script_b = lesson.configure(vars(ex3b), checkpointing)
    script_a = lesson.configure(vars(ex3a), checkpointing)
    runtime = devices.pick_runtime(args.device, args.precision, training=True)
    device, dtype = runtime.device, runtime.dtype
    notes = [w for w in [harness.busy_warning(device)] if w]
    for line in notes:
        print(f"Note: {line}")
    accelerator = Accelerator(mixed_precision=runtime.mixed_precision, cpu=device.type == "cpu",
                              gradient_accumulation_steps=args.accumulation)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as workdir:
        print(f"Building {args.arch} ...")
        pipe = harness.load_pipeline(args.arch, dtype, Path(workdir)).to(device)
    vae, text_encoder = pipe.vae, pipe.text_encoder
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # as the scripts train against
    resolution = args.resolution or models.native_resolution(pipe)
    name = args.name or harness.default_name("train", args, runtime, resolution,
                                             *(["gc"] if args.gradient_checkpointing else []))

    # Data, as the scripts prepare it: instance photos; class images (random pixels: content costs nothing).
    pixels = images.to_tensor(images.load_instance_images(args.training_images, resolution))
    class_pixels = torch.rand(2, 3, resolution, resolution, generator=devices.generator(0)) * 2 - 1
    instance_cache = training.cache_latent_distributions(vae, pixels, flip=True)
    class_cache = training.cache_latent_distributions(vae, class_pixels, flip=True)
    text_encoder.requires_grad_(False), vae.requires_grad_(False)
    data = SimpleNamespace(pixels=pixels, class_pixels=class_pixels, instance=instance_cache, klass=class_cache)
    print(f"{args.arch} at {resolution} px on {device} ({str(dtype).replace('torch.', '')}), batch {args.batch}, "
          f"accumulation {args.accumulation}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}")

    results = {}
    for loop in [x for x in LOOPS if x in args.loops]:
        print(f"\nExercise {loop}: {args.warmup} warm-up and {args.steps} timed optimizer steps per variant")
        bench = textual_inversion_variants if loop == "3a" else lora_variants
        script = script_a if loop == "3a" else script_b
        variants, facts, cleanup = bench(script, pipe, noise_scheduler, data, accelerator, runtime, args)
        harness.measure(variants, args.warmup, args.steps, device,
                        profile_to=args.results_dir / f"{name}.{loop}" if args.profile else None)
        results[loop] = summarize(variants, facts, args, script)
        del variants
        cleanup()

    for loop, result in results.items():
        rows = [[v, r["median_s"], r["median_s"] / result["variants"]["floor"]["median_s"],
                 harness.gib(r["peak_memory_bytes"])] for v, r in result["variants"].items()]
        harness.print_table(f"Exercise {loop} ({result['unet_batch']} image(s) per UNet call, {name}): seconds "
                            "per optimizer step (median)", ["variant", "s/step", "x floor", "peak memory"], rows)
        print("  " + "   ".join(f"{k} = {v:.3f}" for k, v in result["ratios"].items()))
    settings = {"arch": args.arch, "resolution": resolution, "precision": str(dtype).replace("torch.", ""),
                "mixed_precision": runtime.mixed_precision, "device": str(device), "batch": args.batch,
                "accumulation": args.accumulation, "gradient_checkpointing": args.gradient_checkpointing,
                "warmup": args.warmup, "steps": args.steps, "loops": args.loops,
                "memory": harness.PeakMemory(device).kind,
                "instance_images": len(pixels), "lora_rank": script_b.LORA_RANK}
    path = harness.write_results("train", name, args.results_dir, settings, results, notes, device)
    print(f"\nWrote {path}")
    return SimpleNamespace(path=path, results=results)


# --------------------------------------------------------------------------- 3b: DreamBooth-LoRA
def lora_variants(script, pipe, noise_scheduler, data, accelerator, runtime, args):
    """``script``: exercise 3b's constants (a Config)."""
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    device, dtype, n = runtime.device, runtime.dtype, args.batch
    cache = SimpleNamespace(  # the fields exercise3b's step 4 computes once
        instance=data.instance, klass=data.klass, instance_embeds=training.encode_text(pipe, script.INSTANCE_PROMPT),
        class_embeds=training.encode_text(pipe, script.CLASS_PROMPT), vae_config=vae.config)

    # exercise3b step 5: the script's own function
    unet, optimizer, lr_scheduler, _, trainable = ex3b.add_lora_and_optimizer(script, unet, accelerator)
    unet.train()

    def ours(step):  # the script's own update (training.optimizer_step), returning what it logs
        return training.optimizer_step(
            accelerator, unet, optimizer, lr_scheduler, lambda g: ex3b.dreambooth_loss(
                unet, noise_scheduler, cache, g, n, script.PRIOR_LOSS_WEIGHT, device, dtype),
            script.RANDOM_SEED, step, args.accumulation, "bench")

    # The floor's inputs, drawn once and left on the device.
    g = training.step_generator(0, 0)
    latents = torch.cat([training.sample_latents(data.instance[:n], g, vae.config),
                         training.sample_latents(data.klass[:n], g, vae.config)])
    fixed = _noisy_batch(noise_scheduler, latents, g, device, dtype)
    fixed_embeds = torch.cat([cache.instance_embeds] * n + [cache.class_embeds] * n).to(device, dtype)

    def floor(step):
        for _ in range(args.accumulation):
            pred = unet(fixed.noisy, fixed.timesteps, fixed_embeds).sample
            F.mse_loss(pred.float(), fixed.target.float()).backward()
        optimizer.zero_grad(set_to_none=True)

    def course(step):
        for micro in range(args.accumulation):
            with accelerator.accumulate(unet):
                g = training.step_generator(script.RANDOM_SEED, step, accelerator.process_index, micro)
                instance_px = data.pixels[torch.randint(len(data.pixels), (n,), generator=g)]
                class_px = data.class_pixels[torch.randint(len(data.class_pixels), (n,), generator=g)]
                with torch.no_grad():  # the frozen VAE and text encoder, every step
                    latents = _encode(vae, instance_px, device, dtype)
                    latents_prior = _encode(vae, class_px, device, dtype)
                    text = _encode_prompt(tokenizer, text_encoder, [script.INSTANCE_PROMPT] * n, device)
                    text_prior = _encode_prompt(tokenizer, text_encoder, [script.CLASS_PROMPT] * n, device)
                # Instance loss: learn the specific subject
                noise = torch.randn_like(latents)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), device=device)
                predicted_noise = unet(noise_scheduler.add_noise(latents, noise, t), t, text).sample
                instance_loss = F.mse_loss(predicted_noise.float(), noise.float())
                # Prior loss: remember the general class (a second UNet pass)
                noise_prior = torch.randn_like(latents_prior)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), device=device)
                predicted_noise_prior = unet(noise_scheduler.add_noise(latents_prior, noise_prior, t), t,
                                             text_prior).sample
                prior_loss = F.mse_loss(predicted_noise_prior.float(), noise_prior.float())
                total_loss = instance_loss + script.PRIOR_LOSS_WEIGHT * prior_loss
                accelerator.backward(total_loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        return total_loss.item()

    helpers_off, helpers_on = _placement([vae, text_encoder], device)  # 3b: both leave the GPU after step 4
    variants = [harness.Variant("ours", ours, helpers_off), harness.Variant("floor", floor, helpers_off),
                harness.Variant("course", course, helpers_on)]
    facts = {"unet_batch": 2 * n, "trainable_parameters": sum(p.numel() for p in trainable),
             "course_unet_calls_per_micro_batch": 2}
    return variants, facts, lambda: None


# --------------------------------------------------------------------------- 3a: Textual Inversion
def textual_inversion_variants(script, pipe, noise_scheduler, data, accelerator, runtime, args):
    """``script``: exercise 3a's constants (a Config)."""
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    device, dtype, n = runtime.device, runtime.dtype, args.batch

    # exercise3a steps 3-4, as the script does them
    token_ids = ti.add_placeholder(tokenizer, text_encoder, script.PLACEHOLDER_TOKEN, script.INITIALIZER_TOKEN,
                                   script.NUM_VECTORS)
    if args.arch == "sd15-shapes":  # the tiny tokenizer's vocabulary shrank the table: give it SD's 49408 rows back
        rows = sd15_shapes.SD15_TEXT_CONFIG["vocab_size"] + len(token_ids)
        text_encoder.resize_token_embeddings(max(len(tokenizer), rows), mean_resizing=False)
    tokens = ti.placeholder_tokens(script.PLACEHOLDER_TOKEN, script.NUM_VECTORS)
    templates = ti.TEMPLATES[script.LEARNABLE_PROPERTY]
    cache = SimpleNamespace(latents=data.instance, caption_ids=ti.tokenize_templates(tokenizer, templates, tokens),
                            vae_config=vae.config)
    # exercise3a step 5: the script's own function
    embedding, optimizer, lr_scheduler = ex3a.train_only_new_vectors(script, pipe, token_ids, accelerator)
    vectors = accelerator.unwrap_model(embedding).vectors

    def ours(step):  # the script's own update (training.optimizer_step), returning what it logs
        return training.optimizer_step(
            accelerator, embedding, optimizer, lr_scheduler, lambda g: ex3a.textual_inversion_loss(
                unet, noise_scheduler, embedding, cache, g, n, device, dtype),
            script.RANDOM_SEED, step, args.accumulation, "bench")

    g = training.step_generator(0, 0)
    fixed = _noisy_batch(noise_scheduler, training.sample_latents(data.instance[:n], g, vae.config), g, device, dtype)
    fixed_ids = cache.caption_ids[:n].to(device)

    def floor(step):
        for _ in range(args.accumulation):
            pred = unet(fixed.noisy, fixed.timesteps, embedding(fixed_ids).to(dtype)).sample
            F.mse_loss(pred.float(), fixed.target.float()).backward()
        vectors.grad = None

    # The usual recipe: the whole table trains; rows other than the new token's are put back after each step.
    table = text_encoder.get_input_embeddings().weight
    original, others = table.detach().clone(), torch.ones(len(table), dtype=torch.bool, device=table.device)
    others[token_ids] = False
    table_optimizer = torch.optim.AdamW([table], lr=script.LEARNING_RATE, weight_decay=1e-2)

    def course(step):
        for micro in range(args.accumulation):
            g = training.step_generator(script.RANDOM_SEED, step, accelerator.process_index, micro)
            px = data.pixels[torch.randint(len(data.pixels), (n,), generator=g)]
            captions = [templates[i].format(" ".join(tokens)) for i in torch.randint(len(templates), (n,), generator=g)]
            with torch.no_grad():
                latents = _encode(vae, px, device, dtype)
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), device=device)
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            pred = unet(noise_scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0].to(dtype)).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
        table_optimizer.step()
        table_optimizer.zero_grad()
        with torch.no_grad():
            table[others] = original[others]
        vectors.grad = None
        return loss.item()

    vae_off, vae_on = _placement([vae], device)  # 3a: the VAE leaves the GPU after step 4, the text encoder stays

    def ours_place():
        table.requires_grad_(False)
        vae_off()

    def course_place():
        table.requires_grad_(True)
        vae_on()

    variants = [harness.Variant("ours", ours, ours_place), harness.Variant("floor", floor, ours_place),
                harness.Variant("course", course, course_place)]
    facts = {"unet_batch": n, "trainable_parameters": vectors.numel(), "course_trainable_parameters": table.numel(),
             "course_loop": "not in the course text: VAE + tokenizer every step, whole token table trained and "
                            "its other rows restored (diffusers' textual_inversion.py recipe)"}

    def cleanup():  # leave the text encoder as the script leaves it: table frozen, new vectors written in
        table.requires_grad_(False)
        table_optimizer.state.clear()
        accelerator.unwrap_model(embedding).finish()
    return variants, facts, cleanup


# --------------------------------------------------------------------------- helpers
def _noisy_batch(noise_scheduler, latents, g, device, dtype):
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=g)
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    return SimpleNamespace(noisy=noise_scheduler.add_noise(latents, noise, timesteps).to(dtype), timesteps=timesteps,
                           target=noise)


def _encode(vae, pixels, device, dtype):
    return vae.encode(pixels.to(device, dtype)).latent_dist.sample() * vae.config.scaling_factor


def _encode_prompt(tokenizer, text_encoder, prompts, device):
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


def _placement(helpers, device):
    """(off, on): the scripts move the VAE (and 3b the text encoder) off the GPU once everything is cached;
    the course's loop needs them on it. A no-op on the CPU."""
    def move(where):
        def place():
            if device.type != "cpu":
                for model in helpers:
                    model.to(where)
                free_memory()
        return place
    return move("cpu"), move(device)


def summarize(variants, facts, args, script) -> dict:
    by_name = {v.name: v for v in variants}
    ours, floor, course = (by_name[k].median for k in ("ours", "floor", "course"))
    per_micro = ours / args.accumulation
    run_steps = script.MAX_TRAIN_STEPS * script.GRADIENT_ACCUMULATION
    return {"variants": {v.name: v.summary() for v in variants},
            "ratios": {"ours/floor": ours / floor, "ours/course": ours / course},
            **facts,
            "script_run_s_extrapolated": per_micro * run_steps,
            "script_run": f"{script.MAX_TRAIN_STEPS} steps x {script.GRADIENT_ACCUMULATION} micro-batch(es), "
                          "training loop only (no class images, progress grids or checkpoints)"}


if __name__ == "__main__":
    main()
