"""Step 5: a looping morph through your fabric's latent space (SLERP between keyframe noises).

Five keyframe seeds give five starting noises, that is, five different fabrics. Walking from one to
the next along the sphere that Gaussian noise lives on (SLERP), and denoising every point on the way,
gives frames that change smoothly; the last keyframe walks back to the first, so the GIF loops without
a seam. The prompt is encoded once for all frames, and frames are denoised in batches.

    python generate_dreambooth_morph.py                   # 15 s at 30 fps = 450 frames
    python generate_dreambooth_morph.py --model tiny      # built-in toy model (after exercise3b --model tiny)
    python generate_dreambooth_morph.py --fast-mode       # LCM-LoRA + tiny autoencoder: 4 steps a frame
    python generate_dreambooth_morph.py --duration-seconds 4 --fps 12    # a quick look first

Writes outputs/dreambooth_fabric_morph.gif, outputs/dreambooth_fabric_morph.mp4 (when imageio-ffmpeg is
installed) and outputs/dreambooth_fabric_morph_keyframes.png.
"""

from pathlib import Path
from types import SimpleNamespace

from common import lesson  # (torch and diffusers load in the lesson, once the command line is read)
from common.errors import LessonError

# ============================== CONSTANTS: edit these ==============================
MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # Hub id, local folder, .safetensors file, or "tiny"
LORA_PATH = "models/fabric_lora"  # exercise 3b's LoRA: folder or file (diffusers, PEFT or kohya layout)
USE_LORA = True  # False = the base model on purpose, to compare with
LORA_SCALE = 1.0  # how strongly the LoRA applies: 0 = base model, 1 = as trained
EMBEDDING_PATH = None  # optional Textual Inversion embedding (exercise 3a) to load as well
SUBJECT_TOKEN = "sks"  # the word the LoRA learned; it fills the {} of PROMPT
PROMPT = "a {} african fabric pattern"  # the same prompt for every frame ({} = SUBJECT_TOKEN)
NUM_KEYFRAMES = 5  # distinct patterns the loop passes through
DURATION_SECONDS = 15.0  # length of the loop, in seconds
FPS = 30  # frames per second (15 s x 30 fps = 450 frames)
NUM_INFERENCE_STEPS = 25  # denoising steps per frame (DPM-Solver++)
GUIDANCE_SCALE = 7.5  # classifier-free guidance
RANDOM_SEED = 42  # keyframe k starts from the noise of seed RANDOM_SEED + k
RESOLUTION = None  # frame size in pixels (multiple of 8); None = the model's own (512 for SD v1.5)
BATCH_SIZE = 8  # frames denoised at once (halved automatically if memory runs out)
GIF_SIZE = 256  # longest side of the GIF's frames in pixels (None = full size; the MP4 keeps full size)
GIF_COLORS = 256  # colours in the GIF's shared palette (fewer = smaller file, more banding)
WRITE_MP4 = True  # also write an MP4 (needs: pip install imageio-ffmpeg)
SAFETY_CHECKER = True  # where the model ships one, it blanks frames it flags; False to disable
FAST_MODE = False  # LCM-LoRA + LCMScheduler + tiny autoencoder: rough frames in a few steps
FAST_STEPS = 4  # denoising steps in FAST_MODE (LCM: 2-8)
FAST_GUIDANCE_SCALE = 1.0  # guidance in FAST_MODE (LCM wants 1-2; 1 skips the unconditional pass)
LCM_LORA_ID = "latent-consistency/lcm-lora-sdv1-5"  # Hub id or local folder of the LCM-LoRA
TINY_VAE_ID = "madebyollin/taesd"  # Hub id or local folder of the tiny autoencoder (AutoencoderTiny)
DEVICE = "auto"  # auto, cuda, mps or cpu
MIXED_PRECISION = "auto"  # auto, no, fp16 or bf16
OUTPUT_DIR = "outputs"  # where the animation goes
# ==================================================================================
MAX_FRAMES = 3000

REFLECTION = [
    "The keyframes differ only in their starting noise. What does that tell you about where the variety "
    "of a personalised model comes from?",
    "Try a straight line instead of SLERP (the middle of two noises has a smaller norm): what would happen "
    "to the frames halfway between keyframes, and why?",
    "Does every frame look like your fabric, or only the keyframes? What does that say about the latent "
    "space around the learned concept?",
]


def validate(cfg):
    """Every constant checked, and the LoRA found, before any model loads."""
    from common import personalize
    from common.animation import MAX_FPS, MIN_FPS

    lesson.require_text(cfg, "PROMPT")
    lesson.require_int(cfg, "NUM_KEYFRAMES", minimum=2, maximum=lesson.MAX_LIST)  # (one tile each in the strip)
    lesson.require_int(cfg, "GIF_COLORS", minimum=2)
    lesson.require_int(cfg, "GIF_SIZE", minimum=16, maximum=4096, allow_none=True)
    lesson.require_float(cfg, "DURATION_SECONDS", above=True)
    lesson.require_float(cfg, "FPS", minimum=MIN_FPS, maximum=MAX_FPS)  # (a GIF's delays: 0.01 s to 655 s a frame)
    frames = cfg.DURATION_SECONDS * cfg.FPS
    if frames > MAX_FRAMES:  # every frame is denoised and kept in memory until the GIF is written
        raise LessonError(f"DURATION_SECONDS x FPS gives {frames:.3g} frames, more than {MAX_FRAMES} (for example "
                          f"{MAX_FRAMES // 30} s at 30 fps). Lower DURATION_SECONDS (--duration-seconds) or FPS "
                          "(--fps).")
    if cfg.GIF_COLORS > 256:
        raise LessonError(f"GIF_COLORS must be at most 256 (a GIF's limit), got {cfg.GIF_COLORS}. Set 256 or fewer.")
    if round(cfg.DURATION_SECONDS * cfg.FPS) < cfg.NUM_KEYFRAMES:
        raise LessonError(f"DURATION_SECONDS x FPS gives {round(cfg.DURATION_SECONDS * cfg.FPS)} frames, fewer than "
                          f"NUM_KEYFRAMES ({cfg.NUM_KEYFRAMES}). Make the animation longer or use fewer keyframes.")
    personalize.check_constants(cfg)  # (the model, sampling settings and files all generation scripts share)
    personalize.check_guidance(personalize.guidance_in_use(cfg))  # (0 draws what 1 draws)


