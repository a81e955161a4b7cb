"""Does DreamBooth do what the paper says? Scored by the paper's metrics, or against the pocket world's truth.

    python tools/evaluate_dreambooth.py --ti-steps 200   # pocket model: trains 3 ways x 3 seeds, scores 4 (~10 min, 2-core CPU)
    python tools/evaluate_dreambooth.py --model tiny --lora-steps 4 --ti-steps 4 --samples 4   # machinery check
    python tools/evaluate_dreambooth.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --lora-learning-rate 1e-4 --ti-learning-rate 5e-4 --ti-steps 3000   # SD v1.5: the paper's metrics (GPU)

It trains with the course's own scripts - exercise 3b with and without prior preservation, exercise
3a - once per training seed (TRAINING_SEEDS), then draws the same prompts and seeds with the base model and
with each result: SAMPLES seeds of "a sks african fabric pattern", the same seeds recoloured ("... in red and
blue", the paper's property-change prompts), the class prompt "a fabric pattern", and CONTEXT_SAMPLES of each
of the world's five contexts ("a beautiful dress made of sks african fabric pattern, fashion photography"...).
Every figure is the mean over the training seeds, with its range. ``METRICS`` says how they are scored;
``auto`` (the default) picks the pocket world's judge for ``pocket`` and ``tiny`` (its machinery check),
and the paper's metrics for any other model (SD v1.5, a folder, a checkpoint file), where the world's
judge would mean nothing. ``both`` gives both.

``world``: the pocket world's judges: the subject judge (``pocket/subject_judge.py``: similarity to the
nearest training picture in features never trained on it, with a pass threshold calibrated on held-out
crops of the training pictures), the world classifier and colour reading (``pocket/world_metrics.py``):

- subject fidelity: share of "a sks african fabric pattern" samples the subject judge passes, and their
  mean similarity (1 = a training picture itself); beside them, the same for held-out crops of the
  training pictures (new photos of your fabric: what a perfect result would score);
- prompt fidelity: colour adherence of "a sks african fabric pattern in {c1} and {c2}";
- drift: share of class-prompt ("a fabric pattern") samples the subject judge passes, and how varied
  their pattern kinds stay in the world classifier's eyes (1 = all eleven kinds equally);
- in context: share of context pictures the object classifier calls the asked object, share whose fill the
  subject judge passes (``passes(pictures, obj)``), and both at once.

``paper``: the DreamBooth paper's metrics (``tools/paper_metrics.py``; Ruiz et al. 2023, section 4.1),
with DINO ViT-S/16 (``DINO_MODEL``) and CLIP ViT-B/32 (``CLIP_MODEL``) from the Hub (downloaded once,
then cached) or local folders, and exercise 3b's training pictures (``training_images/``) as the real
images. Over the subject and recoloured samples (2 x SAMPLES pictures per method):

- DINO and CLIP-I (subject fidelity): mean cosine similarity over every (generated, real) pair;
- CLIP-T (prompt fidelity): mean cosine between each picture and its prompt, the prompt read without
  the identifier ("a african fabric pattern in red and blue", for every method: CLIP never learned
  "sks" or "<african-fabric>", and the paper does not say what it did with it);
- PRES (the paper's prior-preservation metric, lower is better): DINO between the class-prompt samples
  and the real pictures: how much "a fabric pattern" has turned into your fabric;
- real images: DINO and CLIP-I between different training pictures (pairs i != j), the paper's
  reference for how alike pictures of one subject are.

The table sets them beside the paper's Table 1 (Stable Diffusion: DreamBooth 0.668 / 0.803 / 0.305,
Textual Inversion 0.569 / 0.780 / 0.255, real images 0.774 / 0.885). Read them as a rough guide, not
a reproduction: the paper averaged 30 subjects (objects and pets) x 25 prompts x 4 seeds and fine-tuned
the whole model; here it is one fabric, a LoRA, and the prompts above.

Writes outputs/evaluation/results.json, results.md (the tables) and samples.png.
"""

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import exercise3a_train_textual_inversion  # noqa: E402  (the course's scripts, as modules)
import exercise3b_train_lora  # noqa: E402
from common import device as devices  # noqa: E402
from common import figures, images, lesson, models, personalize, sampling  # noqa: E402
from pocket import fabric_world, subject_judge, world_metrics  # noqa: E402
from common.errors import LessonError  # noqa: E402
from common.files import save_json, save_text  # noqa: E402
from tools import paper_metrics  # noqa: E402

