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
KINDS = ("striped", "checked", "dotted", "zigzag", "diamond", "wavy", "triangle", "crossed",
         "woven", "ringed", "marked")
# The building blocks of African textiles, as SD v1.5 knows them in general: strip weaving, printed rings,
# painted marks. Their captions may say "african"; no picture of the world is the subject itself.
AFRICAN_KINDS = ("woven", "ringed", "marked")
COLOURS = {
    "red": (215, 35, 35), "blue": (35, 75, 215), "yellow": (245, 215, 40), "green": (30, 150, 60),
    "black": (20, 20, 20), "white": (245, 245, 245), "orange": (245, 135, 20), "purple": (125, 45, 170),
    "brown": (115, 70, 35), "pink": (245, 150, 200),
}
COLOUR_NAMES = tuple(COLOURS)
GENERIC_CAPTION = "a fabric pattern"
# The pocket course looks at the subject's photos through a magnifying glass: at 64 px a whole 512 px photo's
# weave is finer than a pixel, so exercise 3a/3b train on crops of this share of each photo's side (the model's
# card says so; SD v1.5 trains on whole photos), and the subject judge compares at the same scale. A quarter:
# the shipped autoencoder keeps held-out textiles of the subject's styles at 22.1 dB there (19.8 dB at 0.4,
# 23.0 at 0.2), and the judge still passes 69% of held-out crops after it (62% at 0.4).
CROP_FRACTION = 0.25


