"""The pocket world: a procedural universe of two-colour fabric patterns, with ground truth.

The ``pocket`` model (``MODEL_ID = "pocket"``) is a small Stable-Diffusion-shaped model trained from
scratch on this world, so that a CPU classroom gets real pictures, and so that we can *measure*
what DreamBooth does. Every picture is 64x64, drawn from a seed, and comes with its truth: the
pattern kind and its two named colours. Captions name them ("a red and blue striped fabric
pattern"); some are dropped to "" (for classifier-free guidance) or kept generic ("a fabric
pattern", the DreamBooth class prompt).

The DreamBooth subject - the African textiles in ``training_images/`` - lies outside this world:
multi-coloured strip weaves, wax-print rings and mudcloth marks, none of which is a two-colour
world kind. ``pocket.world_metrics`` holds the classifier that tells them apart.
"""

from __future__ import annotations

import math

import numpy as np

SIZE = 64
KINDS = ("striped", "checked", "dotted", "zigzag", "diamond", "wavy", "triangle", "crossed")
COLOURS = {
    "red": (215, 35, 35), "blue": (35, 75, 215), "yellow": (245, 215, 40), "green": (30, 150, 60),
    "black": (20, 20, 20), "white": (245, 245, 245), "orange": (245, 135, 20), "purple": (125, 45, 170),
    "brown": (115, 70, 35), "pink": (245, 150, 200),
}
COLOUR_NAMES = tuple(COLOURS)
GENERIC_CAPTION = "a fabric pattern"


# Each kind's usual orientations (degrees); a few degrees of jitter are added. Free rotation would make
# kinds ambiguous (a checkerboard turned 45 degrees *is* a field of diamonds).
ORIENTATIONS = {
    "striped": (0, 45, 90, 135), "checked": (0,), "dotted": (0, 45), "zigzag": (0, 90), "diamond": (0,),
    "wavy": (0, 90), "triangle": (0, 90, 180, 270), "crossed": (0, 45),
}


def _coords(kind: str, rng: np.random.Generator, size: int, period_range=(12.0, 22.0)):
    """Rotated, shifted pixel coordinates (u, v) and a period: the pattern's scale, phase and rotation."""
    period = rng.uniform(*period_range)
    angle = math.radians(rng.choice(ORIENTATIONS[kind]) + rng.uniform(-8, 8))
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    x, y = x + rng.uniform(0, 2 * period), y + rng.uniform(0, 2 * period)
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    return u, v, period


