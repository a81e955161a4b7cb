"""Personalising a pipeline: every LoRA layout changes the pictures, embeddings add their token."""

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from common import lora, personalize, sampling
from common.errors import LessonError
from test_lora import _peft_folder, _randomize_lora

SETTINGS = sampling.SamplingSettings(num_inference_steps=2, guidance_scale=7.5)
PROMPTS, SEEDS = ["a sks african fabric pattern", "a dress made of sks african fabric"], [3, 4]


def _make(layout, tiny_pipe, folder):
    """A random LoRA for the tiny UNet in the given layout; returns the path LORA_PATH would name."""
    if layout == "peft":
        return _peft_folder(tiny_pipe.unet, folder)
    unet = tiny_pipe.unet
    config = lora.add_lora(unet, rank=4, alpha=8)
    _randomize_lora(unet)
    if layout == "diffusers":
        lora.save_lora(unet, folder, config)
        return folder
    return lora.export_kohya(unet, folder.with_suffix(".safetensors"), config)


@pytest.mark.parametrize("layout", ["diffusers", "peft", "kohya"])
def test_each_layout_patches_every_attention_projection_and_changes_the_pixels(layout, tiny_pipe, tiny_dir,
                                                                                tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    path = _make(layout, tiny_pipe, tmp_path / "fabric_lora")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)
    base, _ = sampling.generate(pipe, PROMPTS, SEEDS, SETTINGS, progress=False)
    loaded = personalize.load_adapters(pipe, path, lora_scale=1.0)
    assert loaded.lora_layers == 56  # 14 attention blocks x to_q, to_k, to_v, to_out
    assert loaded.adapters == {lora.ADAPTER_NAME: 1.0}
    assert loaded.lora_layout == layout
    assert f"({layout} layout): 56 layers patched" in capsys.readouterr().out  # it always says what it loaded
    after, _ = sampling.generate(pipe, PROMPTS, SEEDS, SETTINGS, progress=False)
    for a, b in zip(base, after):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() > 1.0


def test_no_lora_is_the_base_model_and_says_so(tiny_pipe, capsys):
    loaded = personalize.load_adapters(tiny_pipe, None)
    assert loaded.lora_layers == 0 and loaded.adapters == {}
    assert len(lora.lora_layer_names(tiny_pipe.unet)) == 0
    assert "BASE model, on purpose" in capsys.readouterr().out


def test_missing_files_stop_before_any_model_loads(tmp_path):
    with pytest.raises(LessonError, match=r"No LoRA at .*exercise3b_train_lora\.py.*USE_LORA = False"):
        personalize.check_adapter_files(tmp_path / "models/fabric_lora")
    with pytest.raises(LessonError, match=r"No embedding at .*EMBEDDING_PATH = None"):
        personalize.check_adapter_files(None, tmp_path / "learned_embeds.safetensors")


@pytest.mark.parametrize("vectors", [1, 2])
def test_embedding_loads_and_returns_the_token_to_write(vectors, tiny_pipe, tmp_path):
    vector = torch.randn(vectors, 32) if vectors > 1 else torch.randn(32)
    path = tmp_path / "learned_embeds.safetensors"
    safetensors.torch.save_file({"<african-fabric>": vector}, str(path))
    before = tiny_pipe.encode_prompt("a <african-fabric> pattern", "cpu", 1, False)[0]
    loaded = personalize.load_adapters(tiny_pipe, None, embedding_path=path)
    assert loaded.tokens == ["<african-fabric>"]  # "<african-fabric>_1" is diffusers' business
    token_id = tiny_pipe.tokenizer.convert_tokens_to_ids("<african-fabric>")
    row = tiny_pipe.text_encoder.get_input_embeddings().weight[token_id]
    assert torch.equal(row, vector.reshape(-1, 32)[0])
    after = tiny_pipe.encode_prompt("a <african-fabric> pattern", "cpu", 1, False)[0]
    assert not torch.allclose(before, after)


def test_embedding_of_the_wrong_width_is_explained(tiny_pipe, tmp_path):
    path = tmp_path / "sd15_embeds.safetensors"
    safetensors.torch.save_file({"<african-fabric>": torch.randn(768)}, str(path))  # SD v1.5 width, tiny is 32
    with pytest.raises(LessonError, match=r"768-wide vectors .* 32 wide"):
        personalize.load_adapters(tiny_pipe, None, embedding_path=path)


def test_without_token_removes_only_the_word():
    assert personalize.without_token("a dress made of sks african fabric, sks", "sks") == \
        "a dress made of african fabric,"
    assert personalize.without_token("tasks for sks", "sks") == "tasks for"
    assert personalize.without_token("sks african fabric pattern", "sks") == "african fabric pattern"
    # as CLIP reads the word: beside punctuation, in any case (the comparison prompt must really lack it)
    assert personalize.without_token("a dress of sks, fashion photography", "sks") == \
        "a dress of, fashion photography"
    assert personalize.without_token("SKS. a vase of Sks fabric", "sks") == "a vase of fabric"


