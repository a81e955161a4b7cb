"""Training-loop machinery shared by exercise 3a (Textual Inversion) and 3b (LoRA).

The loop itself - noise, timesteps, UNet call, loss - stays visible in the lesson scripts. What
lives here is what makes it cheap and safe:

- the VAE and the text encoder run once, before the loop: images become cached latent
  distributions (flipped copies too, for flip augmentation), prompts become cached embeddings;
- each step draws its data, noise and timesteps from a generator seeded by (seed, step), so a
  resumed run continues exactly as an uninterrupted one would;
- checkpoints (adapter weights + optimizer + LR scheduler, and the step and loss history as JSON)
  are written with accelerate into a temporary folder and renamed into place; the last few are kept;
- the checkpoints belong to one run (``run.json``): a fresh run moves an earlier run's aside, --resume
  continues only a run with the same fixed settings (and names the pictures added, removed or edited since
  its checkpoint), and a lock keeps a second training out;
- nothing read back can run code: no pickled objects are saved, and pickles are read weights-only;
- Ctrl-C (or SIGTERM/SIGHUP) finishes the current step, saves, and prints the command that resumes;
- a NaN or infinite loss, or weights, stop the run before they can overwrite a good checkpoint;
- LOG_WITH: accelerate's trackers (TensorBoard, or W&B) show the loss, learning rate and progress grids
  live, each run in a folder of its own under OUTPUT_DIR/runs/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from common import files, folder_lock, lesson, pickles
from common.errors import LessonError, brief, warn
from common.files import save_json
from common.lesson import dashed


# --------------------------------------------------------------------------- step 1
def load_base_model(cfg, run: Run | None = None):
    """Step 1 of both training scripts: the device and precision (DEVICE, MIXED_PRECISION) as an accelerate
    ``Accelerator`` (one GPU, or several under ``accelerate launch``; its trackers log to LOG_WITH, in
    OUTPUT_DIR/runs/), then MODEL_ID on it, its frozen parts in the training dtype, and the noise scheduler
    the loss trains against: DDPM, the forward process (a model whose prediction type the loss cannot train is
    refused now, not after minutes). Returns ``(accelerator, pipe, noise_scheduler, resolution)``: RESOLUTION
    or the model's own, which ``run`` (``begin_run``) keeps, and a resumed run must match."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration
    from diffusers import DDPMScheduler

    from common import device, models, sampling

    runtime = device.pick_runtime(cfg.DEVICE, cfg.MIXED_PRECISION, training=True)
    # accelerate keeps one precision per Python process; a second lesson in the same notebook kernel may ask for
    # another (the processes' group itself, PartialState, is kept)
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=runtime.mixed_precision, cpu=runtime.device.type == "cpu",
                              gradient_accumulation_steps=cfg.GRADIENT_ACCUMULATION, log_with=cfg.LOG_WITH,
                              project_config=ProjectConfiguration(project_dir=cfg.OUTPUT_DIR,
                                                                  logging_dir=str(Path(cfg.OUTPUT_DIR) / RUNS_DIR)))
    print(f"  Model: {models.describe_source(cfg.MODEL_ID)}")
    pipe = models.load_pipeline(cfg.MODEL_ID, dtype=weight_dtype(accelerator)).to(accelerator.device)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # (before the sampler replaces it)
    prediction_type(noise_scheduler)
    sampling.use_multistep_solver(pipe)  # (for the progress grids)
    models.check_resolution(cfg.RESOLUTION, pipe)
    resolution = cfg.RESOLUTION or models.native_resolution(pipe)
    if run is not None and "RESOLUTION" in run.fixed:
        _settle_resolution(run, resolution, models.native_resolution(pipe))
    return accelerator, pipe, noise_scheduler, resolution


# --------------------------------------------------------------------------- computed once, before the loop
@torch.no_grad()
def cache_latent_distributions(vae, pixels: torch.Tensor, flip: bool, batch_size: int = 4) -> torch.Tensor:
    """Encode images once. Returns the VAE's latent distribution parameters (mean and log-variance).

    With ``flip``, the mirrored images are encoded too (rows N..2N-1), so flip augmentation costs no
    VAE pass during training. A fresh latent is *sampled* from these each step, as encoding would.
    """
    if flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    device, dtype = vae.device, vae.dtype
    params = [vae.encode(pixels[i:i + batch_size].to(device, dtype)).latent_dist.parameters
              for i in range(0, len(pixels), batch_size)]
    return torch.cat(params).float()


