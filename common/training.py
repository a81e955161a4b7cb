"""Training-loop machinery shared by exercise 3a (Textual Inversion) and 3b (LoRA).

The loop itself - noise, timesteps, UNet call, loss - stays visible in the lesson scripts. What
lives here is what makes it cheap and safe:

- the VAE and the text encoder run once, before the loop: images become cached latent
  distributions (flipped copies too, for flip augmentation), prompts become cached embeddings;
- each step draws its data, noise and timesteps from a generator seeded by (seed, step), so a
  resumed run continues exactly as an uninterrupted one would;
- checkpoints (adapter weights + optimizer + LR scheduler + step) are written with accelerate into a
  temporary folder and renamed into place; the last few are kept;
- Ctrl-C finishes the current step, saves, and prints the command that resumes;
- a NaN or infinite loss stops the run before it can overwrite a good checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from common.errors import LessonError, brief
from common.files import fault_point

NAN_FAULT_ENV = "DREAMBOOTH_INJECT_NAN_AT_STEP"  # tests: "5" makes step 5's loss NaN, "5:inf" infinite


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
def encode_text(pipe, prompt: str) -> torch.Tensor:
    """The text encoder's output for one prompt, shape (1, 77, width): the UNet's cross-attention input."""
    from common.sampling import check_prompt_lengths

    check_prompt_lengths(pipe, [prompt])
    embeds, _ = pipe.encode_prompt(prompt, pipe.text_encoder.device, 1, False)
    return embeds


def step_generator(seed: int, step: int, process_index: int = 0, micro_step: int = 0) -> torch.Generator:
    """The random stream for one (micro-)step: resumable without saving any RNG state."""
    return torch.Generator("cpu").manual_seed(
        (seed * 1_000_003 + step * 1009 + micro_step * 17 + process_index * 7_919_993) % (2**63))


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


def check_finite(loss: torch.Tensor, step: int, checkpoint_dir) -> None:
    """Stop at once on a NaN/inf loss: continuing would only write broken weights over good ones."""
    at, _, value = os.environ.get(NAN_FAULT_ENV, "").partition(":")
    if at == str(step):
        loss = loss * float(value or "nan")
    if not torch.isfinite(loss).all():
        raise LessonError(f"The loss became {loss.item()} at step {step}, so training stopped (nothing was "
                          f"saved over your checkpoints in '{checkpoint_dir}/'). Lower LEARNING_RATE (e.g. by 10x), "
                          "or use MIXED_PRECISION = 'no' or 'bf16' instead of 'fp16', then run again with --resume.")


# --------------------------------------------------------------------------- checkpoints
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


def register_adapter_checkpointing(accelerator, save_adapter, load_adapter) -> None:
    """Make ``accelerator.save_state`` store only the trained adapter, not the whole frozen UNet.

    ``save_adapter(model, folder)`` writes the adapter of one prepared model; ``load_adapter(model,
    folder)`` reads it back. Optimizer, scheduler and custom objects are saved by accelerate itself.
    """
    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                save_adapter(accelerator.unwrap_model(model), output_dir)
        weights.clear()

    def load_hook(models, input_dir):
        while models:
            load_adapter(accelerator.unwrap_model(models.pop()), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_dirs(root) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.glob("checkpoint-*") if p.is_dir()) if root.is_dir() else []


def save_checkpoint(accelerator, root, step: int, keep: int) -> Path:
    """accelerate ``save_state`` into a temporary folder, renamed into place; keep the newest ``keep``."""
    root = Path(root)
    final, partial = root / f"checkpoint-{step:06d}", root / f".checkpoint-{step:06d}.partial"
    if accelerator.is_main_process:
        for stale in root.glob(".checkpoint-*.partial"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fault_point(final)  # (tests: killed with everything written, before the rename)
        if final.exists():  # the same step saved again (after a resume): the new one is as good
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in checkpoint_dirs(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, root, state: TrainState) -> bool:
    """Load the newest checkpoint under ``root`` into the prepared objects. False when there is none."""
    found = checkpoint_dirs(root)
    if not found:
        print(f"  --resume: no checkpoint in '{root}/' yet; starting from step 0.")
        return False
    try:
        accelerator.load_state(str(found[-1]))
    except LessonError:
        raise
    except Exception as exc:  # noqa: BLE001 - damaged files, or settings changed since the save
        before = f" ('{found[-2]}')" if len(found) > 1 else ""
        raise LessonError(
            f"--resume could not load the checkpoint '{found[-1]}' ({brief(exc)}). If you changed "
            "a setting since it was saved (LORA_RANK, NUM_VECTORS, MODEL_ID, ...), change it back; if its files are "
            f"damaged, delete that folder to resume from the one before{before}; or run without --resume to start "
            "afresh.") from exc
    print(f"  Resumed from '{found[-1]}' at step {state.step}.")
    return True


class StopRequest:
    """Ctrl-C asks the loop to stop after the current step (and save); a second Ctrl-C quits at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n  Ctrl-C: finishing this step and saving a checkpoint (press Ctrl-C again to quit without saving)...",
              flush=True)

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# --------------------------------------------------------------------------- around the loop
@contextmanager
def sampling_mode(model, helpers, device):
    """Switch the trained model to eval and bring the VAE/text encoder back to ``device`` while sampling."""
    from diffusers.training_utils import offload_models

    model.eval()
    try:
        with offload_models(*helpers, device=device):
            yield
    finally:
        model.train()


class ProgressBar:
    """A tqdm bar over optimizer steps that shows the latest loss: ``bar.update(1, loss=0.12)``."""

    def __init__(self, start: int, total: int, desc: str = "Training", enabled: bool = True):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=start, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)

    def update(self, n: int = 1, **values: float) -> None:
        self._bar.set_postfix({k: f"{v:.4f}" for k, v in values.items()}, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


@contextmanager
def progress(start: int, total: int, accelerator):
    """A ``ProgressBar`` on the main process only, closed at the end of the ``with`` block."""
    bar = ProgressBar(start, total, enabled=accelerator.is_local_main_process)
    try:
        yield bar
    finally:
        bar.close()
