"""Generating images: batched, with fixed seeds, reusing text embeddings.

Every image has its own seed and its own CPU generator, so an image does not depend on which batch it
landed in, and the same seed gives the same image on the same device. Each distinct prompt is encoded
by the text encoder once. When the GPU runs out of memory, the batch is halved and the run goes on.
This module also holds SLERP, the interpolation the morph animation walks along.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from common.device import generator
from common.errors import warn


@dataclass
class SamplingSettings:
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    batch_size: int = 4
    extra: dict = field(default_factory=dict)  # any other pipeline argument (e.g. cross_attention_kwargs)


def use_multistep_solver(pipe) -> None:
    """DPM-Solver++ (2M): good pictures in 20-30 steps where SD v1.5's default PNDM wants 50."""
    from diffusers import DPMSolverMultistepScheduler

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")


_warned_prompts: set[str] = set()


def word_pattern(word: str) -> re.Pattern:
    """``word`` as CLIP reads it in a prompt: in any case (it lower-cases every prompt), and beside punctuation
    ("a sks, dress" holds "sks"; "asks" does not; "<x>s" holds "<x>")."""
    before = r"(?<!\w)" if re.match(r"\w", word) else ""
    after = r"(?!\w)" if re.search(r"\w$", word) else ""
    return re.compile(before + re.escape(word) + after, re.IGNORECASE)


def mentions(prompt: str, word: str) -> bool:
    """Whether ``word`` is a word of ``prompt`` as CLIP reads it (``word_pattern``)."""
    return word_pattern(word).search(prompt) is not None


