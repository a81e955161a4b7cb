"""Prior preservation: class images, and the prior term of the DreamBooth loss.

Fine-tuning on ten pictures of one fabric teaches the model that *every* "fabric pattern" looks like
it (language drift), and it forgets the variety it knew (catastrophic forgetting). DreamBooth's fix
(Ruiz et al. 2022) is to let the original model draw ~100 images for the plain class prompt
("a fabric pattern") first, and keep training on them alongside the subject:

    L = || eps - eps_theta(x_t, t, c_instance) ||^2  +  lambda * || eps - eps_theta(x'_t, t', c_class) ||^2

The class images live in ``class_images/`` with a manifest that records how they were made (model,
prompt, resolution, seeds), so images made by another model or for another prompt are never reused.
Two runs sharing the folder take turns (``holding``): one draws and reads, the other waits, then reuses or redraws.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from common.errors import warn
from common.files import save_image, save_json

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"  # (not a .png nor the manifest: set_aside leaves it where it is)


def prior_preservation_loss(model_pred: torch.Tensor, target: torch.Tensor, num_instance: int,
                            prior_loss_weight: float):
    """The DreamBooth loss for one batch whose first ``num_instance`` rows are instance images.

    The remaining rows are class images; their MSE is the prior-preservation term. Returns
    ``(total, instance_loss, prior_loss)``; without class rows the prior term is zero.
    """
    pred, target = model_pred.float(), target.float()
    instance_loss = F.mse_loss(pred[:num_instance], target[:num_instance], reduction="mean")
    if pred.shape[0] == num_instance:
        return instance_loss, instance_loss, torch.zeros_like(instance_loss)
    prior_loss = F.mse_loss(pred[num_instance:], target[num_instance:], reduction="mean")
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss


def class_image_recipe(model: str, prompt: str, resolution: int, num_inference_steps: int,
                       guidance_scale: float, weights: str | None = None) -> dict:
    """What must match for existing class images to be reused. ``weights``: the model's
    ``models.weights_fingerprint`` where it has one (a local model, which can change under its name)."""
    recipe = {"model": model, "prompt": prompt, "resolution": resolution,
              "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    return recipe if weights is None else {**recipe, "model_weights": weights}


def _valid_manifest(folder) -> dict | None:
    """The manifest, or None when there is none or it was edited or damaged beyond reading."""
    manifest = read_manifest(folder)
    if isinstance(manifest, dict) and isinstance(manifest.get("recipe", {}), dict) and \
            isinstance(manifest.get("files", []), list):
        return manifest
    return None


def read_manifest(folder) -> dict | None:
    import json

    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def class_image_name(seed: int) -> str:
    return f"class_{seed:05d}.png"


def is_good_class_image(path: Path, resolution) -> bool:
    """The file opens and decodes as a picture of the recipe's size (a deleted, cut-short or foreign file
    is drawn again rather than trained on)."""
    try:
        with Image.open(path) as image:
            image.load()
            return resolution is None or image.size == (resolution, resolution)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def reusable_class_images(folder, recipe: dict) -> tuple[list[Path], str | None]:
    """The class images already made with this recipe (each checked), and why the others cannot be reused (or None)."""
    folder = Path(folder)
    manifest = _valid_manifest(folder)
    if manifest is None:
        stray = [p for p in folder.glob("*.png")] if folder.is_dir() else []
        return [], ("there is no manifest saying how the images there were made" if stray else None)
    changed = [k for k, v in recipe.items() if manifest.get("recipe", {}).get(k) != v]
    if changed:
        was = ", ".join(f"{k}={manifest.get('recipe', {}).get(k)!r}" for k in changed)
        return [], f"they were made with {was}"
    files = [folder / name for name in manifest.get("files", []) if isinstance(name, str) and "/" not in name]
    return [p for p in files if is_good_class_image(p, recipe.get("resolution"))], None


def set_aside(folder, reason: str) -> None:
    """Move old class images out of the way (into ``folder/replaced-N/``), never deleting a student's file."""
    folder = Path(folder)
    old = [p for p in folder.glob("*.png")] + [folder / MANIFEST]
    old = [p for p in old if p.is_file()]
    if not old:
        return
    n = 1
    while (folder / f"replaced-{n}").exists():
        n += 1
    aside = folder / f"replaced-{n}"
    aside.mkdir(parents=True)
    for p in old:
        p.replace(aside / p.name)
    warn(f"class images in '{folder}/' were not made for this run ({reason}); moved them to '{aside}/' "
         "and generating new ones.")


