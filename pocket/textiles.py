"""Procedural African-textile-inspired pictures: the subject the course teaches DreamBooth to learn.

The course trained on ten photos of African fabrics. We cannot ship third-party photos, so
``tools/make_training_images.py`` draws ten of our own from three traditions:

- kente-style strip weaving: narrow woven strips of coloured bands and blocks, sewn edge to edge;
- wax-print (Ankara) style: bold repeated circles, rings and leaf shapes on a saturated ground;
- mudcloth (bogolanfini) style: off-white marks - dots, crosses, zigzags, grids - on a dark earth ground.

Every picture is deterministic from its seed. A soft weave texture keeps them from looking flat.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

PALETTES = {
    "kente_gold": [(226, 170, 30), (20, 110, 50), (180, 30, 30), (15, 15, 15)],
    "kente_blue": [(30, 60, 150), (230, 190, 40), (240, 240, 230), (20, 120, 60)],
    "kente_red": [(190, 30, 40), (240, 200, 50), (20, 20, 20), (40, 90, 170)],
    "kente_green": [(20, 120, 60), (240, 180, 20), (150, 20, 60), (250, 240, 220)],
    "wax_orange": [(235, 110, 20), (30, 40, 120), (250, 220, 60), (240, 240, 235)],
    "wax_teal": [(0, 128, 128), (250, 170, 30), (200, 30, 70), (245, 240, 225)],
    "wax_purple": [(110, 40, 130), (250, 200, 40), (40, 170, 90), (245, 245, 240)],
    "mud_brown": [(70, 45, 25), (235, 225, 200)],
    "mud_black": [(25, 22, 20), (230, 220, 195)],
    "mud_rust": [(140, 60, 30), (245, 235, 210)],
}

# The ten shipped pictures: (style, palette, seed).
DESIGNS = [
    ("kente", "kente_gold", 1), ("wax", "wax_orange", 2), ("mudcloth", "mud_brown", 3),
    ("kente", "kente_blue", 4), ("wax", "wax_teal", 5), ("mudcloth", "mud_black", 6),
    ("kente", "kente_red", 7), ("wax", "wax_purple", 8), ("mudcloth", "mud_rust", 9),
    ("kente", "kente_green", 10),
]


def _kente(draw: ImageDraw.ImageDraw, size: int, colors, rng: np.random.Generator) -> None:
    strip = size // int(rng.integers(4, 7))
    for x0 in range(0, size, strip):
        y = 0
        offset = int(rng.integers(0, len(colors)))
        while y < size:
            band = int(rng.integers(size // 40, size // 10))
            if rng.random() < 0.35:  # a patterned block: checker of two colours
                a, b = colors[offset % len(colors)], colors[(offset + 2) % len(colors)]
                cell = max(4, strip // 6)
                for cy in range(y, min(y + band * 2, size), cell):
                    for cx in range(x0, x0 + strip, cell):
                        draw.rectangle([cx, cy, cx + cell, cy + cell], fill=a if ((cx - x0) // cell + cy // cell) % 2 else b)
                y += band * 2
            else:  # plain bands with thin pinstripes
                draw.rectangle([x0, y, x0 + strip, y + band], fill=colors[offset % len(colors)])
                for k in range(0, band, max(3, band // 4)):
                    draw.line([x0, y + k, x0 + strip, y + k], fill=colors[(offset + 1) % len(colors)], width=1)
                y += band
            offset += 1
        draw.line([x0, 0, x0, size], fill=(10, 10, 10), width=2)  # the seam between sewn strips


def _wax(draw: ImageDraw.ImageDraw, size: int, colors, rng: np.random.Generator) -> None:
    ground, motif, accent, light = colors
    draw.rectangle([0, 0, size, size], fill=ground)
    step = size // int(rng.integers(3, 5))
    for row, cy in enumerate(range(-step // 2, size + step, step)):
        for cx in range(-step // 2 + (row % 2) * step // 2, size + step, step):
            r = step * 0.42
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=motif)
            for k, color in enumerate((light, accent, light)):
                rr = r * (0.75 - 0.2 * k)
                draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], outline=color, width=max(2, size // 100))
            for a in range(8):  # petals between the rings
                ang = a * math.pi / 4 + row * 0.3
                px, py = cx + math.cos(ang) * r * 1.05, cy + math.sin(ang) * r * 1.05
                draw.ellipse([px - r * 0.12, py - r * 0.12, px + r * 0.12, py + r * 0.12], fill=accent)
    for _ in range(int(size * 0.15)):  # crackle dots, like wax resist
        x, y = rng.integers(0, size, 2)
        draw.point((int(x), int(y)), fill=light)


def _mudcloth(draw: ImageDraw.ImageDraw, size: int, colors, rng: np.random.Generator) -> None:
    ground, mark = colors
    draw.rectangle([0, 0, size, size], fill=ground)
    rows = int(rng.integers(5, 8))
    h = size / rows
    width = max(2, size // 90)
    for r in range(rows):
        y0, kind = r * h, int(rng.integers(0, 4))
        draw.line([0, y0, size, y0], fill=mark, width=width)
        if kind == 0:  # zigzag
            pts = [(x, y0 + (h * 0.2 if (x // (h / 2)) % 2 else h * 0.8)) for x in np.arange(0, size + h, h / 2)]
            draw.line(pts, fill=mark, width=width)
        elif kind == 1:  # dots
            for x in np.arange(h / 4, size, h / 2):
                draw.ellipse([x - h * 0.08, y0 + h / 2 - h * 0.08, x + h * 0.08, y0 + h / 2 + h * 0.08], fill=mark)
        elif kind == 2:  # crosses
            for x in np.arange(h / 2, size, h):
                c = h * 0.25
                draw.line([x - c, y0 + h / 2, x + c, y0 + h / 2], fill=mark, width=width)
                draw.line([x, y0 + h / 2 - c, x, y0 + h / 2 + c], fill=mark, width=width)
        else:  # ladder of short strokes
            for x in np.arange(0, size, h / 5):
                draw.line([x, y0 + h * 0.25, x, y0 + h * 0.75], fill=mark, width=width)


STYLES = {"kente": _kente, "wax": _wax, "mudcloth": _mudcloth}


def draw_textile(style: str, palette, seed: int, size: int = 512) -> Image.Image:
    """One textile picture, deterministic from ``seed``. ``palette``: a name in PALETTES, or the colours
    themselves (RGB triples: four for kente and wax, two for mudcloth)."""
    rng = np.random.default_rng(seed)
    colors = PALETTES[palette] if isinstance(palette, str) else [tuple(int(v) for v in c) for c in palette]
    image = Image.new("RGB", (size, size), colors[0])
    STYLES[style](ImageDraw.Draw(image), size, colors, rng)
    if rng.random() < 0.5:
        image = image.rotate(90)
    # A soft weave: fine criss-cross shading and a little blur, so it reads as cloth, not a vector drawing.
    yy, xx = np.mgrid[0:size, 0:size]
    weave = 1.0 + 0.06 * np.sin(xx * 1.7) * np.sin(yy * 1.7) + rng.normal(0, 0.025, (size, size))
    array = np.asarray(image.filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32) * weave[..., None]
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def shipped_designs(size: int = 512) -> list[tuple[str, Image.Image]]:
    """The ten training pictures as (file name, image)."""
    return [(f"fabric_{i:03d}_{style}.jpg", draw_textile(style, palette, seed, size))
            for i, (style, palette, seed) in enumerate(DESIGNS, 1)]
