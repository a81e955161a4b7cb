"""The pocket world: what the ``pocket`` model was trained on, and how we measure DreamBooth in it.

- ``fabric_world``   a procedural universe of two-colour fabric patterns, with captions and ground truth
- ``world_metrics``  the judge: a classifier of the world's kinds and colour adherence read from pixels
- ``textiles``       the procedural African textiles drawn into ``training_images/`` (the subject)

Used by ``tools/`` (training and evaluating the pocket model) and the tests; the lesson scripts never
import it: for them ``pocket`` is just another ``MODEL_ID``.
"""
