"""Exercise 3a and common/textual_inversion.py on the tiny model: one new word, and nothing else changes."""

import re
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch

from common import comparison, lora, sampling, training
from common import textual_inversion as ti
from common.errors import LessonError
import exercise3a_train_textual_inversion
from conftest import ROOT, SHARED_SEED, needs_shared

TOKEN = "<african-fabric>"
FAST = ["--model", "tiny", "--sample-every", "100", "--num-inference-steps", "2", "--num-sample-seeds", "1",
        "--learning-rate", "5e-2", "--gradient-accumulation", "1"]


def _fresh_pipe(folder="models/tiny-sd"):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    sampling.use_multistep_solver(pipe)
    return pipe


def _encode(pipe, prompt):
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def _pixels(images):
    return [np.asarray(im, dtype=np.int16) for im in images]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dir):
    """One short run (4 optimizer steps of 2 micro-batches) in a project that already has a LoRA from 3b."""
    project = tmp_path_factory.mktemp("ti_project")
    shutil.copytree(tiny_dir, project / "models" / "tiny-sd")
    shutil.copytree(ROOT / "training_images", project / "training_images")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.delenv("DREAMBOOTH_MODEL", raising=False)
        unet = _fresh_pipe().unet
        config = lora.add_lora(unet, rank=4, alpha=4)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
        lora.save_lora(unet, "models/fabric_lora", config, {"SUBJECT_TOKEN": "sks", "training_seconds": 754})
        result = exercise3a_train_textual_inversion.train(
            FAST + ["--max-train-steps", "4", "--gradient-accumulation", "2", "--checkpoint-every", "2",
                    "--sample-every", "4", "--sample-prompts", "a {} pattern | a fabric pattern"])
        yield project, result


def test_embedding_loads_with_plain_diffusers_and_changes_prompt_and_pixels(trained):
    project, result = trained
    file = project / "models/fabric_textual_inversion/learned_embeds.safetensors"
    assert result.embedding_file == file.relative_to(project)
    saved = safetensors.torch.load_file(str(file))
    assert list(saved) == [TOKEN] and saved[TOKEN].shape == (1, 32)
    assert lora.read_settings(file)["resolution"] == 64  # RESOLUTION None: tiny's own (1, 2 and the morph compare)
    assert (project / "outputs/exercise3a_loss_curve.png").is_file()
    assert sorted(p.name for p in (project / "outputs/training_progress_ti").iterdir()) == [
        "step_00000.png", "step_00004.png"]

    pipe = _fresh_pipe(project / "models/tiny-sd")
    base = _pixels(sampling.generate(pipe, result.sample_prompts, result.sample_seeds, result.settings,
                                     progress=False)[0])
    pipe.load_textual_inversion(str(file.parent))  # the plain diffusers call, on the folder
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[-1], saved[TOKEN][0])
    # Training moved the word away from its initializer: its prompt now encodes differently.
    assert not torch.allclose(_encode(pipe, f"a {TOKEN} pattern"), _encode(pipe, "a pattern pattern"), atol=1e-3)
    after = _pixels(sampling.generate(pipe, result.sample_prompts, result.sample_seeds, result.settings,
                                      progress=False)[0])
    start = _pixels(sampling.generate(pipe, ["a pattern pattern"], result.sample_seeds[:1], result.settings,
                                      progress=False)[0])
    assert result.sample_prompts[0] == f"a {TOKEN} pattern"
    assert np.abs(after[0] - _pixels(result.samples)[0]).max() <= 1  # the last progress sample, from the file
    assert np.abs(after[0] - start[0]).mean() > 0.5  # the learned word draws something else than "pattern"
    assert np.abs(after[-1] - base[-1]).max() <= 1  # "a fabric pattern": unchanged (within rounding)


def test_every_other_weight_is_bit_identical_after_training(trained):
    project, result = trained
    fresh = _fresh_pipe(project / "models/tiny-sd")
    table = result.pipe.text_encoder.get_input_embeddings().weight.detach()
    original = fresh.text_encoder.get_input_embeddings().weight
    assert result.token_ids == [len(original)]
    assert torch.equal(table[:len(original)], original)  # every row but the new one, bit for bit
    init = original[fresh.tokenizer.convert_tokens_to_ids("pattern</w>")]
    assert not torch.allclose(table[len(original)], init, atol=1e-4)  # and the new one trained
    for name in ("unet", "vae", "text_encoder"):
        # (the comparison loaded a LoRA and deleted it again: PEFT leaves its wrapper, ".base_layer", behind)
        ours = {k.replace(".base_layer", ""): v for k, v in getattr(result.pipe, name).named_parameters()
                if not k.endswith("token_embedding.weight")}  # (compared row by row above)
        theirs = {k: v for k, v in getattr(fresh, name).named_parameters() if not k.endswith("token_embedding.weight")}
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_gradient_accumulation_counts_optimizer_steps(trained):
    project, result = trained
    root = project / "models/fabric_textual_inversion/checkpoints-ti"
    assert [p.name for p in training.checkpoint_dirs(root)] == ["checkpoint-000002", "checkpoint-000004"]
    optimizer = torch.load(root / "checkpoint-000004/optimizer.bin", weights_only=True)
    assert optimizer["state"][0]["step"] == 4  # 4 updates from 8 micro-batches
    assert optimizer["state"][0]["exp_avg"].shape == (1, 32)  # the optimizer sees only the new vector
    assert len(result.history["loss"]) == 4


