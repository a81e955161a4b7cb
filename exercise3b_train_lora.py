"""Exercise 3b: teach Stable Diffusion your fabric with DreamBooth, LoRA and prior preservation.

DreamBooth binds a rare token ("sks") to ~10 pictures of one subject. We fine-tune only small LoRA
matrices in the UNet's attention layers, and keep the model's idea of "a fabric pattern" alive with
class images it drew itself (prior preservation).

    python exercise3b_train_lora.py                      # the course's settings (NVIDIA GPU: 15-30 min)
    python exercise3b_train_lora.py --model tiny         # built-in toy model: seconds on any CPU
    python exercise3b_train_lora.py --resume             # continue from the last checkpoint
    accelerate launch exercise3b_train_lora.py           # several GPUs (run 'accelerate config' once)

Writes models/fabric_lora/pytorch_lora_weights.safetensors, which exercise 1 and 2 (and plain
diffusers: pipe.load_lora_weights("models/fabric_lora")) load, plus progress grids and loss curves
in outputs/.
"""

import time
from pathlib import Path
from types import SimpleNamespace

from common import lesson  # (torch, diffusers and accelerate load in train(), once the command line is read)
from common.errors import warn

# ============================== CONSTANTS: edit these ==============================
MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Hub id, local folder, .safetensors file, or "tiny"
TRAINING_IMAGES_DIR = "training_images"  # 5-20 pictures of your subject
SUBJECT_TOKEN = "sks"  # the rare word that will mean *your* fabric; it fills the {} of the prompts below
INSTANCE_PROMPT = "a {} african fabric pattern"  # {} = SUBJECT_TOKEN, + the class it belongs to
CLASS_PROMPT = "a fabric pattern"  # the same class, without the token
RESOLUTION = None  # training size in pixels (multiple of 8); None = the model's own (512 for SD v1.5)
# The pocket model draws 64 px pictures, in which a 512 px photo's weave is finer than a pixel: it trains on
# crops, as if zoomed in (its card says how large). SD v1.5 trains on the whole picture.
CROP_FRACTION = None  # share of a picture's side one training crop shows (1 = all of it); None = the model's own
LORA_RANK = 4  # rank r of the LoRA matrices: bigger = more capacity, bigger file
LORA_ALPHA = 32  # the LoRA's change is scaled by alpha / rank: 32 / 4 = 8, as in the course
LEARNING_RATE = 1e-4  # AdamW learning rate (the course's, for SD v1.5)
# A step here is one optimizer update: the gradients of GRADIENT_ACCUMULATION micro-batches (each
# TRAIN_BATCH_SIZE instance images plus as many class images) are averaged, then AdamW changes the LoRA
# once. The course's script counted every micro-batch as a step, so its "800 steps" at accumulation 4 were
# 200 updates. 200 updates x 4 micro-batches x 1 image = the course's run: 800 instance images (and 800
# class images) seen, 200 updates. SAMPLE_EVERY and CHECKPOINT_EVERY below count updates too.
MAX_TRAIN_STEPS = 200  # optimizer updates (x GRADIENT_ACCUMULATION 4 = the course's 800 micro-batch steps)
TRAIN_BATCH_SIZE = 1  # instance images per micro-batch (plus as many class images)
GRADIENT_ACCUMULATION = 4  # micro-batches averaged into one update (the course's 4; raise it when you lower the batch)
LR_SCHEDULER = "constant"  # constant, constant_with_warmup, linear or cosine
LR_WARMUP_STEPS = 0  # steps of learning-rate warm-up
PRIOR_PRESERVATION = True  # train on class images too, so "a fabric pattern" keeps its meaning
NUM_CLASS_IMAGES = 100  # class images the base model draws once (kept in CLASS_DATA_DIR)
PRIOR_LOSS_WEIGHT = 1.0  # lambda: weight of the prior-preservation term
CLASS_DATA_DIR = "class_images"  # where the class images and their manifest live
RANDOM_FLIP = True  # mirror images at random (cached, so it costs nothing)
GRADIENT_CHECKPOINTING = False  # trade ~30% speed for much less GPU memory
USE_8BIT_ADAM = False  # bitsandbytes' 8-bit AdamW (NVIDIA only, optional install)
MIXED_PRECISION = "auto"  # auto, no, fp16 or bf16 (LoRA weights always train in fp32)
DEVICE = "auto"  # auto, cuda, mps or cpu
SAMPLE_EVERY = 25  # updates between progress grids (the course's every 100 micro-batch steps)
SAMPLE_PROMPTS = ("a {} african fabric pattern",
                  "a beautiful dress made of {} african fabric pattern, fashion photography",
                  "a fabric pattern")  # {} = SUBJECT_TOKEN; the last one shows language drift (or its absence)
