"""Model sources: the tiny model, aliases, local paths and the message when the Hub is out of reach."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from bench import sd15_shapes
from common import models, tiny_model
from common.errors import LessonError


def test_tiny_model_is_a_standard_diffusers_folder(tiny_dir):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    # cross-attention: the UNet reads the text encoder's features
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert models.native_resolution(pipe) == 64


def test_tiny_tokenizer_knows_the_course_words(tiny_pipe):
    tok = tiny_pipe.tokenizer
    for word in ["sks", "african", "fabric", "pattern", "dress", "watercolor", "striped", "purple"]:
        assert len(tok.tokenize(word)) == 1, word
    ids = tok("a sks african fabric pattern").input_ids
    assert len(ids) == 7  # start, 5 words, end
    assert tok.model_max_length == 77
    # unknown words still encode (as characters), they are not dropped
    assert len(tok.tokenize("zebra")) > 1


def test_tiny_model_is_deterministic(tmp_path):
    a = tiny_model.build_tiny_pipeline(tmp_path / "a")
    b = tiny_model.build_tiny_pipeline(tmp_path / "b")
    for (name, pa), pb in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_same_seed_same_image(tiny_pipe):
    images = [tiny_pipe("a sks african fabric pattern", num_inference_steps=4,
                        generator=torch.Generator().manual_seed(7), output_type="np").images for _ in range(2)]
    assert (images[0] == images[1]).all()


def test_resolve_sources(tmp_path, tiny_dir):
    assert models.resolve("tiny").kind == "tiny"
    alias = models.resolve("runwayml/stable-diffusion-v1-5")
    assert alias.location == "stable-diffusion-v1-5/stable-diffusion-v1-5" and "removed" in alias.note
    assert models.resolve(str(tiny_dir)).kind == "folder"
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    assert models.resolve(str(ckpt)).kind == "single_file"
    assert models.resolve("someone/some-model").kind == "hub"


@pytest.mark.parametrize("model_id, words", [
    ("./no/such/folder", "does not exist"),
    ("not a model", "not a Hub id"),
    ("", "empty"),
])
def test_bad_model_ids_are_explained(model_id, words):
    with pytest.raises(LessonError, match=words):
        models.resolve(model_id)


def test_folder_without_model_index_is_explained(tmp_path):
    with pytest.raises(LessonError, match="model_index.json"):
        models.resolve(str(tmp_path))


SD15_KEYS = {  # a few of a whole SD v1.5 checkpoint's tensors, at toy size
    "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
    "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (8, 16, 1, 1),
    "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 8)}


@pytest.mark.parametrize("tensors, kind", [
    ({**SD15_KEYS, "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (8,),  # 2nd text encoder
      "conditioner.embedders.1.model.positional_embedding": (77, 8)}, "SDXL"),
    ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (8,),
      "model.diffusion_model.guidance_in.in_layer.bias": (8,), "model.diffusion_model.img_in.weight": (8, 64)}, "FLUX"),
    ({"model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight": (8, 8),
      "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight": (77, 8)},
     "Stable Diffusion 3.5"),
    ({**SD15_KEYS, "model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3)}, "an inpainting model"),  # 9 inputs
])
def test_a_single_file_checkpoint_of_another_kind_of_model_is_refused_from_its_header(tmp_path, tensors, kind):
    """As its diffusers folder is (by model_index.json): from_single_file took it for SD v1.x and failed once it had
    loaded, or, offline, asked the Hub for the other model's configuration files."""
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    with pytest.raises(LessonError, match=rf"MODEL_ID file '.*model.safetensors' is a checkpoint of {kind}, but the "
                                          r"scripts run Stable Diffusion v1.x and 2.x models.*Use an SD v1.x model"):
        models.resolve(str(path))


@pytest.mark.parametrize("part", ["unet", "model_index.json", "unet/config.json"])
def test_a_part_of_a_diffusers_model_names_the_folder_that_holds_the_whole(tiny_dir, part):
    """--model models/tiny-sd/unet (or its model_index.json) was told to point at 'the folder that holds
    model_index.json', without saying it is the one just above."""
    with pytest.raises(LessonError, match=rf"It is a part of the diffusers model in '{tiny_dir}': set MODEL_ID = "
                                          rf"'{tiny_dir}' \(--model {tiny_dir}\)\.$"):
        models.resolve(str(tiny_dir / part))


def test_a_single_file_sd15_checkpoint_passes_the_header_check(tmp_path):
    import safetensors.torch

    path = tmp_path / "v1-5-pruned.safetensors"
    safetensors.torch.save_file({k: torch.zeros(shape) for k, shape in SD15_KEYS.items()}, str(path))
    assert models.resolve(str(path)).kind == "single_file"


