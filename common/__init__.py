"""Shared machinery for the DreamBooth lesson scripts.

One module per idea of the lesson, each listed once:

- ``configurator``  the CONSTANTS block at the top of a script -> its command line (``--max-train-steps``)
- ``lesson``        validating constants by name, the run summary, numbered steps, one-line errors
- ``errors``        ``LessonError`` (a failure the student can fix) and warnings
- ``device``        which accelerator and precision to use
- ``models``        where the base model comes from (Hub id, folder, single file, ``tiny``, ``pocket``)
- ``tiny_model``    the built-in ``tiny`` model: SD v1.5's architecture at toy size, built offline
- ``images``        loading and preparing the instance (training) images
- ``prior``         class images and the prior-preservation term of the DreamBooth loss
- ``lora``          adding, saving and loading LoRA adapters (diffusers, PEFT and kohya layouts)
- ``textual_inversion``  the placeholder token, training only its embedding, loading embeddings
- ``personalize``   step 2 of the generation scripts: the LoRA and embedding, FAST_MODE on top
- ``fast_mode``     the LCM-LoRA and the tiny autoencoder: pictures in 4 steps
- ``training``      cached latents, checkpoints, --resume, the Ctrl-C guard, the loss target
- ``folder_lock``   one training per checkpoints folder at a time
- ``pickles``       reading .bin/.pt/.pkl weights without letting them run code
- ``sampling``      generating images in batches with fixed seeds; SLERP and keyframes
- ``figures``       grids, strips and loss curves
- ``animation``     the morph's looping GIF and MP4
- ``comparison``    the base model, Textual Inversion and LoRA side by side (Concept 4)
- ``model_card``    the README.md (Hugging Face model card) beside a trained LoRA or embedding
- ``files``         atomic saves, and reading adapter files' headers

The pocket world (the procedural fabric universe the ``pocket`` model learned, and its judge) lives
beside this package in ``pocket/``; the benchmarks' SD v1.5-shaped builders in ``bench/``.
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys

# transformers prints a warning about optional torchvision at import; students need not see it.
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_missing = [name for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "PIL",
                              "numpy", "matplotlib") if _importlib_util.find_spec(name) is None]
if _missing:
    _sys.stderr.write(
        f"ERROR: missing Python package(s): {', '.join(_missing)}. Install the course requirements first: "
        "pip install -r requirements.txt (and PyTorch for your machine from https://pytorch.org).\n")
    raise SystemExit(1)
