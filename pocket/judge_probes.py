"""Pictures that are *not* the subject, to measure how often a subject judge is fooled.

Each probe set is 64x64x3 uint8 pictures, deterministic from its seed. Issue 12's audit found the old
judge (the world classifier's "subject" class) called grey noise, shuffled pixels and procedural clouds
"the subject"; these sets are that audit, made repeatable:

- ``gaussian_noise``, ``uniform_noise``: grey or coloured noise of random level and spread;
- ``pixel_shuffled``, ``block_shuffled``: held-out crops of the subject with their pixels (or 8x8 blocks)
  put in random order: exactly the subject's colours, none (or little) of its structure;
- ``procedural_textures``: clouds, marble and wood grain (fractal value noise), coloured from random
  colours or from the subject's own palettes;
- ``thresholded_blobs``: smooth noise cut into two to four flat colours (random or the subject's palettes);
- ``restyled_textiles``: the subject's own styles (kente, wax, mudcloth) in palettes that are not the
  subject's: the tradition in general, as SD v1.5 knows it, not *your* fabric;
- ``world_samples``: the pocket world's own pictures, plain or as objects (``fabric_world.sample_scene``);
- ``class_images``: the pocket model's "a fabric pattern", what prior preservation trains on.

``PROBES`` names them (the targets: at most 5% may pass); ``NEAR_MISSES`` are measured beside them with
no target (a coarser shuffle, sibling textiles from the same loom, crops through the pocket VAE).

The fill judge (``SubjectJudge.passes(images, obj)``: is the dress's fabric yours?) has its own sets, each
(judge, n, seed, obj) -> n pictures of ``obj``: ``FILL_PROBES`` (world objects of every kind from
``fabric_world.draw_scene``, and the plain probes' noise, shuffles, textures and blobs made into the object
the way ``draw_scene`` does it) and ``FILL_NEAR_MISSES``.
``python -m pocket.judge_probes [n] [class_n]`` prints the tables README.md and pocket/README.md quote.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pocket import fabric_world, textiles

SIZE = fabric_world.SIZE


def gaussian_noise(n: int, seed: int) -> np.ndarray:
    """Grey (half of them) or coloured Gaussian noise, mean 60-200, spread 10-80."""
    rng = np.random.default_rng([seed, 101])
    out = []
    for _ in range(n):
        channels = 1 if rng.random() < 0.5 else 3
        noise = rng.normal(rng.uniform(60, 200, channels), rng.uniform(10, 80), (SIZE, SIZE, channels))
        out.append(np.broadcast_to(noise, (SIZE, SIZE, 3)))
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def uniform_noise(n: int, seed: int) -> np.ndarray:
    """Uniform noise per pixel and channel, between a random low (0-128) and high (40 above it up to 255)."""
    rng = np.random.default_rng([seed, 102])
    out = []
    for _ in range(n):
        low = rng.uniform(0, 128)
        out.append(rng.uniform(low, rng.uniform(low + 40, 255), (SIZE, SIZE, 3)))
    return np.stack(out).astype(np.uint8)


def pixel_shuffled(pictures: np.ndarray, seed: int) -> np.ndarray:
    """Each picture's pixels in a random order."""
    rng = np.random.default_rng([seed, 103])
    flat = pictures.reshape(len(pictures), -1, 3)
    return np.stack([p[rng.permutation(len(p))] for p in flat]).reshape(pictures.shape)


def block_shuffled(pictures: np.ndarray, seed: int, block: int = 8) -> np.ndarray:
    """Each picture cut into ``block`` x ``block`` squares, put back in a random order."""
    rng = np.random.default_rng([seed, 104])
    n, g = len(pictures), SIZE // block
    blocks = pictures.reshape(n, g, block, g, block, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, block, block, 3)
    blocks = np.stack([b[rng.permutation(g * g)] for b in blocks])
    return blocks.reshape(n, g, g, block, block, 3).transpose(0, 1, 3, 2, 4, 5).reshape(pictures.shape)


def value_noise(rng: np.random.Generator, octaves: int, base: int) -> np.ndarray:
    """Fractal value noise in [0, 1] (64x64): ``octaves`` random grids from ``base`` cells, bicubic, halving."""
    total, amplitude = np.zeros((SIZE, SIZE)), 1.0
    for octave in range(octaves):
        cells = base * 2 ** octave
        grid = torch.from_numpy(rng.random((cells + 1, cells + 1)))[None, None].float()
        total += amplitude * F.interpolate(grid, size=(SIZE, SIZE), mode="bicubic", align_corners=True)[0, 0].numpy()
        amplitude /= 2
    return (total - total.min()) / (np.ptp(total) + 1e-9)