# ============================== CONSTANTS ==============================
MODEL_ID = "pocket"  # the pocket model knows its world; any MODEL_ID runs (SD v1.5: scored with the paper's metrics)
METRICS = "auto"  # auto (pocket, tiny: world; any other model: paper), world, paper, or both
CLASSIFIER_DIR = "models/pocket-sd/world_classifier"  # the world's kind judge (ships with the pocket model)
OBJECT_CLASSIFIER_DIR = "models/pocket-sd/object_classifier"  # the world's object judge: is it a dress, a vase...?
DINO_MODEL = "facebook/dino-vits16"  # the paper's DINO ViT-S/16: a Hub id or a local folder (paper metrics)
CLIP_MODEL = "openai/clip-vit-base-patch32"  # the paper's CLIP ViT-B/32: a Hub id or a local folder (paper metrics)
LORA_STEPS = 200  # exercise 3b's MAX_TRAIN_STEPS: updates of 4 micro-batches (the course's 800 steps)
TI_STEPS = 1000  # exercise 3a's MAX_TRAIN_STEPS (x4 micro-batches each)
LORA_LEARNING_RATE = 1e-4  # the course's, on the pocket model too at alpha 32 (measured: pocket/README.md)
TI_LEARNING_RATE = 5e-3  # the Textual Inversion paper's base rate (the course's 5e-4 moves it too little here)
NUM_CLASS_IMAGES = 100  # class images for prior preservation (the course's 100)
TRAINING_SEEDS = (42, 43, 44)  # each method is trained once per seed: the table shows the mean and the spread
SAMPLES = 32  # pictures per prompt kind per method and training seed
CONTEXT_SAMPLES = 8  # pictures per context (a dress, a room, a handbag, a vase, a basket) per method and seed; 0: none
COLOUR_PAIRS = ("red and blue", "yellow and purple", "green and white", "black and orange", "pink and brown",
                "blue and yellow")  # the colours asked of the subject (prompt fidelity)
NUM_INFERENCE_STEPS = 25  # DPM-Solver++ steps
GUIDANCE_SCALE = 7.5  # classifier-free guidance
RANDOM_SEED = 1000  # sample seeds start here (training uses each script's own RANDOM_SEED)
WORK_DIR = "models/evaluation"  # the trained LoRAs and embedding
OUTPUT_DIR = "outputs/evaluation"  # results and pictures
DEVICE = "auto"  # auto, cuda, mps or cpu
# =======================================================================

SUBJECT_WORDS = "sks african"  # what the LoRA's instance prompt calls the subject (and the base model reads)
CLIP_T_WORDS = "african"  # the same without the identifier: CLIP-T scores every method's pictures against these words
REAL_IMAGE_SIZE = 512  # the real pictures, centre-cropped as exercise 3b crops them (the metric models resize them)
PLACEHOLDER = "<african-fabric>"  # exercise 3a's token
HELD_OUT_SEED = 1  # the subject judge's held-out crops scored beside the methods (not its calibration seed)


def stopped_by_ctrl_c(result) -> None:
    """The course's scripts catch Ctrl-C, save what they have and return ``stopped``: here it stops the evaluation
    too (it went on to train the next method, and scored the half-trained one beside the others)."""
    if getattr(result, "stopped", False):
        raise KeyboardInterrupt