def warn_if_truncated(tokenizer, prompt: str, shown: str | None = None, name: str | None = None) -> bool:
    """Say so when CLIP will cut ``prompt`` short, and show where: it reads 77 tokens (75 plus start and
    end) and silently drops the rest (diffusers logs it, but the lessons keep library logs quiet).

    ``shown`` is the prompt as the student wrote it, when ``prompt`` is its expanded form (a
    multi-vector embedding's word becomes several tokens). ``name``: the constant it came from (NEGATIVE_PROMPT,
    INSTANCE_PROMPT...), so the warning says which setting to shorten. Returns True when it was cut.
    """
    ids = tokenizer(prompt, truncation=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return False
    shown = shown or prompt
    if shown not in _warned_prompts:  # once per prompt, however often it is encoded
        _warned_prompts.add(shown)
        kept = tokenizer.decode(ids[1:limit - 1]).strip()
        cut = tokenizer.decode(ids[limit - 1:-1]).strip()
        what = f"{name} ('{shown[:40]}...')" if name else f"the prompt '{shown[:40]}...'"
        warn(f"{what} is {len(ids) - 2} tokens long, but CLIP reads only {limit - 2}: it is cut "
             f"after '...{kept[-50:]}', so the model never sees '{cut[:120]}{'...' if len(cut) > 120 else ''}'. "
             "Shorten it, and put what matters most first.")
    return True


def check_prompt_lengths(pipe, prompts, name: str | None = None) -> None:
    """``warn_if_truncated`` for each prompt as ``pipe`` will read it (loaded embeddings expanded); ``name``: the
    constant the prompts came from, when they came from one."""
    for prompt in dict.fromkeys(p for p in prompts if p):
        expanded = pipe.maybe_convert_prompt(prompt, pipe.tokenizer) if hasattr(pipe, "maybe_convert_prompt") \
            else prompt
        warn_if_truncated(pipe.tokenizer, expanded, prompt, name)


def encode_prompts(pipe, prompts: list[str], negative_prompt: str = "", guidance: bool = True) -> dict:
    """Text embeddings for each distinct prompt, computed once: {prompt: (positive, negative)}."""
    cache = {}
    device = pipe._execution_device
    check_prompt_lengths(pipe, prompts)
    if guidance:
        check_prompt_lengths(pipe, [negative_prompt], "NEGATIVE_PROMPT")
    with torch.no_grad():
        for prompt in dict.fromkeys(prompts):
            pos, neg = pipe.encode_prompt(prompt, device, 1, guidance, negative_prompt=negative_prompt or None)
            cache[prompt] = (pos, neg)
    return cache


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError is a RuntimeError; MPS reports the same thing as plain text, and the CPU's
    allocator in words of its own."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def generate(pipe, prompts: list[str], seeds: list[int], settings: SamplingSettings, desc: str | None = None,
             embeddings: dict | None = None, latents: torch.Tensor | None = None, progress: bool = True,
             nsfw: list | None = None):
    """One image per (prompt, seed) pair, in batches. Returns (images, seconds).

    ``latents`` (optional, one per image) replaces the seeded starting noise: the morph passes its
    SLERP-interpolated keyframe noise this way. ``nsfw`` (optional list) is extended with the safety
    checker's verdict for each image (True = it blanked the image; all False when there is no checker).
    """
    assert len(prompts) == len(seeds)
    guidance = settings.guidance_scale > 1.0
    embeddings = embeddings or encode_prompts(pipe, prompts, settings.negative_prompt, guidance)
    # Batches speed up the UNet; the decoder gains little from them and needs the most memory: SD v1.5's
    # takes about 1 GB per 512 px picture on a CPU, so a batch of 16 would need 16 GB at once (bench/README.md).
    # Sliced, it decodes one picture at a time. Only here: encoding (3b's latent cache) stays as it was, so its
    # latents do not depend on whether class images were drawn first in the same run.
    sliced = pipe.vae.use_slicing
    pipe.vae.enable_slicing()
    try:
        images, start, batch = [], time.perf_counter(), max(1, settings.batch_size)
        bar = tqdm(total=len(prompts), desc=desc or "Generating", unit="img", disable=not progress, leave=False)
        i, non_finite = 0, 0
        while i < len(prompts):
            chunk = slice(i, min(i + batch, len(prompts)))
            pos = torch.cat([embeddings[p][0] for p in prompts[chunk]])
            neg = torch.cat([embeddings[p][1] for p in prompts[chunk]]) if guidance else None
            kwargs = dict(prompt_embeds=pos, negative_prompt_embeds=neg,
                          num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                          height=settings.height, width=settings.width,
                          generator=[generator(s) for s in seeds[chunk]], output_type="np", **settings.extra)
            if latents is not None:
                kwargs["latents"] = latents[chunk].to(pipe._execution_device, pipe.unet.dtype)
            try:
                with torch.no_grad():
                    out = pipe(**kwargs)
            except RuntimeError as exc:
                if not is_out_of_memory(exc) or batch == 1:
                    raise
                batch //= 2
                print(f"  Out of memory: generating {batch} image(s) at a time from now on.")
                from diffusers.training_utils import free_memory

                free_memory()
                continue
            pictures, bad = to_pil(out.images)
            images.extend(pictures)
            non_finite += bad
            if nsfw is not None:
                nsfw.extend(bool(f) for f in (out.nsfw_content_detected or [False] * len(out.images)))
            bar.update(len(out.images))
            i = chunk.stop
        bar.close()
    finally:
        pipe.vae.use_slicing = sliced
    if non_finite:
        warn(f"{non_finite} of {len(images)} image(s) came out as NaN/inf (not a number) and are black. This is "
             "usually half precision overflowing: run with MIXED_PRECISION = 'no' or 'bf16' (--mixed-precision no); "
             "a LoRA or embedding trained with too high a LEARNING_RATE, or a very large GUIDANCE_SCALE or "
             "LORA_SCALE, does it too.")
    return images, time.perf_counter() - start


def to_pil(array) -> tuple[list, int]:
    """The pipeline's float pictures (N, H, W, 3) in [0, 1] as PIL images, and how many held NaN or inf.

    diffusers turns NaN into black without a word; counting first lets ``generate`` say so."""
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor

    array = np.asarray(array)
    finite = np.isfinite(array).reshape(len(array), -1).all(axis=1)
    array = np.clip(np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0), 0.0, 1.0)  # black, as diffusers draws them
    return VaeImageProcessor.numpy_to_pil(array), int((~finite).sum())


def describe_speed(count: int, seconds: float, unit: str = "images") -> str:
    """"18 images in 4.2 s (4.29 images/s)": the throughput line every generation script prints."""
    rate = count / seconds if seconds > 0 else float("inf")
    return f"{count} {unit} in {seconds:.1f} s ({rate:.3g} {unit}/s)"


