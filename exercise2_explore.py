"""Exercise 2: how guidance, style words and seeds shape your personalised fabric.

Three explorations, each runnable on its own:

  Part A  guidance scale: the same prompt and seed at 1.5, 3, 7.5, 12 and 20
  Part B  style transfer: your fabric rendered in nine artistic styles (same seed, so only the words change)
  Part C  seed variation: the same prompt with nine seeds: diversity against consistency

    python exercise2_explore.py                     # all three parts (NVIDIA GPU: about a minute)
    python exercise2_explore.py --part a            # only part A
    python exercise2_explore.py --model tiny        # built-in toy model (after exercise3b --model tiny)
    python exercise2_explore.py --negative-prompt "blurry, distorted"   # the course's tip

Writes outputs/exercise2_guidance_comparison.png, outputs/exercise2_style_grid.png and
outputs/exercise2_seed_comparison.png.
"""

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

from common import lesson  # (torch and diffusers load in the lesson, once the command line is read)
from common.errors import LessonError

# ============================== CONSTANTS: edit these ==============================
MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Hub id, local folder, .safetensors file, or "tiny"
PART = "all"  # which exploration to run: a, b, c or all
LORA_PATH = "models/fabric_lora"  # exercise 3b's LoRA: folder or file (diffusers, PEFT or kohya layout)
USE_LORA = True  # False = the base model on purpose, to compare with
LORA_SCALE = 1.0  # how strongly the LoRA applies: 0 = base model, 1 = as trained
EMBEDDING_PATH = None  # optional Textual Inversion embedding (exercise 3a) to load as well
SUBJECT_TOKEN = "sks"  # the word the LoRA learned; it fills the {} of PROMPT and STYLE_PROMPT
PROMPT = "a {} african fabric pattern"  # parts A and C ({} = SUBJECT_TOKEN)
NEGATIVE_PROMPT = ""  # what to steer away from, e.g. "blurry, distorted" (used whenever guidance > 1)
GUIDANCE_SCALES = (1.5, 3.0, 7.5, 12.0, 20.0)  # part A
STYLES = ("oil painting", "watercolor painting", "pencil sketch", "pop art", "pixel art",
          "ukiyo-e woodblock print", "stained glass", "cubist painting", "impressionist painting")  # part B
STYLE_PROMPT = "{} african fabric pattern, {style} style"  # part B: {} = SUBJECT_TOKEN, {style} = each of STYLES
NUM_SEEDS = 9  # part C: seeds RANDOM_SEED, RANDOM_SEED + 1, ...
NUM_INFERENCE_STEPS = 30  # denoising steps (DPM-Solver++)
GUIDANCE_SCALE = 7.5  # parts B and C
RANDOM_SEED = 42  # the seed of parts A and B, and the first of part C
RESOLUTION = None  # image size in pixels (multiple of 8); None = the model's own (512 for SD v1.5)
BATCH_SIZE = 4  # images generated at once (halved automatically if memory runs out)
SAFETY_CHECKER = True  # where the model ships one, it blanks images it flags; False to disable
FAST_MODE = False  # LCM-LoRA + LCMScheduler + tiny autoencoder: rough pictures in a few steps
FAST_STEPS = 4  # denoising steps in FAST_MODE (LCM: 2-8)
FAST_GUIDANCE_SCALE = 1.0  # parts B and C in FAST_MODE (LCM wants 1-2; part A keeps GUIDANCE_SCALES)
LCM_LORA_ID = "latent-consistency/lcm-lora-sdv1-5"  # Hub id or local folder of the LCM-LoRA
TINY_VAE_ID = "madebyollin/taesd"  # Hub id or local folder of the tiny autoencoder (AutoencoderTiny)
DEVICE = "auto"  # auto, cuda, mps or cpu
MIXED_PRECISION = "auto"  # auto, no, fp16 or bf16
OUTPUT_DIR = "outputs"  # where the pictures go
# ==================================================================================