def palette(rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` colours: half the time from one of the subject's palettes (textiles.PALETTES), else random."""
    if rng.random() < 0.5:
        colours = list(textiles.PALETTES.values())[rng.integers(len(textiles.PALETTES))]
        return np.array([colours[i % len(colours)] for i in rng.permutation(max(k, len(colours)))[:k]], float)
    return rng.uniform(0, 255, (k, 3))


def procedural_textures(n: int, seed: int) -> np.ndarray:
    """Clouds, marble and wood grain in turn, each ramped through three colours."""
    rng = np.random.default_rng([seed, 105])
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    out = []
    for i in range(n):
        v = value_noise(rng, 4, int(rng.integers(2, 6)))
        if i % 3 == 1:  # marble: a sine wave bent by the noise
            frequency, angle = rng.uniform(0.05, 0.3), rng.uniform(0, np.pi)
            v = 0.5 + 0.5 * np.sin(frequency * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(3, 10) * v)
        elif i % 3 == 2:  # wood: rings around a point, bent by the noise
            cx, cy = rng.uniform(-SIZE / 2, 1.5 * SIZE, 2)
            v = (np.hypot(x - cx, y - cy) * rng.uniform(0.1, 0.4) + 4 * v) % 1.0
        colours = palette(rng, 3)
        t = np.clip(v * 2, 0, 1.999)
        low = np.floor(t).astype(int)
        image = colours[low] * (1 - (t - low))[..., None] + colours[low + 1] * (t - low)[..., None]
        out.append(image)
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def thresholded_blobs(n: int, seed: int) -> np.ndarray:
    """Smooth noise cut at its quantiles into two to four flat colours, with a little weave noise."""
    rng = np.random.default_rng([seed, 106])
    out = []
    for _ in range(n):
        v = value_noise(rng, int(rng.integers(1, 4)), int(rng.integers(3, 9)))
        k = int(rng.integers(2, 5))
        levels = np.digitize(v, np.quantile(v, np.linspace(0, 1, k + 1)[1:-1]))
        out.append(palette(rng, k)[levels] + rng.normal(0, 3, (SIZE, SIZE, 3)))
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def world_samples(n: int, seed: int) -> np.ndarray:
    """The pocket world's own pictures, every kind, plain or made into an object (``fabric_world.sample_scene``)."""
    return np.stack([fabric_world.sample_scene(seed + i)[0] for i in range(n)])


def class_images(n: int, seed: int, steps: int = 15, model_id: str = "pocket") -> np.ndarray:
    """The pocket model's "a fabric pattern" (the class prompt), ``steps`` DPM-Solver++ steps, seeds from ``seed``."""
    from common import models, sampling

    pipe = models.load_pipeline(model_id)
    sampling.use_multistep_solver(pipe)
    pictures, _ = sampling.generate(pipe, [fabric_world.GENERIC_CAPTION] * n, list(range(seed, seed + n)),
                                    sampling.SamplingSettings(steps, 7.5, batch_size=16), progress=False)
    return np.stack([np.asarray(p.convert("RGB")) for p in pictures])


# Every probe set by name: (judge, n, seed) -> n pictures. The shuffled ones shuffle the judge's held-out
# crops (seed + 1, so not the held-out set reported beside them).
PROBES = {
    "Gaussian noise": lambda judge, n, seed: gaussian_noise(n, seed),
    "uniform noise": lambda judge, n, seed: uniform_noise(n, seed),
    "pixel-shuffled subject": lambda judge, n, seed: pixel_shuffled(judge.held_out(n, seed + 1), seed),
    "8x8 block-shuffled subject": lambda judge, n, seed: block_shuffled(judge.held_out(n, seed + 1), seed),
    "procedural textures": lambda judge, n, seed: procedural_textures(n, seed),
    "thresholded blobs": lambda judge, n, seed: thresholded_blobs(n, seed),
    "the subject's styles in other palettes": lambda judge, n, seed: restyled_textiles(n, seed, judge.view),
    "world samples": lambda judge, n, seed: world_samples(n, 20_000_000 + seed * 10_000),
    "class images": lambda judge, n, seed: class_images(n, 30_000_000 + seed * 10_000),
}


def sibling_textiles(n: int, seed: int, view: float = 1.0) -> np.ndarray:
    """Textiles in the style and palette of each of the ten training pictures in turn, drawn with other
    seeds: another cloth from the same loom. Not the subject, but no target: see the README. Each is seen the
    way the judge sees a sample: a crop of ``view`` of its side (at a random place), at 64 px."""
    from pocket.subject_judge import crop

    rng = np.random.default_rng([seed, 107])
    designs = textiles.DESIGNS * (n // len(textiles.DESIGNS) + 1)
    drawn = [textiles.draw_textile(style, palette, 40_000_000 + seed * 10_000 + i) for i, (style, palette, _) in
             zip(range(n), designs)]
    return np.stack([crop(picture, view, *(rng.random(2) if view < 1 else (0.5, 0.5))) for picture in drawn])


def subject_palettes_named() -> list[frozenset]:
    """Each of the subject's palettes as the set of the world's colour names nearest to its colours."""
    names = fabric_world.COLOUR_NAMES
    named = np.array([fabric_world.COLOURS[c] for c in names], float)
    return [frozenset(names[int(np.argmin(((named - np.array(c, float)) ** 2).sum(1)))] for c in colours)
            for colours in textiles.PALETTES.values()]


def restyled_textiles(n: int, seed: int, view: float = 1.0) -> np.ndarray:
    """The subject's three styles (kente, wax, mudcloth in turn) drawn in the world's named colours, in palettes
    that share at most half their colours with any of the subject's: another maker's cloth in the same tradition,
    what SD v1.5 knows of kente, wax print and mudcloth in general. Seen as ``sibling_textiles`` are."""
    from pocket.subject_judge import crop

    rng = np.random.default_rng([seed, 108])
    names, subject = fabric_world.COLOUR_NAMES, subject_palettes_named()
    out = []
    for i in range(n):
        style = ("kente", "wax", "mudcloth")[i % 3]
        while True:  # (about one draw in three is too close to one of the subject's palettes)
            chosen = [names[k] for k in rng.choice(len(names), 2 if style == "mudcloth" else 4, replace=False)]
            if all(len(set(chosen) & palette) <= len(palette) // 2 for palette in subject):
                break
        picture = textiles.draw_textile(style, [fabric_world.COLOURS[c] for c in chosen], 50_000_000 + seed * 10_000 + i)
        out.append(crop(picture, view, *(rng.random(2) if view < 1 else (0.5, 0.5))))
    return np.stack(out)


def through_pocket_vae(pictures: np.ndarray, vae_dir: str = "models/pocket-sd/vae") -> np.ndarray:
    """The pictures encoded and decoded by the pocket model's autoencoder: the most of them it can draw."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        x = torch.from_numpy(pictures).float().permute(0, 3, 1, 2) / 127.5 - 1
        y = torch.cat([vae.decode(vae.encode(b).latent_dist.mean).sample for b in x.split(64)])
    return ((y.clamp(-1, 1).permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)


# Measured beside the probes, with no target: what the judge makes of near misses.
NEAR_MISSES = {
    "16x16 block-shuffled subject": lambda judge, n, seed: block_shuffled(judge.held_out(n, seed + 1), seed, 16),
    "sibling textiles (same style and palette, other seeds)":
        lambda judge, n, seed: sibling_textiles(n, seed, judge.view),
    "held-out crops through the pocket VAE": lambda judge, n, seed: through_pocket_vae(judge.held_out(n, seed)),
}


def made_into(pictures: np.ndarray, obj: str, seed: int) -> np.ndarray:
    """Each picture made into ``obj`` on the studio ground the way ``fabric_world.draw_scene`` does it, each
    with its own jitter (``subject_judge.compose``)."""
    from pocket.subject_judge import compose

    return np.stack([compose(p, obj, 70_000_000 + seed * 10_000 + i) for i, p in enumerate(pictures)])


def world_objects(n: int, seed: int, obj: str) -> np.ndarray:
    """World patterns of every kind in turn (random colours) made into ``obj`` by ``fabric_world.draw_scene``."""
    out = []
    for i in range(n):
        s = 60_000_000 + seed * 10_000 + i
        _, _, c1, c2 = fabric_world.sample(s)
        out.append(fabric_world.draw_scene(fabric_world.KINDS[i % len(fabric_world.KINDS)], c1, c2, obj, s))
    return np.stack(out)


# The fill judge's probes: (judge, n, seed, obj) -> n pictures of ``obj`` whose fill is not the subject
# (targets: at most 5% may pass), and its near misses (no target). The fabric of each is the plain probe's.
FILL_PROBES = {
    "world objects, every kind": lambda judge, n, seed, obj: world_objects(n, seed, obj),
    "Gaussian noise": lambda judge, n, seed, obj: made_into(gaussian_noise(n, seed), obj, seed),
    "uniform noise": lambda judge, n, seed, obj: made_into(uniform_noise(n, seed), obj, seed),
    "pixel-shuffled subject": lambda judge, n, seed, obj: made_into(PROBES["pixel-shuffled subject"](judge, n, seed),
                                                                     obj, seed),
    "8x8 block-shuffled subject": lambda judge, n, seed, obj: made_into(
        PROBES["8x8 block-shuffled subject"](judge, n, seed), obj, seed),
    "procedural textures": lambda judge, n, seed, obj: made_into(procedural_textures(n, seed), obj, seed),
    "thresholded blobs": lambda judge, n, seed, obj: made_into(thresholded_blobs(n, seed), obj, seed),
    "the subject's styles in other palettes": lambda judge, n, seed, obj: made_into(
        restyled_textiles(n, seed, judge.view), obj, seed),
}
FILL_NEAR_MISSES = {
    "16x16 block-shuffled subject": lambda judge, n, seed, obj: made_into(
        NEAR_MISSES["16x16 block-shuffled subject"](judge, n, seed), obj, seed),
    "sibling textiles (same style and palette, other seeds)": lambda judge, n, seed, obj: made_into(
        sibling_textiles(n, seed, judge.view), obj, seed),
}


def report(n: int = 256, class_n: int = 64, seed: int = 1, folder="training_images", fills: bool = True) -> str:
    """The judge's held-out pass rate and every probe set's false-positive rate, as a Markdown table; then
    (``fills``) the same for the fill judge, ``n`` pictures per set spread over the five objects."""
    from pocket import subject_judge

    judge = subject_judge.load(folder)
    rows = [("held-out crops of the training pictures (target >= 90%)", n, judge.summary(judge.held_out(n, seed)))]
    for name, build in list(PROBES.items()) + list(NEAR_MISSES.items()):
        count = class_n if name == "class images" else n
        rows.append((name + (" (target <= 5%)" if name in PROBES else " (no target)"), count,
                     judge.summary(build(judge, count, seed))))
    lines = ["| pictures | n | pass | mean similarity |", "|---|---|---|---|"]
    lines += [f"| {name} | {count} | {r['pass_rate']:.1%} | {r['similarity']:.2f} |" for name, count, r in rows]
    threshold = (f"view {judge.view:g}, threshold {judge.threshold:.3f} (similarity {np.exp(-judge.threshold):.3f}), "
                 f"seed {seed}")
    text = "\n".join(lines) + "\n\n" + threshold
    return text + "\n\n" + fill_report(judge, n, seed) if fills else text


def fill_report(judge, n: int = 256, seed: int = 1) -> str:
    """The fill judge's table: per set, ``n`` pictures in all, ``n // 5`` of each object, each judged by its fill."""
    objects = fabric_world.OBJECTS[1:]
    each = max(1, n // len(objects))
    sets = [("held-out crops of the training pictures, made into objects (target >= 90%)",
             lambda judge, n, seed, obj: judge.held_out_fills(n, seed, obj))]
    sets += [(name + " (target <= 5%)", build) for name, build in FILL_PROBES.items()]
    sets += [(name + " (no target)", build) for name, build in FILL_NEAR_MISSES.items()]
    lines = ["| fills | n | pass | mean similarity | " + " | ".join(objects) + " |", "|---" * (4 + len(objects)) + "|"]
    for name, build in sets:
        passed, similar = [], []
        for obj in objects:
            scores = judge.score_object(build(judge, each, seed, obj), obj)
            passed.append(judge.verdict(scores, obj))
            similar.append(np.exp(-scores["distance"]))
        cells = " | ".join(f"{p.mean():.0%}" for p in passed)
        lines.append(f"| {name} | {each * len(objects)} | {np.concatenate(passed).mean():.1%} | "
                     f"{np.concatenate(similar).mean():.2f} | {cells} |")
    thresholds = ", ".join(f"{obj} {judge.fill_threshold(obj):.3f}" for obj in objects)
    return "\n".join(lines) + f"\n\nfill thresholds: {thresholds}; {each} pictures per object, seed {seed}"


USAGE = "python -m pocket.judge_probes [n] [class_n]  (pictures per probe set, class images; 256 and 64 unless given)"


def main(argv: list[str]) -> int:
    """The command line: up to two whole numbers >= 1 (a typo, 0 or -3 was a numpy traceback; a third was ignored)."""
    from common.errors import LessonError

    args = [a for a in argv if a != "--debug"]  # (lesson.run reads --debug itself)
    if len(args) > 2:
        raise LessonError(f"judge_probes takes at most two numbers, got {len(args)}. Usage: {USAGE}")
    counts = []
    for name, text in zip(("n", "class_n"), args):
        try:
            counts.append(int(text))
        except ValueError:
            counts.append(0)
        if counts[-1] < 1:
            raise LessonError(f"{name} must be a whole number >= 1, got {text!r}. Usage: {USAGE}")
    print(report(*counts))
    return 0


if __name__ == "__main__":
    import sys

    from common import lesson

    lesson.run(lambda: main(sys.argv[1:]))
