"""Exercise 3a: Textual Inversion - teach Stable Diffusion one new word for your fabric, and nothing else.

Textual Inversion adds a placeholder token ("<african-fabric>") to the text encoder's vocabulary and
trains only its embedding: one 768-number vector. The UNet, the VAE and every other word stay frozen,
so the result is a ~3 KB file that changes nothing but the meaning of the new word.

    python exercise3a_train_textual_inversion.py                 # the course's settings (NVIDIA GPU: 30-60 min)
    python exercise3a_train_textual_inversion.py --model tiny    # built-in toy model: seconds on any CPU
    python exercise3a_train_textual_inversion.py --resume        # continue from the last checkpoint
    accelerate launch exercise3a_train_textual_inversion.py      # several GPUs (run 'accelerate config' once)

Writes models/fabric_textual_inversion/learned_embeds.safetensors, which plain diffusers loads
(pipe.load_textual_inversion("models/fabric_textual_inversion")), and so does AUTOMATIC1111. With a
LoRA from exercise 3b in models/fabric_lora it also draws outputs/exercise3_ti_vs_lora.png.
"""

import time
from pathlib import Path
from types import SimpleNamespace

from common import lesson  # (torch, diffusers and accelerate load in train(), once the command line is read)
from common.errors import LessonError, warn

# ============================== CONSTANTS: edit these ==============================
MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Hub id, local folder, .safetensors file, or "tiny"
TRAINING_IMAGES_DIR = "training_images"  # 5-20 pictures of your fabric
PLACEHOLDER_TOKEN = "<african-fabric>"  # the new word (lower case: CLIP lower-cases every prompt)
INITIALIZER_TOKEN = "pattern"  # an existing one-token word to start from
NUM_VECTORS = 1  # vectors per concept: more can hold more detail, and overfit sooner
# Why "style": a fabric pattern is a look that can cover anything, so the word should learn a look
# ("fabric in the style of <african-fabric>"). The course trained with object captions ("a photo of a
# <african-fabric>"), which bind the word to a thing and make "a dress made of <african-fabric>" harder.
LEARNABLE_PROPERTY = "style"  # style or object: which caption templates to train with
RESOLUTION = None  # training size in pixels (multiple of 8); None = the model's own (512 for SD v1.5)
# The pocket model draws 64 px pictures, in which a 512 px photo's weave is finer than a pixel: it trains on
# crops, as if zoomed in (its card says how large). SD v1.5 trains on the whole picture.
CROP_FRACTION = None  # share of a picture's side one training crop shows (1 = all of it); None = the model's own
LEARNING_RATE = 5e-4  # AdamW learning rate for the embedding
MAX_TRAIN_STEPS = 3000  # optimizer updates
TRAIN_BATCH_SIZE = 1  # images per micro-batch
GRADIENT_ACCUMULATION = 4  # micro-batches summed into one update (diffusers' TI recipe: 1 x 4)
LR_SCHEDULER = "constant"  # constant, constant_with_warmup, linear or cosine
LR_WARMUP_STEPS = 0  # steps of learning-rate warm-up
RANDOM_FLIP = True  # mirror images at random (cached, so it costs nothing)
GRADIENT_CHECKPOINTING = False  # trade ~30% speed for much less GPU memory
MIXED_PRECISION = "auto"  # auto, no, fp16 or bf16 (the embedding always trains in fp32)
DEVICE = "auto"  # auto, cuda, mps or cpu
SAMPLE_EVERY = 500  # steps between progress grids
SAMPLE_PROMPTS = ("a {} pattern",
                  "a beautiful dress made of {} pattern, fashion photography",
                  "a fabric pattern")  # {} = PLACEHOLDER_TOKEN; the last row shows that nothing else changes
