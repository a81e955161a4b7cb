"""Instance images: the ~10 pictures of the subject that DreamBooth binds to the token "sks".

Real photos arrive in every shape: any case of .jpg/.jpeg/.png/.webp/.bmp, rotated by an EXIF tag,
RGBA, palette, grayscale, CMYK or 16-bit, animated, huge, tiny or broken. ``load_instance_images``
turns each usable one into an RGB square at the training resolution (centre crop, then resize; or,
with ``crop_fraction`` below 1, several random crops), warns when it has to upscale or a picture is far
from square (the square keeps little of it), and names every file it skips.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import LessonError, warn

# What PIL reads everywhere, with the names browsers and scanners give them (Chrome on Windows saves JPEGs as .jfif).
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SUFFIX_LIST = "/".join(sorted(IMAGE_SUFFIXES))
# Exercises 3a and 3b's TRAINING_IMAGES_DIR as the course ships it: the generation scripts, which have no such
# constant, keep their pictures out of it.
COURSE_IMAGES_DIR = "training_images"
# Below this share of a picture kept by the square (short side / long side: 2:1 keeps half), the picture is named
# with what it loses: a panorama or a strip shows little of its subject once cropped to a square.
MIN_KEPT = 0.5


def require_apart_from_course_images(cfg, name: str) -> None:
    """Folder constant ``name`` of a script without TRAINING_IMAGES_DIR is not the course's training pictures'
    folder: exercises 3a and 3b would train on what this script writes there."""
    from common.configurator import dashed

    from common.files import same_place

    if same_place(getattr(cfg, name), COURSE_IMAGES_DIR):
        raise LessonError(f"{name} '{getattr(cfg, name)}' is '{COURSE_IMAGES_DIR}/', the folder of your training "
                          "pictures: exercises 3a and 3b would train on the pictures this script writes there. Set "
                          f"{name} to a folder of its own (edit it at the top of {cfg.SCRIPT} or pass "
                          f"{dashed(name)}).")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited over white (how a fabric photo is usually shown)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        # 16-bit pictures go to 65535; float ones (mode F) mostly to 1.0 (scientific and HDR software), else to 255
        top = 65535.0 if array.max() > 255 else 1.0 if image.mode == "F" and array.max() <= 1.0 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path, longest_needed: int | None = None) -> Image.Image:
    """Open one image file as upright RGB. Raises OSError/ValueError for files that are not images.

    ``longest_needed`` lets JPEG decoding shrink a huge photo while it loads (PIL's draft mode), so a
    10000x10000 picture does not need gigabytes of memory.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            image.seek(0)  # animated GIF/WebP: the first frame
            if longest_needed and image.format == "JPEG":
                image.draft("RGB", (longest_needed, longest_needed))
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """The largest centred square, resized to ``resolution`` x ``resolution``."""
    return ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def list_image_files(folder) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def broken_links(folder) -> list[Path]:
    """Picture-named links in ``folder`` whose file was moved or deleted: not pictures to read, but not to be
    passed over in silence either (a folder of links to photos elsewhere is a common way to choose them)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_symlink() and not p.exists()
                  and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _links_text(links: list[Path]) -> str:
    return ", ".join(f"{p.name} -> {os.readlink(p)}" for p in links[:3]) + (" ..." if len(links) > 3 else "")


def repeated_pictures(files: list[Path]) -> dict[Path, Path]:
    """Each file in ``files`` whose bytes are another's (a copy such as 'photo (1).jpg', or a link to a picture
    also in the folder), mapped to the one of them that is kept. Trained on twice, a picture would count double
    against the others, as if the subject looked like it more often. The one kept is the original: a file rather
    than a link, then the shortest name."""
    alike: dict[str, list[Path]] = {}
    for path in files:
        try:
            if path.stat().st_size == 0:  # (empty files are alike but no copies: each is named as empty)
                continue
            with open(path, "rb") as f:
                alike.setdefault(hashlib.file_digest(f, "sha256").hexdigest(), []).append(path)
        except OSError:  # (unreadable: named when it is decoded)
            pass
    repeats = {}
    for group in alike.values():  # the one kept: a file rather than a link, then the shortest name ('a.jpg')
        kept = min(group, key=lambda p: (p.is_symlink(), len(p.name), p.name))
        repeats.update({p: kept for p in group if p != kept})
    return repeats


def subfolders_with_pictures(folder) -> list[str]:
    """The names of ``folder``'s subfolders that hold pictures of their own (not read: only ``folder`` is)."""
    found = []
    for sub in sorted(Path(folder).iterdir()):
        try:
            if sub.is_dir() and not sub.name.startswith(".") and list_image_files(sub):
                found.append(sub.name)
        except OSError:  # a subfolder we may not list: it is not read either way
            pass
    return found