NUM_SAMPLE_SEEDS = 2  # images per sample prompt
NUM_INFERENCE_STEPS = 25  # denoising steps for samples and class images
GUIDANCE_SCALE = 7.5  # classifier-free guidance for samples and class images
SAMPLE_BATCH_SIZE = 4  # images generated at once (halved automatically if memory runs out)
CHECKPOINT_EVERY = 50  # updates between checkpoints, for --resume (the course's every 200 micro-batch steps)
CHECKPOINTS_TO_KEEP = 3  # older checkpoints are deleted (0 = keep them all)
RESUME = False  # continue from the newest checkpoint in LORA_DIR/checkpoints (new LEARNING_RATE etc. apply)
RANDOM_SEED = 42  # same seed, same run
LORA_DIR = "models/fabric_lora"  # where the trained LoRA goes
OUTPUT_DIR = "outputs"  # where the pictures go
LOG_WITH = "tensorboard"  # watch training live: "tensorboard" (if installed), "wandb" or None (off)
# ==================================================================================

# {name}: what this run measured, filled in when they are printed (the numbers of your model, not SD v1.5's).
REFLECTION = [
    "Compare the step-0 grid with the last one: which prompt changed first, and why that one?",
    "Look at the 'a fabric pattern' row. Did it drift towards your fabric? Try --no-prior-preservation.",
    "The LoRA file is {lora_file_size} ({lora_numbers} numbers); the UNet it adapts is {unet_size} ({unet_numbers} "
    "numbers). What does that say about what fine-tuning changes?",
    "The instance and prior loss curves barely fall. Why is the diffusion loss a poor progress meter?",
]
# What the LoRA *is*: --resume continues a run only with these unchanged (LEARNING_RATE, MAX_TRAIN_STEPS... may change).
FIXED_ON_RESUME = ("MODEL_ID", "RESOLUTION", "CROP_FRACTION", "INSTANCE_PROMPT", "CLASS_PROMPT", "SUBJECT_TOKEN",
                   "LORA_RANK", "LORA_ALPHA", "USE_8BIT_ADAM")


