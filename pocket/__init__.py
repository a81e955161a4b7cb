"""The pocket world: what the ``pocket`` model was trained on, and how we measure DreamBooth in it.

- ``fabric_world``   a procedural universe of two-colour fabric patterns, with captions and ground truth
- ``world_metrics``  a classifier of the world's kinds and colour adherence read from pixels (prompt fidelity)
- ``subject_judge``  subject fidelity: similarity to the nearest training picture (nothing trained on it)
- ``judge_probes``   pictures that are not the subject (noise, shuffles, textures, blobs, world, class images)
- ``textiles``       the procedural African textiles drawn into ``training_images/`` (the subject)

Used by ``tools/`` (training and evaluating the pocket model) and the tests; the lesson scripts never
import it: for them ``pocket`` is just another ``MODEL_ID``.
"""