@contextmanager
def holding(folder, accelerator=None):
    """Hold the class folder while this run decides, draws and reads its class images.

    Another run with a different recipe (CLASS_PROMPT, MODEL_ID...) would otherwise set this run's images
    aside, or draw into the folder, while this one reads it. The other run waits rather than failing: it
    needs these images too, and once this one has read them it can reuse them (same recipe) or set them
    aside and draw its own. The wait lasts the drawing, not the training. A lock of the operating system
    (``filelock``): a run that is killed lets go of it. Under ``accelerate launch`` the main process holds
    it until every process has read the images.
    """
    from filelock import FileLock, Timeout  # (installed with huggingface_hub)

    if accelerator is not None and not accelerator.is_main_process:
        yield
        accelerator.wait_for_everyone()
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_FILE)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"  Another run is drawing or reading the class images in '{folder}/': waiting until it is done "
              "with them (Ctrl-C to stop)...", flush=True)
        lock.acquire()
    try:
        yield
        if accelerator is not None:
            accelerator.wait_for_everyone()  # (every process has read the images)
    finally:
        lock.release()


def ensure_class_images(folder, recipe: dict, num_images: int, generate_fn, accelerator=None,
                        batch_size: int = 4) -> list[Path]:
    """Make sure ``folder`` holds ``num_images`` class images made with ``recipe``; generate what is missing.

    Image i is drawn from seed i and saved as ``class_0000i.png``. ``generate_fn(prompts, seeds) ->
    list[PIL.Image]`` draws one batch; each batch is saved, and the manifest updated, as soon as it is
    drawn, so an interrupted run keeps what it made and the next run draws only the rest. A listed
    image that is missing or damaged is drawn again from its own seed. Under ``accelerate launch``
    each batch is shared out across the processes and only the main process writes files.
    """
    folder = Path(folder)
    is_main = accelerator is None or accelerator.is_main_process
    have, reason = reusable_class_images(folder, recipe)
    if reason and is_main:
        set_aside(folder, reason)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    wanted = [folder / class_image_name(seed) for seed in range(num_images)]
    good = {p.name for p in have}
    missing = [seed for seed, p in enumerate(wanted) if p.name not in good]
    if not missing:
        print(f"  Reusing {num_images} class images from '{folder}/' (same model, prompt and resolution).")
        return wanted

    listed = (_valid_manifest(folder) or {}).get("files", []) if not reason else []
    damaged = [seed for seed in missing if class_image_name(seed) in listed]
    if damaged:
        names = ", ".join(f"{class_image_name(s)} (seed {s})" for s in damaged[:8])
        names += " ..." if len(damaged) > 8 else ""
        print(f"  Drawing again {len(damaged)} class image(s) that are missing or damaged: {names}")
    print(f"  Generating {len(missing)} class images for '{recipe['prompt']}' with the base model "
          f"(once; they are kept in '{folder}/')...")
    processes = accelerator.num_processes if accelerator is not None else 1
    step = max(1, batch_size) * processes
    done = sorted(good)
    for start in range(0, len(missing), step):
        seeds = missing[start:start + step]
        if processes > 1:
            from accelerate.utils import gather_object

            with accelerator.split_between_processes(seeds) as my_seeds:
                mine = list(zip(my_seeds, generate_fn([recipe["prompt"]] * len(my_seeds), list(my_seeds))))
            made = sorted(gather_object(mine), key=lambda pair: pair[0])
        else:
            made = list(zip(seeds, generate_fn([recipe["prompt"]] * len(seeds), seeds)))
        if is_main:  # the images first, then the manifest that vouches for them
            for seed, image in made:
                done.append(save_image(image, folder / class_image_name(seed)).name)
            done = sorted(set(done))
            seeds_done = [int(m.group(1)) for m in map(re.compile(r"class_(\d+)\.png").fullmatch, done) if m]
            save_json({"recipe": recipe, "seeds": seeds_done, "files": done}, folder / MANIFEST)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return wanted
