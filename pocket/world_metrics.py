"""Measuring DreamBooth against ground truth in the pocket world: kinds and colours.

The DreamBooth paper scores subject fidelity with DINO/CLIP-I, prompt fidelity with CLIP-T, and
language drift with PRES/DIV. In the pocket world we know the truth, so a small classifier recognises
each world pattern kind, and colour adherence is read straight from the pixels. Subject fidelity is
``pocket.subject_judge``'s job (similarity to the nearest training picture, in features never trained
on the subject).

| metric            | what it measures                                                      | plays the role of |
|-------------------|-----------------------------------------------------------------------|-------------------|
| kind accuracy     | base model: share of samples of the requested kind                    |                   |
| colour adherence  | share of pixels in the two requested colours                          |                   |
| subject fidelity  | ``subject_judge``: share of "sks" samples passing, mean similarity     | DINO / CLIP-I     |
| prompt fidelity   | colour adherence of "a sks african fabric pattern in {c1} and {c2}"   | CLIP-T            |
| language drift    | class-prompt samples ``subject_judge`` passes; kind variety           | PRES / DIV        |

An object classifier says which of exercise 1's contexts a picture shows (a dress, a room, a handbag, a vase,
a basket, or the plain pattern): prompt fidelity for "a beautiful dress made of sks african fabric pattern".
Neither classifier ever saw the subject: the kind classifier learned the world's pictures, the object
classifier the world's objects, some filled with random off-world patches so that a fill it never saw does
not change its mind.

The classifiers are ``transformers`` ResNets saved beside the pocket model (``models/pocket-sd/world_classifier/``,
``models/pocket-sd/object_classifier/``), loadable with ``ResNetForImageClassification.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pocket import fabric_world
from common.errors import LessonError

LABELS = fabric_world.KINDS
CLASSIFIER_DIR = Path("models/pocket-sd/world_classifier")
OBJECT_CLASSIFIER_DIR = Path("models/pocket-sd/object_classifier")


def build_classifier(labels=LABELS):
    """A small ResNet (about 0.7M parameters) for 64x64 pictures: the world's kinds, or ``fabric_world.OBJECTS``."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128, 128], depths=[1, 1, 1, 1],
                          layer_type="basic", num_labels=len(labels),
                          id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    return ResNetForImageClassification(config)


def load_classifier(folder=CLASSIFIER_DIR):
    """The kind classifier (or, with ``folder=OBJECT_CLASSIFIER_DIR``, the object classifier)."""
    from transformers import ResNetForImageClassification

    if not (Path(folder) / "config.json").is_file():
        raise LessonError(f"The classifier is not in '{folder}/'. It ships with the pocket model "
                          "('git checkout -- models/pocket-sd'), or train it: python tools/train_pocket_model.py --stage classifier")
    return ResNetForImageClassification.from_pretrained(str(folder)).eval()


def to_batch(images) -> torch.Tensor:
    """PIL images or HxWx3 uint8 arrays (any size) -> (N, 3, 64, 64) floats in [-1, 1]."""
    from PIL import Image

    arrays = []
    for im in images:
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8))
        if im.size != (fabric_world.SIZE, fabric_world.SIZE):
            im = im.convert("RGB").resize((fabric_world.SIZE, fabric_world.SIZE), Image.Resampling.BOX)
        arrays.append(np.asarray(im.convert("RGB"), dtype=np.float32))
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def classify(classifier, images, batch_size: int = 256) -> np.ndarray:
    """The classifier's label index for each picture."""
    batch = to_batch(images)
    out = [classifier(pixel_values=batch[i:i + batch_size]).logits.argmax(-1) for i in range(0, len(batch), batch_size)]
    return torch.cat(out).numpy()


def kind_diversity(labels: np.ndarray) -> float:
    """How evenly samples spread over the world kinds: normalised entropy, 1 = all kinds equally, 0 = one kind."""
    if len(labels) == 0:
        return 0.0
    p = np.bincount(labels, minlength=len(LABELS)) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(len(LABELS)))


def kind_accuracy(classifier, images, kinds: list[str]) -> float:
    labels = classify(classifier, images)
    return float(np.mean([LABELS[i] == k for i, k in zip(labels, kinds)]))


def object_accuracy(object_classifier, images, objects: list[str]) -> float:
    """Share of pictures the object classifier puts in the asked context ("dress", "vase", ..., "plain")."""
    labels = classify(object_classifier, images)
    return float(np.mean([fabric_world.OBJECTS[i] == o for i, o in zip(labels, objects)]))


def mean_colour_adherence(images, colour_pairs) -> float:
    return float(np.mean([fabric_world.colour_adherence(np.asarray(im), a, b) for im, (a, b) in zip(images, colour_pairs)]))