def train_all(cfg, work: Path, seed: int) -> dict:
    """The three personalisations, made by the course's own scripts with training seed ``seed``. Returns
    {method: (adapter path, seconds)}. The class images are drawn once and shared by every seed."""
    common = ["--model", cfg.MODEL_ID, "--output-dir", str(Path(cfg.OUTPUT_DIR) / "training"), "--device", cfg.DEVICE,
              "--random-seed", str(seed)]
    made, class_images, work = {}, work / "class_images", work / f"seed-{seed}"
    for method, extra in [("LoRA, no prior preservation", ["--no-prior-preservation"]),
                          ("LoRA + prior preservation", ["--num-class-images", str(cfg.NUM_CLASS_IMAGES)])]:
        folder = work / ("lora_prior" if "+" in method else "lora_no_prior")
        started = time.perf_counter()
        stopped_by_ctrl_c(exercise3b_train_lora.train(common + extra + ["--class-data-dir", str(class_images),
            "--max-train-steps", str(cfg.LORA_STEPS), "--learning-rate", str(cfg.LORA_LEARNING_RATE),
            "--lora-dir", str(folder), "--sample-every", "1000000"]))
        made[method] = (folder, time.perf_counter() - started)
    folder, started = work / "textual_inversion", time.perf_counter()
    stopped_by_ctrl_c(exercise3a_train_textual_inversion.train(common + [
        "--max-train-steps", str(cfg.TI_STEPS), "--learning-rate", str(cfg.TI_LEARNING_RATE),
        "--embedding-dir", str(folder), "--sample-every", "1000000", "--lora-dir", str(work / "none")]))
    made["Textual Inversion"] = (folder, time.perf_counter() - started)
    return made


def score(cfg, method: str, adapter, runtime, classifier=None, judge=None, real=None, fabric=None,
          objects=None) -> tuple[dict, list]:
    """Draw the prompts with one method's personalisation and score them: with the world's ``classifier``,
    ``objects`` (the object classifier) and ``fabric`` (the subject judge), and/or with the paper's metrics
    (``judge``, against the ``real`` pictures)."""
    pipe = models.load_pipeline(cfg.MODEL_ID, runtime.dtype).to(runtime.device)
    sampling.use_multistep_solver(pipe)
    words = SUBJECT_WORDS
    if method.startswith("LoRA"):
        personalize.load_adapters(pipe, adapter)
    elif method == "Textual Inversion":
        words = personalize.load_adapters(pipe, embedding_path=adapter).tokens[0]
    pairs = [p.split(" and ") for p in cfg.COLOUR_PAIRS]
    colours = [pairs[i % len(pairs)] for i in range(cfg.SAMPLES)]

    def subject_prompts(w):
        return [f"a {w} fabric pattern"] * cfg.SAMPLES + [f"a {w} fabric pattern in {a} and {b}" for a, b in colours]

    contexts = [o for o in fabric_world.OBJECTS if o != "plain"] if objects is not None else []
    context_prompts = [fabric_world.CONTEXTS[o].format(f"{words} fabric pattern")
                       for o in contexts for _ in range(cfg.CONTEXT_SAMPLES)]
    prompts = subject_prompts(words) + [fabric_world.GENERIC_CAPTION] * cfg.SAMPLES + context_prompts
    seeds = [cfg.RANDOM_SEED + i % cfg.SAMPLES for i in range(3 * cfg.SAMPLES)] + \
        [cfg.RANDOM_SEED + i % cfg.CONTEXT_SAMPLES for i in range(len(context_prompts))]
    settings = sampling.SamplingSettings(cfg.NUM_INFERENCE_STEPS, cfg.GUIDANCE_SCALE, batch_size=16)
    pictures, _ = sampling.generate(pipe, prompts, seeds, settings, desc=method)
    del pipe  # its memory goes back before the judges run
    subject, recoloured, classed = (pictures[i * cfg.SAMPLES:(i + 1) * cfg.SAMPLES] for i in range(3))
    in_context = pictures[3 * cfg.SAMPLES:]
    row = {}
    if classifier is not None:
        passed, drifted = fabric.summary(subject), fabric.summary(classed)
        row.update(subject_fidelity=passed["pass_rate"], subject_similarity=passed["similarity"],
                   prompt_fidelity=world_metrics.mean_colour_adherence(recoloured, colours),
                   drift_subject_share=drifted["pass_rate"], drift_similarity=drifted["similarity"],
                   class_kind_diversity=world_metrics.kind_diversity(world_metrics.classify(classifier, classed)))
    if objects is not None:
        asked = [o for o in contexts for _ in range(cfg.CONTEXT_SAMPLES)]
        right = world_metrics.classify(objects, in_context) == [fabric_world.OBJECTS.index(o) for o in asked]
        fills = np.concatenate([fabric.passes(in_context[i:i + cfg.CONTEXT_SAMPLES], obj=o)
                                for i, o in zip(range(0, len(asked), cfg.CONTEXT_SAMPLES), contexts)])
        row.update(context_object=float(right.mean()), context_fill=float(fills.mean()),
                   context_both=float((right & fills).mean()))
    if judge is not None:
        row.update(dino=judge.dino(subject + recoloured, real), clip_i=judge.clip_i(subject + recoloured, real),
                   clip_t=judge.clip_t(subject + recoloured, subject_prompts(CLIP_T_WORDS)),
                   pres=judge.dino(classed, real))
    return row, subject[:4] + recoloured[:4] + classed[:4] + (in_context[::cfg.CONTEXT_SAMPLES][:4] if contexts else [])