NUM_SAMPLE_SEEDS = 2  # images per sample prompt
NUM_INFERENCE_STEPS = 25  # denoising steps for samples
GUIDANCE_SCALE = 7.5  # classifier-free guidance for samples
SAMPLE_BATCH_SIZE = 4  # images generated at once (halved automatically if memory runs out)
CHECKPOINT_EVERY = 1000  # steps between checkpoints (for --resume)
CHECKPOINTS_TO_KEEP = 3  # older checkpoints are deleted (0 = keep them all)
RESUME = False  # continue from the newest checkpoint in EMBEDDING_DIR/checkpoints-ti (new LEARNING_RATE etc. apply)
RANDOM_SEED = 42  # same seed, same run
EMBEDDING_DIR = "models/fabric_textual_inversion"  # where the learned embedding goes
LORA_DIR = "models/fabric_lora"  # a LoRA from exercise 3b to compare with (skipped if absent)
CLASS_WORDS = "african fabric"  # the base model's words for the fabric in the comparison (LoRA: "sks" + these)
OUTPUT_DIR = "outputs"  # where the pictures go
LOG_WITH = "tensorboard"  # watch training live: "tensorboard" (if installed), "wandb" or None (off)
# ==================================================================================

# {name}: what this run measured, filled in when they are printed (the numbers of your model, not SD v1.5's).
REFLECTION = [
    "The 'a fabric pattern' row is identical at every step. Why can Textual Inversion not cause language drift?",
    "The embedding is {embedding} ({embedding_file_size}); exercise 3b's rank-4 LoRA on this UNet is {lora_numbers} "
    "numbers, {ratio}x more. What can each one hold?",
    "Compare the TI and LoRA rows of outputs/exercise3_ti_vs_lora.png: which keeps the fabric's details better?",
    "Try --num-vectors 4 or --learnable-property object. How do the samples change?",
]
# What the word *is*: --resume continues a run only with these unchanged (LEARNING_RATE, MAX_TRAIN_STEPS... may change).
FIXED_ON_RESUME = ("MODEL_ID", "RESOLUTION", "CROP_FRACTION", "PLACEHOLDER_TOKEN", "INITIALIZER_TOKEN",
                   "NUM_VECTORS", "LEARNABLE_PROPERTY")


def validate(cfg):
    """Every constant checked before any model loads."""
    from common import files, images, training
    from common import textual_inversion as ti

    lesson.require_text(cfg, "MODEL_ID", "INITIALIZER_TOKEN", "CLASS_WORDS")
    lesson.require_token(cfg, "PLACEHOLDER_TOKEN")
    lesson.require_text_list(cfg, "SAMPLE_PROMPTS")
    lesson.require_int(cfg, "MAX_TRAIN_STEPS", "SAMPLE_EVERY", "CHECKPOINT_EVERY")
    training.check_train_batch(cfg)
    lesson.require_int(cfg, "GRADIENT_ACCUMULATION", maximum=lesson.MAX_ACCUMULATION)
    lesson.require_int(cfg, "SAMPLE_BATCH_SIZE", maximum=lesson.MAX_BATCH)
    lesson.require_int(cfg, "NUM_VECTORS", maximum=64)  # CLIP reads 75 tokens: the captions need room too
    lesson.require_int(cfg, "NUM_INFERENCE_STEPS", maximum=lesson.MAX_STEPS)
    lesson.require_int(cfg, "NUM_SAMPLE_SEEDS", maximum=16)  # columns of the progress grids
    lesson.require_int(cfg, "LR_WARMUP_STEPS", "CHECKPOINTS_TO_KEEP", minimum=0)
    lesson.require_seed(cfg, "RANDOM_SEED")
    lesson.require_learning_rate(cfg, course=5e-4)
    lesson.require_float(cfg, "GUIDANCE_SCALE", maximum=lesson.MAX_GUIDANCE)
    lesson.require_multiple_of(cfg, "RESOLUTION", 8)
    # (at least 0.1: a smaller crop shows less than a motif and gives 1 / fraction**2 crops per picture to encode)
    lesson.require_float(cfg, "CROP_FRACTION", minimum=0.1, maximum=1, allow_none=True)
    lesson.require_choice(cfg, "LEARNABLE_PROPERTY", list(ti.TEMPLATES))
    lesson.require_choice(cfg, "LR_SCHEDULER", ["constant", "constant_with_warmup", "linear", "cosine"])
    training.check_schedule(cfg)
    training.check_log_with(cfg)
    token = cfg.PLACEHOLDER_TOKEN
    if len(token.split()) != 1 or token != token.lower():
        raise LessonError(f"PLACEHOLDER_TOKEN must be one lower-case word without spaces (CLIP lower-cases every "
                          f"prompt, so an upper-case word would never be found), got {token!r}. Try "
                          f"{'-'.join(token.lower().split())!r}.")
    if not any("{}" in p for p in cfg.SAMPLE_PROMPTS):
        warn("no SAMPLE_PROMPTS contains '{}', so the progress grids never show the new word.")
    lesson.require_path(cfg, "TRAINING_IMAGES_DIR")
    lesson.require_path(cfg, "LORA_DIR", allow_none=True)
    lesson.require_writable_dir(cfg, "OUTPUT_DIR", "EMBEDDING_DIR")
    ti.a1111_file(cfg.PLACEHOLDER_TOKEN, cfg.EMBEDDING_DIR)  # (the word names a file too: it must make one of its own)
    files.require_replaceable(Path(cfg.EMBEDDING_DIR) / ti.WEIGHT_NAME, "EMBEDDING_DIR", cfg.SCRIPT)
    lesson.require_model_id(cfg)
    for name in ("OUTPUT_DIR", "EMBEDDING_DIR"):
        lesson.require_apart(cfg, name, "TRAINING_IMAGES_DIR")
    images.check_instance_folder(cfg.TRAINING_IMAGES_DIR)  # (decoded after the model loads; found before)