REFLECTION = [
    "Part A: at which guidance scale does the fabric appear first, and where does it start to look "
    "over-saturated or artificial? Try values between 5 and 12 to find your balance.",
    "Part B: which styles keep the fabric's motifs recognisable, and which overwrite them? What does that "
    "say about how strongly 'sks' is bound?",
    "Part C: do the nine seeds show one fabric in nine arrangements, or nine different fabrics? Is that "
    "consistency what you want from a personalised model?",
    "Try a negative prompt ('blurry, distorted'), short prompts ('sks fabric') against detailed ones, or "
    "unusual objects (spacecraft, ancient temple, underwater) to find the context boundaries.",
]


def validate(cfg):
    """Every constant checked, and the LoRA found, before any model loads."""
    from common import personalize

    cfg.PART = str(cfg.PART).lower()
    lesson.require_choice(cfg, "PART", ["a", "b", "c", "all"])
    lesson.require_text(cfg, "PROMPT", "STYLE_PROMPT")
    lesson.require_text_list(cfg, "STYLES")
    if not isinstance(cfg.NEGATIVE_PROMPT, str):
        cfg.NEGATIVE_PROMPT = "" if cfg.NEGATIVE_PROMPT is None else str(cfg.NEGATIVE_PROMPT)
    if "{style}" not in cfg.STYLE_PROMPT:
        raise LessonError(f"STYLE_PROMPT must contain {{style}} where each style goes, got {cfg.STYLE_PROMPT!r}. "
                          "For example: '{} african fabric pattern, {style} style' ({} = SUBJECT_TOKEN).")
    scales = cfg.GUIDANCE_SCALES if isinstance(cfg.GUIDANCE_SCALES, (tuple, list)) else (cfg.GUIDANCE_SCALES,)
    cfg.GUIDANCE_SCALES = tuple(scales)  # one number alone is a list of one
    if not 1 <= len(scales) <= lesson.MAX_LIST or not all(
            isinstance(g, (int, float)) and not isinstance(g, bool) and math.isfinite(g)
            and 0 <= g <= lesson.MAX_GUIDANCE for g in scales):
        lesson.fail(cfg, "GUIDANCE_SCALES", f"must be a list of 1 to {lesson.MAX_LIST} numbers >= 0 and <= "
                    f"{lesson.MAX_GUIDANCE} (on the command line: --guidance-scales 1.5,7.5,12)")
    lesson.require_int(cfg, "NUM_SEEDS", maximum=lesson.MAX_LIST)  # part C's grid: one picture per seed
    personalize.check_constants(cfg)  # (the model, sampling settings and files all generation scripts share)
    scales = {f"part A's guidance {g:g}": g for g in cfg.GUIDANCE_SCALES} if cfg.PART in ("a", "all") else {}
    if cfg.PART != "a":  # (parts B and C sample at the one scale)
        scales.update(personalize.guidance_in_use(cfg))
    personalize.check_guidance(scales, cfg.NEGATIVE_PROMPT)