class _RunsCode:  # a pickle that would call os.system("echo PWNED") when loaded
    def __reduce__(self):
        import os
        return os.system, ("echo PWNED",)


def _ckpt(path, kind):
    """A .ckpt file of each kind a student may point MODEL_ID at."""
    import pickle
    import zipfile

    state = {"state_dict": {k: torch.zeros(shape) for k, shape in SD15_KEYS.items()}}
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbled":
        path.write_bytes(bytes(range(7, 250)) * 20)
    elif kind == "lfs":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 4265380512\n")
    elif kind == "zip of text":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("readme.txt", "hello")
    elif kind == "cut short":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "runs code":
        path.write_bytes(pickle.dumps({"state_dict": _RunsCode()}))
    elif kind == "zip that runs code":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", pickle.dumps(_RunsCode()))
    elif kind == "lightning":  # an original training checkpoint: its callbacks' state beside the weights
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", b"\x80\x02cpytorch_lightning.callbacks.model_checkpoint\n"
                                                 b"ModelCheckpoint\n)\x81.")
    elif kind == "not SD":
        torch.save({"a": torch.zeros(3)}, path)
    elif kind == "embedding":
        torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "name": "fabric"}, path)
    elif kind == "SDXL":
        torch.save({"state_dict": {k: torch.zeros(s) for k, s in {
            **SD15_KEYS, "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (8,),
            "conditioner.embedders.1.model.positional_embedding": (77, 8)}.items()}}, path)
    elif kind in ("SD", "SD legacy"):
        torch.save(state, path, _use_new_zipfile_serialization=kind == "SD")
    return path


@pytest.mark.parametrize("kind, says", [
    ("empty", r"is empty \(0 bytes\): an interrupted download or copy\. Download it again"),
    ("garbled", r"is not a checkpoint: it is neither a PyTorch zip nor a pickle .*Download it again"),
    ("lfs", r"is a Git LFS pointer \(\d+ bytes\), not the checkpoint.*'git lfs pull'"),
    ("zip of text", r"is a zip archive of readme\.txt, not a PyTorch checkpoint .*download it again"),
    ("cut short", r"is a PyTorch zip cut short \(300 bytes, its end missing\).*Download it again"),
    ("runs code", r"was refused for safety: it is a pickle that asks to run Python code \((posix|nt)\.system\)"),
    ("zip that runs code", r"was refused for safety: .*\((posix|nt)\.system\).*Use the model's \.safetensors file"),
    ("lightning", r"holds PyTorch Lightning's training state beside the weights .*Use the model's \.safetensors file"),
    ("not SD", r"holds no Stable Diffusion UNet .*it is not a whole base model but a part of a model, or something "
               r"else\. Set MODEL_ID to a whole SD v1\.x checkpoint"),
    ("embedding", r"holds no Stable Diffusion UNet .*but an embedding \(set EMBEDDING_PATH to it\)"),
    ("SDXL", r"is a checkpoint of SDXL, but the scripts run Stable Diffusion v1\.x and 2\.x models"),
])
def test_a_ckpt_model_id_is_looked_at_before_loading_without_running_it(kind, says, tmp_path, monkeypatch, capfd):
    """A .ckpt MODEL_ID (a pickle) was left to from_single_file: 'Unable to load weights from checkpoint file' for a
    garbled, empty, zipped or code-running file, after the model's step had begun; 'could not download the
    configuration files' offline for one that is no SD model at all. Now each is named before anything loads, and
    nothing in it runs (weights-only loading is never bypassed)."""
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: real(*a, **k) if k.get("weights_only") is True
                        else pytest.fail("torch.load without weights_only=True"))
    path = _ckpt(tmp_path / "model.ckpt", kind)
    with pytest.raises(LessonError, match=rf"^MODEL_ID file '.*model\.ckpt' {says}"):
        models.resolve(str(path))
    assert "PWNED" not in capfd.readouterr().out


@pytest.mark.parametrize("kind", ["SD", "SD legacy"])
def test_a_ckpt_of_sd_passes_the_look(kind, tmp_path, monkeypatch):
    path = _ckpt(tmp_path / "v1-5-pruned.ckpt", kind)
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: real(*a, **k) if k.get("weights_only") is True
                        else pytest.fail("torch.load without weights_only=True"))
    assert models.resolve(str(path)).kind == "single_file"