def validate(cfg):
    """Every constant checked before any model loads."""
    from common import files, images, lora, sampling, training

    lesson.require_text(cfg, "MODEL_ID", "INSTANCE_PROMPT", "CLASS_PROMPT")
    lesson.require_token(cfg, "SUBJECT_TOKEN")
    lesson.require_text_list(cfg, "SAMPLE_PROMPTS")
    lesson.require_int(cfg, "MAX_TRAIN_STEPS", "SAMPLE_EVERY", "CHECKPOINT_EVERY")
    training.check_train_batch(cfg)
    lesson.require_int(cfg, "GRADIENT_ACCUMULATION", maximum=lesson.MAX_ACCUMULATION)
    lesson.require_int(cfg, "SAMPLE_BATCH_SIZE", maximum=lesson.MAX_BATCH)
    lesson.require_int(cfg, "LORA_RANK", maximum=1024)
    lesson.require_int(cfg, "NUM_INFERENCE_STEPS", maximum=lesson.MAX_STEPS)
    lesson.require_int(cfg, "NUM_SAMPLE_SEEDS", maximum=16)  # columns of the progress grids
    lesson.require_int(cfg, "NUM_CLASS_IMAGES", minimum=0, maximum=10000)
    lesson.require_int(cfg, "LR_WARMUP_STEPS", "CHECKPOINTS_TO_KEEP", minimum=0)
    lesson.require_seed(cfg, "RANDOM_SEED")
    lesson.require_learning_rate(cfg, course=1e-4)
    lesson.require_float(cfg, "LORA_ALPHA", above=True, maximum=10000)
    lesson.require_float(cfg, "GUIDANCE_SCALE", maximum=lesson.MAX_GUIDANCE)
    lesson.require_float(cfg, "PRIOR_LOSS_WEIGHT", maximum=1000)
    lesson.require_multiple_of(cfg, "RESOLUTION", 8)
    # (at least 0.1: a smaller crop shows less than a motif and gives 1 / fraction**2 crops per picture to encode)
    lesson.require_float(cfg, "CROP_FRACTION", minimum=0.1, maximum=1, allow_none=True)
    lesson.require_choice(cfg, "LR_SCHEDULER", ["constant", "constant_with_warmup", "linear", "cosine"])
    training.check_schedule(cfg)
    training.check_log_with(cfg)
    if cfg.PRIOR_PRESERVATION and cfg.NUM_CLASS_IMAGES < 1:
        lesson.fail(cfg, "NUM_CLASS_IMAGES", "must be at least 1 while PRIOR_PRESERVATION is on (it trains on them)",
                    "To train without class images, set PRIOR_PRESERVATION = False (--no-prior-preservation).")
    if not sampling.mentions(cfg.INSTANCE_PROMPT, cfg.SUBJECT_TOKEN):
        warn(f"INSTANCE_PROMPT {cfg.INSTANCE_PROMPT!r} does not contain SUBJECT_TOKEN {cfg.SUBJECT_TOKEN!r}: "
             "the model will learn your images without a word to call them by.")
    if cfg.PRIOR_PRESERVATION and " ".join(cfg.CLASS_PROMPT.lower().split()) == \
            " ".join(cfg.INSTANCE_PROMPT.lower().split()):  # (as CLIP reads them: lower-cased, words apart)
        warn(f"INSTANCE_PROMPT and CLASS_PROMPT are the same text ({cfg.CLASS_PROMPT!r}): with PRIOR_PRESERVATION on, "
             "the instance term teaches those words your images and the prior term teaches them the base model's "
             "own pictures, two different things. Make CLASS_PROMPT the instance prompt without the subject token "
             "(the course's: 'a fabric pattern'), or set PRIOR_PRESERVATION = False (--no-prior-preservation).")
    elif cfg.PRIOR_PRESERVATION and sampling.mentions(cfg.CLASS_PROMPT, cfg.SUBJECT_TOKEN):
        warn(f"CLASS_PROMPT {cfg.CLASS_PROMPT!r} contains SUBJECT_TOKEN {cfg.SUBJECT_TOKEN!r}: prior preservation "
             "would teach that word the base model's own pictures, against yours. Write the class alone, "
             "without the word (the course's: 'a fabric pattern').")
    lesson.require_path(cfg, "TRAINING_IMAGES_DIR")
    lesson.require_writable_dir(cfg, "OUTPUT_DIR", "LORA_DIR", *(["CLASS_DATA_DIR"] if cfg.PRIOR_PRESERVATION else []))
    files.require_replaceable(Path(cfg.LORA_DIR) / lora.WEIGHT_NAME, "LORA_DIR", cfg.SCRIPT)
    lesson.require_model_id(cfg)
    for name in ("OUTPUT_DIR", "LORA_DIR"):
        lesson.require_apart(cfg, name, "TRAINING_IMAGES_DIR")
    if cfg.PRIOR_PRESERVATION:  # before anything is set aside: the class folder must not hold the student's pictures
        lesson.require_apart(cfg, "CLASS_DATA_DIR", "TRAINING_IMAGES_DIR", nested=True)
        lesson.require_apart(cfg, "CLASS_DATA_DIR", "OUTPUT_DIR")  # (nor the pictures of every exercise)
    images.check_instance_folder(cfg.TRAINING_IMAGES_DIR)  # (decoded after the model loads; found before)


