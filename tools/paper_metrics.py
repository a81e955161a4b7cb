"""The DreamBooth paper's own metrics: DINO, CLIP-I and CLIP-T (Ruiz et al. 2023, section 4.1).

    from tools.paper_metrics import PaperMetrics
    judge = PaperMetrics.load()                        # facebook/dino-vits16 and openai/clip-vit-base-patch32
    judge.dino(generated, real), judge.clip_i(generated, real), judge.clip_t(generated, texts)

As the paper defines them, over PIL images:

- **DINO**: the average pairwise cosine similarity between the ViT-S/16 DINO embeddings (the CLS token of
  ``ViTModel``'s last hidden state) of generated and real images: the mean over every (generated, real)
  pair. Subject fidelity; unlike CLIP-I it tells apart subjects of the same class.
- **CLIP-I**: the same with CLIP image embeddings (``get_image_features``, the projected ones).
- **CLIP-T**: the average cosine similarity between each generated image's CLIP embedding and the CLIP
  text embedding of its prompt. Prompt fidelity. The paper says "prompt and image CLIP embeddings" and
  does not say what became of the identifier. We score the prompt *with the identifier removed*
  ("a sks african fabric pattern" is scored as "a african fabric pattern"): CLIP never learned the
  identifier (to CLIP "sks" is a rifle), a Textual Inversion word is not in CLIP's vocabulary at all, and
  every method is then scored against the same text. ``tools/evaluate_dreambooth.py`` does this.
- **Real images** (the paper's upper reference): DINO and CLIP-I between *different* real images, every
  pair i != j (a picture compared with itself would score 1).

The paper used CLIP ViT-B/32 (``openai/clip-vit-base-patch32``) and DINO ViT-S/16 (``facebook/dino-vits16``),
30 subjects x 25 prompts x 4 images, and reports raw cosines (not CLIPScore's x100). Each model is read
with its own processor (resize, crop, normalise) and tokenizer, through ``from_pretrained``: a Hub id
(downloaded once, then cached) or a local folder. When the weights cannot be had, ``load`` raises one
:class:`LessonError` line that says what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from common.configurator import dashed
from common.errors import LessonError, brief

DINO_MODEL = "facebook/dino-vits16"  # DINO ViT-S/16, as in the paper
CLIP_MODEL = "openai/clip-vit-base-patch32"  # CLIP ViT-B/32, as in the paper
_DEFAULTS = {"DINO_MODEL": DINO_MODEL, "CLIP_MODEL": CLIP_MODEL}
_KINDS = {"DINO_MODEL": ("vit", "a ViT (DINO)"), "CLIP_MODEL": ("clip", "a CLIP")}

# The paper's Table 1 (Stable Diffusion rows, and the real-image reference): DINO, CLIP-I, CLIP-T.
PAPER_TABLE_1 = {
    "DreamBooth (Stable Diffusion)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "Textual Inversion (Stable Diffusion)": {"dino": 0.569, "clip_i": 0.780, "clip_t": 0.255},
    "Real images": {"dino": 0.774, "clip_i": 0.885, "clip_t": None},
}


def _where(name: str, model_id: str) -> str:
    """Where ``model_id`` is: 'folder' (an existing folder) or 'hub'; a LessonError for a path that is not there."""
    text = str(model_id).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        return "folder"
    if path.exists():
        raise LessonError(f"{name} '{text}' is a file; it must be a Hub id such as '{_DEFAULTS[name]}' or a folder "
                          "holding a transformers model (config.json and the weights).")
    first = text.replace("\\", "/").split("/")[0]
    if (not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text) or text.startswith((".", "-")) or
            ("/" in text and Path(first).is_dir())):
        raise LessonError(f"{name} '{text}' does not exist on this computer (relative paths start from {Path.cwd()}). "
                          f"Check the path, or use a Hub id such as '{_DEFAULTS[name]}'.")
    return "hub"


def _unavailable(name: str, model_id: str, exc: Exception) -> LessonError:
    """The one line that says why ``model_id`` could not be loaded, and what to do."""
    text = str(exc)
    lower = text.lower()
    local = f"models/{model_id.split('/')[-1]}"
    if re.search(r"\b401\b|gated|access token|restricted", lower):
        return LessonError(f"The Hub refused access to {name} '{model_id}'. Log in with 'hf auth login' (and accept "
                           f"the model's terms on its Hub page), or pass a local folder: {dashed(name)} {local}.")
    if any(s in lower for s in ("connect", "offline", "cached", "network", "resolve", "timed out")):
        return LessonError(f"Could not download {name} '{model_id}' for the paper's metrics: the Hugging Face Hub "
                           "cannot be reached and it is not cached. Connect to the internet once (it is cached "
                           f"afterwards; 'hf auth login' if the Hub asks), or download it where you can "
                           f"('hf download {model_id} --local-dir {local}') and pass the folder: "
                           f"{dashed(name)} {local}.")
    if re.search(r"\b404\b|not found|not a valid model identifier", lower):
        return LessonError(f"{name} '{model_id}' was not found on the Hugging Face Hub. Check the spelling; the "
                           f"paper's model is '{_DEFAULTS[name]}'.")
    return LessonError(f"Could not load {name} '{model_id}' from the Hub ({brief(exc)}). Run again, or download it "
                       f"('hf download {model_id} --local-dir {local}') and pass the folder: {dashed(name)} {local}.")


def load_model(name: str, model_id: str):
    """(model, processor) for the constant ``name`` ('DINO_MODEL' or 'CLIP_MODEL') from a Hub id or a folder,
    in evaluation mode on the CPU; a LessonError when the weights cannot be had or are of another kind."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, CLIPModel, ViTModel

    where = _where(name, model_id)
    model_type, kind = _KINDS[name]
    try:
        config = AutoConfig.from_pretrained(model_id)
        if config.model_type != model_type:
            raise LessonError(f"{name} '{model_id}' is a '{config.model_type}' model, not {kind} model. The paper's "
                              f"model is '{_DEFAULTS[name]}'.")
        if name == "DINO_MODEL":  # the CLS token is the embedding: no pooling layer (DINO has none trained)
            model = ViTModel.from_pretrained(model_id, add_pooling_layer=False)
            processor = AutoImageProcessor.from_pretrained(model_id)
        else:
            model = CLIPModel.from_pretrained(model_id)
            processor = AutoProcessor.from_pretrained(model_id)
    except LessonError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one readable line
        if where == "folder":
            raise LessonError(f"Could not load {name} folder '{model_id}' ({brief(exc)}). It must hold a transformers "
                              f"model with its processor (config.json, the weights, preprocessor_config.json"
                              f"{', the tokenizer' if name == 'CLIP_MODEL' else ''}), as 'hf download "
                              f"{_DEFAULTS[name]} --local-dir {model_id}' writes it.") from exc
        raise _unavailable(name, model_id, exc) from exc
    return model.eval(), processor


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor, exclude_self: bool = False) -> float:
    """The mean cosine similarity over every pair (a_i, b_j) of unit vectors; ``exclude_self`` (a is b) leaves
    out the pairs i == j."""
    sims = a @ b.T
    if not exclude_self:
        return float(sims.mean())
    n = len(a)
    if n < 2:
        raise LessonError("The real-image reference needs at least 2 real images (pairs of different images).")
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def _projected(out) -> torch.Tensor:
    """``get_image_features`` / ``get_text_features``: a tensor in transformers 4, an output whose
    ``pooler_output`` holds it in transformers 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class PaperMetrics:
    """DINO and CLIP, loaded once; every score is a Python float in [-1, 1]."""

    def __init__(self, dino_model, dino_processor, clip_model, clip_processor, batch_size: int = 32):
        self.dino_model, self.dino_processor = dino_model, dino_processor
        self.clip_model, self.clip_processor = clip_model, clip_processor
        self.batch_size = batch_size
        self.device = torch.device("cpu")

    @classmethod
    def load(cls, dino_model: str = DINO_MODEL, clip_model: str = CLIP_MODEL, batch_size: int = 32) -> PaperMetrics:
        """Both models from Hub ids or local folders (on the CPU: move them with ``to``)."""
        return cls(*load_model("DINO_MODEL", dino_model), *load_model("CLIP_MODEL", clip_model), batch_size)

    def to(self, device) -> PaperMetrics:
        self.device = torch.device(device)
        self.dino_model.to(self.device, torch.float32)
        self.clip_model.to(self.device, torch.float32)
        return self

    @torch.no_grad()
    def _embed(self, items: list, encode) -> torch.Tensor:
        """``encode(batch)`` over ``items`` in batches, as unit vectors on the CPU (float32)."""
        if not items:
            raise ValueError("nothing to embed")
        out = [encode(items[i:i + self.batch_size]).float() for i in range(0, len(items), self.batch_size)]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()

    def dino_embeddings(self, images: list) -> torch.Tensor:
        def encode(batch):
            pixels = self.dino_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            return self.dino_model(pixel_values=pixels).last_hidden_state[:, 0]  # the CLS token
        return self._embed(list(images), encode)

    def clip_image_embeddings(self, images: list) -> torch.Tensor:
        def encode(batch):
            pixels = self.clip_processor.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            return _projected(self.clip_model.get_image_features(pixel_values=pixels.to(self.device)))
        return self._embed(list(images), encode)

    def clip_text_embeddings(self, texts: list[str]) -> torch.Tensor:
        def encode(batch):
            tokens = self.clip_processor.tokenizer(batch, padding=True, truncation=True, return_tensors="pt")
            tokens = {k: tokens[k].to(self.device) for k in ("input_ids", "attention_mask")}
            return _projected(self.clip_model.get_text_features(**tokens))
        return self._embed(list(texts), encode)

    def dino(self, generated: list, real: list) -> float:
        """Subject fidelity (DINO): mean cosine over every (generated, real) pair of DINO embeddings."""
        return mean_pairwise_cosine(self.dino_embeddings(generated), self.dino_embeddings(real))

    def clip_i(self, generated: list, real: list) -> float:
        """Subject fidelity (CLIP-I): mean cosine over every (generated, real) pair of CLIP image embeddings."""
        return mean_pairwise_cosine(self.clip_image_embeddings(generated), self.clip_image_embeddings(real))

    def clip_t(self, generated: list, texts: list[str]) -> float:
        """Prompt fidelity (CLIP-T): mean cosine between each image and the text it was drawn for (one text per
        image; each distinct text is embedded once)."""
        if len(generated) != len(texts):
            raise ValueError(f"{len(generated)} images but {len(texts)} texts")
        unique = list(dict.fromkeys(texts))
        text = self.clip_text_embeddings(unique)[[unique.index(t) for t in texts]]
        return float((self.clip_image_embeddings(generated) * text).sum(-1).mean())

    def real_vs_real(self, real: list) -> dict:
        """The paper's upper reference: DINO and CLIP-I between different real images (pairs i != j)."""
        dino, clip = self.dino_embeddings(real), self.clip_image_embeddings(real)
        return {"dino": mean_pairwise_cosine(dino, dino, exclude_self=True),
                "clip_i": mean_pairwise_cosine(clip, clip, exclude_self=True)}