def test_comparison_figure_made_when_a_lora_exists(trained):
    from PIL import Image

    project, result = trained
    assert result.comparison_file == project.joinpath("outputs/exercise3_ti_vs_lora.png").relative_to(project)
    with Image.open(project / result.comparison_file) as figure:
        assert figure.width > 2 * 192 and figure.height > 3 * 192  # three rows of two prompts, and a caption
    assert lora.lora_layer_names(result.pipe.unet) == []  # the LoRA was taken out again
    line = comparison.describe_file("LoRA", project / "models/fabric_lora/pytorch_lora_weights.safetensors")
    assert line.startswith("LoRA: ") and "KB" in line and line.endswith("training time 13 min")


def test_resume_continues_at_the_right_step_with_two_vectors(workdir, capsys):
    script = exercise3a_train_textual_inversion
    args = FAST + ["--num-vectors", "2", "--no-random-flip", "--sample-prompts", "a {} pattern"]
    script.train(args + ["--max-train-steps", "2", "--embedding-dir", "models/split"])
    result = script.train(args + ["--max-train-steps", "3", "--embedding-dir", "models/split", "--resume"])
    said = capsys.readouterr().out
    assert "Resumed from 'models/split/checkpoints-ti/checkpoint-000002' at step 2" in said
    assert "No LoRA at LORA_DIR = 'models/fabric_lora'" in said and "exercise3b_train_lora.py" in said
    assert len(result.history["loss"]) == 3
    # Its reflection quotes this run's numbers: two 32-wide vectors, the file as "Files written" showed it, and
    # what a rank-4 LoRA on this UNet would hold (counted here by adding one).
    size = re.findall(r"models/split/learned_embeds\.safetensors  \((.+?)\)", said)[-1]
    unet = _fresh_pipe().unet
    lora.add_lora(unet, rank=4, alpha=4)
    lora_numbers = sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name)
    reflection = said.split("Reflection questions")[-1]
    assert (f"The embedding is 2 vectors of 32 numbers ({size}); exercise 3b's rank-4 LoRA on this UNet is "
            f"{lora_numbers:,} numbers, {lora_numbers / 64:,.0f}x more.") in reflection
    # No SD v1.5 width quoted as this model's (the file's size, whose header varies, may itself read "768 B").
    assert "768" not in reflection.replace(f"({size})", "") and "{" not in reflection
    script.train(args + ["--max-train-steps", "3", "--embedding-dir", "models/straight"])
    split = safetensors.torch.load_file("models/split/learned_embeds.safetensors")[TOKEN]
    straight = safetensors.torch.load_file("models/straight/learned_embeds.safetensors")[TOKEN]
    assert split.shape == (2, 32) and torch.allclose(split, straight, atol=1e-6)


def test_multi_vector_embedding_round_trips(tiny_dir, tmp_path):
    pipe = _fresh_pipe(tiny_dir)
    ids = ti.add_placeholder(pipe.tokenizer, pipe.text_encoder, "<m>", "pattern", num_vectors=3)
    embedding = ti.PlaceholderEmbedding(pipe.text_encoder, ids)
    with torch.no_grad():
        embedding.vectors.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    caption = ti.tokenize_templates(pipe.tokenizer, ["a {} pattern"], ti.placeholder_tokens("<m>", 3))
    trained = embedding(caption)  # what training saw
    path = ti.save_embedding(embedding.vectors, "<m>", tmp_path / "m.safetensors")

    plain = _fresh_pipe(tiny_dir)
    plain.load_textual_inversion(str(path))
    assert plain.tokenizer.convert_ids_to_tokens(list(range(len(plain.tokenizer) - 3, len(plain.tokenizer)))) == [
        "<m>", "<m>_1", "<m>_2"]
    assert torch.allclose(_encode(plain, "a <m> pattern"), trained, atol=1e-5)  # diffusers expands "<m>"

    ours = _fresh_pipe(tiny_dir)
    assert ti.load_embedding(ours, tmp_path) == "<m>"
    assert torch.allclose(_encode(ours, "a <m> pattern"), trained, atol=1e-5)


