"""FAST_MODE: pictures in about 4 denoising steps instead of 30, for CPU classrooms and quick looks.

Two published add-ons for Stable Diffusion v1.5, used through plain diffusers:

- the **LCM-LoRA** (``latent-consistency/lcm-lora-sdv1-5``): a LoRA distilled so that each UNet call
  jumps most of the way to a clean image. It is *stacked* with the fabric LoRA through diffusers'
  multi-adapter API (two named adapters, ``set_adapters`` with one weight each) and sampled with
  ``LCMScheduler`` in 2-8 steps at guidance 1-2 (guidance 1 also skips the unconditional pass);
- the **tiny autoencoder** TAESD (``madebyollin/taesd``, ``AutoencoderTiny``): decodes latents to
  pixels at a fraction of the full VAE's cost, a little less sharp.

The pictures are rougher than the full sampler's; the fabric LoRA still decides what they show.
Both ids may point at local folders (downloaded once), which is how a classroom without internet uses them.
"""

from __future__ import annotations

import warnings

from common import lora
from common.errors import LessonError

LCM_LORA_ID = "latent-consistency/lcm-lora-sdv1-5"
TINY_VAE_ID = "madebyollin/taesd"
LCM_ADAPTER = "lcm"


def _cannot_load(what: str, constant: str, location, default: str, exc: Exception) -> LessonError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
    return LessonError(
        f"FAST_MODE needs {what} '{location}' ({constant}), which could not be loaded ({reason}). Download it once "
        f"while online ('hf download {default} --local-dir models/{default.split('/')[-1]}') and set {constant} "
        "to that folder, or run without FAST_MODE.")


def enable_fast_mode(pipe, keep: dict[str, float], lcm_lora=LCM_LORA_ID, tiny_vae=TINY_VAE_ID) -> str:
    """Stack the LCM-LoRA on the adapters in ``keep`` ({name: weight}), switch to LCMScheduler and the
    tiny autoencoder. Returns a one-line description of what changed."""
    from diffusers import AutoencoderTiny, LCMScheduler

    try:
        with warnings.catch_warnings():  # PEFT warns that a second adapter is being added: that is the point
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            pipe.load_lora_weights(str(lcm_lora), adapter_name=LCM_ADAPTER)
    except Exception as exc:  # noqa: BLE001 - offline, missing, or not a LoRA: one message for all
        raise _cannot_load("the LCM-LoRA", "LCM_LORA_ID", lcm_lora, LCM_LORA_ID, exc) from exc
    layers = len(lora.lora_layer_names(pipe.unet, LCM_ADAPTER))
    if layers == 0:
        raise LessonError(f"The LCM-LoRA '{lcm_lora}' (LCM_LORA_ID) patched 0 layers of this UNet: it was made "
                          f"for another base model. Use {LCM_LORA_ID} with Stable Diffusion v1.5.")
    names, weights = list(keep) + [LCM_ADAPTER], list(keep.values()) + [1.0]
    pipe.set_adapters(names, adapter_weights=weights)  # both adapters active, each at its own weight
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)

    try:
        vae = AutoencoderTiny.from_pretrained(str(tiny_vae), torch_dtype=pipe.vae.dtype)
    except Exception as exc:  # noqa: BLE001
        raise _cannot_load("the tiny autoencoder", "TINY_VAE_ID", tiny_vae, TINY_VAE_ID, exc) from exc
    factor = vae.config.upsampling_scaling_factor ** (len(vae.config.decoder_block_out_channels) - 1)
    if factor != pipe.vae_scale_factor or vae.config.latent_channels != pipe.vae.config.latent_channels:
        raise LessonError(f"The tiny autoencoder '{tiny_vae}' (TINY_VAE_ID) does not fit this model's latents "
                          f"({vae.config.latent_channels} channels, {factor}x, against "
                          f"{pipe.vae.config.latent_channels} channels, {pipe.vae_scale_factor}x). "
                          f"Use {TINY_VAE_ID} with Stable Diffusion v1.5.")
    pipe.vae = vae.to(pipe._execution_device)
    stacked = " + ".join(f"{n} x{w:g}" for n, w in zip(names, weights))
    return (f"FAST_MODE: LCM-LoRA '{lcm_lora}' ({layers} layers), adapters {stacked}, LCMScheduler, "
            f"tiny autoencoder '{tiny_vae}'")
