"""LoRA files: ours load with plain diffusers; the course's PEFT layout and kohya files load as PEFT would."""

import copy
import json
import re

import pytest
import safetensors
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from bench import sd15_shapes
from common import lora, tiny_model
from common.errors import LessonError
from conftest import SHARED_SEED, needs_shared


def _unet_output(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size // 2
    x = torch.randn(1, 4, size, size, generator=g)
    e = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 500, e).sample


def _randomize_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture
def trained_unet(tiny_pipe):
    unet = tiny_pipe.unet
    config = lora.add_lora(unet, rank=4, alpha=8)  # alpha != rank: the scale must travel with the file
    _randomize_lora(unet)
    return unet, config


def test_save_then_plain_diffusers_load_reproduces_the_unet(trained_unet, tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet, config = trained_unet
    path = lora.save_lora(unet, tmp_path / "fabric_lora", config, {"LEARNING_RATE": 1e-4})
    assert path.name == "pytorch_lora_weights.safetensors"
    assert lora.read_settings(path) == {"LEARNING_RATE": 1e-4}
    fresh = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    base = _unet_output(fresh.unet)
    fresh.load_lora_weights(str(tmp_path / "fabric_lora"))  # the course's quick start, unchanged
    assert len(lora.lora_layer_names(fresh.unet)) == 56  # 14 attention blocks x to_q/k/v/out
    out = _unet_output(fresh.unet)
    assert torch.allclose(out, _unet_output(unet), atol=1e-6)
    assert (out - base).abs().max() > 1e-3


def test_kohya_export_loads_in_diffusers_with_its_alpha(trained_unet, tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet, config = trained_unet
    path = lora.export_kohya(unet, tmp_path / "fabric_kohya.safetensors", config)
    with safetensors.safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        assert all(k.startswith("lora_unet_") for k in keys)
        assert f.get_tensor(next(k for k in keys if k.endswith(".alpha"))).item() == 8
    fresh = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    assert lora.load_lora(fresh, path) == 56
    assert torch.allclose(_unet_output(fresh.unet), _unet_output(unet), atol=1e-5)


def _peft_folder(unet, folder, rank=4, alpha=32):
    peft_model = get_peft_model(copy.deepcopy(unet), LoraConfig(r=rank, lora_alpha=alpha,
                                                                 target_modules=list(lora.TARGET_MODULES)))
    _randomize_lora(peft_model)
    peft_model.save_pretrained(str(folder))
    return folder


def test_peft_layout_matches_peft_itself(tiny_pipe, tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = _peft_folder(tiny_pipe.unet, tmp_path / "peft_lora")
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "adapter_config.json").is_file()
    reference = _unet_output(PeftModel.from_pretrained(copy.deepcopy(tiny_pipe.unet), str(folder)))

    plain = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    plain.load_lora_weights(str(folder))  # what the course's quick start does: nothing is patched
    assert len(lora.lora_layer_names(plain.unet)) == 0

    ours = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    assert lora.load_lora(ours, folder) == 56
    assert torch.allclose(_unet_output(ours.unet), reference, atol=1e-5)


def test_lora_scale_scales_the_change(trained_unet, tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet, config = trained_unet
    lora.save_lora(unet, tmp_path / "l", config)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    base = _unet_output(pipe.unet)
    lora.load_lora(pipe, tmp_path / "l", scale=0.0)
    assert torch.allclose(_unet_output(pipe.unet), base, atol=1e-6)
    pipe.set_adapters([lora.ADAPTER_NAME], adapter_weights=[1.0])
    assert not torch.allclose(_unet_output(pipe.unet), base, atol=1e-4)


def test_missing_and_empty_lora_are_explained(tiny_pipe, tmp_path):
    with pytest.raises(LessonError, match="exercise3b_train_lora.py"):
        lora.load_lora(tiny_pipe, tmp_path / "nothing_here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LessonError, match="no LoRA weights"):
        lora.load_lora(tiny_pipe, tmp_path / "empty")


def test_lora_for_another_model_names_both_shapes(tiny_pipe, tmp_path):
    # A LoRA whose cross-attention layers expect 2048-wide text features (SDXL) on a 32-wide model.
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    state = {f"unet.{name}.lora.down.weight": torch.zeros(4, 2048), f"unet.{name}.lora.up.weight": torch.zeros(32, 4)}
    safetensors.torch.save_file(state, str(tmp_path / "sdxl_lora.safetensors"))
    with pytest.raises(LessonError, match=r"2048.*32"):
        lora.load_lora(tiny_pipe, tmp_path / "sdxl_lora.safetensors")


@needs_shared
def test_course_published_lora_applies_exactly_as_peft(tmp_path):
    """The course's adapter (rank 4, alpha 32, SD v1.5 shapes) on a random SD v1.5-shaped UNet."""
    folder = SHARED_SEED / "fabric_lora"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 32)
    pipe, reference = _sd15_pipeline_and_peft_output(folder, tmp_path)
    pipe.load_lora_weights(str(folder))  # plain diffusers: 0 layers
    assert len(lora.lora_layer_names(pipe.unet)) == 0
    assert lora.load_lora(pipe, folder) == 128  # 16 transformer blocks x 2 attentions x 4 projections
    assert torch.allclose(_unet_output(pipe.unet), reference, atol=1e-5)


def _sd15_pipeline_and_peft_output(folder, tmp_path):
    """A pipeline with a random SD v1.5-shaped UNet (the tiny model's other parts), and that UNet's output with
    the PEFT adapter in ``folder`` applied by PEFT itself."""
    from diffusers import StableDiffusionPipeline

    unet = sd15_shapes.random_sd15_unet()
    peft_model = PeftModel.from_pretrained(unet, str(folder))
    reference = _unet_output(peft_model)
    unet = peft_model.unload()  # back to the bare UNet, same weights
    tiny = tiny_model.build_tiny_pipeline(tmp_path / "tok")
    return StableDiffusionPipeline(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=unet,
                                   scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False), reference


def _kohya_file_with_mixed_alphas_and_ranks(pipe, path):
    """What kohya's resize_lora.py --dynamic_method writes: per-layer ranks, alpha = scale x rank per layer,
    for the UNet's attention projections and the text encoder's. Returns {module: (scale, up @ down)}."""
    g = torch.Generator().manual_seed(5)
    tensors, rule = {}, {}
    targets = [("lora_unet_", "unet", pipe.unet, lora.TARGET_MODULES),
               ("lora_te_", "text_encoder", pipe.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj"))]
    for prefix, part, model, wanted in targets:
        for i, (name, module) in enumerate((n, m) for n, m in model.named_modules()
                                           if isinstance(m, torch.nn.Linear) and n.endswith(wanted)):
            rank, alpha = (2, 8.0) if i % 3 == 0 else (4, 1.0) if i % 3 == 1 else (4, 4.0)
            down = torch.randn(rank, module.in_features, generator=g) * 0.3
            up = torch.randn(module.out_features, rank, generator=g) * 0.3
            key = prefix + name.replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(alpha)})
            rule[(part, name)] = alpha / rank * (up @ down)
    safetensors.torch.save_file(tensors, str(path))
    return rule


def _merged_pipeline(tiny_dir, rule):
    """The tiny pipeline with each layer's change from ``rule`` added to its weight: what a LoRA should give."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    with torch.no_grad():
        for (part, name), delta in rule.items():
            getattr(pipe, part).get_submodule(name).weight += delta
    return pipe


def test_kohya_alphas_that_differ_per_layer_load_at_kohyas_strength(tiny_dir, tmp_path):
    """Each layer gets W + alpha / rank * up @ down with its own alpha and rank, UNet and text encoder."""
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    rule = _kohya_file_with_mixed_alphas_and_ranks(loaded, tmp_path / "resized.safetensors")
    expected = _merged_pipeline(tiny_dir, rule)
    assert lora.find_lora_file(tmp_path / "resized.safetensors")[0] == "kohya"
    assert lora.load_lora(loaded, tmp_path / "resized.safetensors") == 56 + 8  # (the UNet's and the text encoder's)
    assert len(lora.lora_layer_names(loaded.unet)) == 56

    ids = loaded.tokenizer(["a sks african fabric pattern"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        text, text_expected = loaded.text_encoder(ids)[0], expected.text_encoder(ids)[0]
    assert torch.allclose(text, text_expected, atol=1e-4)
    assert not torch.allclose(text, StableDiffusionPipeline.from_pretrained(str(tiny_dir)).text_encoder(ids)[0],
                              atol=1e-2)  # the text-encoder layers did load
    assert torch.allclose(_unet_output(loaded.unet), _unet_output(expected.unet), atol=1e-4)


def _legacy_lora_weights(unet, rank):
    """Give ``unet`` a LoRA of random weights with alpha = rank (the old format has no alpha: it always meant
    alpha = rank); return them under diffusers' old attention-processor names ("X.processor.to_q_lora.down.weight")."""
    lora.add_lora(unet, rank=rank, alpha=rank)
    _randomize_lora(unet)
    old = {}
    for key, value in lora.lora_state_dict(unet).items():
        module, proj, kind = re.match(r"(.*)\.(to_q|to_k|to_v|to_out\.0)\.lora_(A|B)\.weight", key).groups()
        old[f"{module}.processor.{proj.replace('.0', '')}_lora.{'down' if kind == 'A' else 'up'}.weight"] = value
    return old


def test_a_legacy_bin_lora_folder_loads_like_its_safetensors(trained_unet, tiny_dir, tmp_path):
    """diffusers' DreamBooth-LoRA example wrote pytorch_lora_weights.bin (attention-processor names) until 0.19."""
    from diffusers import StableDiffusionPipeline

    unet, config = trained_unet
    unet.delete_adapters("default")
    old = _legacy_lora_weights(unet, config.r)
    # 0.17-0.19 (save_lora_weights) prefixed the UNet's keys with "unet."; 0.16 (save_attn_procs) did not.
    for name, weights in (("v0.19", {f"unet.{k}": v for k, v in old.items()}), ("v0.16", old)):
        (tmp_path / name).mkdir()
        torch.save(weights, tmp_path / name / "pytorch_lora_weights.bin")
        assert lora.find_lora_file(tmp_path / name) == ("diffusers", tmp_path / name / "pytorch_lora_weights.bin")
        fresh = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
        assert lora.load_lora(fresh, tmp_path / name) == 56, name
        assert torch.allclose(_unet_output(fresh.unet), _unet_output(unet), atol=1e-5), name


def test_a_file_with_another_ending_is_not_read_as_a_damaged_lora(tmp_path):
    """LORA_PATH at a .txt, a picture or 'X.SAFETENSORS' was read as a pickle and refused as 'damaged or
    incompletely downloaded' (UnpicklingError, in PyTorch's words): it is named for what it is."""
    safetensors.torch.save_file({"unet.x.lora_A.weight": torch.ones(2, 4)}, str(tmp_path / "LORA.SAFETENSORS"))
    (tmp_path / "notes.txt").write_text("my lora")
    with pytest.raises(LessonError, match=r"'.*LORA.SAFETENSORS' ends in '.SAFETENSORS': rename it to end in "
                                          r"'.safetensors' .* and set LORA_PATH to the renamed file"):
        lora.find_lora_file(tmp_path / "LORA.SAFETENSORS")
    with pytest.raises(LessonError, match=r"'.*notes.txt' is not a LoRA file: a LoRA is a \.safetensors/\.bin/\.pt/"
                                          r"\.pth file \(exercise 3b writes pytorch_lora_weights.safetensors\)"):
        lora.find_lora_file(tmp_path / "notes.txt")
    (tmp_path / "LORA.SAFETENSORS").rename(tmp_path / "lora.safetensors")
    assert lora.find_lora_file(tmp_path / "lora.safetensors") == ("diffusers", tmp_path / "lora.safetensors")


def test_a_folder_holding_3bs_lora_and_the_courses_uses_3bs_and_says_how_to_pick_the_other(tmp_path, capsys):
    """The course's LoRA downloaded into models/fabric_lora/, where 3b trains: both are LoRAs, one is used."""
    safetensors.torch.save_file({"unet.a.lora_A.weight": torch.zeros(4, 8)}, str(tmp_path / lora.WEIGHT_NAME))
    safetensors.torch.save_file({"base_model.model.a.lora_A.weight": torch.zeros(4, 8)},
                                str(tmp_path / lora.PEFT_WEIGHTS))
    (tmp_path / lora.PEFT_CONFIG).write_text('{"r": 4}')
    assert lora.find_lora_file(tmp_path) == ("diffusers", tmp_path / lora.WEIGHT_NAME)
    said = capsys.readouterr().out
    assert f"holds two LoRAs: exercise 3b's {lora.WEIGHT_NAME} (used)" in said
    assert f"set LORA_PATH to '{tmp_path / lora.PEFT_WEIGHTS}'" in said
    assert lora.find_lora_file(tmp_path / lora.PEFT_WEIGHTS)[0] == "peft"  # (which it then loads)


@pytest.mark.parametrize("lora_dir, name", [("models/fabric_lora", "models/fabric_lora/fabric_lora_kohya.safetensors"),
                                            (".", "course_kohya.safetensors"),
                                            ("models/x/..", "models/x/../models_kohya.safetensors")])
def test_the_kohya_copy_is_named_after_the_folder_lora_dir_stands_for(tmp_path, monkeypatch, lora_dir, name):
    (tmp_path / "course/models/x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "course")  # (LORA_DIR "." named it "_kohya.safetensors", a hidden-looking file)
    assert lora.kohya_path(lora_dir).as_posix() == name


def test_a_lora_of_the_text_encoder_alone_loads_and_changes_what_the_unet_is_told(tiny_dir, tmp_path):
    """kohya's trainers can train the text encoder alone: its layers load; it was refused as 'patched 0 layers
    of the UNet', though it changes every picture."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    maker = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                       init_lora_weights=False), maker.text_encoder)
    (tmp_path / "te").mkdir()
    safetensors.torch.save_file({f"text_encoder.{k}": v.contiguous() for k, v in
                                 get_peft_model_state_dict(maker.text_encoder).items()},
                                tmp_path / "te/pytorch_lora_weights.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    before = pipe.encode_prompt("a sks pattern", "cpu", 1, False)[0]
    layers = 2 * maker.text_encoder.config.num_hidden_layers  # (q and v of each)
    assert lora.load_lora(pipe, tmp_path / "te") == layers and not lora.lora_layer_names(pipe.unet)
    with torch.no_grad():
        assert not torch.allclose(pipe.encode_prompt("a sks pattern", "cpu", 1, False)[0], before, atol=1e-3)


def test_replacing_a_file_this_course_did_not_write_is_refused_and_its_own_or_an_unreadable_one_is_not(tmp_path):
    """The rule that a training must not overwrite a LoRA or embedding it did not write (a download, a classmate's)
    is a file-safety rule, files.require_replaceable, beside the other checks on these files' headers; it was
    lora.require_own_file, which 3a (an embedding) had to import the LoRA module for."""
    from safetensors.torch import save_file

    from common import files

    ours, foreign, damaged = tmp_path / "ours.safetensors", tmp_path / "x" / "w.safetensors", tmp_path / "d.safetensors"
    foreign.parent.mkdir()
    save_file({"a": torch.zeros(1)}, str(ours), metadata={files.SETTINGS_KEY: "{}"})
    save_file({"a": torch.zeros(1)}, str(foreign))
    damaged.write_bytes(b"\x00" * 7)
    for path in [ours, damaged, tmp_path / "missing.safetensors"]:
        files.require_replaceable(path, "LORA_DIR", "exercise3b_train_lora.py")
    with pytest.raises(LessonError, match=r"LORA_DIR '.*x' already holds 'w.safetensors', which this course did not "
                                          r"train .*pass --lora-dir\), or move that file out of it"):
        files.require_replaceable(foreign, "LORA_DIR", "exercise3b_train_lora.py")
    assert lora.SETTINGS_KEY == files.SETTINGS_KEY  # (what LoRA files and embeddings are written with)


@pytest.mark.parametrize("damage, says", [
    ("drop", "holds only one of its two matrices"),  # (PEFT would fill the missing half with random numbers)
    ("cut", "ranks 2 and 4"),
    ("int", "not the decimal ones"),
])
def test_a_lora_with_a_damaged_layer_is_refused_by_name(trained_unet, tiny_dir, tmp_path, damage, says):
    from diffusers import StableDiffusionPipeline

    unet, config = trained_unet
    lora.save_lora(unet, tmp_path / "l", config)
    file = tmp_path / "l" / "pytorch_lora_weights.safetensors"
    with safetensors.safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    state = safetensors.torch.load_file(str(file))
    key = next(k for k in sorted(state) if "lora_A" in k or "lora.down" in k)
    if damage == "drop":
        del state[key]
    elif damage == "cut":
        state[key] = state[key][:2].clone()
    else:
        state = {k: (v * 100).to(torch.int64) for k, v in state.items()}
    safetensors.torch.save_file(state, str(file), metadata=metadata)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    with pytest.raises(LessonError, match=rf"is damaged: its layer '.*to_\w+' .*{says}.*exercise3b_train_lora.py"):
        lora.load_lora(pipe, tmp_path / "l")


@pytest.mark.parametrize("damage, says", [("drop", "holds only one of its two matrices"),
                                          ("int", "not the decimal ones")])
def test_a_damaged_text_encoder_layer_is_refused_by_name(trained_unet, tiny_dir, tmp_path, damage, says):
    """load_lora loads a LoRA's text-encoder layers too, and only the UNet's were checked: a text-encoder layer
    missing a half, or holding whole numbers, loaded without a word."""
    from diffusers import StableDiffusionPipeline

    unet, config = trained_unet
    file = lora.save_lora(unet, tmp_path / "l", config)
    with safetensors.safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    state = safetensors.torch.load_file(str(file))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    width, layer = pipe.text_encoder.config.hidden_size, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    state[f"{layer}.lora_A.weight"] = torch.randn(4, width)
    if damage == "int":
        state[f"{layer}.lora_B.weight"] = torch.ones(width, 4, dtype=torch.int64)
        state[f"{layer}.lora_A.weight"] = state[f"{layer}.lora_A.weight"].to(torch.int64)
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    header = json.loads(metadata[LORA_ADAPTER_METADATA_KEY])  # (the text encoder's rank and alpha, as diffusers writes)
    header.update({"text_encoder.r": 4, "text_encoder.lora_alpha": 4, "text_encoder.target_modules": ["q_proj"]})
    safetensors.torch.save_file(state, str(file), metadata={**metadata, LORA_ADAPTER_METADATA_KEY: json.dumps(header)})
    with pytest.raises(LessonError, match=rf"is damaged: its layer '{layer}' .*{says}.*exercise3b_train_lora.py"):
        lora.load_lora(pipe, tmp_path / "l")
