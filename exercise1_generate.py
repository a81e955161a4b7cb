"""Exercise 1: generate your fabric in nine new contexts with the personalised model.

The LoRA from exercise 3b binds the word "sks" to your fabric. Here "sks african fabric pattern" goes
on a dress, a wallpaper, a vase, a cyberpunk city...: nine prompts, each with its own seed, in one grid.
The same prompts and seeds *without* "sks" show what the token adds (reflection question 2).

    python exercise1_generate.py                    # the course's settings (NVIDIA GPU: under a minute)
    python exercise1_generate.py --model tiny       # built-in toy model (after exercise3b --model tiny)
    python exercise1_generate.py --fast-mode        # LCM-LoRA + tiny autoencoder: 4 steps per image
    python exercise1_generate.py --no-use-lora      # the base model, on purpose, for comparison

Writes outputs/exercise1_output.png (labelled 3x3 grid), outputs/exercise1_grid_simple.png,
outputs/exercise1_variations/NN_<slug>.png and outputs/exercise1_token_comparison.png.
"""

import math
from pathlib import Path
from types import SimpleNamespace

from common import lesson  # (torch and diffusers load in the lesson, once the command line is read)
from common.files import save_image, slug

# ============================== CONSTANTS: edit these ==============================
MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Hub id, local folder, .safetensors file, or "tiny"
LORA_PATH = "models/fabric_lora"  # exercise 3b's LoRA: folder or file (diffusers, PEFT or kohya layout)
USE_LORA = True  # False = the base model on purpose, to compare with
LORA_SCALE = 1.0  # how strongly the LoRA applies: 0 = base model, 1 = as trained
EMBEDDING_PATH = None  # optional Textual Inversion embedding (exercise 3a) to load as well
SUBJECT_TOKEN = "sks"  # the word the LoRA learned; it fills the {} of PROMPTS
PROMPTS = (
    "a beautiful dress made of {} african fabric pattern, fashion photography",
    "a modern room with {} african fabric pattern wallpaper, interior design",
    "a watercolor painting of {} african fabric pattern",
    "a leather handbag with {} african fabric pattern",
    "a ceramic vase painted with {} african fabric pattern",
    "a cyberpunk city decorated with {} african fabric pattern",
    "a woven basket with {} african fabric pattern",
    "abstract art inspired by {} african fabric pattern",
    "a plain {} african fabric pattern, textile photography",
)  # the nine contexts of the course's figure ({} = SUBJECT_TOKEN)
COMPARE_WITHOUT_TOKEN = True  # also draw every prompt and seed without SUBJECT_TOKEN, side by side
NUM_INFERENCE_STEPS = 30  # denoising steps (DPM-Solver++)
GUIDANCE_SCALE = 7.5  # classifier-free guidance: how strictly to follow the prompt
RANDOM_SEED = 42  # prompt i uses seed RANDOM_SEED + i
RESOLUTION = None  # image size in pixels (multiple of 8); None = the model's own (512 for SD v1.5)
BATCH_SIZE = 4  # images generated at once (halved automatically if memory runs out)
SAFETY_CHECKER = True  # where the model ships one, it blanks images it flags; False to disable
FAST_MODE = False  # LCM-LoRA + LCMScheduler + tiny autoencoder: rough pictures in a few steps
FAST_STEPS = 4  # denoising steps in FAST_MODE (LCM: 2-8)
FAST_GUIDANCE_SCALE = 1.0  # guidance in FAST_MODE (LCM wants 1-2; 1 skips the unconditional pass)
LCM_LORA_ID = "latent-consistency/lcm-lora-sdv1-5"  # Hub id or local folder of the LCM-LoRA
TINY_VAE_ID = "madebyollin/taesd"  # Hub id or local folder of the tiny autoencoder (AutoencoderTiny)
DEVICE = "auto"  # auto, cuda, mps or cpu
MIXED_PRECISION = "auto"  # auto, no, fp16 or bf16
OUTPUT_DIR = "outputs"  # where the pictures go
# ==================================================================================

REFLECTION = [
    "Connection to DDPM: how does text conditioning change what the model generates compared to "
    "unconditional DDPM from Module 12.3.1?",
    "Token importance: what happens if you remove 'sks' from the prompt? Compare the two rows of "
    "exercise1_token_comparison.png: same prompt, same seed, one word less.",
    "Generalization: the model was trained on only 10 fabric images. How can it generate the pattern on a "
    "dress it never saw during training?",
]


def validate(cfg):
    """Every constant checked, and the LoRA found, before any model loads."""
    from common import personalize

    lesson.require_text_list(cfg, "PROMPTS")
    personalize.check_constants(cfg)  # (the model, sampling settings and files all generation scripts share)
    personalize.check_guidance(personalize.guidance_in_use(cfg))  # (0 draws what 1 draws)


