"""Prior preservation: class images, and the prior term of the DreamBooth loss.

Fine-tuning on ten pictures of one fabric teaches the model that *every* "fabric pattern" looks like
it (language drift), and it forgets the variety it knew (catastrophic forgetting). DreamBooth's fix
(Ruiz et al. 2022) is to let the original model draw ~100 images for the plain class prompt
("a fabric pattern") first, and keep training on them alongside the subject:

    L = || eps - eps_theta(x_t, t, c_instance) ||^2  +  lambda * || eps - eps_theta(x'_t, t', c_class) ||^2

The class images live in ``class_images/`` with a manifest that records how they were made (model,
prompt, resolution, seeds), so images made by another model or for another prompt are never reused.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from common.errors import warn
from common.files import save_image, save_json

MANIFEST = "manifest.json"


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
                       guidance_scale: float) -> dict:
    """What must match for existing class images to be reused."""
    return {"model": model, "prompt": prompt, "resolution": resolution,
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}


def read_manifest(folder) -> dict | None:
    import json

    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def reusable_class_images(folder, recipe: dict) -> tuple[list[Path], str | None]:
    """The class images already made with this recipe, and why the others cannot be reused (or None)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        stray = [p for p in folder.glob("*.png")] if folder.is_dir() else []
        return [], ("there is no manifest saying how the images there were made" if stray else None)
    changed = [k for k, v in recipe.items() if manifest.get("recipe", {}).get(k) != v]
    if changed:
        was = ", ".join(f"{k}={manifest.get('recipe', {}).get(k)!r}" for k in changed)
        return [], f"they were made with {was}"
    files = [folder / name for name in manifest.get("files", [])]
    return [p for p in files if p.is_file()], None


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


def ensure_class_images(pipe, folder, recipe: dict, num_images: int, generate_fn, accelerator=None,
                        seed_base: int = 0) -> list[Path]:
    """Make sure ``folder`` holds ``num_images`` class images made with ``recipe``; generate what is missing.

    ``generate_fn(prompts, seeds) -> list[PIL.Image]`` draws the images (batched). Under
    ``accelerate launch`` the missing images are shared out across the processes and only the main
    process writes files.
    """
    folder = Path(folder)
    is_main = accelerator is None or accelerator.is_main_process
    have, reason = reusable_class_images(folder, recipe)
    if reason and is_main:
        set_aside(folder, reason)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    have = have[:num_images]
    missing = num_images - len(have)
    if missing <= 0:
        print(f"  Reusing {len(have)} class images from '{folder}/' (same model, prompt and resolution).")
        return have

    start = len(have)
    seeds = [seed_base + i for i in range(start, num_images)]
    print(f"  Generating {missing} class images for '{recipe['prompt']}' with the base model "
          f"(once; they are kept in '{folder}/')...")
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        with accelerator.split_between_processes(seeds) as my_seeds:
            mine = generate_fn([recipe["prompt"]] * len(my_seeds), list(my_seeds))
            mine = list(zip(my_seeds, mine))
        made = sorted(gather_object(mine), key=lambda pair: pair[0])
    else:
        made = list(zip(seeds, generate_fn([recipe["prompt"]] * len(seeds), seeds)))

    files = list(have)
    if is_main:
        for seed, image in made:
            files.append(save_image(image, folder / f"class_{seed:05d}.png"))
        save_json({"recipe": recipe, "seeds": [seed_base + i for i in range(num_images)],
                   "files": [p.name for p in files]}, folder / MANIFEST)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return [folder / f"class_{seed_base + i:05d}.png" for i in range(num_images)]