def check_instance_folder(folder, constant: str = "TRAINING_IMAGES_DIR") -> list[Path]:
    """The picture files in ``folder``, or a LessonError saying why there are none.

    Nothing is decoded, so the training scripts call this before any model loads: a missing folder
    is reported at once, not after a 4 GB download.
    """
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.is_file() else f"does not exist (looked in {Path.cwd()})"
        raise LessonError(f"{constant} folder '{folder}' {what}. Run the script from the project folder, or put "
                          f"your training images in '{folder}/'.")
    files = list_image_files(folder)
    nested = subfolders_with_pictures(folder)
    if not files and nested:  # (an unzipped download often puts the photos one folder down)
        inner = folder / nested[0]
        raise LessonError(f"{constant} folder '{folder}/' holds no pictures itself, but its subfolder"
                          f"{'s' if len(nested) > 1 else ''} {', '.join(f'{n}/' for n in nested[:3])} "
                          f"{'do' if len(nested) > 1 else 'does'}: pictures in subfolders are not read. Set "
                          f"{constant} to '{inner}' (or move the pictures up into '{folder}/') and run again.")
    links = broken_links(folder)
    if not files and links:
        raise LessonError(f"{constant} folder '{folder}/' holds only links to pictures that no longer exist "
                          f"({_links_text(links)}): the files they point to were moved or deleted. Copy the "
                          f"pictures themselves into '{folder}/' and run again.")
    if not files:
        others = [p.name + ("/" if p.is_dir() else "") for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
        held = f"holds only {len(others)} other file(s) ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''})" \
            if others else "is empty"
        heic = " Convert iPhone .heic photos to .jpg first." if any(
            n.lower().endswith((".heic", ".heif")) for n in others) else ""
        raise LessonError(f"{constant} folder '{folder}/' {held}: no pictures ({SUFFIX_LIST}). Add 5-20 pictures of "
                          f"your subject and run again.{heic}")
    return files


def crops_per_picture(crop_fraction: float) -> int:
    """How many training crops each picture gives at ``crop_fraction``: enough to cover it about once
    (1 / crop_fraction**2; 0.5 -> 4, 0.4 -> 6), and 1 for the whole picture."""
    return max(1, round(1 / crop_fraction ** 2))


def random_crops(image: Image.Image, resolution: int, crop_fraction: float, rng: np.random.Generator
                 ) -> list[Image.Image]:
    """``crops_per_picture(crop_fraction)`` squares of ``crop_fraction`` x the picture's shorter side, at
    random positions drawn from ``rng``, each resized to ``resolution`` as ``center_crop_resize`` does."""
    width, height = image.size
    side = max(1, round(crop_fraction * min(width, height)))
    crops = []
    for _ in range(crops_per_picture(crop_fraction)):
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        crops.append(center_crop_resize(image.crop((left, top, left + side, top + side)), resolution))
    return crops


def load_instance_images(folder, resolution: int, constant: str = "TRAINING_IMAGES_DIR",
                         crop_fraction: float = 1.0, seed: int = 0) -> list[Image.Image]:
    """Every usable image in ``folder`` as RGB ``resolution``-squares; skipped files are named.

    ``crop_fraction`` = 1: each picture once, its largest centred square (what SD v1.5 trains on: the whole
    photo). Below 1: each picture gives ``crops_per_picture(crop_fraction)`` squares of ``crop_fraction`` x
    its shorter side, at random positions (seeded by ``seed`` and the file's place in the folder: same seed,
    same crops). That is for the pocket model, which draws 64 px pictures: a whole 512 px photo shrunk to
    64 px loses its weave (finer than a pixel), so the pocket model sees the photo through a magnifying glass,
    a piece at a time. The training scripts encode the crops once (their latent cache), so more crops cost
    nothing per training step.
    """
    folder = Path(folder)
    files = check_instance_folder(folder, constant)
    others = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES
              and not p.name.startswith(".")]
    if others:
        warn(f"ignoring {len(others)} file(s) that are not {SUFFIX_LIST}: {', '.join(others[:5])}"
             + (" ..." if len(others) > 5 else ""))
    links = broken_links(folder)
    if links:
        warn(f"skipping {len(links)} link(s) to pictures that no longer exist ({_links_text(links)}): the files "
             f"they point to were moved or deleted. Copy the pictures themselves into '{folder}/'.")
    nested = subfolders_with_pictures(folder)
    if nested:
        warn(f"ignoring the pictures in subfolder(s) {', '.join(f'{n}/' for n in nested[:5])}"
             f"{' ...' if len(nested) > 5 else ''}: only the pictures directly in '{folder}/' are trained on. "
             "Move them up if they are of your subject.")
    repeats = repeated_pictures(files)
    whole = crop_fraction >= 1
    needed = math.ceil(resolution / min(crop_fraction, 1.0))  # the shorter side that needs no upscaling
    images, upscaled, used = [], [], set()
    for index, path in enumerate(files):  # (the index seeds the crops)
        if path in repeats:
            continue
        try:  # (a crop needs more of the picture's pixels: JPEG decoding may shrink it only that far)
            image = open_image(path, longest_needed=needed)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            warn(f"skipping '{path.name}': {_why_unreadable(path, exc)}. Replace or remove it.")
            continue
        side = min(image.size)
        if side < 32:
            warn(f"skipping '{path.name}': {image.size[0]}x{image.size[1]} is too small to learn from (its shorter "
                 f"side is under 32 px). Use a photo of at least {needed}x{needed} px.")
            continue
        seen = side if whole else max(1, round(crop_fraction * side))  # the square that becomes one image
        if side / max(image.size) < MIN_KEPT:  # (its own warning says the upscaling too: one message a picture)
            warn(_narrow(path.name, image.size, seen, resolution, whole))
        elif seen < resolution:
            upscaled.append((path.name, seen))
        if whole:
            images.append(center_crop_resize(image, resolution))
        else:
            images += random_crops(image, resolution, crop_fraction, np.random.default_rng([seed, index]))
        used.add(path)
    _warn_repeats(repeats, used)
    if upscaled:
        worst = min(s for _, s in upscaled)
        what = "image(s) are" if whole else f"image(s) give crops ({crop_fraction:.0%} of the side) that are"
        warn(f"{len(upscaled)} {what} smaller than {resolution}x{resolution} and were upscaled up to "
             f"{resolution / worst:.0f}x ({', '.join(n for n, _ in upscaled[:4])}{' ...' if len(upscaled) > 4 else ''}). "
             "Upscaled pictures are blurry and the model learns the blur: use photos of at least "
             f"{needed}px if you can.")
    if not images:
        raise LessonError(f"No usable training images in '{folder}/' ({len(files)} picture file(s) found, all "
                          "unreadable or smaller than 32 px; each is named above). Add 5-20 .jpg/.png pictures of "
                          "your subject and run again.")
    return images


