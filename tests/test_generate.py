"""Exercises 1 and 2 and the morph end to end on the tiny model: files, sizes, frames, and what they loaded."""

import numpy as np
import pytest
import torch
from PIL import Image

from common import animation, lesson, lora
from common.errors import LessonError
import exercise1_generate
import exercise2_explore
import exercise3b_train_lora
import generate_dreambooth_morph
from test_lora import _randomize_lora

QUICK = ["--model", "tiny", "--num-inference-steps", "2", "--batch-size", "9"]


def _pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture
def fabric_lora(workdir, tiny_pipe):
    """A random LoRA where exercise 3b would have written one (models/fabric_lora, diffusers layout)."""
    config = lora.add_lora(tiny_pipe.unet, rank=4, alpha=4)
    _randomize_lora(tiny_pipe.unet)
    return lora.save_lora(tiny_pipe.unet, workdir / "models/fabric_lora", config)


def test_exercise1_writes_its_grids_and_variations(fabric_lora, workdir, capsys):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    result = exercise1_generate.generate(QUICK)
    out = workdir / "outputs"
    said = capsys.readouterr().out
    assert "56 layers patched" in said and "images/s)" in said and "Safety checker: this model ships none" in said
    assert len(result.prompts) == 9 and result.seeds == list(range(42, 51))
    assert Image.open(out / "exercise1_grid_simple.png").size == (3 * 196 + 4,) * 2  # 3x3 tiles of 192 + gaps
    labelled = Image.open(out / "exercise1_output.png")
    assert labelled.width == 3 * 196 + 4 and labelled.height > labelled.width  # room for titles and captions
    assert Image.open(out / "exercise1_token_comparison.png").width > 9 * 196
    files = sorted((out / "exercise1_variations").glob("*.png"))
    assert [f.name[:3] for f in files] == [f"{i:02d}_" for i in range(1, 10)]
    assert files[0].name == "01_beautiful_dress_fashion_photography.png"
    for path, image in zip(files, result.images):
        assert Image.open(path).size == (64, 64)
        assert np.array_equal(_pixels(Image.open(path).convert("RGB")), _pixels(image))
    assert "sks" not in " ".join(result.plain_prompts)
    for with_token, without in zip(result.images, result.without_token):  # one word less, another picture
        assert np.abs(_pixels(with_token) - _pixels(without)).mean() > 1.0

    # Same seed, same image: plain diffusers with the same LoRA, scheduler and seed redraws image 5.
    pipe = StableDiffusionPipeline.from_pretrained("models/tiny-sd")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.load_lora_weights("models/fabric_lora")
    again = pipe(result.prompts[4], num_inference_steps=2, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(46)).images[0]
    assert np.abs(_pixels(again) - _pixels(result.images[4])).max() <= 1


def test_exercise1_compares_with_and_without_the_subject_token_it_is_given(fabric_lora, workdir):
    result = exercise1_generate.generate(QUICK + ["--subject-token", "ohwx", "--prompts",
                                              "a {} scarf | a dress of {} cloth"])
    assert result.prompts == ["a ohwx scarf", "a dress of ohwx cloth"]
    assert result.plain_prompts == ["a scarf", "a dress of cloth"]  # the same prompts, one word less
    assert (workdir / "outputs/exercise1_token_comparison.png").is_file()


def test_exercise1_names_its_pictures_within_what_a_file_name_can_hold(fabric_lora, workdir):
    """A picture is named after its prompt's words: one long word (a pasted code, words run together) made a name
    longer than a file system allows, and the run ended in 'unexpected OSError: File name too long' after every
    picture had been drawn."""
    word = "kente" * 60  # 300 letters
    exercise1_generate.generate(QUICK + ["--no-compare-without-token", "--prompts", f"a {{}} {word} pattern"])
    files = [p.name for p in (workdir / "outputs/exercise1_variations").glob("*.png")]
    assert len(files) == 1 and files[0].startswith("01_kentekente") and len(files[0]) <= 80, files


