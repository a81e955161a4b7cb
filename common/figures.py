"""The pictures a student looks at: labelled grids, progression strips and loss curves.

Small images (the tiny and pocket models draw 64 px) are enlarged with nearest-neighbour so that a
grid is readable on screen; labels are drawn under each tile with PIL's built-in font.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.files import atomic_path, save_image

MIN_TILE = 192  # enlarge smaller images to at least this, so grids stay legible


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size font
        return ImageFont.load_default()


def _tile(image: Image.Image, tile: int) -> Image.Image:
    if image.size == (tile, tile):
        return image
    resample = Image.Resampling.NEAREST if image.width < tile else Image.Resampling.LANCZOS
    return image.resize((tile, tile), resample)


def image_grid(images: list[Image.Image], cols: int, labels: list[str] | None = None, title: str | None = None,
               row_labels: list[str] | None = None, tile: int | None = None) -> Image.Image:
    """Images in a grid of ``cols`` columns, each with an optional caption, rows with optional names."""
    tile = tile or max(MIN_TILE, min(max(im.width for im in images), 512))
    rows = -(-len(images) // cols)
    font_size = max(12, tile // 16)
    font = _font(font_size)
    chars = max(10, int(tile / (font_size * 0.55)))
    wrapped = [textwrap.wrap(label, chars)[:3] for label in labels] if labels else None
    label_h = (max(map(len, wrapped)) * (font_size + 3) + 6) if wrapped else 0
    left = int(font_size * 0.6 * max(map(len, row_labels))) + 12 if row_labels else 0
    top = font_size * 2 + 8 if title else 0
    gap = 4
    canvas = Image.new("RGB", (left + cols * (tile + gap) + gap, top + rows * (tile + label_h + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap + left, 6), title, fill="black", font=_font(int(font_size * 1.3)))
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        x, y = left + gap + c * (tile + gap), top + gap + r * (tile + label_h + gap)
        canvas.paste(_tile(image.convert("RGB"), tile), (x, y))
        if wrapped:
            for k, line in enumerate(wrapped[i]):
                draw.text((x + 2, y + tile + 3 + k * (font_size + 3)), line, fill="black", font=font)
    if row_labels:
        for r, name in enumerate(row_labels):
            y = top + gap + r * (tile + label_h + gap) + tile // 2 - font_size // 2
            draw.text((4, y), name, fill="black", font=font)
    return canvas


def save_grid(images, path, cols: int, **kwargs) -> Path:
    return save_image(image_grid(images, cols, **kwargs), path)


def smooth(values, weight: float = 0.9) -> np.ndarray:
    """Exponential moving average, as TensorBoard smooths a noisy loss."""
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return np.asarray(out)


def plot_curves(curves: dict[str, list[float]], path, title: str, xlabel: str = "optimizer step",
                steps: list[int] | None = None) -> Path:
    """One panel per curve: the raw values faint, the smoothed ones bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        x = steps if steps is not None else range(1, len(values) + 1)
        ax.plot(x, values, alpha=0.3, linewidth=0.8, label="raw")
        ax.plot(x, smooth(values), linewidth=2, label="smoothed")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return Path(path)


def add_caption(image: Image.Image, lines: list[str]) -> Image.Image:
    """The figure with lines of text underneath (what a figure caption says: sizes, times, settings)."""
    font_size = max(12, image.width // 90)
    font = _font(font_size)
    height = len(lines) * (font_size + 4) + 10
    canvas = Image.new("RGB", (image.width, image.height + height), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((8, image.height + 4 + i * (font_size + 4)), line, fill="black", font=font)
    return canvas
