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

The classifier's ninth class, "subject", was trained on crops of the ten training pictures; it is not a
subject detector (issue 12: it takes grey noise, shuffled pixels and procedural clouds for the subject,
being a detector of pictures that are out of the world). ``subject_share`` remains for the pocket
model's training report only.

The classifier is a ``transformers`` ResNet saved beside the pocket model
(``models/pocket-sd/world_classifier/``), loadable with ``ResNetForImageClassification.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pocket import fabric_world
from common.errors import LessonError

LABELS = fabric_world.KINDS + ("subject",)
SUBJECT = len(LABELS) - 1
CLASSIFIER_DIR = Path("models/pocket-sd/world_classifier")


def build_classifier():
    """A small ResNet (about 0.7M parameters) for 64x64 pictures: 8 world kinds + the subject."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128, 128], depths=[1, 1, 1, 1],
                          layer_type="basic", num_labels=len(LABELS),
                          id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    return ResNetForImageClassification(config)


def load_classifier(folder=CLASSIFIER_DIR):
    from transformers import ResNetForImageClassification

    if not (Path(folder) / "config.json").is_file():
        raise LessonError(f"The world classifier is not in '{folder}/'. It ships with the pocket model "
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
    kinds = labels[labels != SUBJECT]
    if len(kinds) == 0:
        return 0.0
    p = np.bincount(kinds, minlength=len(fabric_world.KINDS)) / len(kinds)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(len(fabric_world.KINDS)))


def kind_accuracy(classifier, images, kinds: list[str]) -> float:
    labels = classify(classifier, images)
    return float(np.mean([LABELS[i] == k for i, k in zip(labels, kinds)]))


def mean_colour_adherence(images, colour_pairs) -> float:
    return float(np.mean([fabric_world.colour_adherence(np.asarray(im), a, b) for im, (a, b) in zip(images, colour_pairs)]))


def subject_share(classifier, images) -> float:
    """Share of pictures the classifier puts in its "subject" class: out of the world, not your fabric (see above)."""
    return float(np.mean(classify(classifier, images) == SUBJECT))