def test_bad_initializer_and_existing_placeholder_are_explained(tiny_pipe):
    with pytest.raises(LessonError, match=r"'zebra' is not a single token.*4 pieces \('z', 'e', 'br', 'a'\)"):
        ti.add_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, TOKEN, "zebra")
    with pytest.raises(LessonError, match="'pattern' is already a word"):
        ti.add_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "pattern", "fabric")
    ti.add_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, TOKEN, "pattern")
    with pytest.raises(LessonError, match=f"'{TOKEN}' is already a word"):
        ti.add_placeholder(tiny_pipe.tokenizer, tiny_pipe.text_encoder, TOKEN, "pattern")


def test_script_refuses_bad_placeholder_before_loading(workdir):
    script = exercise3a_train_textual_inversion
    with pytest.raises(LessonError, match="PLACEHOLDER_TOKEN must be one lower-case word"):
        script.train(FAST + ["--placeholder-token", "<African-Fabric>"])
    with pytest.raises(LessonError, match="INITIALIZER_TOKEN 'zebra' is not a single token"):
        script.train(FAST + ["--initializer-token", "zebra"])


@pytest.mark.parametrize("placeholder, says", [
    ("<../../escaped>", "a character a file name cannot"),  # was written two folders up, outside models/
    ("<a/b>", "a character a file name cannot"),  # was written into a subfolder a/
    ("<my:fabric>", "a character a file name cannot"),  # (no file of that name on Windows)
    ("<>", "empty without its angle brackets"),  # was '.safetensors', a hidden file
    ("<.fabric>", "starting with '.' is hidden"),
    ("<nul>", "Windows keeps that name"),
    ("<learned_embeds>", "another file of the course"),  # was written over the embedding itself
    ("<pytorch_lora_weights>", "another file of the course"),  # over 3b's LoRA, in a folder they share
    ("<fabric_lora_kohya>", "another file of the course"),
    ("<my-lora>", r"'.*my-lora.safetensors' is a LoRA, which it would overwrite"),
])
def test_a_placeholder_that_cannot_name_its_own_automatic1111_file_is_refused(placeholder, says, tmp_path):
    lora_weights = {f"unet.down.to_q.lora_{ab}.weight": torch.zeros(4, 4) for ab in "AB"}
    safetensors.torch.save_file(lora_weights, str(tmp_path / "my-lora.safetensors"))  # a student's own LoRA
    with pytest.raises(LessonError, match=rf"^PLACEHOLDER_TOKEN '{re.escape(placeholder)}' cannot name the "
                                          rf"AUTOMATIC1111 copy.*{says}.*such as '<my-fabric>'"):
        ti.a1111_file(placeholder, tmp_path)
    assert ti.a1111_file("<african-fabric_2>", tmp_path) == tmp_path / "african-fabric_2.safetensors"
    assert ti.a1111_file("<布>", tmp_path) == tmp_path / "布.safetensors"


@pytest.mark.parametrize("state, message", [
    ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, r"SDXL embedding .*768 and 1280.* 32 wide"),
    ({"<sd2>": torch.zeros(2, 1024)}, r"1024-wide vectors \(made for Stable Diffusion 2.x\).* 32 wide"),
])
def test_wrong_width_names_both_widths(tiny_pipe, tmp_path, state, message):
    safetensors.torch.save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(LessonError, match=message):
        ti.load_embedding(tiny_pipe, tmp_path / "other.safetensors")


@pytest.mark.parametrize("vectors, what", [
    (torch.zeros(3, 4, 32), r"shape \(3, 4, 32\) and type float32"),  # was: unexpected RuntimeError (diffusers)
    (torch.zeros(0, 32), r"shape \(0, 32\) and type float32"),  # was: unexpected IndexError
    (torch.ones(1, 32, dtype=torch.int64), r"shape \(1, 32\) and type int64"),  # was: loaded as if learned
    (torch.ones(1, 32, dtype=torch.bool), r"shape \(1, 32\) and type bool"),
])
def test_embedding_of_another_shape_or_type_is_refused_and_the_pipe_is_untouched(tiny_pipe, tmp_path, vectors,
                                                                                   what):
    safetensors.torch.save_file({"<odd>": vectors}, str(tmp_path / "odd.safetensors"))
    words = len(tiny_pipe.tokenizer)
    with pytest.raises(LessonError, match=rf"is not a Textual Inversion embedding: its '<odd>' holds a tensor of "
                                          rf"{what}, not vectors of numbers \(32 wide"):
        ti.load_embedding(tiny_pipe, tmp_path / "odd.safetensors")
    assert len(tiny_pipe.tokenizer) == words


