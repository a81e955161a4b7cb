"""Does DreamBooth do what the paper says? Measured against ground truth on the pocket model.

    python tools/evaluate_dreambooth.py                  # pocket model: trains 3 ways, scores 4 (~7 min on a 2-core CPU)
    python tools/evaluate_dreambooth.py --model tiny --lora-steps 4 --ti-steps 4 --samples 4   # machinery check

It trains with the course's own scripts - exercise 3b with and without prior preservation, exercise
3a - then draws the same prompts and seeds with the base model and with each result, and scores the
pictures with the pocket world's classifier and colour reading (``pocket/world_metrics.py``):

- subject fidelity: share of "a sks african fabric pattern" samples recognised as the subject;
- prompt fidelity: colour adherence of "a sks african fabric pattern in {c1} and {c2}";
- drift: share of class-prompt ("a fabric pattern") samples recognised as the subject, and how varied
  their pattern kinds stay (1 = all eight kinds equally).

Writes outputs/evaluation/results.json, results.md (the table) and samples.png.
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import exercise3a_train_textual_inversion  # noqa: E402  (the course's scripts, as modules)
import exercise3b_train_lora  # noqa: E402
from common import device as devices  # noqa: E402
from common import figures, lesson, models, personalize, sampling  # noqa: E402
from pocket import fabric_world, world_metrics  # noqa: E402
from common.errors import LessonError  # noqa: E402
from common.files import save_json  # noqa: E402

# ============================== CONSTANTS ==============================
MODEL_ID = "pocket"  # the pocket model knows its world; any MODEL_ID runs, but only pocket scores mean anything
CLASSIFIER_DIR = "models/pocket-sd/world_classifier"  # the judge (ships with the pocket model)
LORA_STEPS = 800  # exercise 3b's MAX_TRAIN_STEPS (the course's 800)
TI_STEPS = 1000  # exercise 3a's MAX_TRAIN_STEPS (x4 micro-batches each)
LORA_LEARNING_RATE = 5e-3  # the pocket profile: the course's 1e-4 barely moves a 6.6M-parameter UNet in 800 steps
TI_LEARNING_RATE = 5e-3  # the Textual Inversion paper's base rate (the course's 5e-4 moves it too little here)
NUM_CLASS_IMAGES = 100  # class images for prior preservation (the course's 100)
SAMPLES = 48  # pictures per prompt kind per method
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
PLACEHOLDER = "<african-fabric>"  # exercise 3a's token


def train_all(cfg, work: Path) -> dict:
    """The three personalisations, made by the course's own scripts. Returns {method: (adapter path, seconds)}."""
    common = ["--model", cfg.MODEL_ID, "--output-dir", str(Path(cfg.OUTPUT_DIR) / "training"), "--device", cfg.DEVICE]
    made = {}
    for method, extra in [("LoRA, no prior preservation", ["--no-prior-preservation"]),
                          ("LoRA + prior preservation", ["--num-class-images", str(cfg.NUM_CLASS_IMAGES)])]:
        folder = work / ("lora_prior" if "+" in method else "lora_no_prior")
        started = time.perf_counter()
        exercise3b_train_lora.train(common + extra + ["--class-data-dir", str(work / "class_images"),
            "--max-train-steps", str(cfg.LORA_STEPS), "--learning-rate", str(cfg.LORA_LEARNING_RATE),
            "--lora-dir", str(folder), "--sample-every", "1000000"])
        made[method] = (folder, time.perf_counter() - started)
    folder, started = work / "textual_inversion", time.perf_counter()
    exercise3a_train_textual_inversion.train(common + [
        "--max-train-steps", str(cfg.TI_STEPS), "--learning-rate", str(cfg.TI_LEARNING_RATE),
        "--embedding-dir", str(folder), "--sample-every", "1000000", "--lora-dir", str(work / "none")])
    made["Textual Inversion"] = (folder, time.perf_counter() - started)
    return made