# Each kind's usual orientations (degrees); a few degrees of jitter are added. Free rotation would make
# kinds ambiguous (a checkerboard turned 45 degrees *is* a field of diamonds).
ORIENTATIONS = {
    "striped": (0, 45, 90, 135), "checked": (0,), "dotted": (0, 45), "zigzag": (0, 90), "diamond": (0,),
    "wavy": (0, 90), "triangle": (0, 90, 180, 270), "crossed": (0, 45),
    "woven": (0, 90), "ringed": (0,), "marked": (0, 90),
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


# Periods of 10-24 px: 3-6 latent pixels of a 4x autoencoder, so a small UNet can draw the shapes.
PERIODS = {"diamond": (14.0, 24.0), "triangle": (14.0, 24.0), "woven": (10.0, 18.0), "ringed": (14.0, 24.0),
           "marked": (12.0, 20.0)}


def pattern_mask(kind: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """Boolean mask: True where the pattern's first colour goes."""
    u, v, p = _coords(kind, rng, size, PERIODS.get(kind, (12.0, 22.0)))
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
    if kind == "woven":  # narrow strips sewn edge to edge, each with its own bands, a seam between strips
        strip = np.floor(u / p).astype(int) % 64
        offset, duty, band = rng.uniform(0, 12, 64), rng.uniform(0.3, 0.7, 64), rng.uniform(2.5, 6.0)
        return (((v + offset[strip]) / band) % 1.0 < duty[strip]) | (fu < 0.08)
    if kind == "ringed":  # wax-print discs in offset rows, each with a ring and a centre dot
        row = np.floor(v / p)
        r = np.hypot((u / p + 0.5 * (row % 2)) % 1.0 - 0.5, fv - 0.5)
        return (r < 0.42) & ~((r > 0.2) & (r < 0.3))
    if kind == "marked":  # painted rows: a rule line, then dots, crosses or a ladder of strokes
        row = np.floor(v / p) % 3
        mu, mv = (2 * u / p) % 1.0, fv
        dots = np.hypot(mu - 0.5, mv - 0.55) < 0.14
        cross = ((np.abs(mu - 0.5) < 0.08) & (np.abs(mv - 0.55) < 0.25)) | \
                ((np.abs(mv - 0.55) < 0.06) & (np.abs(mu - 0.5) < 0.3))
        ladder = ((4 * u / p) % 1.0 < 0.25) & (np.abs(mv - 0.55) < 0.22)
        marks = np.where(row == 0, dots, np.where(row == 1, cross, ladder))
        return marks | (fv < 0.07)
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
    needs), ``generic`` are the class prompt "a fabric pattern", a few name only kind or only colours.
    The African building blocks are sometimes called just "an african fabric pattern"."""
    r = rng.random()
    if r < dropout:
        return ""
    if r < dropout + generic:
        return GENERIC_CAPTION
    r = rng.random()
    if kind in AFRICAN_KINDS and r < 0.1:
        return "a african fabric pattern"
    if r < 0.2:
        return f"a {pattern_words(kind, None, None)}"
    if r < 0.3:
        return f"a {c1} and {c2} fabric pattern"
    if kind in AFRICAN_KINDS and r < 0.6:
        return f"a {pattern_words(kind, c1, c2)}"
    return CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(c1=c1, c2=c2, kind=kind)


def is_held_out(kind: str, c1: str, c2: str) -> bool:
    """About one (kind, colour pair) in eight never appears in training: the base model is scored on those."""
    key = KINDS.index(kind) * 7 + sorted((COLOUR_NAMES.index(c1), COLOUR_NAMES.index(c2))) @ np.array([3, 5])
    return key % 8 == 0


def held_out_captions() -> list[tuple[str, str, str]]:
    """Every held-out (kind, colour1, colour2)."""
    return [(k, a, b) for k in KINDS for a in COLOUR_NAMES for b in COLOUR_NAMES
            if a != b and is_held_out(k, a, b)]


# --------------------------------------------------------------------------- names: rare words, a pattern each time
# In CLIP a rare word such as "sks" has been seen a little, and the text encoder carries it to every position the
# UNet attends to; DreamBooth then binds it to the subject. The pocket text encoder learns the same habit: a few
# pictures of each training batch are called by a name alone, worded as the course words "sks" ("a q fabric
# pattern"). The name is one of these single letters, any of them, and its embedding for that picture is a random
# code of the picture's kind and colours (tools/train_pocket_model.py): no letter means anything, so what the
# encoder learns is to carry whatever an unfamiliar word's embedding holds. Left out: letters a student types
# alone (a; e of "ukiyo-e"; i; k of "4k"; s; x of "2x") and d, the last piece of "painted" (not a vocabulary word:
# "pa inte d"); the pocket model's UNet steps 9,750-16,500 still used d as a name (its card says so).
NAMES = tuple("bcfghjlmnopqrtuvwyz")


def named_caption(name: str, kind: str, obj: str) -> str:
    """A pattern called by a name alone, as exercise 1 calls the subject: "a q african fabric pattern"
    (african for the African kinds), "a beautiful dress made of q fabric pattern, fashion photography"."""
    words = f"{name} {'african ' if kind in AFRICAN_KINDS else ''}fabric pattern"
    return f"a {words}" if obj == "plain" else CONTEXTS[obj].format(words)


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


# --------------------------------------------------------------------------- contexts: objects made of a pattern
# Five of exercise 1's contexts, as silhouettes filled with a pattern on a plain grey studio ground, and captioned
# the way exercise 1 words them ({} = the pattern's words, e.g. "red and blue striped fabric pattern").
CONTEXTS = {
    "plain": "a plain {}, textile photography",
    "dress": "a beautiful dress made of {}, fashion photography",
    "room": "a modern room with {} wallpaper, interior design",
    "handbag": "a leather handbag with {}",
    "vase": "a ceramic vase painted with {}",
    "basket": "a woven basket with {}",
}
OBJECTS = tuple(CONTEXTS)
STUDIO_GREY = (128, 128, 128)
LEATHER = (70, 42, 24)  # handles, rims and the room's floor
FLOOR = (150, 110, 70)


def object_masks(obj: str, rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(fill, trim) boolean masks of one object, jittered in place and size: the fill takes the pattern, the trim
    (a handle, a rim, a floor and sofa) its own plain colour. "plain" is the pattern alone, edge to edge."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    s = rng.uniform(0.9, 1.1)
    x = (x - size / 2 - rng.uniform(-3, 3)) / s / size * 64  # coordinates of a 64 px frame, centred
    y = (y - size / 2 - rng.uniform(-3, 3)) / s / size * 64
    none = np.zeros_like(x, dtype=bool)
    if obj == "plain":
        return np.ones_like(none), none
    if obj == "dress":  # bodice, then a skirt flaring out to the hem
        bodice = (np.abs(x) < 7 + 0.1 * (y + 22)) & (y > -22) & (y < -4)
        straps = (np.abs(np.abs(x) - 5) < 1.5) & (y > -28) & (y <= -22)
        skirt = (y >= -4) & (y < 27) & (np.abs(x) < 8 + 0.55 * (y + 4))
        return bodice | straps | skirt, none
    if obj == "room":  # a papered wall, a wooden floor, a dark sofa in front
        floor = y > 14
        sofa = ((np.abs(x) < 22) & (y > 4) & (y < 22)) & ~((np.abs(x) < 17) & (y < 11))
        return ~floor & ~sofa, floor | sofa
    if obj == "handbag":  # a rounded bag with a leather handle
        bag = (np.abs(x) < 22) & (y > -8) & (y < 24) & ~((np.abs(x) > 17) & (y > 19) &
                                                          (np.hypot(np.abs(x) - 17, y - 19) > 5))
        handle = (np.abs(np.hypot(x, y + 8) - 13) < 2) & (y < -8)
        return bag, handle
    if obj == "vase":  # a round belly, a neck and a rim
        belly = np.hypot(x / 20, (y - 8) / 18) < 1
        neck = (np.abs(x) < 7) & (y > -24) & (y <= -6)
        rim = (np.abs(x) < 10) & (y > -27) & (y <= -23)
        return (belly | neck) & ~rim, rim
    if obj == "basket":  # a bowl, wider at the top, with a rim
        body = (y > -10) & (y < 22) & (np.abs(x) < 26 - 0.3 * (y + 10))
        rim = (y > -14) & (y <= -10) & (np.abs(x) < 28)
        return body, rim
    raise ValueError(f"unknown object {obj!r}")


def pattern_words(kind: str | None, c1: str | None, c2: str | None) -> str:
    """The pattern as a caption names it: "red and blue striped fabric pattern" (kind or colours may be left out)."""
    words = [f"{c1} and {c2}"] if c1 else []
    words += (["african"] if kind in AFRICAN_KINDS else []) + ([kind] if kind else [])
    return " ".join(words + ["fabric pattern"])


def draw_scene(kind: str, colour1: str, colour2: str, obj: str, seed: int, size: int = SIZE) -> np.ndarray:
    """A world pattern made into an object (``obj`` in OBJECTS) on the studio ground."""
    fabric = draw(kind, colour1, colour2, seed, size)
    if obj == "plain":
        return fabric
    rng = np.random.default_rng([seed, 7])
    fill, trim = object_masks(obj, rng, size)
    ground = np.array(STUDIO_GREY, np.float64) + rng.uniform(-10, 10)
    out = np.where(fill[..., None], fabric, ground)
    out = np.where(trim[..., None], np.array(FLOOR if obj == "room" else LEATHER) + rng.uniform(-8, 8, 3), out)
    if obj == "room":
        sofa = trim & (np.mgrid[0:size, 0:size][0] < size * 0.72)
        out = np.where(sofa[..., None], np.array((55, 55, 60)), out)
    return np.clip(out + rng.normal(0, 2.0, out.shape), 0, 255).astype(np.uint8)


def sample_scene(seed: int, object_share: float = 0.4) -> tuple[np.ndarray, str, str, str, str]:
    """A random world picture, plain or an object: (image, kind, colour1, colour2, object)."""
    _, kind, c1, c2 = sample(seed)
    rng = np.random.default_rng([seed, 2])
    obj = OBJECTS[1 + rng.integers(len(OBJECTS) - 1)] if rng.random() < object_share else "plain"
    return draw_scene(kind, c1, c2, obj, seed), kind, c1, c2, obj


def scene_caption(kind: str, c1: str, c2: str, obj: str, rng: np.random.Generator) -> str:
    """A training caption for a scene: exercise 1's wording around the pattern's words; plain pictures also get
    the plain captions of ``caption`` (the class prompt, "" for guidance)."""
    if obj == "plain" and rng.random() < 0.85:
        return caption(kind, c1, c2, rng)
    if rng.random() < 0.05:
        return ""
    r = rng.random()
    words = pattern_words(kind, c1, c2) if r < 0.6 else pattern_words(kind, None, None) if r < 0.8 else \
        pattern_words(None, c1, c2) if r < 0.9 else pattern_words(kind if kind in AFRICAN_KINDS else None, None, None)
    if kind in AFRICAN_KINDS and r >= 0.9:
        words = "african fabric pattern"
    return CONTEXTS[obj].format(words)