def test_a_prompt_holds_the_word_as_clip_reads_it_in_any_case_and_beside_punctuation(capsys):
    loaded = personalize.Personalization(lora_file=Path("models/fabric_lora"), tokens=["<african-fabric>"])
    personalize.warn_if_unused(["a SKS dress, in <African-Fabric>."], loaded, "sks")
    assert "no prompt contains" not in capsys.readouterr().out
    personalize.warn_if_unused(["asks for a dress", "<african-fabric>s"], loaded, "sks")
    said = capsys.readouterr().out
    assert "no prompt contains 'sks'" in said and "no prompt contains '<african-fabric>'" not in said


def test_an_adapter_is_found_once_and_each_header_read_once(tiny_pipe, tmp_path, monkeypatch):
    """Checked before the model loads, then loaded: the folder is searched once more, its header never."""
    from common import files

    folder = _make("diffusers", tiny_pipe, tmp_path / "fabric_lora")
    tiny_pipe.unet.delete_adapters("default")  # (_make trained it in this pipe; load it afresh)
    calls = []
    real = lora.find_lora_file
    monkeypatch.setattr(lora, "find_lora_file", lambda path: calls.append(path) or real(path))
    files._header.cache_clear()
    personalize.check_adapter_files(folder)  # what validate() does, before any model loads
    loaded = personalize.load_adapters(tiny_pipe, folder)
    assert loaded.lora_layers == 56
    assert len(calls) == 2  # validate, then load (load_lora is handed the answer: no third search)
    assert files._header.cache_info().misses == 1  # one header read for the one file
    (folder / lora.WEIGHT_NAME).write_bytes(b"\0" * 100)  # a changed file is read again, not served stale
    with pytest.raises(LessonError, match="is not a readable .safetensors file"):
        personalize.check_adapter_files(folder)


def test_personalize_takes_the_scripts_constants_and_fast_mode_changes_steps(tiny_pipe, tmp_path):
    from types import SimpleNamespace

    folder = _make("diffusers", tiny_pipe, tmp_path / "fabric_lora")
    tiny_pipe.unet.delete_adapters("default")
    cfg = SimpleNamespace(LORA_PATH=str(folder), USE_LORA=True, LORA_SCALE=0.5, EMBEDDING_PATH=None, FAST_MODE=False,
                          NUM_INFERENCE_STEPS=30, GUIDANCE_SCALE=7.5, FAST_STEPS=4, FAST_GUIDANCE_SCALE=1.0,
                          RESOLUTION=None)
    loaded = personalize.personalize(tiny_pipe, cfg)
    assert (loaded.lora_layers, loaded.lora_scale, loaded.steps, loaded.guidance) == (56, 0.5, 30, 7.5)
    cfg.USE_LORA = False
    base = personalize.personalize(tiny_pipe, cfg)  # the base model on purpose: nothing loaded
    assert base.lora_file is None and base.adapters == {}


@pytest.mark.parametrize("settings, resolution, warns", [
    ({"resolution": 128, "RESOLUTION": 128}, None, True),  # 3b at --resolution 128, exercise 1 at tiny's own 64
    ({"resolution": 128, "RESOLUTION": 128}, 128, False),
    ({"resolution": 64, "RESOLUTION": None}, None, False),  # trained at the model's own size, drawn at it
    ({"resolution": 64, "RESOLUTION": None}, 96, True),
    ({"RESOLUTION": 96}, None, True),  # a file of before 'resolution' was kept: its whole RESOLUTION says
    ({"RESOLUTION": None}, 96, False),  # ... and None there is unknown (the model's own size, not recorded)
    ({}, 96, False),  # a LoRA from elsewhere: nothing to compare with
])
def test_an_adapter_trained_at_another_resolution_warns_once_in_every_generation_script(
        settings, resolution, warns, tiny_pipe, tmp_path, capsys):
    from types import SimpleNamespace

    unet = tiny_pipe.unet
    config = lora.add_lora(unet, rank=4, alpha=8)
    lora.save_lora(unet, tmp_path / "fabric_lora", config, settings)
    unet.delete_adapters("default")
    vector_file = tmp_path / "emb" / "learned_embeds.safetensors"
    vector_file.parent.mkdir()
    safetensors.torch.save_file({"<fab>": torch.randn(32)}, str(vector_file),
                                metadata={lora.SETTINGS_KEY: __import__("json").dumps(settings)})
    cfg = SimpleNamespace(LORA_PATH=str(tmp_path / "fabric_lora"), USE_LORA=True, LORA_SCALE=1.0,
                          EMBEDDING_PATH=str(vector_file.parent), FAST_MODE=False, NUM_INFERENCE_STEPS=4,
                          GUIDANCE_SCALE=7.5, FAST_STEPS=4, FAST_GUIDANCE_SCALE=1.0, RESOLUTION=resolution)
    personalize.personalize(tiny_pipe, cfg)  # (exercises 1, 2 and the morph all load through it)
    out = capsys.readouterr().out
    used = resolution or 64
    trained = settings.get("resolution") or settings.get("RESOLUTION")
    for what, script, name in [("LoRA", "exercise 3b", tmp_path / "fabric_lora" / lora.WEIGHT_NAME),
                               ("embedding", "exercise 3a", vector_file)]:
        said = (f"Warning: the {what} '{name}' was trained at {trained}x{trained} ({script}'s RESOLUTION, kept in the "
                f"file), but the pictures are drawn at {used}x{used} now" in out
                and f"Set RESOLUTION = {trained} (--resolution {trained}), or train it again at {used}." in out)
        assert said is warns, out
    assert out.count("was trained at") == (2 if warns else 0), out