def sample_latents(distribution_params: torch.Tensor, generator: torch.Generator, vae_config) -> torch.Tensor:
    """Draw latents from cached distributions and scale them as the UNet was trained to see them."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    latents = DiagonalGaussianDistribution(distribution_params).sample(generator=generator)
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


@torch.no_grad()
def encode_text(pipe, prompt: str, name: str | None = None) -> torch.Tensor:
    """The text encoder's output for one prompt, shape (1, 77, width): the UNet's cross-attention input. ``name``:
    the constant the prompt came from, named if it is too long."""
    from common.sampling import check_prompt_lengths

    check_prompt_lengths(pipe, [prompt], name)
    embeds, _ = pipe.encode_prompt(prompt, pipe.text_encoder.device, 1, False)
    return embeds


def step_generator(seed: int, step: int, process_index: int = 0, micro_step: int = 0) -> torch.Generator:
    """The random stream for one (micro-)step: resumable without saving any RNG state."""
    return torch.Generator("cpu").manual_seed(
        (seed * 1_000_003 + step * 1009 + micro_step * 17 + process_index * 7_919_993) % (2**63))


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype for the frozen models' weights, from the accelerator's mixed precision (as diffusers'
    training examples choose it). The trained LoRA or embedding stays fp32 whatever this is."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def prediction_type(noise_scheduler) -> str:
    """What the UNet learned to predict, from its scheduler's config: the noise itself ("epsilon", SD 1.x)
    or the velocity ("v_prediction", SD 2.x at 768 px). Anything else is refused (scripts ask at load time,
    so the refusal comes before the class images and the first step)."""
    kind = noise_scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise LessonError(f"This model predicts {kind!r}, which the lesson's loss does not handle (epsilon or "
                          "v_prediction). Use a Stable Diffusion 1.x or 2.x model (MODEL_ID).")
    return kind


def diffusion_target(noise_scheduler, latents, noise, timesteps) -> torch.Tensor:
    """The loss's target for ``noise`` added to ``latents`` at ``timesteps``: what the UNet should predict."""
    if prediction_type(noise_scheduler) == "epsilon":
        return noise
    return noise_scheduler.get_velocity(latents, noise, timesteps)


def make_optimizer(params, learning_rate: float, use_8bit_adam: bool = False, weight_decay: float = 1e-2):
    """AdamW, or bitsandbytes' 8-bit AdamW (optional dependency) to save GPU memory."""
    if use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise LessonError("USE_8BIT_ADAM = True needs bitsandbytes: 'pip install bitsandbytes' "
                              "(NVIDIA GPUs), or set USE_8BIT_ADAM = False.") from None
        return bnb.optim.AdamW8bit(params, lr=learning_rate, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)


def _not_finite(what: str, step: int, checkpoint_dir) -> LessonError:
    return LessonError(f"{what} at step {step}, so training stopped (nothing was saved over your checkpoints in "
                       f"'{checkpoint_dir}/'). Lower LEARNING_RATE (e.g. by 10x), or use MIXED_PRECISION = 'no' or "
                       "'bf16' instead of 'fp16', then run again with --resume (it continues from the last good "
                       "checkpoint at the new rate).")


def check_finite(loss: torch.Tensor, step: int, checkpoint_dir) -> None:
    """Stop at once on a NaN/inf loss: continuing would only write broken weights over good ones."""
    if not torch.isfinite(loss).all():
        raise _not_finite(f"The loss became {loss.item()}", step, checkpoint_dir)


def check_weights_finite(params, step: int, checkpoint_dir) -> None:
    """Refuse to save weights holding NaN/inf (a finite loss can still end in an infinite update)."""
    if not all(torch.isfinite(p).all() for p in params):
        raise _not_finite("The trained weights became NaN or infinite", step, checkpoint_dir)


# --------------------------------------------------------------------------- checkpoints
RUN_FILE = "run.json"  # in the checkpoints folder: which run its checkpoints belong to
STATE_FILE = "train_state.json"  # in each checkpoint: step, loss history, seconds, the settings and pictures in force


class TrainState:
    """What accelerate does not know about: the step reached, the loss history (for the curves) and
    ``seconds``, the wall-clock training time (summed over resumed runs, for the file's header)."""

    def __init__(self):
        self.step = 0
        self.history: dict[str, list[float]] = {}
        self.seconds = 0.0
        self._clock = time.perf_counter()

    def log(self, **values: float) -> None:
        """Record one step's values; the time since the previous step (or since training started or
        resumed, progress grids included) is added to ``seconds``."""
        now = time.perf_counter()
        self.seconds, self._clock = self.seconds + now - self._clock, now
        for name, value in values.items():
            self.history.setdefault(name, []).append(float(value))

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history = int(state["step"]), {k: list(v) for k, v in state["history"].items()}
        self.seconds, self._clock = float(state.get("seconds", 0.0)), time.perf_counter()


