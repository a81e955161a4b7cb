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
from pathlib import Path

from common import lora
from common.errors import LessonError

LCM_LORA_ID = "latent-consistency/lcm-lora-sdv1-5"
TINY_VAE_ID = "madebyollin/taesd"
LCM_ADAPTER = "lcm"


# The add-ons' constants: what each is called in messages, and its Hub id.
ADD_ONS = {"LCM_LORA_ID": ("the LCM-LoRA", LCM_LORA_ID), "TINY_VAE_ID": ("the tiny autoencoder", TINY_VAE_ID)}


def _download_advice(constant: str) -> str:
    default = ADD_ONS[constant][1]
    return (f"Download it once while online ('hf download {default} --local-dir models/{default.split('/')[-1]}') "
            f"and set {constant} to that folder, or run without FAST_MODE.")


def _cannot_load(constant: str, location, exc: Exception) -> LessonError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
    return LessonError(f"FAST_MODE needs {ADD_ONS[constant][0]} '{location}' ({constant}), which could not be loaded "
                       f"({reason}). {_download_advice(constant)}")


def check_ids(cfg) -> None:
    """Before any model loads: LCM_LORA_ID and TINY_VAE_ID are text, and one meant as a local path is there.

    A mistyped folder ('models/lcm-lora-typo', './my_taesd') was found missing only once the base model had
    loaded. A Hub id (owner/name) passes: whether the Hub has it, or a cache, is known only when it loads."""
    from common import lesson, models

    lesson.require_path(cfg, *ADD_ONS)
    for constant in ADD_ONS:
        location = getattr(cfg, constant).strip()
        setattr(cfg, constant, location)
        if not Path(location).exists() and models.looks_like_path(location):
            raise LessonError(f"FAST_MODE needs {ADD_ONS[constant][0]} '{location}' ({constant}), which does not "
                              f"exist on this computer (check the path: {models.where_relative(location)}). "
                              + _download_advice(constant))


def enable_fast_mode(pipe, keep: dict[str, float], lcm_lora=LCM_LORA_ID, tiny_vae=TINY_VAE_ID) -> str:
    """Stack the LCM-LoRA on the adapters in ``keep`` ({name: weight}), switch to LCMScheduler and the
    tiny autoencoder. Returns a one-line description of what changed."""
    from diffusers import AutoencoderTiny, LCMScheduler

    try:
        with warnings.catch_warnings():  # PEFT warns that a second adapter is being added: that is the point
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")
            pipe.load_lora_weights(str(lcm_lora), adapter_name=LCM_ADAPTER)
    except Exception as exc:  # noqa: BLE001 - offline, missing, or not a LoRA: one message for all
        raise _cannot_load("LCM_LORA_ID", lcm_lora, exc) from exc
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
        raise _cannot_load("TINY_VAE_ID", tiny_vae, exc) from exc
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
