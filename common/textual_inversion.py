"""Textual Inversion: teach the text encoder one new word, and change nothing else.

The placeholder token ("<african-fabric>") is added to the tokenizer with an embedding copied from
an initializer word ("pattern"). Training then adjusts that one vector (or ``NUM_VECTORS`` vectors,
named "<african-fabric>", "<african-fabric>_1", ... as diffusers names them) until the frozen model,
reading it, redraws the training images. The file is ~3 KB: ``{token: tensor of shape (vectors, width)}``,
which ``pipe.load_textual_inversion(path)`` and AUTOMATIC1111 both read.

How only the new rows can change: the vectors being trained live in :class:`PlaceholderEmbedding`, a
small module of their own. While it is attached, a forward hook on the text encoder's token-embedding
table swaps them in wherever a placeholder id appears. The table itself is never given to the
optimizer, so every other word keeps its embedding bit for bit, and the optimizer state and the
checkpoints hold ``vectors x width`` numbers rather than the whole 49408 x 768 table.

:func:`load_embedding` loads any embedding a student meets (ours, the course's, AUTOMATIC1111's
``.pt``/``.safetensors``) through diffusers' ``load_textual_inversion`` and returns the word to prompt with.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from common import pickles
from common.errors import LessonError
from common.files import SETTINGS_KEY, adapter_kind, atomic_path, model_file_advice, require_readable, require_suffix
from common.lora import require_finite

WEIGHT_NAME = "learned_embeds.safetensors"  # what diffusers' load_textual_inversion(folder) looks for
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")  # ours, diffusers', AUTOMATIC1111's

# "style": the word names a look, as a pattern is a look that can cover anything. Adapted to textiles
# from the Textual Inversion paper's style prompts ("a painting in the style of {}").
STYLE_TEMPLATES = [
    "a photo of fabric in the style of {}",
    "a close-up photo of a textile in the style of {}",
    "a pattern in the style of {}",
    "a print in the style of {}",
    "a photo of cloth with a {} pattern",
    "a cropped photo of fabric in the style of {}",
    "a bright photo of a textile in the style of {}",
    "a dark photo of cloth in the style of {}",
    "a woven textile in the style of {}",
    "a printed fabric in the style of {}",
    "a rendering in the style of {}",
    "a painting in the style of {}",
]
# "object": the word names a thing, as in the paper's (and the course's) "a photo of a {}".
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]
TEMPLATES = {"style": STYLE_TEMPLATES, "object": OBJECT_TEMPLATES}

WIDTHS = {768: "Stable Diffusion v1.x", 1024: "Stable Diffusion 2.x", 1280: "SDXL's second text encoder",
          2048: "SDXL"}


# --------------------------------------------------------------------------- the new word
def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """The tokens of one concept: "<x>", "<x>_1", ... (the names diffusers' loader gives extra vectors)."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def _require_new(tokenizer, tokens: list[str], what: str, advice: str) -> None:
    vocab = tokenizer.get_vocab()
    taken = [t for t in tokens if t in vocab or f"{t}</w>" in vocab]  # CLIP stores whole words as "word</w>"
    if taken:
        raise LessonError(f"{what} {taken[0]!r} is already a word of this model's tokenizer. {advice}")


def add_placeholder(tokenizer, text_encoder, placeholder: str, initializer: str, num_vectors: int = 1) -> list[int]:
    """Add the placeholder token(s) to the tokenizer and give each the initializer's embedding.

    Returns the new token ids. Refuses an initializer that is not one token (its embedding would be
    ambiguous) and a placeholder the tokenizer already knows.
    """
    pieces = tokenizer.tokenize(initializer)
    if len(pieces) != 1:
        shown = ", ".join(repr(p.removesuffix("</w>")) for p in pieces) or "nothing"
        raise LessonError(f"INITIALIZER_TOKEN {initializer!r} is not a single token: this tokenizer splits it into "
                          f"{len(pieces)} pieces ({shown}). Use one common word close to your concept, "
                          "such as 'pattern', 'fabric' or 'textile'.")
    tokens = placeholder_tokens(placeholder, num_vectors)
    _require_new(tokenizer, tokens, "PLACEHOLDER_TOKEN", "Training it would change what that word means: "
                 "choose a new word, such as '<my-fabric>'.")
    init_id = tokenizer.convert_tokens_to_ids(pieces[0])
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # old rows are copied unchanged
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[ids] = table[init_id].clone()
    return ids


def tokenize_templates(tokenizer, templates: list[str], tokens: list[str]) -> torch.Tensor:
    """The training captions, tokenized once: shape (len(templates), 77). A multi-vector concept is
    written as all of its tokens in a row."""
    from common.sampling import warn_if_truncated

    captions = [t.format(" ".join(tokens)) for t in templates]
    warn_if_truncated(tokenizer, max(captions, key=len))  # only a very long placeholder or NUM_VECTORS gets here
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class PlaceholderEmbedding(torch.nn.Module):
    """The only weights Textual Inversion trains: one vector per placeholder token.

    Calling it runs the text encoder with these vectors in place of the placeholder rows (a forward
    hook on the token-embedding table; the table is not touched). ``finish()`` writes the vectors into
    the table and removes the hook, leaving the text encoder as ``load_textual_inversion`` would.
    """

    def __init__(self, text_encoder, token_ids: list[int]):
        super().__init__()
        self.text_encoder = text_encoder
        table = text_encoder.get_input_embeddings()
        self.register_buffer("token_ids", torch.tensor(token_ids, device=table.weight.device), persistent=False)
        self.vectors = torch.nn.Parameter(table.weight[token_ids].detach().float().clone())  # fp32 even in fp16
        self._hook = table.register_forward_hook(self._swap_in)

    def _swap_in(self, module, args, output):
        match = args[0].unsqueeze(-1) == self.token_ids  # (batch, length, vectors)
        if not match.any():
            return output
        which = match.int().argmax(-1)
        return torch.where(match.any(-1, keepdim=True), self.vectors[which].to(output.dtype), output)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text encoder's last hidden state: the UNet's cross-attention input."""
        return self.text_encoder(input_ids)[0]

    @torch.no_grad()
    def finish(self) -> None:
        table = self.text_encoder.get_input_embeddings().weight
        table[self.token_ids] = self.vectors.to(table.dtype)
        self._hook.remove()


# --------------------------------------------------------------------------- files
def save_embedding(vectors: torch.Tensor, placeholder: str, path, settings: dict | None = None) -> Path:
    """Write ``{placeholder: tensor (vectors, width)}`` atomically, with the training settings in the header."""
    path = Path(path)
    tensor = vectors.detach().to("cpu", torch.float32).contiguous()
    with atomic_path(path) as tmp:
        safetensors.torch.save_file({placeholder: tensor}, str(tmp),
                                    metadata={SETTINGS_KEY: json.dumps(settings or {}, default=str)})
    return path


# The names of the files the course writes into a model folder (a LoRA and an embedding may share one), which the
# AUTOMATIC1111 copy must not take; and the names Windows keeps for its devices.
_TAKEN_NAMES = ("learned_embeds", "pytorch_lora_weights", "adapter_model")
_DEVICE_NAMES = {"con", "prn", "aux", "nul", *(f"{d}{i}" for d in ("com", "lpt") for i in range(1, 10))}


def a1111_file(placeholder: str, folder) -> Path:
    """Where exercise 3a writes the AUTOMATIC1111 copy of the embedding: ``folder/<word>.safetensors``, the word
    being PLACEHOLDER_TOKEN without its angle brackets (AUTOMATIC1111 and ComfyUI name the word after the file).
    Refuses a word that would not make a file of its own in ``folder`` (checked before any model loads): one
    that climbs out of it or into a subfolder ("<../x>", "<a/b>"), a hidden or empty name, a name Windows cannot
    create, or the name of another file there (learned_embeds, a LoRA), which the copy would overwrite."""
    name = placeholder.strip("<>")
    path = Path(folder) / f"{name}.safetensors"
    why = ("it is empty without its angle brackets" if not name
           else "it holds a character a file name cannot ('/', '\\', ':', '*', '?', '\"', '<', '>', '|')"
           if any(c in '/\\:*?"<>|' or ord(c) < 32 for c in name)
           else "a name starting with '.' is hidden" if name.startswith(".")
           else "Windows keeps that name for a device" if name.split(".")[0].lower() in _DEVICE_NAMES
           else "that is the name of another file of the course, which it would overwrite"
           if name.lower() in _TAKEN_NAMES or name.lower().endswith("_kohya")
           else f"'{path}' is a LoRA, which it would overwrite" if path.is_file() and adapter_kind(path) == "lora"
           else None)
    if why:
        raise LessonError(f"PLACEHOLDER_TOKEN {placeholder!r} cannot name the AUTOMATIC1111 copy of the embedding, "
                          f"which exercise 3a writes beside {WEIGHT_NAME} as '{name}.safetensors' (AUTOMATIC1111 and "
                          f"ComfyUI take the word from the file's name): {why}. Use a word of letters, digits, '-' "
                          "and '_', such as '<my-fabric>'.")
    return path


def export_a1111(vectors: torch.Tensor, path) -> Path:
    """The same vectors as AUTOMATIC1111 and ComfyUI read them: one ``emb_params`` tensor, the word being the
    file's name (so the file is named after the placeholder, without its angle brackets)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file({"emb_params": vectors.detach().to("cpu", torch.float32).contiguous()}, str(tmp))
    return path


def load_checkpoint(module: PlaceholderEmbedding, folder) -> None:
    """Put the vectors saved in a checkpoint folder back into the module being trained (resuming)."""
    saved = next(iter(safetensors.torch.load_file(str(Path(folder) / WEIGHT_NAME)).values()))
    if saved.shape != module.vectors.shape:
        raise LessonError(f"The checkpoint in '{folder}' holds {tuple(saved.shape)} vectors, this run trains "
                          f"{tuple(module.vectors.shape)} (was NUM_VECTORS or MODEL_ID changed?). Start afresh "
                          "without --resume, or restore the settings it was made with.")
    with torch.no_grad():
        module.vectors.copy_(saved)


def find_embedding_file(path) -> Path:
    """The embedding file at ``path``: a file, or a folder holding learned_embeds.* or one .safetensors/.pt/.bin.

    LoRA files and unfinished saves (".name") in the folder are passed over; a damaged .safetensors file
    is refused here, before any model loads.
    """
    path = Path(path)
    if not path.exists():
        raise LessonError(f"No Textual Inversion embedding at '{path}'. Train one with "
                          "'python exercise3a_train_textual_inversion.py', or point EMBEDDING_PATH at the file.")
    if path.is_file():
        require_suffix(path, EMBEDDING_SUFFIXES, "an embedding", "EMBEDDING_PATH", f"exercise 3a writes {WEIGHT_NAME}")
    found = path if path.is_file() else next((path / n for n in (WEIGHT_NAME, "learned_embeds.bin")
                                              if (path / n).is_file()), None)
    if found is None:
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pt", ".bin") and p.is_file()
                       and not p.name.startswith("."))
        candidates = [p for p in files if adapter_kind(p) not in ("lora", "model")]
        if len(candidates) != 1:
            loras = [p.name for p in files if adapter_kind(p) == "lora"]
            raise LessonError(f"The folder '{path}' holds {len(candidates) or 'no'} embedding files"
                              + (f" ({', '.join(p.name for p in candidates)})" if candidates else "")
                              + (f" (and the LoRA {'files ' if len(loras) > 1 else ''}{', '.join(loras)}, which "
                                 f"belong{'' if len(loras) > 1 else 's'} in LORA_PATH)" if loras else "")
                              + ": point EMBEDDING_PATH at the one embedding file you mean.")
        found = candidates[0]
    require_readable(found, "exercise3a_train_textual_inversion.py")
    if adapter_kind(found) == "lora":
        raise LessonError(f"'{found}' is a LoRA, not a Textual Inversion embedding. Set LORA_PATH to it, and "
                          "EMBEDDING_PATH to an embedding (or None).")
    if adapter_kind(found) == "model":
        raise LessonError(f"'{found}' is not a Textual Inversion embedding: it {model_file_advice(found)} Set "
                          f"EMBEDDING_PATH to an embedding (exercise 3a writes {WEIGHT_NAME}), or None.")
    return found