def test_missing_lora_stops_with_how_to_get_one(workdir):
    with pytest.raises(LessonError, match=r"No LoRA at 'models/fabric_lora'.*exercise3b_train_lora\.py.*USE_LORA"):
        exercise1_generate.generate(QUICK)
    assert not (workdir / "outputs").exists()  # stopped before generating anything


def test_exercise2_parts_run_alone_or_together(fabric_lora, workdir, capsys):
    script, out = exercise2_explore, workdir / "outputs"
    result = script.explore(QUICK + ["--part", "a"])
    assert [p.name for p in result.files] == ["exercise2_guidance_comparison.png"] and result.count == 5
    assert Image.open(out / "exercise2_guidance_comparison.png").width == 5 * 196 + 4
    assert not (out / "exercise2_style_grid.png").exists()
    result = script.explore(QUICK + ["--negative-prompt", "blurry, distorted"])
    assert [p.name for p in result.files] == ["exercise2_guidance_comparison.png", "exercise2_style_grid.png",
                                              "exercise2_seed_comparison.png"]
    assert result.count == 5 + 9 + 9
    for name in ("exercise2_style_grid.png", "exercise2_seed_comparison.png"):
        assert Image.open(out / name).width == 3 * 196 + 4
    said = capsys.readouterr().out
    assert "23 images in" in said and "images/s)" in said


def test_base_model_on_purpose_needs_no_lora(workdir, capsys):
    result = exercise2_explore.explore(QUICK + ["--part", "a", "--no-use-lora"])
    assert result.loaded.lora_layers == 0 and len(lora.lora_layer_names(result.pipe.unet)) == 0
    assert "BASE model, on purpose" in capsys.readouterr().out
    # The command line's entry point returns an exit code, and the run's files are what a test reads of it.
    picture = workdir / "outputs/exercise2_guidance_comparison.png"
    picture.unlink()
    assert exercise2_explore.main(QUICK + ["--part", "a", "--no-use-lora"]) == 0 and picture.is_file()



@pytest.mark.parametrize("resolution, said", [
    # the 64 px pocket model at 512 px: 9 s a picture on a CPU, repeated broken shapes, and not a word
    ("256", "RESOLUTION 256 is far from the 64 px this model learned: each picture costs about 16x the time"),
    ("16", "RESOLUTION 16 is far from the 64 px this model learned: a picture is only 4x4 latent pixels"),
    ("128", None), ("32", None), ("none", None),
])
def test_a_resolution_far_from_the_models_own_warns(workdir, capsys, resolution, said):
    from common import personalize, training

    for script, load, more in ((exercise1_generate, personalize.load_base_model, []),
                               (exercise3b_train_lora, training.load_base_model, ["--log-with", "none"])):
        cfg = lesson.configure(vars(script), ["--model", "tiny", "--resolution", resolution, *more])
        load(cfg)
        out = capsys.readouterr().out
        assert (said in out) if said else "is far from the" not in out, (script.__name__, out)


def test_morph_writes_a_looping_gif_with_every_frame(fabric_lora, workdir, capsys):
    result = generate_dreambooth_morph.morph(
        ["--model", "tiny", "--num-inference-steps", "2", "--duration-seconds", "1.5", "--fps", "8",
         "--num-keyframes", "3", "--gif-size", "48"])
    assert result.num_frames == 12 and len(result.frames) == 12
    gif = Image.open(workdir / "outputs/dreambooth_fabric_morph.gif")
    assert gif.n_frames == 12 and gif.size == (48, 48) and gif.info["loop"] == 0
    durations = []
    for i in range(gif.n_frames):
        gif.seek(i)
        durations.append(gif.info["duration"])
    assert sum(durations) == 1500
    assert (workdir / "outputs/dreambooth_fabric_morph_keyframes.png").is_file()
    # Frames 0, 4 and 8 are the keyframes' own noise; the loop never repeats a frame.
    for k in range(3):
        assert torch.equal(result.latents[4 * k], result.keyframes[k])
    pixels = [_pixels(f) for f in result.frames]
    assert all(np.abs(pixels[i] - pixels[(i + 1) % 12]).mean() > 0 for i in range(12))
    mp4 = workdir / "outputs/dreambooth_fabric_morph.mp4"
    said = capsys.readouterr().out
    assert "12 frames in" in said and "frames/s)" in said
    if animation.can_write_mp4():
        import imageio.v2 as imageio

        assert imageio.get_reader(str(mp4)).count_frames() == 12
    else:
        assert not mp4.exists() and "pip install imageio-ffmpeg" in said


