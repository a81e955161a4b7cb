"""Writing the morph: a looping GIF of sensible size, and an MP4 when an encoder is installed.

A GIF stores at most 256 colours per frame and compresses poorly; 450 frames of 512 px fabric would
weigh 100 MB or more. So the GIF is (optionally) downscaled and all frames share **one palette**
computed from frames across the whole loop: nothing flickers as per-frame palettes would, and
identical colours compress alike. GIF delays count in hundredths of a second, so 30 fps is written as
delays of 3 and 4 hundredths that add up to exactly the requested duration. The MP4 (H.264, through
imageio-ffmpeg) keeps the full size and is far smaller.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
from PIL import Image

from common.files import atomic_path

# A GIF stores each frame's delay as a 16-bit count of hundredths of a second: at most 655.35 s a frame. Below
# 0.01 fps (a frame every 100 s) the delay would not fit, and the GIF, written last, would fail after every
# frame had been denoised. Above 100 fps a frame would last less than the hundredth a GIF can count.
MIN_FPS, MAX_FPS = 0.01, 100
# Browsers (Chrome, Firefox, Safari) show a GIF frame of 0 or 1 hundredth as 10 hundredths: at more than 50 fps
# the loop would play several times slower than asked, and stutter. The GIF keeps every k-th frame instead.
GIF_MAX_FPS = 50


def gif_durations_ms(num_frames: int, fps: float) -> list[int]:
    """Per-frame delays in ms, multiples of 10 (GIF's unit), summing to num_frames / fps seconds."""
    ticks = [round((i + 1) * 100 / fps) - round(i * 100 / fps) for i in range(num_frames)]
    return [max(1, t) * 10 for t in ticks]


def shared_palette(frames: list[Image.Image], colors: int = 256, samples: int = 16) -> Image.Image:
    """One adaptive palette for the whole animation, from ``samples`` frames spread across it."""
    picked = [frames[i] for i in np.linspace(0, len(frames) - 1, min(samples, len(frames))).astype(int)]
    w, h = picked[0].size
    mosaic = Image.new("RGB", (w, h * len(picked)))
    for k, frame in enumerate(picked):
        mosaic.paste(frame.convert("RGB"), (0, k * h))
    return mosaic.quantize(colors=colors, method=Image.Quantize.MEDIANCUT)


def save_gif(frames: list[Image.Image], path, fps: float, max_size: int | None = None, colors: int = 256,
             dither: bool = False) -> Path:
    """A looping GIF; frames larger than ``max_size`` pixels are shrunk (aspect kept). Written atomically.
    Above ``GIF_MAX_FPS`` it keeps every k-th frame, at fps / k, so that it plays as long as asked."""
    if fps > GIF_MAX_FPS:
        step = math.ceil(fps / GIF_MAX_FPS)
        frames, fps = frames[::step], fps / step
    if max_size and max(frames[0].size) > max_size:
        w, h = frames[0].size
        size = (max(1, round(w * max_size / max(w, h))), max(1, round(h * max_size / max(w, h))))
        frames = [f.resize(size, Image.Resampling.LANCZOS) for f in frames]
    palette = shared_palette(frames, colors)
    mode = Image.Dither.FLOYDSTEINBERG if dither else Image.Dither.NONE
    indexed = [f.convert("RGB").quantize(palette=palette, dither=mode) for f in frames]
    with atomic_path(path) as tmp:
        indexed[0].save(tmp, format="GIF", save_all=True, append_images=indexed[1:], loop=0,
                        duration=gif_durations_ms(len(frames), fps), optimize=False, disposal=1)
    return Path(path)


def can_write_mp4() -> bool:
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def save_mp4(frames: list[Image.Image], path, fps: float, quality: int = 8) -> Path:
    """H.264 MP4 through diffusers' ``export_to_video`` (imageio + ffmpeg), written atomically.
    Needs ``pip install imageio-ffmpeg``."""
    from diffusers.utils import export_to_video

    with atomic_path(path) as tmp:
        export_to_video(frames, str(tmp), fps=fps, quality=quality, macro_block_size=8)
    return Path(path)