# --------------------------------------------------------------------------- words the pocket model never learned
WORLD_WORDS = ["a", "and", "african", "fabric", "pattern", "beautiful", "dress", "made", "of", "modern", "room",
               "with", "wallpaper", "leather", "handbag", "ceramic", "vase", "painted", "woven", "basket", "plain",
               "fashion", "photography", "interior", "design", "textile", "red", "striped"]


def test_unknown_words_ignore_the_subject_token_case_and_punctuation():
    prompts = ["a sks african fabric pattern", "A Watercolor painting of sks, african fabric pattern!",
               "a red and striped fabric pattern", "abstract art inspired by sks african fabric pattern"]
    assert personalize.unknown_words(prompts, set(WORLD_WORDS), "sks") == [
        (prompts[1], ["watercolor", "painting"]), (prompts[3], ["abstract", "art", "inspired", "by"])]
    assert personalize.unknown_words(prompts[:1], set(WORLD_WORDS), "") == [(prompts[0], ["sks"])]


def test_exercise1_says_which_prompts_the_pocket_model_never_learned(workdir, capsys):
    import re

    import exercise1_generate
    from conftest import fake_pocket

    quick = ["--num-inference-steps", "1", "--batch-size", "9", "--no-use-lora", "--no-compare-without-token"]
    exercise1_generate.generate(["--model", "tiny"] + quick)  # (no card: no note)
    assert "never learned" not in capsys.readouterr().out
    fake_pocket(workdir, {"known_words": WORLD_WORDS})  # the tiny model, with a pocket card
    exercise1_generate.generate(["--model", "pocket"] + quick)
    said = capsys.readouterr().out
    note = said[said.index("  SAFETY_CHECKER "):said.index("[Step 1]")]  # after the run summary, before step 1
    assert "\nNote: the pocket model never learned some words of 3 of the 9 prompts" in note
    assert re.search(r'\n  "a watercolor painting of sks african fabric pattern": watercolor, painting\n', note)
    assert re.search(r'\n  "a cyberpunk city decorated with sks african fabric pattern": cyberpunk, city, decor', note)
    assert '\n  "abstract art inspired by sks african fabric pattern": abstract, art, inspired, by\n' in note
    assert "dress" not in note and "more" not in note


def test_the_note_lists_a_few_prompts_and_counts_the_rest(tmp_path, monkeypatch, capsys):
    import json
    from types import SimpleNamespace

    from common import models

    monkeypatch.setattr(models, "POCKET_DIR", tmp_path)
    (tmp_path / models.POCKET_CARD).write_text(json.dumps({"known_words": WORLD_WORDS}), encoding="utf-8")
    prompts = [f"a sks fabric pattern, {style} style" for style in ("pop art", "pixel art", "oil painting",
                                                                    "stained glass", "cubist painting")]
    personalize.note_unknown_words(SimpleNamespace(MODEL_ID="pocket", SUBJECT_TOKEN="sks"), prompts + ["a dress"])
    said = capsys.readouterr().out
    assert said.startswith("Note: the pocket model never learned some words of 5 of the 6 prompts")
    assert '  "a sks fabric pattern, pop art style": pop, art, style\n' in said
    assert said.count("\n  \"") == 4 and "  ... and 1 more\n" in said
    personalize.note_unknown_words(SimpleNamespace(MODEL_ID="tiny", SUBJECT_TOKEN="sks"), prompts)
    assert capsys.readouterr().out == ""  # no card, no note