def morph(argv=None):
    """The lesson, step by step. Returns what it made (the tests read it); the command line runs main()."""
    cfg = lesson.configure(globals(), argv, __doc__)
    # The libraries load now, after the command line is read, so that --help answers at once.
    from common import animation, figures, personalize, sampling

    validate(cfg)
    num_frames = round(cfg.DURATION_SECONDS * cfg.FPS)
    lesson.print_summary(cfg, f"Step 5 - morphing animation ({num_frames} frames)", [
        "MODEL_ID", "LORA_PATH", "USE_LORA", "LORA_SCALE", "PROMPT", "NUM_KEYFRAMES", "DURATION_SECONDS", "FPS",
        "NUM_INFERENCE_STEPS", "GUIDANCE_SCALE", "RANDOM_SEED", "GIF_SIZE", "FAST_MODE", "SAFETY_CHECKER"])
    out_dir = Path(cfg.OUTPUT_DIR)

    lesson.step(1, "Choose the device and load the base model")
    # (DPM-Solver++ as the scheduler: deterministic, so neighbouring noises give neighbouring frames)
    pipe, resolution = personalize.load_base_model(cfg)

    lesson.step(2, f"Personalise it: load what binds '{cfg.SUBJECT_TOKEN}' to your fabric")
    loaded = personalize.personalize(pipe, cfg)  # LoRA, embedding, and FAST_MODE's LCM-LoRA on top
    steps, guidance = loaded.steps, loaded.guidance
    settings = sampling.SamplingSettings(steps, guidance, height=resolution, width=resolution,
                                         batch_size=cfg.BATCH_SIZE)

    lesson.step(3, "Encode the prompt once, for every frame")
    personalize.warn_if_unused([cfg.PROMPT], loaded, cfg.SUBJECT_TOKEN)
    embeddings = sampling.encode_prompts(pipe, [cfg.PROMPT], guidance=guidance > 1)

    lesson.step(4, f"{cfg.NUM_KEYFRAMES} keyframe noises, joined by SLERP into a loop of {num_frames} latents")
    key_seeds = [cfg.RANDOM_SEED + k for k in range(cfg.NUM_KEYFRAMES)]
    keyframes = sampling.keyframe_latents(pipe, key_seeds, resolution, resolution)
    latents = sampling.loop_latents(keyframes, num_frames)
    print(f"  Keyframe seeds {key_seeds}; latents {tuple(latents.shape)}; the last frame leads back to the first")

    lesson.step(5, f"Denoise {num_frames} frames, {steps} steps each, {settings.batch_size} at a time")
    flags = []
    # One seed for all frames: stochastic samplers (LCM in FAST_MODE) then add the same noise to every
    # frame, so neighbouring frames stay neighbours. DPM-Solver++ uses no noise beyond the latents.
    frames, seconds = sampling.generate(pipe, [cfg.PROMPT] * num_frames, [cfg.RANDOM_SEED] * num_frames, settings,
                                        "Frames", embeddings=embeddings, latents=latents, nsfw=flags)

    lesson.step(6, "Write the GIF (shared palette, downscaled), the MP4 and the keyframe strip")
    stem = out_dir / "dreambooth_fabric_morph"
    gif = animation.save_gif(frames, stem.with_suffix(".gif"), cfg.FPS, cfg.GIF_SIZE, cfg.GIF_COLORS)
    written = [gif]
    if cfg.WRITE_MP4 and animation.can_write_mp4():
        written.append(animation.save_mp4(frames, stem.with_suffix(".mp4"), cfg.FPS))
    elif cfg.WRITE_MP4:
        print("  MP4 skipped: no video encoder. 'pip install imageio-ffmpeg' adds one.")
    key_index = sampling.keyframe_frames(cfg.NUM_KEYFRAMES, num_frames)  # the frames that are the keyframes
    written.append(figures.save_grid(
        [frames[i] for i in key_index], out_dir / "dreambooth_fabric_morph_keyframes.png", cols=len(key_index),
        labels=[f"frame {i}, seed {s}" for i, s in zip(key_index, key_seeds)], title=f"Keyframes of '{cfg.PROMPT}'"))

    print("\nDone. " + sampling.describe_speed(num_frames, seconds, "frames"))
    print("  " + sampling.describe_safety(pipe, flags, cfg.SAFETY_CHECKER))
    for line in loaded.describe():
        print(f"  {line}")
    lesson.print_files(written)
    lesson.print_reflection(REFLECTION)
    return SimpleNamespace(frames=frames, latents=latents, keyframes=keyframes, files=written, seconds=seconds,
                           nsfw=flags, loaded=loaded, pipe=pipe, settings=settings, num_frames=num_frames)


def main(argv=None) -> int:
    """The command line: run the lesson; the exit code is 0 when it ran to the end."""
    morph(argv)
    return 0


if __name__ == "__main__":
    lesson.run(main)
