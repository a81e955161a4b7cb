"""Model cards: a README.md beside what you trained, in the Hugging Face format, so it can be shared.

A LoRA or an embedding without a card is a file nobody can use a month later: which base model, which
word to write, how it was trained. The card is what the Hub shows (YAML front matter: base_model,
instance_prompt, license, tags, written with ``huggingface_hub``'s ``ModelCardData``) followed by the
training settings, a preview, and how to load the file in diffusers, AUTOMATIC1111 and ComfyUI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from common.files import atomic_path, save_text

PREVIEW = ("preview.png", "preview_embedding.png")  # the LoRA's, the embedding's (they may share a folder)
LICENSE = "creativeml-openrail-m"  # Stable Diffusion v1.5's licence, which fine-tunes inherit
SHOWN_SETTINGS = ("MODEL_ID", "INSTANCE_PROMPT", "CLASS_PROMPT", "PLACEHOLDER_TOKEN", "INITIALIZER_TOKEN",
                  "NUM_VECTORS", "RESOLUTION", "LORA_RANK", "LORA_ALPHA", "LEARNING_RATE", "MAX_TRAIN_STEPS",
                  "TRAIN_BATCH_SIZE", "GRADIENT_ACCUMULATION", "PRIOR_PRESERVATION", "NUM_CLASS_IMAGES",
                  "PRIOR_LOSS_WEIGHT", "RANDOM_SEED", "training_seconds")


def _literal(text) -> str:
    """``text`` as a Python string in the card's snippet: a prompt with a quote in it still makes code that runs."""
    return json.dumps(str(text), ensure_ascii=False)


def _front_matter(settings: dict, tags: list[str], prompt: str) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=str(settings.get("MODEL_ID", "")), license=LICENSE, library_name="diffusers",
                         tags=["text-to-image", "stable-diffusion", "diffusers", *tags], instance_prompt=prompt)
    return f"---\n{data.to_yaml()}\n---\n"


def _settings_table(settings: dict) -> str:
    rows = [f"| `{k}` | `{settings[k]}` |" for k in SHOWN_SETTINGS if k in settings]
    return "| setting | value |\n|---|---|\n" + "\n".join(rows) + "\n"


def _preview(folder: Path, preview, name: str) -> str:
    """Copy the preview picture into the folder as ``name`` (the card travels with it) and link it."""
    if preview is None or not Path(preview).is_file():
        return ""
    with atomic_path(folder / name) as tmp:
        shutil.copyfile(preview, tmp)
    return f"![samples during training]({name})\n\n"


OWN_CARD = "Trained with `exercise3"  # a line every card of ours has: a README.md without it is yours, and kept


def _is_ours(path: Path) -> bool:
    try:
        return OWN_CARD in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _write(folder: Path, text: str, other_kind_file: str, own_name: str) -> Path:
    """README.md, unless the folder also holds the other kind of adapter (a LoRA and an embedding may
    share a folder) or a README.md that is not a card of ours (a student's own notes): then the card is
    named after its kind, so it overwrites neither."""
    readme = folder / "README.md"
    shared = (folder / other_kind_file).exists() or (readme.exists() and not _is_ours(readme))
    path = folder / own_name if shared else readme
    return save_text(text, path)


def write_lora_card(folder, settings: dict, kohya_file: Path, preview=None) -> Path:
    """README.md beside a DreamBooth-LoRA: the trigger word is SUBJECT_TOKEN, the prompt INSTANCE_PROMPT."""
    folder = Path(folder)
    prompt, token = settings.get("INSTANCE_PROMPT", ""), settings.get("SUBJECT_TOKEN", "sks")
    text = _front_matter(settings, ["lora", "dreambooth"], prompt) + f"""
# {folder.name}: a DreamBooth-LoRA

Trained with `exercise3b_train_lora.py` (DreamBooth + LoRA with prior preservation). Trigger word:
**`{token}`**; prompt it as in training: `{prompt}`.

{_preview(folder, preview, PREVIEW[0])}## Training settings

{_settings_table(settings)}
## Use it

**diffusers**

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained({_literal(settings.get("MODEL_ID", ""))})
pipe.load_lora_weights({_literal(folder.as_posix())})  # reads pytorch_lora_weights.safetensors
image = pipe({_literal(prompt)}).images[0]
```

**AUTOMATIC1111**: copy `{kohya_file.name}` into `stable-diffusion-webui/models/Lora/`, then prompt
`<lora:{kohya_file.stem}:1> {prompt}`.

**ComfyUI**: copy `{kohya_file.name}` into `ComfyUI/models/loras/` and pick it in a *Load LoRA* node.
"""
    return _write(folder, text, "learned_embeds.safetensors", "README_lora.md")


def write_embedding_card(folder, settings: dict, a1111_file: Path, preview=None) -> Path:
    """README.md beside a Textual Inversion embedding: the word to write is PLACEHOLDER_TOKEN."""
    folder = Path(folder)
    token = settings.get("PLACEHOLDER_TOKEN", "")
    prompt = f"a {token} pattern"
    text = _front_matter(settings, ["textual_inversion"], prompt) + f"""
# {folder.name}: a Textual Inversion embedding

Trained with `exercise3a_train_textual_inversion.py`: one new word, **`{token}`**, and nothing else in the
model changed. Write it in a prompt: `{prompt}`.

{_preview(folder, preview, PREVIEW[1])}## Training settings

{_settings_table(settings)}
## Use it

**diffusers**

```python
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained({_literal(settings.get("MODEL_ID", ""))})
pipe.load_textual_inversion({_literal((folder / "learned_embeds.safetensors").as_posix())})
image = pipe({_literal(prompt)}).images[0]
```

**AUTOMATIC1111**: copy `{a1111_file.name}` into `stable-diffusion-webui/embeddings/`, then write
`{a1111_file.stem}` in a prompt. **ComfyUI**: copy it into `ComfyUI/models/embeddings/` and write
`embedding:{a1111_file.stem}`.
"""
    return _write(folder, text, "pytorch_lora_weights.safetensors", "README_textual_inversion.md")