def dreambooth_loss(unet, noise_scheduler, cache, g, n_inst, prior_loss_weight, device, dtype):
    """One micro-batch's loss (Concept 3): instance loss + PRIOR_LOSS_WEIGHT x prior loss.

    ``cache`` holds what step 4 computed once (latent distributions and prompt embeddings); every
    random draw comes from ``g``. Returns ``{"total": ..., "instance": ..., "prior": ...}``: the total
    trains, the two terms are logged so that you can watch each one.
    """
    import torch

    from common import prior, training

    # The batch: instance latents (+ class latents), each with its prompt's embedding.
    pick = torch.randint(len(cache.instance), (n_inst,), generator=g)
    latents = training.sample_latents(cache.instance[pick], g, cache.vae_config)
    embeds = [cache.instance_embeds] * n_inst
    if cache.klass is not None:
        pick = torch.randint(len(cache.klass), (n_inst,), generator=g)
        latents = torch.cat([latents, training.sample_latents(cache.klass[pick], g, cache.vae_config)])
        embeds += [cache.class_embeds] * n_inst
    # Forward diffusion: independent noise and timestep for every sample.
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=g)
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    # One UNet call for instance and class images together: predict the noise.
    model_pred = unet(noisy_latents.to(dtype), timesteps, torch.cat(embeds).to(device, dtype)).sample
    target = training.diffusion_target(noise_scheduler, latents, noise, timesteps)  # the noise (SD 1.x)
    # The first n_inst rows are instance images, the rest class images (prior.prior_preservation_loss).
    total, instance_loss, prior_loss = prior.prior_preservation_loss(model_pred, target, n_inst, prior_loss_weight)
    return {"total": total, "instance": instance_loss, "prior": prior_loss}