def test_an_embedding_path_with_another_ending_is_named_not_called_damaged(tmp_path):
    safetensors.torch.save_file({"<odd>": torch.ones(1, 32)}, str(tmp_path / "EMB.Safetensors"))
    (tmp_path / "emb.txt").write_text("x")
    with pytest.raises(LessonError, match=r"ends in '.Safetensors': rename it to end in '.safetensors' .* and set "
                                          r"EMBEDDING_PATH to the renamed file"):
        ti.find_embedding_file(tmp_path / "EMB.Safetensors")
    with pytest.raises(LessonError, match=r"'.*emb.txt' is not an embedding file: an embedding is a "
                                          r"\.safetensors/\.pt/\.bin file"):  # was: "not a readable embedding file"
        ti.find_embedding_file(tmp_path / "emb.txt")


def test_automatic1111_layouts_load(tiny_pipe, tmp_path):
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": "kente-a1111",
                "step": 500, "sd_checkpoint": "cc6cb27103", "sd_checkpoint_name": "v1-5-pruned"},
               tmp_path / "kente.pt")
    safetensors.torch.save_file({"emb_params": vectors[:1] * 2}, str(tmp_path / "adinkra.safetensors"))
    assert ti.load_embedding(tiny_pipe, tmp_path / "kente.pt") == "kente-a1111"  # its "name"
    assert ti.load_embedding(tiny_pipe, tmp_path / "adinkra.safetensors") == "adinkra"  # A1111 uses the file name
    table, tok = tiny_pipe.text_encoder.get_input_embeddings().weight, tiny_pipe.tokenizer
    assert torch.equal(table[tok.convert_tokens_to_ids(["kente-a1111", "kente-a1111_1"])], vectors)
    assert torch.equal(table[tok.convert_tokens_to_ids("adinkra")], vectors[0] * 2)
    with pytest.raises(LessonError, match="'adinkra' is already a word"):
        ti.load_embedding(tiny_pipe, tmp_path / "adinkra.safetensors")


@needs_shared
def test_course_embedding_loads_into_a_768_wide_text_encoder(tmp_path, tiny_pipe):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    course = SHARED_SEED / "fabric_textual_inversion/learned_embeds.safetensors"
    with pytest.raises(LessonError, match=r"768-wide vectors \(made for Stable Diffusion v1.x\).* 32 wide"):
        ti.load_embedding(tiny_pipe, course)
    tok = tiny_pipe.tokenizer
    torch.manual_seed(0)
    wide = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    pipe = StableDiffusionPipeline(vae=tiny_pipe.vae, text_encoder=wide, tokenizer=tok, unet=tiny_pipe.unet,
                                   scheduler=tiny_pipe.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    assert ti.load_embedding(pipe, course.parent) == TOKEN
    row = wide.get_input_embeddings().weight[tok.convert_tokens_to_ids(TOKEN)]
    assert torch.equal(row, safetensors.torch.load_file(str(course))[TOKEN])
    assert not torch.allclose(_encode(pipe, f"a {TOKEN} pattern"), _encode(pipe, "a pattern pattern"), atol=1e-3)


def test_beside_the_embedding_an_automatic1111_file_and_a_model_card(trained):
    from diffusers.loaders.textual_inversion import load_textual_inversion_state_dicts
    from huggingface_hub import ModelCard

    project, _ = trained
    folder = project / "models/fabric_textual_inversion"
    ours = safetensors.torch.load_file(str(folder / "learned_embeds.safetensors"))[TOKEN]
    a1111 = load_textual_inversion_state_dicts([str(folder / "african-fabric.safetensors")])[0]
    assert list(a1111) == ["emb_params"] and torch.equal(a1111["emb_params"], ours)  # the same vectors
    card = ModelCard.load(folder / "README.md")
    assert card.data.instance_prompt == f"a {TOKEN} pattern" and "textual_inversion" in card.data.tags
    assert "embedding:african-fabric" in card.text and (folder / "preview_embedding.png").is_file()


def test_training_images_become_crops_with_crop_fraction(workdir, capsys):
    exercise3a_train_textual_inversion.train(FAST + ["--max-train-steps", "1", "--crop-fraction", "0.4",
                                                     "--lora-dir", "none"])
    assert "10 training images -> 60 crops of 40% of each picture's side" in capsys.readouterr().out