def optimizer_step(accelerator, trained, optimizer, lr_scheduler, loss_fn, seed: int, step: int,
                   accumulation: int, checkpoint_dir) -> dict[str, float]:
    """One optimizer update, the same in exercise 3a, 3b and bench/bench_train.py.

    ``loss_fn(g)`` is the lesson's loss on one micro-batch, every random draw taken from ``g``; it returns
    a dict of losses whose *first* entry is the one that trains (the others are only logged). Its
    gradients are summed over ``accumulation`` micro-batches (accelerate's ``accumulate``), then AdamW
    and the learning-rate schedule step once. Returns each loss averaged over the micro-batches, for the log.
    """
    losses = []
    for micro in range(accumulation):
        with accelerator.accumulate(trained):
            micro_losses = loss_fn(step_generator(seed, step, accelerator.process_index, micro))
            loss = next(iter(micro_losses.values()))
            check_finite(loss, step, checkpoint_dir)
            accelerator.backward(loss)
            optimizer.step()  # accelerate applies it once all micro-batches are summed
            lr_scheduler.step()
            optimizer.zero_grad()
            losses.append({name: value.detach() for name, value in micro_losses.items()})
    return mean_losses(losses)


def mean_losses(micro_batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each loss averaged over one step's micro-batches (``[{"total": loss.detach(), ...}, ...]``): the
    number to log for the step, as its update follows the mean of their gradients. The losses stay on
    their device until here, so a GPU waits for them once a step, not once a micro-batch."""
    return {name: torch.stack([torch.as_tensor(m[name]).detach().float() for m in micro_batches]).mean().item()
            for name in micro_batches[0]}


# --------------------------------------------------------------------------- memory, before the first step
# On a Linux CPU a process that runs out of memory is stopped by the kernel without a word ("Killed"); a GPU, Windows
# and macOS raise an error the scripts explain (lesson.explain). So on a Linux CPU the need is measured first.
BACKWARD_FACTOR = 2.5  # the backward pass holds about as much again as the forward pass saves (measured 2.1-2.3x)


def available_memory() -> int | None:
    """Bytes this process may still use: the kernel's MemAvailable, less any container (cgroup v2) limit's
    headroom; None where neither can be read (not Linux)."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max" and free is not None:
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def saved_bytes(loss_fn, batch_size: int) -> int:
    """What autograd keeps for the backward pass of one micro-batch of ``batch_size`` (``loss_fn(g, n)``):
    the forward pass alone is run, its graph dropped. Tensors sharing the model's weights count once."""
    seen, total = set(), 0

    def keep(tensor):
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss_fn(step_generator(0, 0), batch_size)
    return total


def check_step_memory(loss_fn, batch_size: int, device, constant: str = "TRAIN_BATCH_SIZE") -> None:
    """Refuse, before the first step, a micro-batch that needs more memory than this computer has free.

    Only on a CPU under Linux (see above). ``loss_fn(g, n)`` is the lesson's loss on a micro-batch of ``n``
    pictures; one picture's share is the difference between micro-batches of 2 and of 1 (the weights cancel
    out), scaled to ``batch_size`` and by ``BACKWARD_FACTOR`` for the backward pass."""
    if torch.device(device).type != "cpu" or (free := available_memory()) is None:
        return
    per_picture = BACKWARD_FACTOR * max(saved_bytes(loss_fn, 2) - saved_bytes(loss_fn, 1), 0)
    if per_picture * batch_size <= free:
        return
    need = (f"{constant} = {batch_size} needs about {files.human_size(per_picture * batch_size)} of memory for one "
            f"training step (about {files.human_size(per_picture)} more for each 1 added to it), and this computer has "
            f"{files.human_size(free)} free.")
    safe = int(free // max(per_picture, 1)) // 2  # (half of what fits: the measure is an estimate)
    if safe >= 1:
        raise LessonError(f"{need} Use {constant} = {safe} or less ({dashed(constant)} {safe}) and raise "
                          "GRADIENT_ACCUMULATION for the same effective batch.")
    raise LessonError(f"{need} Even one picture is too many: use a smaller RESOLUTION (--resolution 256), close "
                      "other programs, or train on a GPU.")


@dataclass
class Run:
    """One training run's claim on its checkpoints folder (``begin_run``)."""

    root: Path
    script: str
    id: str
    fixed: dict  # the settings a resumed run must share (LORA_RANK, MODEL_ID, ...)
    settings: dict  # every setting of this session, as JSON stores it
    resume_from: Path | None = None  # the checkpoint --resume continues (None: start at step 0)
    saved_state: dict = field(default_factory=dict)  # its train_state.json
    # RESOLUTION None is the model's own size, known once it has loaded: a resumed run's, to compare then
    resolution_was: list = field(default_factory=list)  # ([its RESOLUTION] when only the model can tell)
    pictures: dict = field(default_factory=dict)  # TRAINING_IMAGES_DIR's picture files: name -> digest of the bytes


def _settle_resolution(run: Run, resolution: int, native: int) -> None:
    """Keep the size the run trains at (run.json), and refuse a --resume at another size than its run's.
    None and the model's own size are one size: 64 after None on a 64 px model resumes."""
    if run.resolution_was and (run.resolution_was[0] or native) != resolution:
        raise LessonError(f"--resume: the run in '{run.root}/' was trained at another size, which cannot change "
                          f"mid-run: RESOLUTION {run.resolution_was[0] or native} -> {resolution} (the model's own "
                          f"size is {native}). Change it back to resume it, or {AFRESH}.")
    run.fixed["RESOLUTION"] = resolution


def _as_json(value):
    return json.loads(json.dumps(value, default=str))  # (tuples become lists, as they come back from a file)


def _read_json(path: Path, advice: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not data:
            raise ValueError("not the object this script writes")
        return data
    except (OSError, ValueError) as exc:
        raise LessonError(f"--resume could not read '{path}' ({brief(exc)}). {advice}") from exc


AFRESH = "run without --resume to start afresh (the old checkpoints are then moved aside, not deleted)"


def training_pictures(folder) -> dict[str, str]:
    """Each picture file the training reads from ``folder`` (``images.list_image_files``): name -> a digest of its
    bytes, kept in every checkpoint so that --resume can tell added, removed and edited pictures."""
    import hashlib

    from common.images import list_image_files

    digests = {}
    for path in list_image_files(folder):
        with open(path, "rb") as f:
            digests[path.name] = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    return digests


def _pictures_changed(run: Run, folder) -> None:
    """Warn when a resumed run's pictures are not the ones its checkpoint trained on: the rest of the run trains on
    the folder as it is now, which the student may not have meant (a photo moved out for a moment, or edited)."""
    before = run.saved_state.get("pictures")
    if not isinstance(before, dict) or before == run.pictures:  # (a checkpoint of before this record: nothing to say)
        return

    def names(found: list[str]) -> str:
        return ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")

    parts = [f"{len(found)} {what} ({names(found)})" for what, found in (
        ("removed", sorted(set(before) - set(run.pictures))), ("added", sorted(set(run.pictures) - set(before))),
        ("edited", sorted(n for n in set(before) & set(run.pictures) if before[n] != run.pictures[n]))) if found]
    warn(f"--resume: the pictures in '{folder}/' changed since step {run.saved_state.get('step')}: "
         f"{'; '.join(parts)}. The rest of the run trains on the pictures as they are now. Put them back as they were "
         f"to continue on the same pictures, or {AFRESH}.")


def begin_run(cfg, root, fixed: tuple[str, ...], folder_option: str) -> Run:
    """Claim the checkpoints folder ``root`` (one training at a time) and decide what --resume continues.

    Called before any model loads, so a refused --resume costs nothing: an old-layout checkpoint
    (pickled step counter), another script's run, or a change to one of the ``fixed`` settings.
    Changes to the others (LEARNING_RATE, MAX_TRAIN_STEPS, ...) are listed, and take effect.
    """
    root = Path(root)
    if int(os.environ.get("RANK", "0")) == 0:  # (under accelerate launch, the first process speaks for all)
        folder_lock.claim(root, cfg.SCRIPT, folder_option)
    settings = _as_json({k: v for k, v in cfg.as_dict().items() if k not in ("RESUME", "DEBUG")})
    run = Run(root, cfg.SCRIPT, uuid.uuid4().hex[:12], {k: settings[k] for k in fixed}, settings)
    run.pictures = training_pictures(cfg.TRAINING_IMAGES_DIR)
    own_crop = None
    if "CROP_FRACTION" in run.fixed:  # None is the model's own (the pocket card's 0.25): one crop, however written
        from common.models import native_crop_fraction

        own_crop = native_crop_fraction(cfg.MODEL_ID)
        run.fixed["CROP_FRACTION"] = run.fixed["CROP_FRACTION"] or own_crop
    found = checkpoint_dirs(root) if cfg.RESUME else []
    if cfg.RESUME and not found:
        print(f"  --resume: no checkpoint in '{root}/' yet; starting from step 0.")
    if not found:
        return run
    latest = found[-1]
    pickles = sorted(p.name for p in latest.glob("custom_checkpoint_*.pkl"))
    missing = [f"no {p.name}" for p in (root / RUN_FILE, latest / STATE_FILE) if not p.is_file()]
    if pickles:  # (never handed to accelerate, which would unpickle custom_checkpoint_0.pkl)
        raise LessonError(f"--resume refused '{latest}' for safety: it is a checkpoint in the old layout "
                          f"({', '.join(pickles + missing)}), which keeps its step counter in a pickle that could run "
                          f"code when loaded, so nothing in it was read. Please {AFRESH}.")
    if not (latest / STATE_FILE).is_file():  # (saves are atomic: a file deleted or moved by hand)
        earlier = (f"delete the folder '{latest}' to resume from '{found[-2].name}', or "
                   if len(found) > 1 else "")
        raise LessonError(f"--resume: '{latest}' has no {STATE_FILE} (deleted or moved?), so its step and "
                          f"settings are unknown. Please {earlier}{AFRESH}.")
    if not (root / RUN_FILE).is_file():
        raise LessonError(f"--resume: '{root}/' has no {RUN_FILE} (deleted or moved?), which says which run and fixed "
                          f"settings its checkpoints belong to, so they cannot be continued safely. Put it back, or "
                          f"{AFRESH}.")
    saved = _read_json(root / RUN_FILE, f"Please {AFRESH}.")
    if saved.get("script") != cfg.SCRIPT:
        raise LessonError(f"The checkpoints in '{root}/' were made by {saved.get('script')}, not {cfg.SCRIPT}. Set "
                          f"{folder_option} to a folder of its own ({dashed(folder_option)}).")
    was = saved.get("fixed", {})
    if own_crop is not None:  # (a run.json of before kept None)
        was = {**was, "CROP_FRACTION": was.get("CROP_FRACTION") or own_crop}
    if "RESOLUTION" in run.fixed and (run.fixed["RESOLUTION"] is None) != (was.get("RESOLUTION") is None):
        run.resolution_was = [was.get("RESOLUTION")]  # (None: the model's own; load_base_model compares the two)
    changed = [f"{k} {was.get(k)!r} -> {v!r}" for k, v in run.fixed.items()
               if was.get(k) != v and not (k == "RESOLUTION" and run.resolution_was)]
    if changed:
        raise LessonError(f"--resume: the run in '{root}/' was trained with other settings, which cannot change "
                          f"mid-run: {', '.join(changed)}. Change them back to resume it, or {AFRESH}.")
    run.id, run.resume_from = saved.get("id"), latest
    run.saved_state = _read_json(latest / STATE_FILE, f"Delete the folder '{latest}' to resume from the one before, "
                                                      f"or {AFRESH}.")
    done = run.saved_state.get("step")
    if isinstance(done, int) and done > cfg.MAX_TRAIN_STEPS:  # (nothing to train, and its weights are not step M's)
        raise LessonError(f"--resume: the run in '{root}/' has already trained {done} steps, more than "
                          f"MAX_TRAIN_STEPS = {cfg.MAX_TRAIN_STEPS}. Pass --max-train-steps {done} or more to "
                          f"train it further (its weights at step {done} are in '{latest}'), or {AFRESH}.")
    _pictures_changed(run, cfg.TRAINING_IMAGES_DIR)
    before = run.saved_state.get("settings", {})
    news = [f"{k} {before[k]!r} -> {v!r}" for k, v in settings.items()
            if k in before and before[k] != v and k not in run.fixed]  # (the fixed ones are the same, or refused)
    if news:
        print(f"  --resume with new settings (in effect after step {run.saved_state.get('step')}): {', '.join(news)}")
    return run


# --------------------------------------------------------------------------- saving and loading
def register_adapter_checkpointing(accelerator, save_adapter, load_adapter, state: TrainState, run: Run) -> None:
    """Make ``accelerator.save_state`` store only the trained adapter (not the whole frozen UNet) and
    ``state`` as JSON (not a pickle, which could run code when read back).

    ``save_adapter(model, folder)`` writes the adapter of one prepared model; ``load_adapter(model,
    folder)`` reads it back. Optimizer and LR scheduler are saved by accelerate itself.
    """
    def save_hook(models, weights, output_dir):
        weights.clear()
        for model in models:  # (every process holds the same weights)
            check_weights_finite([p for p in model.parameters() if p.requires_grad], state.step, run.root)
        if accelerator.is_main_process:
            for model in models:
                save_adapter(accelerator.unwrap_model(model), output_dir)
            save_json({**state.state_dict(), "run_id": run.id, "settings": run.settings, "pictures": run.pictures},
                      Path(output_dir) / STATE_FILE)

    def load_hook(models, input_dir):
        while models:
            load_adapter(accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_dirs(root) -> list[Path]:
    """This course's checkpoints in ``root``, oldest first: checkpoint-NNNNNN folders (save_checkpoint's names:
    the step, at least six digits). Other "checkpoint-..." folders (a copy, diffusers' checkpoint-500) are not
    ours: --resume does not pick them, and keeping the newest never deletes them."""
    root = Path(root)
    ours = [p for p in root.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d{6,}", p.name) and p.is_dir()] \
        if root.is_dir() else []
    return sorted(ours, key=lambda p: int(p.name.removeprefix("checkpoint-")))  # (step 1,000,000 has 7 digits)


def _set_aside_earlier_run(run: Run) -> None:
    """On a fresh run's first save: move another run's checkpoints into previous-run-N/ (never deleted;
    --resume never looks there), and write this run's run.json."""
    try:
        owner = json.loads((run.root / RUN_FILE).read_text(encoding="utf-8")).get("id")
    except (OSError, ValueError):
        owner = None
    if owner == run.id:
        return
    earlier = checkpoint_dirs(run.root)
    if earlier:
        n = 1
        while (run.root / f"previous-run-{n}").exists():
            n += 1
        aside = run.root / f"previous-run-{n}"
        aside.mkdir()
        for path in earlier + [p for p in [run.root / RUN_FILE] if p.exists()]:
            os.replace(path, aside / path.name)
        print(f"\n  This is a new run, so the checkpoints of the earlier one were moved to '{aside}/' "
              "(--resume never picks them; delete that folder when you no longer need it).", flush=True)
    save_json({"id": run.id, "script": run.script, "fixed": run.fixed}, run.root / RUN_FILE)


def save_checkpoint(accelerator, run: Run, step: int, keep: int) -> Path:
    """accelerate ``save_state`` into a temporary folder, renamed into place; keep the newest ``keep``.

    (Not accelerate's own rotation, ``ProjectConfiguration(total_limit=...)``: it deletes the oldest
    checkpoint *before* writing the new one and numbers folders by save, not by step, so a crash while
    saving would leave fewer good checkpoints, and a resumed run's numbers would not say its step.)"""
    root = run.root
    final, partial = root / f"checkpoint-{step:06d}", root / f".checkpoint-{step:06d}.partial"
    if accelerator.is_main_process:
        for stale in root.glob(".checkpoint-*.partial"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _set_aside_earlier_run(run)  # (only now: a fresh run that fails before its first checkpoint moves nothing)
        files.commit(partial, final)  # (replacing the same step saved before a resume: the new one is as good)
        for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, run: Run, state: TrainState, optimizer, lr_scheduler, learning_rate: float) -> bool:
    """Load the checkpoint ``begin_run`` chose into the prepared objects, then apply LEARNING_RATE.
    False when there is none."""
    folder = run.resume_from
    if folder is None:
        return False
    found = checkpoint_dirs(run.root)
    before = f" ('{found[-2]}')" if len(found) > 1 else ""
    advice = f"Delete the folder '{folder}' to resume from the one before{before}, or run without --resume."
    try:
        for file in sorted(folder.iterdir()):  # refuse a file that would run code before accelerate reads any
            if file.suffix in pickles.PICKLE_SUFFIXES:
                pickles.load(file, advice)
        accelerator.load_state(str(folder), load_kwargs={"weights_only": True})
        # accelerate restores its count of micro-batches and updates whenever it divides by GRADIENT_ACCUMULATION: a
        # checkpoint lies between two updates, so the count starts again, whatever accumulation made it
        accelerator.step = 0
        state.load_state_dict(run.saved_state)
    except LessonError:
        raise
    except Exception as exc:  # noqa: BLE001 - damaged files
        raise LessonError(
            f"--resume could not load the checkpoint '{folder}' ({brief(exc)}). Its files are damaged: delete that "
            f"folder to resume from the one before{before}, or run without --resume to start afresh.") from exc
    apply_learning_rate(optimizer, lr_scheduler, learning_rate)
    print(f"  Resumed from '{folder}' at step {state.step}.")
    return True


def apply_learning_rate(optimizer, lr_scheduler, learning_rate: float) -> None:
    """Make ``learning_rate`` the rate from now on, on this run's schedule.

    Loading a checkpoint restores the old rate (in the optimizer's param groups and the scheduler's
    ``base_lrs``); a student who lowered LEARNING_RATE after a NaN must get the new one. The schedule's
    shape is the one built for this run (a LambdaLR's function is not saved), so a new MAX_TRAIN_STEPS
    or warm-up takes effect too.
    """
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # (accelerate wraps it)
    scheduler.base_lrs = [learning_rate] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = learning_rate, learning_rate * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# --------------------------------------------------------------------------- the live log (LOG_WITH)
RUNS_DIR = "runs"  # in OUTPUT_DIR: one folder per run, which TensorBoard shows side by side
LOG_WITH_CHOICES = ("tensorboard", "wandb", None)
WANDB_PROJECT = "dreambooth-fabric"  # (W&B groups runs by project; TensorBoard by folder)


def check_train_batch(cfg) -> None:
    """TRAIN_BATCH_SIZE is at most ``lesson.MAX_TRAIN_BATCH``, on every computer, before any model loads."""
    lesson.require_int(cfg, "TRAIN_BATCH_SIZE", maximum=lesson.MAX_TRAIN_BATCH, advice=(
        f"For a larger effective batch, raise GRADIENT_ACCUMULATION instead ({dashed('GRADIENT_ACCUMULATION')} N): "
        "it averages N micro-batches into one update, in the memory of one."))


def check_schedule(cfg) -> None:
    """Warn, before any model loads, when the learning-rate constants will not do what they say: diffusers'
    "constant" schedule has no warm-up, and a warm-up as long as the run never reaches LEARNING_RATE."""
    if cfg.LR_WARMUP_STEPS > 0 and cfg.LR_SCHEDULER == "constant":
        warn(f"LR_WARMUP_STEPS is {cfg.LR_WARMUP_STEPS}, but LR_SCHEDULER 'constant' has no warm-up, so it is ignored. "
             f"Set {dashed('LR_SCHEDULER')} constant_with_warmup (or linear, cosine) to warm up.")
    elif cfg.LR_WARMUP_STEPS >= cfg.MAX_TRAIN_STEPS > 0:
        warn(f"LR_WARMUP_STEPS ({cfg.LR_WARMUP_STEPS}) is not below MAX_TRAIN_STEPS ({cfg.MAX_TRAIN_STEPS}): the "
             f"learning rate never reaches LEARNING_RATE ({cfg.LEARNING_RATE:g}). A warm-up of a tenth of the run "
             "or less is usual.")


def check_log_with(cfg) -> None:
    """LOG_WITH, checked before any model loads: "tensorboard" (the default; when tensorboard is not
    installed, a warning and no live log), "wandb" (which must be installed) or None (off)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    lesson.require_choice(cfg, "LOG_WITH", LOG_WITH_CHOICES)
    if cfg.LOG_WITH == "wandb" and not is_wandb_available():
        raise LessonError("LOG_WITH = 'wandb' needs Weights & Biases: 'pip install wandb' (then 'wandb login'), or "
                          f"set LOG_WITH = 'tensorboard' or None (--log-with none) in {cfg.SCRIPT}.")
    if cfg.LOG_WITH == "tensorboard" and not is_tensorboard_available():
        warn("LOG_WITH = 'tensorboard', but tensorboard is not installed, so this run is not logged live (the "
             "progress grids and loss curves are saved as always): 'pip install tensorboard', or set LOG_WITH = None.")
        cfg.LOG_WITH = None


def _tracker_value(value):
    """A constant as trackers store settings: numbers, booleans and text as they are, lists as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return " | ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def start_live_log(accelerator, cfg, step: int) -> None:
    """Start LOG_WITH's tracker (accelerate's ``init_trackers``) with the run's settings; the loop then logs
    the loss and learning rate (``accelerator.log``) and every progress grid (``log_image``) into it.

    Each run gets a folder of its own, ``OUTPUT_DIR/runs/<script>-<date>-<time>``. A resumed run too
    (``...-from-step-N``): its steps continue from ``step``, so its curves carry on where the earlier run's
    stopped, beside them. Nothing is started when LOG_WITH is None or no step is left to train.
    """
    if not accelerator.log_with or step >= cfg.MAX_TRAIN_STEPS:
        return
    runs = Path(accelerator.logging_dir)
    name = f"{Path(cfg.SCRIPT).stem.split('_')[0]}-{time.strftime('%Y%m%d-%H%M%S')}" + (
        f"-from-step-{step}" if step else "")
    run_name, n = name, 1
    while (runs / run_name).exists():  # (two runs in the same second)
        n += 1
        run_name = f"{name}-{n}"
    if accelerator.is_main_process:
        runs.mkdir(parents=True, exist_ok=True)
    tensorboard = cfg.LOG_WITH == "tensorboard"
    try:
        accelerator.init_trackers(run_name if tensorboard else WANDB_PROJECT,
                                  config={k: _tracker_value(v) for k, v in cfg.as_dict().items()},
                                  init_kwargs={"wandb": {"name": run_name, "dir": str(runs.resolve())}})  # (its wandb/)
    except Exception as exc:  # W&B: not logged in (outside a terminal it cannot ask), or its server out of reach
        if tensorboard or not type(exc).__module__.startswith("wandb"):
            raise
        raise LessonError(f"LOG_WITH = 'wandb': W&B could not start the run ({str(exc).strip().rstrip('.')}). Log in "
                          "once with 'wandb login', or keep the log on this computer with WANDB_MODE=offline in "
                          "front of the command (upload it later with 'wandb sync'), or set LOG_WITH = 'tensorboard' "
                          f"or None (--log-with none) in {cfg.SCRIPT}, and run again: nothing was trained.") from exc
    where = (f"'{runs / run_name}/'; watch it: tensorboard --logdir {runs}" if tensorboard
             else f"W&B run '{run_name}' in project '{WANDB_PROJECT}'")
    print(f"  Live log (LOG_WITH = {cfg.LOG_WITH!r}): {where}")


def log_image(accelerator, tag: str, path, step: int) -> None:
    """The picture saved at ``path`` (a progress grid) into the live log at ``step``, through the tracker's
    own ``log_images``, and onto the disk at once (as ``accelerator.log`` flushes the numbers)."""
    if not accelerator.trackers:
        return
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":  # (SummaryWriter.add_images takes a batch of arrays)
            tracker.log_images({tag: np.asarray(image)[None]}, step=step, dataformats="NHWC")
            tracker.writer.flush()
        else:
            tracker.log_images({tag: [image]}, step=step)


# --------------------------------------------------------------------------- stopping
STOP_SIGNALS = {"SIGINT": "Ctrl-C", "SIGTERM": "SIGTERM", "SIGHUP": "SIGHUP (the terminal closed)",
                "SIGBREAK": "Ctrl-Break"}


class StopRequest:
    """Ctrl-C, SIGTERM, SIGHUP or SIGBREAK ask the loop to stop after the current step (and save); a second one
    quits at once. (SIGTERM is what a job scheduler or ``kill`` sends; SIGHUP, a closed terminal; SIGBREAK, on
    Windows, Ctrl-Break, which is how the notebook's stop button reaches a script there: Windows has no SIGINT
    to send to another process.)"""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        name = STOP_SIGNALS.get(signal.Signals(signum).name, "A stop signal")
        said = f"\n  {name}: finishing this step and saving a checkpoint (press Ctrl-C again to quit without saving)..."
        try:
            print(said, flush=True)
        except RuntimeError:  # the signal came in the middle of another print to stdout ("reentrant call")
            try:
                os.write(sys.stdout.fileno(), (said + "\n").encode("utf-8", "replace"))
            except (OSError, ValueError):
                pass
        except OSError:  # (no terminal left to print to after SIGHUP)
            pass

    def __enter__(self):
        for name in STOP_SIGNALS:
            if hasattr(signal, name):  # (Windows has no SIGHUP; only Windows has SIGBREAK)
                try:
                    self._previous[name] = signal.signal(getattr(signal, name), self._handler)
                except ValueError:  # not the main thread: signals keep their default behaviour
                    pass
        return self

    def __exit__(self, *exc):
        for name, previous in self._previous.items():
            signal.signal(getattr(signal, name), previous)
        return False


def continue_command(script: str, argv: list[str] | None, shell: str | None = None) -> str:
    """The command that continues this run: the same options, plus --resume, quoted for ``shell``: "posix" (bash,
    zsh, sh), "powershell" or "cmd"; by default this computer's (Windows: PowerShell, the README's terminal)."""
    from common.configurator import NO, YES

    given, args = list(sys.argv[1:] if argv is None else argv), []
    for i, arg in enumerate(given):
        if arg.split("=")[0] in ("--resume", "--no-resume"):
            continue
        if i and given[i - 1] in ("--resume", "--no-resume") and arg.strip().lower() in YES + NO:
            continue  # (its value: "--resume true", as every yes/no option takes one)
        args.append(arg)
    return command_line(["python", script, *args, "--resume"], shell)


_BARE = re.compile(r"[\w\-.:\\/=+]+")  # a word every shell reads as itself, unquoted
_POWERSHELL_SPECIAL = re.compile(r'[$`"]')  # what PowerShell reads inside double quotes (a variable, an escape)


def _cmd_word(word: str) -> str:
    """One word for cmd and a Windows program's own reading of its command line (the C runtime's rules): in double
    quotes unless bare, so that & | < > ^ ( ) , ; and spaces stay in it; \\" for a quote, and the backslashes
    before a quote (or the closing one: C:\\My Dir\\) doubled."""
    if _BARE.fullmatch(word):
        return word
    word = re.sub(r'(\\*)"', r'\1\1\\"', word)
    return '"' + re.sub(r"(\\+)\Z", r"\1\1", word) + '"'


def command_line(words: list[str], shell: str | None = None) -> str:
    """``words`` as a command line to paste into ``shell`` (see continue_command).

    cmd's form pastes into PowerShell too, unless a word holds $, ` or " (which PowerShell reads inside double
    quotes): there PowerShell gets the same line after its stop-parsing token, "python --% ...", which passes the
    rest to the program as cmd would (Windows PowerShell 5.1 and PowerShell 7 alike)."""
    import shlex

    shell = shell or ("powershell" if os.name == "nt" else "posix")
    if shell == "posix":
        return shlex.join(words)
    if shell not in ("cmd", "powershell"):
        raise ValueError(f"shell: 'posix', 'cmd' or 'powershell', not {shell!r}")
    line = " ".join(map(_cmd_word, words))
    if shell == "powershell" and any(_POWERSHELL_SPECIAL.search(w) for w in words[1:]):
        return f"{_cmd_word(words[0])} --% " + " ".join(map(_cmd_word, words[1:]))
    return line


def stopped(state: TrainState, root, script: str, argv: list[str] | None):
    """Say where the checkpoint is and how to continue. Returns what a stopped lesson returns:
    ``stopped=True``, the step reached and the loss history (its main() then exits with 130, as Ctrl-C)."""
    command = continue_command(script, argv)
    if os.name == "nt" and (cmd := continue_command(script, argv, "cmd")) != command:
        command += f"\n  (in cmd: {cmd})"
    print(f"\nStopped at step {state.step}; checkpoint saved in '{root}/'. Continue with:\n  {command}")
    return SimpleNamespace(stopped=True, step=state.step, history=state.history)


# --------------------------------------------------------------------------- around the loop
@contextmanager
def sampling_mode(accelerator, model, helpers):
    """Switch the trained model to eval and bring the VAE/text encoder back to the accelerator's device while
    sampling, under its autocast. (Mixed precision: the prepared model answers in fp32, accelerate's
    ``convert_outputs_to_fp32``, so the sampler's latents turn fp32, and the fp16/bf16 VAE would refuse them
    without autocast; diffusers' training examples draw their validation pictures the same way.)"""
    from diffusers.training_utils import offload_models

    model.eval()
    try:
        with offload_models(*helpers, device=accelerator.device), accelerator.autocast():
            yield
    finally:
        model.train()