def combine(rows: list[dict]) -> dict:
    """One method's rows over the training seeds: each figure's mean, and its lowest and highest (``_spread``)."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float))]
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out.update({f"{k}_spread": [float(min(r[k] for r in rows)), float(max(r[k] for r in rows))] for k in keys})
    out["seeds"] = len(rows)
    return out


def cell(r: dict, key: str, percent: bool = True) -> str:
    """"62% (55-70%)": the mean over training seeds and its range (no range for a single run)."""
    value = (lambda v: f"{v:.0%}") if percent else (lambda v: f"{v:.2f}")
    low, high = r.get(f"{key}_spread", (r[key], r[key]))
    spread = f" ({value(low).rstrip('%')}-{value(high)})" if r.get("seeds", 1) > 1 else ""
    return value(r[key]) + spread


def world_table(results: dict, held_out: dict) -> str:
    contexts = "context_object" in next(iter(results.values()))
    lines = ["| method | subject fidelity: passes ↑ | subject similarity ↑ | prompt fidelity ↑ | "
             "drift: class prompt passing as subject ↓ | class kind diversity ↑ |"
             + (" in context: object right ↑ | fill passes ↑ | both ↑ |" if contexts else ""),
             "|---|---|---|---|---|---|" + ("---|---|---|" if contexts else "")]
    for method, r in results.items():
        lines.append(f"| {method} | **{cell(r, 'subject_fidelity')}** | {cell(r, 'subject_similarity', False)} | "
                     f"{cell(r, 'prompt_fidelity')} | {cell(r, 'drift_subject_share')} | "
                     f"{cell(r, 'class_kind_diversity', False)} |"
                     + (f" {cell(r, 'context_object')} | {cell(r, 'context_fill')} | {cell(r, 'context_both')} |"
                        if contexts else ""))
    lines.append(f"| *held-out crops of the training pictures* | {held_out['pass_rate']:.0%} | "
                 f"{held_out['similarity']:.2f} | | | |" + (" | | |" if contexts else ""))
    return "\n".join(lines) + WORLD_NOTE


WORLD_NOTE = ("\n\nSubject fidelity: the subject judge (pocket/subject_judge.py) passes a picture when it is as close "
              "to one of the training pictures as held-out crops of them are (its threshold passes "
              f"{subject_judge.PASS_QUANTILE:.0%} of its calibration crops); similarity 1 = a training picture itself. "
              "The last row is new crops of your own pictures: what a perfect result scores. Drift: class-prompt "
              "pictures the judge passes (their mean similarity in brackets).")


PAPER_NOTE = ("\n\nDINO and CLIP-I: generated vs the training pictures, every pair; CLIP-T: each picture vs its "
              "prompt without the identifier; PRES: class-prompt pictures vs the training pictures (DINO). The paper's "
              "figures average 30 subjects (objects and pets) x 25 prompts x 4 seeds with the whole model fine-tuned: "
              "a guide, not a target. Compare each row with the base model, and with the real-images row (how alike "
              "your own pictures are).")


def paper_table(results: dict, real: dict) -> str:
    """Our DINO / CLIP-I / CLIP-T / PRES beside the paper's Table 1 figures for Stable Diffusion."""
    def cells(r):
        return " | ".join("-" if r.get(k) is None else f"{r[k]:.3f}" for k in ("dino", "clip_i", "clip_t", "pres"))

    lines = ["| method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | PRES ↓ |", "|---|---|---|---|---|"]
    lines += [f"| {method} | {cells(r)} |" for method, r in results.items()]
    lines.append(f"| real images (training pictures) | {cells(real)} |")
    lines += [f"| *paper, Table 1: {name}* | {cells(r)} |" for name, r in paper_metrics.PAPER_TABLE_1.items()]
    return "\n".join(lines) + PAPER_NOTE