@pytest.mark.parametrize("name, where, says", [
    ("model.bin", "", r"is a PyTorch pickle \(\.bin\), which the scripts do not load as a base model\. A whole model "
                      r"comes as one \.safetensors \(or \.ckpt\) file or a diffusers folder"),
    ("model.pt", "", r"is a PyTorch pickle \(\.pt\).*point MODEL_ID at one"),
    ("model.pth", "", r"is a PyTorch pickle \(\.pth\).*point MODEL_ID at one"),
    ("diffusion_pytorch_model.bin", "unet", r"is a PyTorch pickle .*It is a part of the diffusers model in '.*sd': "
                                            r"set MODEL_ID = '.*sd' \(--model .*sd\)\.$"),
    ("pytorch_lora_weights.bin", "", r"is a PyTorch pickle .*Its name says it is a LoRA: set LORA_PATH to it"),
    ("learned_embeds.bin", "", r"is a PyTorch pickle .*Its name says it is a Textual Inversion embedding: set EMBEDDING_PATH to it"),
])
def test_a_pickle_model_id_says_what_it_is_and_what_to_use(name, where, says, tmp_path):
    folder = tmp_path / "sd"
    (folder / where).mkdir(parents=True, exist_ok=True)
    if where:
        (folder / "model_index.json").write_text("{}")
    path = folder / where / name
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(LessonError, match=rf"^MODEL_ID file '.*{name}' {says}"):
        models.resolve(str(path))


def test_unreachable_hub_gives_ways_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LessonError) as info:
        models.load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    message = str(info.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "hf auth login" in message and "pocket" in message and "local" in message
    assert "\n" not in message


def test_attention_uses_pytorch_sdpa(tiny_pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = tiny_pipe.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_broken_checkpoint_file_is_explained(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(LessonError, match="model.safetensors"):
        models.load_pipeline(str(bad))


def test_sd15_shapes_pipeline_has_sd15s_shapes_and_runs(tmp_path):
    pipe = sd15_shapes.build_sd15_shapes_pipeline(tmp_path / "tokenizer")
    count = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    assert round(count["unet"] / 1e6) == 860 and round(count["vae"] / 1e6) == 84
    assert round(count["text_encoder"] / 1e6) == 123  # SD v1.5's 49408-row token table kept
    assert models.native_resolution(pipe) == 512 and pipe.vae_scale_factor == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 768
    embeds, _ = pipe.encode_prompt("a sks african fabric pattern", "cpu", 1, False)
    assert embeds.shape == (1, 77, 768) and torch.isfinite(embeds).all()
    # Position ids survive the fast random fill (garbage ids would make every token the same)
    assert torch.equal(dict(pipe.text_encoder.named_buffers())["embeddings.position_ids"],
                       torch.arange(77).unsqueeze(0))
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


def test_training_refuses_a_numbered_gpu_and_says_how_to_choose_one():
    from common import device

    with pytest.raises(LessonError, match=r"DEVICE = 'cuda:1' cannot choose the GPU for training.*"
                                          r"CUDA_VISIBLE_DEVICES=1"):
        device.pick_runtime("cuda:1", training=True, verbose=False)
    assert device.pick_runtime("cpu", training=True, verbose=False).device.type == "cpu"


# --------------------------------------------------------------------------- the pocket model's card
def _card(folder, monkeypatch, card=None):
    """``card`` as the pocket model's pocket_card.json, in a temporary folder standing in for models/pocket-sd."""
    import json

    monkeypatch.setattr(models, "POCKET_DIR", folder)
    folder.mkdir(exist_ok=True)
    if card is not None:
        (folder / models.POCKET_CARD).write_text(json.dumps(card), encoding="utf-8")


def test_native_crop_fraction_and_known_words_come_from_the_pocket_card(tmp_path, monkeypatch):
    _card(tmp_path / "pocket-sd", monkeypatch, {"crop_fraction": 0.4, "known_words": ["Dress", "fabric", "a"]})
    assert models.native_crop_fraction("pocket") == 0.4
    assert models.known_words("pocket") == {"dress", "fabric", "a"}
    for other in ("tiny", "stable-diffusion-v1-5/stable-diffusion-v1-5"):  # no card: the whole picture, every word
        assert models.native_crop_fraction(other) == 1.0 and models.known_words(other) is None


def test_a_card_without_them_means_the_whole_picture_and_no_word_list(tmp_path, monkeypatch):
    _card(tmp_path / "no-card", monkeypatch)
    assert models.native_crop_fraction("pocket") == 1.0 and models.known_words("pocket") is None
    _card(tmp_path / "old-card", monkeypatch, {"kind_accuracy": 0.99})
    assert models.native_crop_fraction("pocket") == 1.0 and models.known_words("pocket") is None
    _card(tmp_path / "bad-card", monkeypatch, {"crop_fraction": 3})
    with pytest.raises(LessonError, match="crop_fraction 3"):
        models.native_crop_fraction("pocket")