def _token_and_vectors(state, file: Path, token: str | None, width: int) -> tuple[str, torch.Tensor]:
    """Which layout a loaded file has: (the token it defines, its vectors). ``width``: the model's."""
    if "string_to_param" in state:  # AUTOMATIC1111 .pt: {"name", "string_to_param": {"*": tensor}, ...}
        return token or state.get("name") or file.stem, state["string_to_param"]["*"]
    if "clip_l" in state and "clip_g" in state:  # SDXL: one tensor per text encoder
        widths = state["clip_l"].shape[-1], state["clip_g"].shape[-1]
        raise LessonError(f"'{file.name}' is an SDXL embedding (vectors {widths[0]} and {widths[1]} wide, "
                          f"{sum(widths)} together), but this model's text encoder is {width} wide "
                          f"({WIDTHS.get(width, 'this MODEL_ID')}). Use an embedding made for this MODEL_ID.")
    if len(state) == 1:
        key, value = next(iter(state.items()))
        if isinstance(value, torch.Tensor):
            # AUTOMATIC1111 .safetensors stores its vectors under "emb_params" and names the word after the file.
            return token or (file.stem if key == "emb_params" else key), value
    keys = ", ".join(list(map(str, state))[:4])
    lora_hint = " It looks like a LoRA: load it with LORA_PATH instead." if any("lora" in str(k) for k in state) else \
        " Point EMBEDDING_PATH at an embedding file (exercise 3a writes learned_embeds.safetensors)."
    raise LessonError(f"'{file}' is not a Textual Inversion embedding (it holds {len(state)} entries: {keys}...)."
                      f"{lora_hint}")