def _warn_repeats(repeats: dict[Path, Path], used: set[Path]) -> None:
    """Name the copies that were not trained on: once for a usable picture, or as skipped with their original."""
    once = [f"'{p.name}' is '{q.name}'" for p, q in repeats.items() if q in used]
    if once:
        warn(f"training on {len(once)} picture(s) once, not twice: {', '.join(once[:3])}"
             f"{' ...' if len(once) > 3 else ''} (the same file, copied or linked). Remove the copies, or replace "
             "them with other photos of your subject.")
    for copy, kept in repeats.items():
        if kept not in used:
            warn(f"skipping '{copy.name}': it is the same file as '{kept.name}', skipped above. Replace or remove "
                 "both.")


def _narrow(name: str, size: tuple[int, int], seen: int, resolution: int, whole: bool) -> str:
    """The warning for a picture much wider than tall (or taller than wide): training sees only a square of it."""
    width, height = size
    side = min(size)
    square = (f"its centre square, {side}x{side}," if whole else f"its crops, squares of {seen}x{seen} px,")
    blown = f", upscaled {resolution / seen:.0f}x," if seen < resolution else ""
    return (f"'{name}' is {width}x{height}: training sees only {square} about {side / max(size):.1%} of the "
            f"picture{blown} and the rest is never trained on. Crop it yourself to a square around your subject, or "
            "use a squarer photo.")


def describe_instances(images: list[Image.Image], crop_fraction: float, what: str = "instance images") -> str:
    """What ``load_instance_images`` gave, in a line: "10 instance images", or, with crops,
    "10 instance images -> 60 crops of 40% of each picture's side"."""
    if crop_fraction >= 1:
        return f"{len(images)} {what}"
    return (f"{len(images) // crops_per_picture(crop_fraction)} {what} -> {len(images)} crops of "
            f"{crop_fraction:.0%} of each picture's side")


def _why_unreadable(path: Path, exc: Exception) -> str:
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    if "truncated" in str(exc):
        return "the file is cut short (an interrupted download or copy?)"
    if isinstance(exc, UnidentifiedImageError):
        return "its content is not a picture, whatever its name says (PIL cannot read it)"
    return f"not a readable picture ({type(exc).__name__}: {str(exc)[:80]})"


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor (N, 3, H, W) in [-1, 1], the range the VAE expects."""
    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