def score(cfg, method: str, adapter, classifier, runtime) -> tuple[dict, list]:
    """Draw the three prompt kinds with one method's personalisation and score them."""
    pipe = models.load_pipeline(cfg.MODEL_ID, runtime.dtype).to(runtime.device)
    sampling.use_multistep_solver(pipe)
    words = SUBJECT_WORDS
    if method.startswith("LoRA"):
        personalize.load_adapters(pipe, adapter)
    elif method == "Textual Inversion":
        words = personalize.load_adapters(pipe, embedding_path=adapter).tokens[0]
    pairs = [p.split(" and ") for p in cfg.COLOUR_PAIRS]
    colours = [pairs[i % len(pairs)] for i in range(cfg.SAMPLES)]
    prompts = ([f"a {words} fabric pattern"] * cfg.SAMPLES
               + [f"a {words} fabric pattern in {a} and {b}" for a, b in colours]
               + [fabric_world.GENERIC_CAPTION] * cfg.SAMPLES)
    seeds = [cfg.RANDOM_SEED + i % cfg.SAMPLES for i in range(len(prompts))]
    settings = sampling.SamplingSettings(cfg.NUM_INFERENCE_STEPS, cfg.GUIDANCE_SCALE, batch_size=16)
    images, _ = sampling.generate(pipe, prompts, seeds, settings, desc=method)
    subject, recoloured, classed = (images[i * cfg.SAMPLES:(i + 1) * cfg.SAMPLES] for i in range(3))
    class_labels = world_metrics.classify(classifier, classed)
    row = {"subject_fidelity": world_metrics.subject_share(classifier, subject),
           "prompt_fidelity": world_metrics.mean_colour_adherence(recoloured, colours),
           "drift_subject_share": float((class_labels == world_metrics.SUBJECT).mean()),
           "class_kind_diversity": world_metrics.kind_diversity(class_labels)}
    return row, subject[:4] + recoloured[:4] + classed[:4]


def table(results: dict) -> str:
    lines = ["| method | subject fidelity ↑ | prompt fidelity ↑ | drift: class prompt seen as subject ↓ | class kind diversity ↑ |",
             "|---|---|---|---|---|"]
    for method, r in results.items():
        lines.append(f"| {method} | {r['subject_fidelity']:.0%} | {r['prompt_fidelity']:.0%} | "
                     f"{r['drift_subject_share']:.0%} | {r['class_kind_diversity']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    cfg = lesson.configure(globals(), argv, __doc__)
    lesson.require_int(cfg, "LORA_STEPS", "TI_STEPS", "NUM_CLASS_IMAGES", "SAMPLES", "NUM_INFERENCE_STEPS")
    lesson.require_float(cfg, "LORA_LEARNING_RATE", "TI_LEARNING_RATE", above=True)
    for pair in cfg.COLOUR_PAIRS:
        names = pair.split(" and ")
        if len(names) != 2 or not set(names) <= set(fabric_world.COLOUR_NAMES):
            raise LessonError(f"COLOUR_PAIRS holds {pair!r}: each must be two world colours like 'red and blue' "
                              f"({', '.join(fabric_world.COLOUR_NAMES)}).")
    lesson.print_summary(cfg, "DreamBooth against ground truth",
                         ["MODEL_ID", "LORA_STEPS", "LORA_LEARNING_RATE", "TI_STEPS", "TI_LEARNING_RATE", "SAMPLES"])
    classifier = world_metrics.load_classifier(cfg.CLASSIFIER_DIR).float()
    started = time.perf_counter()

    lesson.step(1, "Train: LoRA without and with prior preservation, and Textual Inversion (the course's scripts)")
    made = train_all(cfg, Path(cfg.WORK_DIR))

    lesson.step(2, "Draw the same prompts and seeds with each method, and score them")
    runtime = devices.pick_runtime(cfg.DEVICE, "no")
    results, rows = {}, []
    for method, adapter in [("base model", None), ("Textual Inversion", made["Textual Inversion"][0]),
                            ("LoRA, no prior preservation", made["LoRA, no prior preservation"][0]),
                            ("LoRA + prior preservation", made["LoRA + prior preservation"][0])]:
        results[method], shown = score(cfg, method, adapter, classifier, runtime)
        if method in made:
            results[method]["train_seconds"] = made[method][1]
        rows.extend(shown)

    lesson.step(3, "Write the table")
    out = Path(cfg.OUTPUT_DIR)
    text = table(results)
    print("\n" + text)
    save_json({"settings": cfg.as_dict(), "results": results, "seconds": time.perf_counter() - started},
              out / "results.json")
    (out / "results.md").write_text(text + "\n", encoding="utf-8")
    figures.save_grid(rows, out / "samples.png", cols=12, row_labels=list(results),
                      title="subject prompt x4 | recoloured x4 | class prompt x4")
    print(f"\nWrote {out / 'results.md'}, {out / 'results.json'} and {out / 'samples.png'}")
    return results


if __name__ == "__main__":
    lesson.run(main)