def load_embedding(pipe, path, token: str | None = None) -> str:
    """Load a Textual Inversion embedding into ``pipe`` and return the word to write in prompts.

    ``path`` is a file or folder: ours, the course's, diffusers', or AUTOMATIC1111's ``.pt`` /
    ``.safetensors`` (``string_to_param`` / ``emb_params``). ``token`` renames the word. A multi-vector
    embedding adds "<x>", "<x>_1", ...; the pipeline expands "<x>" in a prompt to all of them.
    """
    from diffusers.loaders.textual_inversion import load_textual_inversion_state_dicts

    file = find_embedding_file(path)
    try:
        state = load_textual_inversion_state_dicts([str(file)])[0] if file.suffix == ".safetensors" else \
            pickles.load(file, "Use a .safetensors embedding from a source you trust, or train your own with "
                               "exercise3a_train_textual_inversion.py.")
    except LessonError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise LessonError(f"'{file}' is not a readable embedding file ({type(exc).__name__}). It may be damaged "
                          "or incompletely downloaded: get it again.") from exc
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    word, vectors = _token_and_vectors(state, file, token, width)
    # A word's vectors are floats, one row per vector: anything else would end deep inside diffusers (a 3-D or
    # empty tensor) or be loaded as if it had been learned (whole numbers, True/False).
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point() or vectors.ndim not in (1, 2) \
            or vectors.numel() == 0:
        what = (f"a tensor of shape {tuple(vectors.shape)} and type {str(vectors.dtype).removeprefix('torch.')}"
                if isinstance(vectors, torch.Tensor) else f"a {type(vectors).__name__}")
        raise LessonError(f"'{file}' is not a Textual Inversion embedding: its '{word}' holds {what}, not "
                          f"vectors of numbers ({width} wide for this model, one row per vector). Use an embedding "
                          "made for this MODEL_ID, or train your own with exercise 3a.")
    require_finite({word: vectors}, file, "the embedding", "exercise3a_train_textual_inversion.py")
    if vectors.shape[-1] != width:
        raise LessonError(f"'{file.name}' holds {vectors.shape[-1]}-wide vectors (made for "
                          f"{WIDTHS.get(vectors.shape[-1], 'another model')}), but this model's text encoder is "
                          f"{width} wide ({WIDTHS.get(width, 'this MODEL_ID')}). An embedding only works with the "
                          "text encoder it was trained with: use one made for this MODEL_ID, or train your own "
                          "with exercise 3a.")
    num_vectors = vectors.shape[0] if vectors.ndim > 1 else 1
    named_by_file = token is None and list(state) == ["emb_params"]  # (AUTOMATIC1111's: the word is the file's name)
    if not word.strip() or any(c.isspace() for c in word):
        raise LessonError(f"'{file}' names its word {word!r}, which a prompt cannot hold as one word (it is empty "
                          "or has spaces). " + ("Rename the file: its name is the word (e.g. 'my-fabric.safetensors')."
                                                if named_by_file else "Use an embedding whose word is one word, such "
                                                "as exercise 3a's '<african-fabric>'."))
    # The scripts load an embedding once per run: a word the tokenizer knows comes from the file (or a second load
    # in one Python session). Only the file can be changed from a script: say how, for each layout.
    _require_new(pipe.tokenizer, placeholder_tokens(word, num_vectors), "The embedding's token",
                 "Loading it would change what that word means in every prompt. "
                 + ("Rename the file: AUTOMATIC1111's embeddings take their word from the file's name (e.g. "
                    f"'my-{file.stem}{file.suffix}')." if named_by_file else
                    "Use an embedding trained on a new word (exercise 3a's PLACEHOLDER_TOKEN, such as "
                    "'<my-fabric>'); in Python, load_embedding(pipe, path, token='<my-fabric>') gives it another "
                    "word, and loads each embedding once."))
    pipe.load_textual_inversion(state, token=word)  # diffusers reads the layout itself; we chose the word
    return word