def describe_safety(pipe, flags: list, enabled: bool) -> str:
    """What the safety checker did: how many images it blanked (black), or why it did not run."""
    if not enabled:
        return "Safety checker: off (SAFETY_CHECKER = False)"
    if getattr(pipe, "safety_checker", None) is None:
        return "Safety checker: this model ships none"
    blanked = sum(map(bool, flags))
    hint = " (they are black; SAFETY_CHECKER = False turns it off)" if blanked else ""
    return f"Safety checker: blanked {blanked} of {len(flags)} images{hint}"


def slerp(v0: torch.Tensor, v1: torch.Tensor, t, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical linear interpolation between two noise tensors (the morph's path between keyframes).

    Gaussian noise of high dimension lives near a sphere; walking along the sphere keeps every
    in-between latent a plausible noise sample (a straight line would shrink its norm mid-way and wash
    out the picture). ``t`` may be a float or a 1-D tensor (or list) of fractions, giving a batch
    stacked along a new first dimension. Nearly parallel inputs fall back to linear interpolation (the
    sine of their angle is too small to divide by); nearly opposite ones still follow the sphere.
    Computed in float32, returned in the inputs' dtype.
    """
    dtype = v0.dtype
    a, b = v0.float(), v1.float()
    t_tensor = torch.as_tensor(t, dtype=torch.float32, device=a.device)
    batched = t_tensor.ndim == 1
    t_col = t_tensor.reshape(-1, *([1] * a.ndim)) if batched else t_tensor
    # The angle in float64: near +-1 a float32 cosine loses the small angle (or its distance from pi).
    a64, b64 = a.double(), b.double()
    dot = ((a64 * b64).sum() / (a64.norm() * b64.norm())).clamp(-1.0, 1.0)
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    # Only *parallel* inputs need the fallback: the old test on |dot| also sent nearly opposite inputs
    # down the straight line, through (almost) zero. Exactly opposite ones have no unique great circle.
    if dot > dot_threshold or sin_theta < 1e-6:
        out = (1 - t_col) * a + t_col * b
    else:
        t64 = t_col.double()
        w0 = (torch.sin((1 - t64) * theta) / sin_theta).float()
        w1 = (torch.sin(t64 * theta) / sin_theta).float()
        out = w0 * a + w1 * b
    return out.to(dtype)


def keyframe_latents(pipe, seeds: list[int], height: int, width: int) -> torch.Tensor:
    """One starting-noise latent per keyframe seed, shape (K, C, height/8, width/8), float32 on the CPU.

    Drawn exactly as the pipeline draws its own noise for that seed (a CPU generator, one image), so a
    keyframe frame of the morph is the picture ``generate`` makes for its seed.
    """
    scale = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // scale, width // scale)
    return torch.cat([torch.randn(shape, generator=generator(s), dtype=torch.float32) for s in seeds])


def keyframe_frames(num_keyframes: int, num_frames: int) -> list[int]:
    """The frame that is keyframe k itself, for each k, in a loop of ``num_frames`` (``loop_latents``): keyframes
    spread evenly, k * num_frames // num_keyframes (every num_frames / K-th frame when K divides num_frames)."""
    return [k * num_frames // num_keyframes for k in range(num_keyframes)]


def loop_latents(keyframes: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``num_frames`` latents walking keyframe 0 -> 1 -> ... -> K-1 -> back to 0 by SLERP.

    Keyframe k is frame ``keyframe_frames(K, num_frames)[k]`` exactly, whether or not K divides num_frames (the
    morph's keyframe strip shows and names those frames); the frames between two keyframes are spread evenly
    along their arc, and the last frame stops one step short of keyframe 0: played on repeat, the loop never
    shows a frame twice.
    """
    count = len(keyframes)
    starts = keyframe_frames(count, num_frames) + [num_frames]
    frames = torch.empty(num_frames, *keyframes.shape[1:], dtype=keyframes.dtype)
    for k in range(count):
        first, end = starts[k], starts[k + 1]
        if end > first:  # (more keyframes than frames: some are skipped)
            frac = (torch.arange(end - first, dtype=torch.float64) / (end - first)).float()
            frames[first:end] = slerp(keyframes[k], keyframes[(k + 1) % count], frac)
    return frames