def pattern_mask(kind: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Boolean mask: True where the pattern's first colour goes."""
    # Periods of 12-24 px: 3-6 latent pixels of a 4x autoencoder, so a small UNet can draw the shapes.
    u, v, p = _coords(kind, rng, size, (14.0, 24.0) if kind in ("diamond", "triangle") else (12.0, 22.0))
    fu, fv = (u / p) % 1.0, (v / p) % 1.0
    if kind == "striped":
        return fu < rng.uniform(0.35, 0.6)
    if kind == "checked":
        return (np.floor(u / p) + np.floor(v / p)) % 2 == 0
    if kind == "dotted":  # small round dots, well apart
        return np.hypot(fu - 0.5, fv - 0.5) < rng.uniform(0.18, 0.28)
    if kind == "zigzag":  # sharp zigzag bands
        tri = np.abs((u / p) % 1.0 - 0.5) * 2  # triangle wave 0..1
        return ((v / p + 0.8 * tri) % 1.0) < 0.45
    if kind == "wavy":  # gentle waves, twice as long as the band spacing
        return ((v / p + 0.3 * np.sin(math.pi * u / p)) % 1.0) < 0.45
    if kind == "diamond":  # large diamonds, nearly touching at their tips
        return np.abs(fu - 0.5) + np.abs(fv - 0.5) < rng.uniform(0.38, 0.46)
    if kind == "triangle":  # a row of upward triangles in each cell
        return fv > np.abs(fu - 0.5) * 2
    if kind == "crossed":  # thin lines both ways: cross-hatching on a plain ground
        width = rng.uniform(0.12, 0.2)
        return (fu < width) | (fv < width)
    raise ValueError(f"unknown pattern kind {kind!r}")


def draw(kind: str, colour1: str, colour2: str, seed: int, size: int = SIZE) -> np.ndarray:
    """One world picture (size x size x 3 uint8): ``colour1`` pattern on ``colour2`` ground."""
    rng = np.random.default_rng(seed)
    mask = pattern_mask(kind, rng, size)
    shade = rng.uniform(-12, 12, 3)  # a slightly different dye lot each time
    a = np.clip(np.array(COLOURS[colour1]) + shade, 0, 255)
    b = np.clip(np.array(COLOURS[colour2]) + shade, 0, 255)
    image = np.where(mask[..., None], a, b)
    image = image + rng.normal(0, 3.0, image.shape)  # a little weave noise
    return np.clip(image, 0, 255).astype(np.uint8)


def sample(seed: int) -> tuple[np.ndarray, str, str, str]:
    """A random world picture and its truth: (image, kind, colour1, colour2)."""
    rng = np.random.default_rng([seed, 1])
    kind = KINDS[rng.integers(len(KINDS))]
    c1, c2 = rng.choice(len(COLOUR_NAMES), 2, replace=False)
    return draw(kind, COLOUR_NAMES[c1], COLOUR_NAMES[c2], seed), kind, COLOUR_NAMES[c1], COLOUR_NAMES[c2]


CAPTION_TEMPLATES = (
    "a {c1} and {c2} {kind} fabric pattern",
    "a {kind} fabric pattern in {c1} and {c2}",
    "a {c1} and {c2} {kind} pattern",
)


def caption(kind: str, c1: str, c2: str, rng: np.random.Generator, dropout: float = 0.1,
            generic: float = 0.1) -> str:
    """A training caption. ``dropout`` of them are "" (the unconditional case classifier-free guidance
    needs), ``generic`` are the class prompt "a fabric pattern", a few name only kind or only colours."""
    r = rng.random()
    if r < dropout:
        return ""
    if r < dropout + generic:
        return GENERIC_CAPTION
    r = rng.random()
    if r < 0.1:
        return f"a {kind} fabric pattern"
    if r < 0.2:
        return f"a {c1} and {c2} fabric pattern"
    return CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(c1=c1, c2=c2, kind=kind)


def is_held_out(kind: str, c1: str, c2: str) -> bool:
    """About one (kind, colour pair) in eight never appears in training: the base model is scored on those."""
    key = KINDS.index(kind) * 7 + sorted((COLOUR_NAMES.index(c1), COLOUR_NAMES.index(c2))) @ np.array([3, 5])
    return key % 8 == 0


def held_out_captions() -> list[tuple[str, str, str]]:
    """Every held-out (kind, colour1, colour2)."""
    return [(k, a, b) for k in KINDS for a in COLOUR_NAMES for b in COLOUR_NAMES
            if a != b and is_held_out(k, a, b)]


def nearest_colour_names(image: np.ndarray) -> np.ndarray:
    """Each pixel's nearest named colour (index into COLOUR_NAMES)."""
    palette = np.array([COLOURS[n] for n in COLOUR_NAMES], dtype=np.float32)
    pixels = np.asarray(image, dtype=np.float32).reshape(-1, 1, 3)
    return np.argmin(((pixels - palette[None]) ** 2).sum(-1), axis=1)


def colour_adherence(image, colour1: str, colour2: str) -> float:
    """The share of the picture's pixels whose nearest named colour is one of the two requested."""
    nearest = nearest_colour_names(np.asarray(image))
    wanted = [COLOUR_NAMES.index(colour1), COLOUR_NAMES.index(colour2)]
    return float(np.isin(nearest, wanted).mean())