def explore(argv=None):
    """The lesson, step by step. Returns what it made (the tests read it); the command line runs main()."""
    cfg = lesson.configure(globals(), argv, __doc__)
    # The libraries load now, after the command line is read, so that --help answers at once.
    from common import figures, personalize, sampling

    validate(cfg)
    lesson.print_summary(cfg, "Exercise 2 - guidance, styles and seeds", [
        "MODEL_ID", "PART", "LORA_PATH", "USE_LORA", "LORA_SCALE", "PROMPT", "NEGATIVE_PROMPT", "GUIDANCE_SCALES",
        "NUM_INFERENCE_STEPS", "GUIDANCE_SCALE", "RANDOM_SEED", "FAST_MODE", "SAFETY_CHECKER"])
    parts = "abc" if cfg.PART == "all" else cfg.PART
    style_prompts = [cfg.STYLE_PROMPT.replace("{style}", s) for s in cfg.STYLES]
    chosen = ([cfg.PROMPT] if set(parts) & {"a", "c"} else []) + (style_prompts if "b" in parts else [])
    personalize.note_unknown_words(cfg, chosen)  # (the pocket model knows only its world's words)
    out_dir = Path(cfg.OUTPUT_DIR)

    lesson.step(1, "Choose the device and load the base model")
    pipe, resolution = personalize.load_base_model(cfg)  # (with DPM-Solver++: 30 steps do what 50 did)

    lesson.step(2, f"Personalise it: load what binds '{cfg.SUBJECT_TOKEN}' to your fabric")
    loaded = personalize.personalize(pipe, cfg)  # LoRA, embedding, and FAST_MODE's LCM-LoRA on top
    steps, guidance = loaded.steps, loaded.guidance
    settings = sampling.SamplingSettings(steps, guidance, cfg.NEGATIVE_PROMPT, resolution, resolution,
                                         cfg.BATCH_SIZE)
    personalize.warn_if_unused(chosen, loaded, cfg.SUBJECT_TOKEN)  # (the prompts of the parts that run)
    # Every prompt of the chosen parts is encoded once, with the negative prompt, and reused by all calls.
    embeddings = sampling.encode_prompts(pipe, chosen, cfg.NEGATIVE_PROMPT)
    flags, count, seconds, written = [], 0, 0.0, []

    def run(prompts, seeds, desc, **changes):
        nonlocal count, seconds
        images, took = sampling.generate(pipe, prompts, seeds, dataclasses.replace(settings, **changes), desc,
                                         embeddings=embeddings, nsfw=flags)
        count, seconds = count + len(images), seconds + took
        return images

    if "a" in parts:
        lesson.step("A", f"Guidance scale: '{cfg.PROMPT}' at {', '.join(f'{g:g}' for g in cfg.GUIDANCE_SCALES)}, "
                         f"seed {cfg.RANDOM_SEED}")
        images = [run([cfg.PROMPT], [cfg.RANDOM_SEED], f"guidance {g:g}", guidance_scale=float(g))[0]
                  for g in cfg.GUIDANCE_SCALES]  # one call per scale: the scale is one number per call
        written.append(figures.save_grid(images, out_dir / "exercise2_guidance_comparison.png", cols=len(images),
                                         labels=[f"guidance {g:g}" for g in cfg.GUIDANCE_SCALES],
                                         title=f"'{cfg.PROMPT}', seed {cfg.RANDOM_SEED}"))

    if "b" in parts:
        lesson.step("B", f"Style transfer: {len(style_prompts)} styles, seed {cfg.RANDOM_SEED} for all")
        images = run(style_prompts, [cfg.RANDOM_SEED] * len(style_prompts), "Styles")
        written.append(figures.save_grid(images, out_dir / "exercise2_style_grid.png",
                                         cols=math.ceil(math.sqrt(len(images))), labels=list(cfg.STYLES),
                                         title=f"'{cfg.STYLE_PROMPT}', guidance {guidance:g}"))

    if "c" in parts:
        seeds = [cfg.RANDOM_SEED + i for i in range(cfg.NUM_SEEDS)]
        lesson.step("C", f"Seed variation: '{cfg.PROMPT}' with seeds {seeds[0]}..{seeds[-1]}")
        images = run([cfg.PROMPT] * len(seeds), seeds, "Seeds")
        written.append(figures.save_grid(images, out_dir / "exercise2_seed_comparison.png",
                                         cols=math.ceil(math.sqrt(len(images))), labels=[f"seed {s}" for s in seeds],
                                         title=f"'{cfg.PROMPT}', guidance {guidance:g}"))

    print("\nDone. " + sampling.describe_speed(count, seconds))
    print("  " + sampling.describe_safety(pipe, flags, cfg.SAFETY_CHECKER))
    for line in loaded.describe():
        print(f"  {line}")
    lesson.print_files(written)
    lesson.print_reflection(REFLECTION)
    return SimpleNamespace(files=written, count=count, seconds=seconds, nsfw=flags, loaded=loaded, pipe=pipe)


def main(argv=None) -> int:
    """The command line: run the lesson; the exit code is 0 when it ran to the end."""
    explore(argv)
    return 0


if __name__ == "__main__":
    lesson.run(main)