def generate(argv=None):
    """The lesson, step by step. Returns what it made (the tests read it); the command line runs main()."""
    cfg = lesson.configure(globals(), argv, __doc__)
    # The libraries load now, after the command line is read, so that --help answers at once.
    from common import figures, personalize, sampling

    validate(cfg)
    lesson.print_summary(cfg, "Exercise 1 - your fabric in nine contexts", [
        "MODEL_ID", "LORA_PATH", "USE_LORA", "LORA_SCALE", "EMBEDDING_PATH", "NUM_INFERENCE_STEPS",
        "GUIDANCE_SCALE", "RANDOM_SEED", "COMPARE_WITHOUT_TOKEN", "FAST_MODE", "SAFETY_CHECKER"])
    personalize.note_unknown_words(cfg, cfg.PROMPTS)  # (the pocket model knows only its world's words)
    out_dir = Path(cfg.OUTPUT_DIR)

    lesson.step(1, "Choose the device and load the base model")
    pipe, resolution = personalize.load_base_model(cfg)  # (with DPM-Solver++: 30 steps do what 50 did)

    lesson.step(2, f"Personalise it: load what binds '{cfg.SUBJECT_TOKEN}' to your fabric")
    loaded = personalize.personalize(pipe, cfg)  # LoRA, embedding, and FAST_MODE's LCM-LoRA on top
    steps, guidance = loaded.steps, loaded.guidance
    settings = sampling.SamplingSettings(steps, guidance, height=resolution, width=resolution,
                                         batch_size=cfg.BATCH_SIZE)

    lesson.step(3, "Encode each prompt once (with and without the subject token)")
    prompts = list(cfg.PROMPTS)
    seeds = [cfg.RANDOM_SEED + i for i in range(len(prompts))]
    plain = [personalize.without_token(p, cfg.SUBJECT_TOKEN) for p in prompts] if cfg.COMPARE_WITHOUT_TOKEN else []
    personalize.warn_if_unused(prompts, loaded, cfg.SUBJECT_TOKEN)
    embeddings = sampling.encode_prompts(pipe, prompts + plain, guidance=guidance > 1)
    print(f"  {len(embeddings)} distinct prompts encoded; seeds {seeds[0]}..{seeds[-1]}")

    lesson.step(4, f"Generate {len(prompts + plain)} images at {resolution}x{resolution}, {steps} steps, "
                   f"guidance {guidance:g}, {settings.batch_size} at a time")
    flags = []
    images, seconds = sampling.generate(pipe, prompts + plain, seeds + seeds[:len(plain)], settings,
                                        "Exercise 1", embeddings=embeddings, nsfw=flags)
    with_token, without = images[:len(prompts)], images[len(prompts):]

    lesson.step(5, "Save the grids and each image")
    drop = tuple(cfg.SUBJECT_TOKEN.split()) + ("african", "fabric", "pattern")
    names = [slug(p, drop) for p in prompts]
    cols = math.ceil(math.sqrt(len(prompts)))
    written = [
        figures.save_grid(with_token, out_dir / "exercise1_output.png", cols=cols, labels=prompts,
                          title=f"'{cfg.SUBJECT_TOKEN}' in {len(prompts)} contexts"),
        figures.save_grid(with_token, out_dir / "exercise1_grid_simple.png", cols=cols),
    ]
    variations = [save_image(im, out_dir / "exercise1_variations" / f"{i:02d}_{name}.png")
                  for i, (im, name) in enumerate(zip(with_token, names), 1)]
    if plain:
        written.append(figures.save_grid(
            with_token + without, out_dir / "exercise1_token_comparison.png", cols=len(prompts),
            labels=[n.replace("_", " ") for n in names] * 2, row_labels=[f"with {cfg.SUBJECT_TOKEN}", "without"],
            title=f"Same prompt, same seed: with '{cfg.SUBJECT_TOKEN}' (top) and without it (bottom)"))

    print("\nDone. " + sampling.describe_speed(len(images), seconds))
    print("  " + sampling.describe_safety(pipe, flags, cfg.SAFETY_CHECKER))
    for line in loaded.describe():
        print(f"  {line}")
    lesson.print_files(written)
    print(f"  {out_dir / 'exercise1_variations'}/  ({len(variations)} images, 01_{names[0]}.png ...)")
    lesson.print_reflection(REFLECTION)
    return SimpleNamespace(images=with_token, without_token=without, prompts=prompts, plain_prompts=plain,
                           seeds=seeds, files=written + variations, seconds=seconds, nsfw=flags,
                           loaded=loaded, pipe=pipe, settings=settings)


def main(argv=None) -> int:
    """The command line: run the lesson; the exit code is 0 when it ran to the end."""
    generate(argv)
    return 0


if __name__ == "__main__":
    lesson.run(main)