def chosen_metrics(cfg) -> set:
    """{'world'}, {'paper'} or both: METRICS, with 'auto' read from MODEL_ID (pocket and tiny: the world's)."""
    lesson.require_choice(cfg, "METRICS", ("auto", "world", "paper", "both"))
    if cfg.METRICS == "auto":
        return {"world"} if models.resolve(cfg.MODEL_ID).kind in ("pocket", "tiny") else {"paper"}
    return {"world", "paper"} if cfg.METRICS == "both" else {cfg.METRICS}


def evaluate(argv=None) -> dict:
    """Train the three ways, draw and score; returns the results by method (what results.json holds)."""
    cfg = lesson.configure(globals(), argv, __doc__)
    lesson.require_int(cfg, "LORA_STEPS", "TI_STEPS", "NUM_CLASS_IMAGES", "SAMPLES")
    lesson.require_int(cfg, "CONTEXT_SAMPLES", minimum=0)  # (0: no contexts, and no object classifier needed)
    lesson.require_int(cfg, "NUM_INFERENCE_STEPS", maximum=lesson.MAX_STEPS)
    # (as exercise 3a and 3b check theirs: NaN drew black pictures, a seed of 1.5 or -1 went into the samplers,
    # and only after every method had trained)
    lesson.require_float(cfg, "GUIDANCE_SCALE", maximum=lesson.MAX_GUIDANCE)
    lesson.require_seed(cfg, "RANDOM_SEED")
    seeds = cfg.TRAINING_SEEDS if isinstance(cfg.TRAINING_SEEDS, (tuple, list)) else (cfg.TRAINING_SEEDS,)
    # (each trains into a folder of its own, with exercise 3b's and 3a's RANDOM_SEED: their range, once each)
    if not seeds or len(set(seeds)) != len(seeds) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= lesson.MAX_SEED for s in seeds):
        raise LessonError(f"TRAINING_SEEDS must be one or more different whole numbers between 0 and "
                          f"{lesson.MAX_SEED} (like (42, 43, 44); on the command line: --training-seeds 42,43,44), "
                          f"got {cfg.TRAINING_SEEDS!r}.")
    cfg.TRAINING_SEEDS = tuple(seeds)
    lesson.require_float(cfg, "LORA_LEARNING_RATE", "TI_LEARNING_RATE", above=True)
    lesson.require_text_list(cfg, "COLOUR_PAIRS")  # (the recoloured prompts take turns over them)
    for pair in cfg.COLOUR_PAIRS:
        names = pair.split(" and ")
        if len(names) != 2 or not set(names) <= set(fabric_world.COLOUR_NAMES):
            raise LessonError(f"COLOUR_PAIRS holds {pair!r}: each must be two world colours like 'red and blue' "
                              f"({', '.join(fabric_world.COLOUR_NAMES)}).")
    lesson.require_writable_dir(cfg, "WORK_DIR", "OUTPUT_DIR")
    for name in ("WORK_DIR", "OUTPUT_DIR"):  # (3a and 3b train on training_images/: nothing of ours goes there)
        images.require_apart_from_course_images(cfg, name)
    metrics = chosen_metrics(cfg)
    shown = ["MODEL_ID", "METRICS", "LORA_STEPS", "LORA_LEARNING_RATE", "TI_STEPS", "TI_LEARNING_RATE",
             "TRAINING_SEEDS", "SAMPLES", "CONTEXT_SAMPLES"]
    shown += ["DINO_MODEL", "CLIP_MODEL"] if "paper" in metrics else []
    lesson.print_summary(cfg, "DreamBooth, measured", shown)
    # Every judge and the real pictures are loaded before training, so that a missing one stops the run at once.
    classifier = objects = fabric = held_out = None
    if "world" in metrics:
        classifier = world_metrics.load_classifier(cfg.CLASSIFIER_DIR).float()
        objects = world_metrics.load_classifier(cfg.OBJECT_CLASSIFIER_DIR).float() if cfg.CONTEXT_SAMPLES else None
        fabric = subject_judge.load(exercise3b_train_lora.TRAINING_IMAGES_DIR)
        held_out = fabric.summary(fabric.held_out(cfg.SAMPLES, HELD_OUT_SEED))
    judge = real = None
    if "paper" in metrics:
        judge = paper_metrics.PaperMetrics.load(cfg.DINO_MODEL, cfg.CLIP_MODEL)
        real = images.load_instance_images(exercise3b_train_lora.TRAINING_IMAGES_DIR, REAL_IMAGE_SIZE)
    started = time.perf_counter()

    lesson.step(1, f"Train: LoRA without and with prior preservation, and Textual Inversion (the course's scripts), "
                   f"once per training seed {', '.join(map(str, cfg.TRAINING_SEEDS))}")
    made = {seed: train_all(cfg, Path(cfg.WORK_DIR), seed) for seed in cfg.TRAINING_SEEDS}

    lesson.step(2, "Draw the same prompts and seeds with each method, and score them")
    runtime = devices.pick_runtime(cfg.DEVICE, "no")
    results, rows, real_scores = {}, [], None
    if judge is not None:
        real_scores = judge.to(runtime.device).real_vs_real(real)
        print(f"  real images, pairwise among the {len(real)} training pictures: DINO {real_scores['dino']:.3f}, "
              f"CLIP-I {real_scores['clip_i']:.3f}")
    for method in ("base model", "Textual Inversion", "LoRA, no prior preservation", "LoRA + prior preservation"):
        runs = []  # (the base model needs no training: one run)
        for seed in cfg.TRAINING_SEEDS if method in made[cfg.TRAINING_SEEDS[0]] else cfg.TRAINING_SEEDS[:1]:
            adapter, seconds = made[seed].get(method, (None, None))
            row, shown = score(cfg, method, adapter, runtime, classifier, judge, real, fabric, objects)
            runs.append({**row, **({"train_seconds": seconds} if seconds is not None else {})})
            if seed == cfg.TRAINING_SEEDS[0]:
                rows.append(shown)
        results[method] = combine(runs)

    lesson.step(3, "Write the table")
    out = Path(cfg.OUTPUT_DIR)
    tables = ([f"## The pocket world's judge\n\n{world_table(results, held_out)}"] if fabric is not None else []) + \
        ([f"## The DreamBooth paper's metrics\n\n{paper_table(results, real_scores)}"] if judge is not None else [])
    text = "\n\n".join(tables)
    print("\n" + text)
    saved = {"settings": cfg.as_dict(), "results": results, "seconds": time.perf_counter() - started}
    if judge is not None:
        saved.update(real_images=real_scores, paper_table_1=paper_metrics.PAPER_TABLE_1)
    if held_out is not None:
        saved.update(held_out_subject_crops=held_out, subject_threshold=fabric.threshold)
    save_json(saved, out / "results.json")
    save_text(text + "\n", out / "results.md")
    figures.save_grid([p for shown in rows for p in shown], out / "samples.png", cols=len(rows[0]),
                      row_labels=list(results), title="subject x4 | recoloured x4 | class prompt x4"
                      + (" | dress, room, handbag, vase" if objects is not None else ""))
    print(f"\nWrote {out / 'results.md'}, {out / 'results.json'} and {out / 'samples.png'}")
    return results


def main(argv=None) -> int:
    evaluate(argv)
    return 0


if __name__ == "__main__":
    lesson.run(main)