def test_gif_durations_add_up_to_the_duration():
    assert animation.gif_durations_ms(450, 30)[:6] == [30, 40, 30, 30, 40, 30]
    assert sum(animation.gif_durations_ms(450, 30)) == 15000
    assert sum(animation.gif_durations_ms(7, 12)) == 580  # 7/12 s, to the hundredth


def test_a_gif_above_50_fps_plays_as_long_as_asked_in_a_browser(tmp_path):
    """Browsers show a GIF delay of 1 hundredth as 10: at --fps 100 (its limit) every frame was 10 ms, and a 2 s
    loop played for 20 s. Above 50 fps the GIF keeps every k-th frame, each at least 20 ms, the same 2 s in all."""
    frames = [Image.new("RGB", (16, 16), (0, 0, 0)) for _ in range(200)]
    for i, frame in enumerate(frames):  # (each its own: a GIF merges a frame that repeats the one before)
        frame.putpixel((i % 16, i // 16), (255, 255, 255))
    for fps, count in [(100, 100), (60, 100), (51, 100), (50, 200)]:
        gif = Image.open(animation.save_gif(frames, tmp_path / f"{fps}.gif", fps))
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
        assert gif.n_frames == count and min(durations) >= 20 and abs(sum(durations) - 200_000 / fps) <= 10, fps


# --------------------------------------------------------------------------- FAST_MODE
@pytest.fixture
def fast_weights(tiny_dir, tmp_path):
    """A tiny random LCM adapter and a tiny random AutoencoderTiny, saved like the real ones."""
    from diffusers import AutoencoderTiny, StableDiffusionPipeline, UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict

    # Like the real LCM-LoRA, it patches more than the attention projections (and has no metadata).
    unet = UNet2DConditionModel.from_pretrained(str(tiny_dir), subfolder="unet")
    lora.add_lora(unet, rank=4, alpha=4, target_modules=("to_q", "to_v", "proj_in", "proj_out", "ff.net.2"))
    _randomize_lora(unet, seed=5)
    lcm = tmp_path / "lcm-lora"
    StableDiffusionPipeline.save_lora_weights(str(lcm), unet_lora_layers=get_peft_model_state_dict(unet))
    torch.manual_seed(0)
    taesd = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
                            num_encoder_blocks=(1, 1, 1), num_decoder_blocks=(1, 1, 1))  # 4x, like tiny's VAE
    taesd.save_pretrained(str(tmp_path / "taesd"))
    return ["--lcm-lora-id", str(lcm), "--tiny-vae-id", str(tmp_path / "taesd")]


@pytest.mark.parametrize("precision, dtype", [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_fast_mode_stacks_the_lcm_lora_on_the_fabric_lora(fabric_lora, fast_weights, workdir, capsys, precision, dtype):
    """(In half precision too, as on a GPU: the tiny autoencoder follows the pipeline's dtype, the adapters stack.)"""
    from diffusers import AutoencoderTiny, LCMScheduler

    result = exercise1_generate.generate(
        QUICK + fast_weights + ["--fast-mode", "--fast-steps", "3", "--lora-scale", "0.5",
                                "--no-compare-without-token", "--mixed-precision", precision])
    pipe = result.pipe
    assert isinstance(pipe.scheduler, LCMScheduler) and isinstance(pipe.vae, AutoencoderTiny)
    assert pipe.unet.dtype == pipe.vae.dtype == dtype
    assert result.settings.num_inference_steps == 3 and result.settings.guidance_scale == 1.0
    assert set(pipe.get_active_adapters()) == {lora.ADAPTER_NAME, "lcm"}
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling[lora.ADAPTER_NAME] == pytest.approx(0.5) and layer.scaling["lcm"] == pytest.approx(1.0)
    # 7 transformer blocks x (to_q, to_v of attn1 and attn2, ff.net.2) + proj_in, proj_out of 7 attentions
    assert len(lora.lora_layer_names(pipe.unet, "lcm")) == 7 * 5 + 7 * 2
    assert len(sorted((workdir / "outputs/exercise1_variations").glob("*.png"))) == 9
    assert all(im.size == (64, 64) and np.asarray(im).std() > 0 for im in result.images)
    assert "FAST_MODE: LCM-LoRA" in capsys.readouterr().out


def test_fast_mode_without_its_weights_names_what_to_download(fabric_lora, workdir):
    # Tests run offline (HF_HUB_OFFLINE=1), as a classroom without internet would.
    with pytest.raises(LessonError, match=r"FAST_MODE needs the LCM-LoRA 'latent-consistency/lcm-lora-sdv1-5' "
                                          r"\(LCM_LORA_ID\).*hf download"):
        exercise1_generate.generate(QUICK + ["--fast-mode"])


@pytest.mark.parametrize("lcm_lora, tiny_vae, refused", [
    ("latent-consistency/lcm-lora-sdv1-5", "madebyollin/taesd", None),  # Hub ids: known only once they load
    ("models/tiny-sd/unet", "models/tiny-sd/vae", None),  # local folders that are there
    ("models/lcm-lora-typo", "madebyollin/taesd", "LCM_LORA_ID"),  # in the project's models/ folder
    ("lcm-lora-sdv1-5.safetensors", "madebyollin/taesd", "LCM_LORA_ID"),
    ("downloads/lcm/lora", "madebyollin/taesd", "LCM_LORA_ID"),  # more than one '/'
    ("latent-consistency/lcm-lora-sdv1-5", "./my_taesd", "TINY_VAE_ID"),
    ("latent-consistency/lcm-lora-sdv1-5", "models\\taesd", "TINY_VAE_ID"),
])
def test_fast_mode_refuses_a_missing_local_path_before_any_model_loads(workdir, lcm_lora, tiny_vae, refused):
    from types import SimpleNamespace

    from common import fast_mode

    cfg = SimpleNamespace(LCM_LORA_ID=lcm_lora, TINY_VAE_ID=tiny_vae, SCRIPT="exercise1_generate.py")
    if refused is None:
        fast_mode.check_ids(cfg)
        return
    with pytest.raises(LessonError, match=rf"\({refused}\), which does not exist on this computer \(check the path.*"
                                          rf"hf download .* and set {refused} to that folder"):
        fast_mode.check_ids(cfg)


# --------------------------------------------------------------------------- safety checker
@pytest.fixture
def model_with_checker(workdir, tiny_dir):
    """The tiny model plus a tiny random safety checker whose thresholds flag every image."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2),
                        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # cosine - threshold > 0 for every image
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    pipe = StableDiffusionPipeline(**{**pipe.components, "safety_checker": checker,
                                      "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32},
                                                                              crop_size=32)})
    pipe.save_pretrained(str(workdir / "models/tiny-checked"))
    return "models/tiny-checked"


def test_safety_checker_is_on_by_default_and_counts_what_it_blanked(model_with_checker, fabric_lora, capsys):
    script = exercise2_explore
    args = QUICK + ["--part", "a", "--model", model_with_checker]
    result = script.explore(args)
    assert result.nsfw == [True] * 5
    assert "Safety checker: blanked 5 of 5 images" in capsys.readouterr().out
    result = script.explore(args + ["--no-safety-checker"])
    assert result.nsfw == [False] * 5 and result.pipe.safety_checker is None
    assert "Safety checker: off" in capsys.readouterr().out