def add_lora_and_optimizer(cfg, unet, accelerator):
    """Step 5: LoRA layers on the frozen UNet, their optimizer and learning-rate schedule, through accelerate.

    Returns ``(unet, optimizer, lr_scheduler, lora_config, trainable parameters)``. (A function of its own
    so that bench/bench_train.py trains exactly this setup.)
    """
    import torch
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    from common import lora, training

    unet.requires_grad_(False)
    set_seed(cfg.RANDOM_SEED)  # the LoRA's random initialisation: same seed, same run
    lora_config = lora.add_lora(unet, cfg.LORA_RANK, cfg.LORA_ALPHA)
    cast_training_params(unet, torch.float32)  # LoRA trains in fp32 even when the frozen UNet is fp16
    if cfg.GRADIENT_CHECKPOINTING:
        unet.enable_gradient_checkpointing()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = training.make_optimizer(trainable, cfg.LEARNING_RATE, cfg.USE_8BIT_ADAM)
    lr_scheduler = get_scheduler(cfg.LR_SCHEDULER, optimizer,
                                 num_warmup_steps=cfg.LR_WARMUP_STEPS * accelerator.num_processes,
                                 num_training_steps=cfg.MAX_TRAIN_STEPS * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    return unet, optimizer, lr_scheduler, lora_config, trainable


def train(argv=None):
    """The lesson, step by step. Returns what it made (the tests read it); the command line runs main()."""
    cfg = lesson.configure(globals(), argv, __doc__)
    # The libraries load now, after the command line is read, so that --help answers at once.
    from diffusers.training_utils import free_memory
    from tqdm.auto import tqdm

    from common import figures, images, lora, model_card, models, prior, sampling, training
    from common.files import human_size

    validate(cfg)
    lesson.print_summary(cfg, "Exercise 3b - DreamBooth-LoRA with prior preservation", [
        "MODEL_ID", "INSTANCE_PROMPT", "CLASS_PROMPT", "RESOLUTION", "CROP_FRACTION", "LORA_RANK", "LORA_ALPHA",
        "LEARNING_RATE", "MAX_TRAIN_STEPS", "TRAIN_BATCH_SIZE", "GRADIENT_ACCUMULATION", "PRIOR_PRESERVATION",
        "NUM_CLASS_IMAGES", "PRIOR_LOSS_WEIGHT", "RANDOM_SEED"])
    started = time.perf_counter()
    out_dir, lora_dir = Path(cfg.OUTPUT_DIR), Path(cfg.LORA_DIR)
    progress_dir, checkpoint_root = out_dir / "training_progress_lora", lora_dir / "checkpoints"
    run = training.begin_run(cfg, checkpoint_root, FIXED_ON_RESUME, "LORA_DIR")  # one training at a time; --resume

    lesson.step(1, "Choose the device and load the base model")
    # Through accelerate (one GPU, or several); noise_scheduler is the forward process the loss trains against.
    accelerator, pipe, noise_scheduler, resolution = training.load_base_model(cfg, run)
    device, weight_dtype = accelerator.device, training.weight_dtype(accelerator)  # (dtype of the frozen models)
    unet, vae = pipe.unet, pipe.vae
    settings = sampling.SamplingSettings(cfg.NUM_INFERENCE_STEPS, cfg.GUIDANCE_SCALE, height=resolution,
                                         width=resolution, batch_size=cfg.SAMPLE_BATCH_SIZE)

    lesson.step(2, f"Load the instance images from '{cfg.TRAINING_IMAGES_DIR}/' at {resolution}x{resolution}")
    # SD v1.5 sees each whole picture; the pocket model sees crops of them, as if zoomed in (CROP_FRACTION).
    crop_fraction = cfg.CROP_FRACTION or models.native_crop_fraction(cfg.MODEL_ID)
    instance_images = images.load_instance_images(cfg.TRAINING_IMAGES_DIR, resolution, crop_fraction=crop_fraction,
                                                   seed=cfg.RANDOM_SEED)
    print("  " + images.describe_instances(instance_images, crop_fraction, "instance images"))

    class_images = []
    if cfg.PRIOR_PRESERVATION:
        lesson.step(3, f"Prior preservation: {cfg.NUM_CLASS_IMAGES} class images of '{cfg.CLASS_PROMPT}'")
        recipe = prior.class_image_recipe(models.describe_source(cfg.MODEL_ID), cfg.CLASS_PROMPT, resolution,
                                          cfg.NUM_INFERENCE_STEPS, cfg.GUIDANCE_SCALE,
                                          models.weights_fingerprint(cfg.MODEL_ID))  # (drawn by this very model)
        with prior.holding(cfg.CLASS_DATA_DIR, accelerator):  # (another run sharing the folder waits its turn)
            files = prior.ensure_class_images(
                cfg.CLASS_DATA_DIR, recipe, cfg.NUM_CLASS_IMAGES, accelerator=accelerator,
                batch_size=settings.batch_size,
                generate_fn=lambda prompts, seeds: sampling.generate(pipe, prompts, seeds, settings, "Class images")[0])
            class_images = [images.center_crop_resize(images.open_image(p), resolution) for p in files]

    lesson.step(4, "Encode images and prompts once (the VAE and text encoder then leave the GPU)")
    cache = SimpleNamespace(  # everything the training step reads, computed once
        instance=training.cache_latent_distributions(vae, images.to_tensor(instance_images), cfg.RANDOM_FLIP),
        klass=(training.cache_latent_distributions(vae, images.to_tensor(class_images), cfg.RANDOM_FLIP)
               if class_images else None),
        instance_embeds=training.encode_text(pipe, cfg.INSTANCE_PROMPT, "INSTANCE_PROMPT"),
        class_embeds=training.encode_text(pipe, cfg.CLASS_PROMPT, "CLASS_PROMPT"), vae_config=vae.config)
    sample_prompts = [p for p in cfg.SAMPLE_PROMPTS for _ in range(cfg.NUM_SAMPLE_SEEDS)]
    sample_seeds = [cfg.RANDOM_SEED + i % cfg.NUM_SAMPLE_SEEDS for i in range(len(sample_prompts))]
    sample_embeds = sampling.encode_prompts(pipe, sample_prompts, guidance=cfg.GUIDANCE_SCALE > 1)
    vae.to("cpu"), pipe.text_encoder.to("cpu")
    free_memory()

    lesson.step(5, f"Add rank-{cfg.LORA_RANK} LoRA layers to the UNet's attention (to_q, to_k, to_v, to_out)")
    # (add_lora_and_optimizer, above: freeze the UNet, add LoRA in fp32, AdamW and the LR schedule)
    unet, optimizer, lr_scheduler, lora_config, trainable = add_lora_and_optimizer(cfg, unet, accelerator)
    print(f"  {len(lora.lora_layer_names(unet))} LoRA layers, {sum(p.numel() for p in trainable):,} trainable "
          f"parameters ({sum(p.numel() for p in unet.parameters()):,} in the UNet)")
    state = training.TrainState()
    run_settings = {k: v for k, v in cfg.as_dict().items() if k not in ("RESUME", "DEVICE", "LOG_WITH")}
    run_settings["resolution"] = resolution  # the size it trains at: exercises 1, 2 and the morph compare
    training.register_adapter_checkpointing(
        accelerator, save_adapter=lambda m, d: lora.save_lora(m, d, lora_config, run_settings),
        load_adapter=lora.load_lora_checkpoint, state=state, run=run)
    training.resume(accelerator, run, state, optimizer, lr_scheduler, cfg.LEARNING_RATE)  # (if --resume found one)
    strip = []  # the first sample at each progress step, for the progression strip

    def save_progress_grid(step):
        with training.sampling_mode(accelerator, unet, [vae, pipe.text_encoder]):
            samples, _ = sampling.generate(pipe, sample_prompts, sample_seeds, settings, progress=False,
                                           embeddings=sample_embeds)
        if accelerator.is_main_process:
            grid = figures.save_grid(samples, progress_dir / f"step_{step:05d}.png", cols=cfg.NUM_SAMPLE_SEEDS,
                                     labels=sample_prompts, title=f"LoRA training, step {step}")
            training.log_image(accelerator, "progress_grid", grid, step)  # (and live, LOG_WITH)
        strip.append((step, samples[0]))
        return samples

    lesson.step(6, f"Train for {cfg.MAX_TRAIN_STEPS} steps (Ctrl-C saves a checkpoint and stops)")

    def micro_batch_loss(g, n_inst=cfg.TRAIN_BATCH_SIZE):  # Concept 3's loss (dreambooth_loss, above)
        return dreambooth_loss(unet, noise_scheduler, cache, g, n_inst, cfg.PRIOR_LOSS_WEIGHT, device, weight_dtype)

    training.check_step_memory(micro_batch_loss, cfg.TRAIN_BATCH_SIZE, device)  # (too big: said now, not "Killed")
    training.start_live_log(accelerator, cfg, state.step)  # LOG_WITH: loss, lr and grids, live in OUTPUT_DIR/runs/
    if state.step == 0:
        save_progress_grid(0)
    samples = None
    unet.train()
    with training.StopRequest() as stop, tqdm(total=cfg.MAX_TRAIN_STEPS, initial=state.step, desc="Training",
                                              unit="step", disable=not accelerator.is_local_main_process) as bar:
        while state.step < cfg.MAX_TRAIN_STEPS:
            step, lr = state.step + 1, lr_scheduler.get_last_lr()[0]  # (lr: logged, with the loss)
            # One update: GRADIENT_ACCUMULATION micro-batches of Concept 3's loss (dreambooth_loss, above: noise,
            # timesteps, one UNet call), their gradients summed, then one AdamW and one LR-schedule step.
            losses = training.optimizer_step(accelerator, unet, optimizer, lr_scheduler, micro_batch_loss,
                                             cfg.RANDOM_SEED, step, cfg.GRADIENT_ACCUMULATION, checkpoint_root)
            state.step = step
            state.log(**losses, lr=lr)
            accelerator.log({**losses, "lr": lr}, step=step)  # the same, live (LOG_WITH)
            bar.set_postfix(loss=f"{losses['total']:.4f}", refresh=False)
            bar.update()
            if step % cfg.SAMPLE_EVERY == 0 or step == cfg.MAX_TRAIN_STEPS:
                samples = save_progress_grid(step)
            if step % cfg.CHECKPOINT_EVERY == 0 or stop.requested:
                training.save_checkpoint(accelerator, run, step, cfg.CHECKPOINTS_TO_KEEP)
            if stop.requested:  # (checked after the step: a stop always saves one)
                break
    if stop.requested and state.step < cfg.MAX_TRAIN_STEPS:  # Ctrl-C: say how to continue, and stop here
        accelerator.end_training()  # (closes the live log)
        return training.stopped(state, checkpoint_root, cfg.SCRIPT, argv)

    lesson.step(7, "Save the LoRA and the figures")
    trained = accelerator.unwrap_model(unet)
    training.check_weights_finite(trainable, state.step, checkpoint_root)
    run_settings["training_seconds"] = round(state.seconds)  # shown by the TI-vs-LoRA comparison (exercise 3a)
    written = []
    if accelerator.is_main_process:
        written.append(lora.save_lora(trained, lora_dir, lora_config, run_settings))
        # The same LoRA as AUTOMATIC1111 and ComfyUI read it (kohya's layout), beside it.
        kohya = lora.export_kohya(trained, lora.kohya_path(lora_dir), lora_config)
        curves = {"total loss": state.history.get("total", []), "instance loss": state.history.get("instance", [])}
        if cfg.PRIOR_PRESERVATION:
            curves["prior loss"] = state.history.get("prior", [])
        written.append(figures.plot_curves(curves, out_dir / "exercise3b_loss_curves.png", "DreamBooth-LoRA losses"))
        if strip:  # (empty when --resume found the run already finished)
            written.append(figures.save_grid([im for _, im in strip], out_dir / "exercise3b_progression.png",
                                             cols=len(strip), labels=[f"step {s}" for s, _ in strip],
                                             title=repr(sample_prompts[0])))
        # A model card (README.md): what the files are, how they were made, how to load them anywhere.
        written += [kohya, model_card.write_lora_card(lora_dir, run_settings, kohya,
                                                      preview=out_dir / "exercise3b_progression.png")]
    accelerator.wait_for_everyone()
    accelerator.end_training()  # (closes the live log; last, as it ends the processes' group under accelerate launch)

    elapsed = time.perf_counter() - started
    print(f"\nDone in {elapsed:.0f} s.")
    lesson.print_files(written + [progress_dir])
    print(f"\nUse it: python exercise1_generate.py   (or in Python: pipe.load_lora_weights('{lora_dir}'))")
    frozen = [p for p in trained.parameters() if not p.requires_grad]  # the UNet's own weights, not the LoRA's
    lesson.print_reflection(REFLECTION, lora_file_size=lesson.file_size(lora_dir / lora.WEIGHT_NAME),
                            lora_numbers=f"{sum(p.numel() for p in trainable):,}",
                            unet_size=human_size(sum(p.numel() * p.element_size() for p in frozen)),
                            unet_numbers=f"{sum(p.numel() for p in frozen):,}")
    return SimpleNamespace(stopped=False, lora_file=written[0] if written else None, samples=samples,
                           history=state.history, sample_prompts=sample_prompts, sample_seeds=sample_seeds,
                           settings=settings,
                           seconds=elapsed)


def main(argv=None) -> int:
    """The command line: run the lesson; the exit code is 0 when training finished, 130 after Ctrl-C."""
    return 130 if train(argv).stopped else 0


if __name__ == "__main__":
    lesson.run(main)