def textual_inversion_loss(unet, noise_scheduler, embedding, cache, g, n, device, dtype):
    """One micro-batch's loss: the frozen UNet's noise prediction error, read through the new word.

    ``cache`` holds what step 4 computed once (latent distributions, tokenized captions); every random
    draw comes from ``g``. Returns ``{"loss": ...}`` (the form ``training.optimizer_step`` takes).
    """
    import torch
    import torch.nn.functional as F

    from common import training

    # The batch: fresh latents of random images, each with a random caption.
    latents = training.sample_latents(cache.latents[torch.randint(len(cache.latents), (n,), generator=g)],
                                      g, cache.vae_config)
    ids = cache.caption_ids[torch.randint(len(cache.caption_ids), (n,), generator=g)]
    # Forward diffusion, then the frozen UNet predicts the noise from the caption's embedding.
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=g)
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    text_states = embedding(ids.to(device))  # the only part with a gradient: the new vector(s)
    model_pred = unet(noisy_latents.to(dtype), timesteps, text_states.to(dtype)).sample
    target = training.diffusion_target(noise_scheduler, latents, noise, timesteps)  # the noise (SD 1.x)
    return {"loss": F.mse_loss(model_pred.float(), target.float())}


def train_only_new_vectors(cfg, pipe, token_ids, accelerator):
    """Step 5: freeze the UNet, the VAE and the text encoder; the new token's vector(s) train, with their
    optimizer and learning-rate schedule, through accelerate. Returns ``(embedding, optimizer, lr_scheduler)``.
    (A function of its own so that bench/bench_train.py trains exactly this setup.)
    """
    from diffusers.optimization import get_scheduler

    from common import training
    from common import textual_inversion as ti

    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    unet.requires_grad_(False), vae.requires_grad_(False), text_encoder.requires_grad_(False)
    if cfg.GRADIENT_CHECKPOINTING:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode (SD's UNet has no dropout)
    embedding = ti.PlaceholderEmbedding(text_encoder, token_ids)
    optimizer = training.make_optimizer([embedding.vectors], cfg.LEARNING_RATE)
    lr_scheduler = get_scheduler(cfg.LR_SCHEDULER, optimizer,
                                 num_warmup_steps=cfg.LR_WARMUP_STEPS * accelerator.num_processes,
                                 num_training_steps=cfg.MAX_TRAIN_STEPS * accelerator.num_processes)
    return accelerator.prepare(embedding, optimizer, lr_scheduler)


def train(argv=None):
    """The lesson, step by step. Returns what it made (the tests read it); the command line runs main()."""
    cfg = lesson.configure(globals(), argv, __doc__)
    # The libraries load now, after the command line is read, so that --help answers at once.
    from diffusers.training_utils import free_memory
    from tqdm.auto import tqdm

    from common import comparison, figures, images, model_card, models, sampling, training
    from common import textual_inversion as ti

    validate(cfg)
    lesson.print_summary(cfg, "Exercise 3a - Textual Inversion", [
        "MODEL_ID", "PLACEHOLDER_TOKEN", "INITIALIZER_TOKEN", "NUM_VECTORS", "LEARNABLE_PROPERTY", "RESOLUTION",
        "CROP_FRACTION", "LEARNING_RATE", "MAX_TRAIN_STEPS", "TRAIN_BATCH_SIZE", "GRADIENT_ACCUMULATION",
        "RANDOM_SEED"])
    started = time.perf_counter()
    out_dir, embedding_dir = Path(cfg.OUTPUT_DIR), Path(cfg.EMBEDDING_DIR)
    # (not "checkpoints": 3b's LoRA may share EMBEDDING_DIR, and each script keeps to its own checkpoints)
    progress_dir, checkpoint_root = out_dir / "training_progress_ti", embedding_dir / "checkpoints-ti"
    run = training.begin_run(cfg, checkpoint_root, FIXED_ON_RESUME, "EMBEDDING_DIR")  # one training at a time; --resume

    lesson.step(1, "Choose the device and load the base model")
    # Through accelerate (one GPU, or several); noise_scheduler is the forward process the loss trains against.
    accelerator, pipe, noise_scheduler, resolution = training.load_base_model(cfg, run)
    device, weight_dtype = accelerator.device, training.weight_dtype(accelerator)  # (dtype of the frozen models)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    settings = sampling.SamplingSettings(cfg.NUM_INFERENCE_STEPS, cfg.GUIDANCE_SCALE, height=resolution,
                                         width=resolution, batch_size=cfg.SAMPLE_BATCH_SIZE)

    lesson.step(2, f"Load the training images from '{cfg.TRAINING_IMAGES_DIR}/' at {resolution}x{resolution}")
    # SD v1.5 sees each whole picture; the pocket model sees crops of them, as if zoomed in (CROP_FRACTION).
    crop_fraction = cfg.CROP_FRACTION or models.native_crop_fraction(cfg.MODEL_ID)
    instance_images = images.load_instance_images(cfg.TRAINING_IMAGES_DIR, resolution, crop_fraction=crop_fraction,
                                                   seed=cfg.RANDOM_SEED)
    print("  " + images.describe_instances(instance_images, crop_fraction, "training images"))

    lesson.step(3, f"Add {cfg.NUM_VECTORS} new token(s) for {cfg.PLACEHOLDER_TOKEN!r}, starting as "
                   f"{cfg.INITIALIZER_TOKEN!r}")
    token_ids = ti.add_placeholder(tokenizer, text_encoder, cfg.PLACEHOLDER_TOKEN, cfg.INITIALIZER_TOKEN,
                                   cfg.NUM_VECTORS)
    tokens = ti.placeholder_tokens(cfg.PLACEHOLDER_TOKEN, cfg.NUM_VECTORS)
    print(f"  {', '.join(tokens)} -> token id(s) {token_ids}; vectors {text_encoder.config.hidden_size} wide")

    lesson.step(4, "Encode the images once (the VAE then leaves the GPU) and tokenize the captions once")
    # The text encoder cannot be run ahead: the embedding it reads is what trains. Its input can.
    templates = ti.TEMPLATES[cfg.LEARNABLE_PROPERTY]
    cache = SimpleNamespace(  # everything the training step reads, computed once
        latents=training.cache_latent_distributions(vae, images.to_tensor(instance_images), cfg.RANDOM_FLIP),
        caption_ids=ti.tokenize_templates(tokenizer, templates, tokens), vae_config=vae.config)
    print(f"  {len(cache.latents)} latent distributions, {len(templates)} {cfg.LEARNABLE_PROPERTY} captions such as "
          f"{templates[0].format(cfg.PLACEHOLDER_TOKEN)!r}")
    sample_prompts = [p.replace("{}", cfg.PLACEHOLDER_TOKEN) for p in cfg.SAMPLE_PROMPTS
                      for _ in range(cfg.NUM_SAMPLE_SEEDS)]
    sample_seeds = [cfg.RANDOM_SEED + i % cfg.NUM_SAMPLE_SEEDS for i in range(len(sample_prompts))]
    vae.to("cpu")
    free_memory()

    lesson.step(5, "Freeze everything; train only the new vector(s)")
    # (train_only_new_vectors, above: everything frozen, a PlaceholderEmbedding, AdamW and the LR schedule)
    embedding, optimizer, lr_scheduler = train_only_new_vectors(cfg, pipe, token_ids, accelerator)
    print(f"  {accelerator.unwrap_model(embedding).vectors.numel():,} trainable numbers; frozen: "
          f"{sum(p.numel() for m in (unet, vae, text_encoder) for p in m.parameters()):,}")
    state = training.TrainState()
    run_settings = {k: getattr(cfg, k) for k in (  # kept in the file's header: how it was made (a few hundred bytes)
        "MODEL_ID", "PLACEHOLDER_TOKEN", "INITIALIZER_TOKEN", "NUM_VECTORS", "LEARNABLE_PROPERTY", "RESOLUTION",
        "CROP_FRACTION", "LEARNING_RATE", "MAX_TRAIN_STEPS", "TRAIN_BATCH_SIZE", "GRADIENT_ACCUMULATION",
        "RANDOM_SEED")}
    run_settings["resolution"] = resolution  # the size it trains at: exercises 1, 2 and the morph compare
    training.register_adapter_checkpointing(
        accelerator, load_adapter=ti.load_checkpoint,
        save_adapter=lambda m, d: ti.save_embedding(m.vectors, cfg.PLACEHOLDER_TOKEN, Path(d) / ti.WEIGHT_NAME,
                                                    run_settings), state=state, run=run)
    training.resume(accelerator, run, state, optimizer, lr_scheduler, cfg.LEARNING_RATE)  # (if --resume found one)

    def save_progress_grid(step):
        with training.sampling_mode(accelerator, unet, [vae]):
            samples, _ = sampling.generate(pipe, sample_prompts, sample_seeds, settings, progress=False)
        if accelerator.is_main_process:
            grid = figures.save_grid(samples, progress_dir / f"step_{step:05d}.png", cols=cfg.NUM_SAMPLE_SEEDS,
                                     labels=sample_prompts, title=f"Textual Inversion, step {step}")
            training.log_image(accelerator, "progress_grid", grid, step)  # (and live, LOG_WITH)
        return samples

    lesson.step(6, f"Train for {cfg.MAX_TRAIN_STEPS} steps of {cfg.GRADIENT_ACCUMULATION} x {cfg.TRAIN_BATCH_SIZE} "
                   "image(s) (Ctrl-C saves a checkpoint and stops)")

    def micro_batch_loss(g, n=cfg.TRAIN_BATCH_SIZE):  # the loss through the new word (textual_inversion_loss)
        return textual_inversion_loss(unet, noise_scheduler, embedding, cache, g, n, device, weight_dtype)

    training.check_step_memory(micro_batch_loss, cfg.TRAIN_BATCH_SIZE, device)  # (too big: said now, not "Killed")
    training.start_live_log(accelerator, cfg, state.step)  # LOG_WITH: loss, lr and grids, live in OUTPUT_DIR/runs/
    if state.step == 0:
        save_progress_grid(0)
    samples = None
    with training.StopRequest() as stop, tqdm(total=cfg.MAX_TRAIN_STEPS, initial=state.step, desc="Training",
                                              unit="step", disable=not accelerator.is_local_main_process) as bar:
        while state.step < cfg.MAX_TRAIN_STEPS:
            step, lr = state.step + 1, lr_scheduler.get_last_lr()[0]  # (lr: logged too)
            # One update: GRADIENT_ACCUMULATION micro-batches of the loss through the new word
            # (textual_inversion_loss, above: noise, timesteps, UNet call), summed, then one AdamW step.
            losses = training.optimizer_step(accelerator, embedding, optimizer, lr_scheduler, micro_batch_loss,
                                             cfg.RANDOM_SEED, step, cfg.GRADIENT_ACCUMULATION, checkpoint_root)
            state.step = step
            state.log(**losses, lr=lr)
            accelerator.log({**losses, "lr": lr}, step=step)  # the same, live (LOG_WITH)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", refresh=False)
            bar.update()
            if step % cfg.SAMPLE_EVERY == 0 or step == cfg.MAX_TRAIN_STEPS:
                samples = save_progress_grid(step)
            if step % cfg.CHECKPOINT_EVERY == 0 or stop.requested or step == cfg.MAX_TRAIN_STEPS:  # a few KB
                training.save_checkpoint(accelerator, run, step, cfg.CHECKPOINTS_TO_KEEP)
            if stop.requested:  # (checked after the step: a stop always saves one)
                break
    if stop.requested and state.step < cfg.MAX_TRAIN_STEPS:  # Ctrl-C: say how to continue, and stop here
        accelerator.end_training()  # (closes the live log)
        return training.stopped(state, checkpoint_root, cfg.SCRIPT, argv)

    lesson.step(7, "Save the embedding and the loss curve")
    embedding = accelerator.unwrap_model(embedding)
    training.check_weights_finite([embedding.vectors], state.step, checkpoint_root)
    embedding.finish()  # the vectors go into the text encoder's table, as load_textual_inversion puts them
    run_settings["training_seconds"] = round(state.seconds)
    embedding_file, written = embedding_dir / ti.WEIGHT_NAME, []
    if accelerator.is_main_process:
        written.append(ti.save_embedding(embedding.vectors, cfg.PLACEHOLDER_TOKEN, embedding_file, run_settings))
        written.append(figures.plot_curves({"loss": state.history.get("loss", [])},
                                           out_dir / "exercise3a_loss_curve.png", "Textual Inversion loss"))
        # The same vectors as AUTOMATIC1111 and ComfyUI read them, and a model card (README.md).
        a1111 = ti.export_a1111(embedding.vectors, ti.a1111_file(cfg.PLACEHOLDER_TOKEN, embedding_dir))
        written += [a1111, model_card.write_embedding_card(embedding_dir, run_settings, a1111,
                                                           preview=progress_dir / f"step_{state.step:05d}.png")]

    lesson.step(8, "Compare with the base model and with LoRA (Concept 4)")
    comparison_file = out_dir / "exercise3_ti_vs_lora.png"
    if not cfg.LORA_DIR or not Path(cfg.LORA_DIR).exists():
        print(f"  No LoRA at LORA_DIR = {cfg.LORA_DIR!r}, so no comparison figure. Train one with "
              "'python exercise3b_train_lora.py' (same --model), then run this script again with --resume.")
    elif accelerator.is_main_process:
        vae.to(device)
        try:
            written.append(comparison.save_ti_vs_lora(
                pipe, cfg.PLACEHOLDER_TOKEN, embedding_file, cfg.LORA_DIR, list(cfg.SAMPLE_PROMPTS),
                [cfg.RANDOM_SEED] * len(cfg.SAMPLE_PROMPTS), settings, comparison_file, cfg.CLASS_WORDS))
        except LessonError as exc:
            warn(f"no comparison figure: {exc}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # (closes the live log; last, as it ends the processes' group under accelerate launch)

    elapsed = time.perf_counter() - started
    print(f"\nDone in {elapsed:.0f} s.")
    lesson.print_files(written + [progress_dir])
    print(f"\nUse it: pipe.load_textual_inversion('{embedding_dir}'), then prompt with "
          f"'a beautiful dress made of {cfg.PLACEHOLDER_TOKEN} pattern'")
    from common.lora import TARGET_MODULES

    count, width = embedding.vectors.shape
    lora_numbers = sum(4 * (m.in_features + m.out_features) for name, m in pipe.unet.named_modules()
                       if name.endswith(TARGET_MODULES) and hasattr(m, "in_features"))  # rank 4: 4 x (in + out)
    lesson.print_reflection(REFLECTION, embedding_file_size=lesson.file_size(embedding_file),
                            embedding=f"{'one vector' if count == 1 else f'{count} vectors'} of {width} numbers",
                            lora_numbers=f"{lora_numbers:,}", ratio=f"{lora_numbers / (count * width):,.0f}")
    return SimpleNamespace(stopped=False, embedding_file=written[0] if written else None, samples=samples,
                           history=state.history, sample_prompts=sample_prompts, sample_seeds=sample_seeds,
                           settings=settings, pipe=pipe,
                           token_ids=token_ids, comparison_file=comparison_file if comparison_file in written else None)


def main(argv=None) -> int:
    """The command line: run the lesson; the exit code is 0 when training finished, 130 after Ctrl-C."""
    return 130 if train(argv).stopped else 0


if __name__ == "__main__":
    lesson.run(main)
