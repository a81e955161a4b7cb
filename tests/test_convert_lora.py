"""tools/convert_lora.py: a LoRA converted to any layout loads at the same strength with the libraries' own loaders."""

import copy
import json
import re

import pytest
import safetensors
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel

from common import lesson, lora
from common.errors import LessonError
from conftest import SHARED_SEED, needs_shared
from test_lora import (_kohya_file_with_mixed_alphas_and_ranks, _legacy_lora_weights, _merged_pipeline,
                       _randomize_lora, _sd15_pipeline_and_peft_output, _unet_output)
from tools import convert_lora

LAYOUTS = ("kohya", "diffusers", "peft")


def _convert(source, out, to, *extra):
    return convert_lora.convert([str(source), str(out), "--to", to, *extra])


def _plain_output(pipe, path, layout, name):
    """The UNet's output with the LoRA at ``path`` loaded by diffusers' load_lora_weights (PEFT's own
    PeftModel for a PEFT folder, which load_lora_weights does not read)."""
    if layout == "peft":
        return _unet_output(PeftModel.from_pretrained(copy.deepcopy(pipe.unet), str(path)))
    pipe.load_lora_weights(str(path), adapter_name=name)
    output = _unet_output(pipe.unet)
    pipe.delete_adapters(name)
    return output


def _header(path):
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata()


def test_every_layout_and_back_keeps_the_strength(tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    trained = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    config = lora.add_lora(trained.unet, rank=4, alpha=8)  # alpha != rank: the strength must travel
    _randomize_lora(trained.unet)
    reference = _unet_output(trained.unet)
    source = lora.save_lora(trained.unet, tmp_path / "trained", config).parent

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    base = _unet_output(pipe.unet)
    converted = {}
    for to in LAYOUTS:  # each layout from diffusers, then each of those to every layout
        converted[to] = _convert(source, tmp_path / f"first.{to}".replace(".kohya", ".safetensors"), to)
    for start in LAYOUTS:
        for to in LAYOUTS:
            out = tmp_path / (f"{start}-{to}.safetensors" if to == "kohya" else f"{start}-{to}")
            path = _convert(converted[start], out, to)
            output = _plain_output(pipe, path, to, f"{start}-{to}")
            assert torch.allclose(output, reference, atol=1e-5), (start, to)
            assert (output - base).abs().max() > 1e-3
            if to == "kohya":
                with safetensors.safe_open(str(path), "pt") as f:
                    assert {f.get_tensor(k).item() for k in f.keys() if k.endswith(".alpha")} == {8.0}
                    assert {f.get_tensor(k).shape[0] for k in f.keys() if k.endswith(".lora_down.weight")} == {4}
                assert _header(path)["ss_network_alpha"] == "8"
            else:  # rank and alpha exactly, in the file's header / the adapter's config
                saved = (LoraConfig.from_pretrained(str(path)).to_dict() if to == "peft"
                         else {k.removeprefix("unet."): v for k, v in
                               json.loads(_header(path / lora.WEIGHT_NAME)["lora_adapter_metadata"]).items()})
                assert (saved["r"], saved["lora_alpha"]) == (4, 8)


def test_kohya_alphas_that_differ_per_layer_convert_at_kohyas_strength(tiny_dir, tmp_path):
    """resize_lora.py's files: ranks 2 and 4, alphas 8, 1 and 4, UNet and text encoder."""
    from diffusers import StableDiffusionPipeline

    fresh = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    source = tmp_path / "resized.safetensors"
    rule = _kohya_file_with_mixed_alphas_and_ranks(fresh, source)
    expected = _merged_pipeline(tiny_dir, rule)
    ids = fresh.tokenizer(["a sks african fabric pattern"], padding="max_length", return_tensors="pt").input_ids

    folder = _convert(source, tmp_path / "diffusers", "diffusers")
    kohya = _convert(folder, tmp_path / "back.safetensors", "kohya")
    again = _convert(kohya, tmp_path / "again", "diffusers")  # kohya's text_model_ names, read back
    for path in (folder, again):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
        pipe.load_lora_weights(str(path))  # plain diffusers, with the alpha_pattern in the header
        assert len(lora.lora_layer_names(pipe.text_encoder)) == 8
        with torch.no_grad():
            assert torch.allclose(pipe.text_encoder(ids)[0], expected.text_encoder(ids)[0], atol=1e-4)
        assert torch.allclose(_unet_output(pipe.unet), _unet_output(expected.unet), atol=1e-4)

    original, back = safetensors.torch.load_file(str(source)), safetensors.torch.load_file(str(kohya))
    # every tensor and alpha as it was; the text encoder's layers under the names AUTOMATIC1111 reads
    assert {k.replace("lora_te_", "lora_te_text_model_"): v for k, v in original.items()}.keys() == back.keys()
    for key, value in original.items():
        assert torch.equal(back[key.replace("lora_te_", "lora_te_text_model_")], value), key
    assert _header(kohya)["ss_network_dim"] == "Dynamic"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    lora.load_lora(pipe, kohya)  # the course's loader: kohya's rule layer by layer
    assert torch.allclose(_unet_output(pipe.unet), _unet_output(expected.unet), atol=1e-4)

    with pytest.raises(LessonError, match="text encoder.*--to diffusers or --to kohya"):
        _convert(source, tmp_path / "peft", "peft")
    assert not (tmp_path / "peft").exists()


def test_a_legacy_bin_folder_converts_at_its_strength(tiny_dir, tmp_path):
    """diffusers 0.16's pytorch_lora_weights.bin: attention-processor names, no "unet.", alpha = rank."""
    from diffusers import StableDiffusionPipeline

    trained = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    (tmp_path / "old").mkdir()
    torch.save(_legacy_lora_weights(trained.unet, 4), tmp_path / "old" / "pytorch_lora_weights.bin")
    reference = _unet_output(trained.unet)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    for to in LAYOUTS:
        path = _convert(tmp_path / "old", tmp_path / ("new.safetensors" if to == "kohya" else f"new-{to}"), to)
        assert torch.allclose(_plain_output(pipe, path, to, to), reference, atol=1e-5), to


@needs_shared
def test_the_course_lora_converts_to_every_layout(tmp_path):
    """The course's PEFT adapter (rank 4, alpha 32, SD v1.5 shapes): kohya and diffusers load it plainly at
    PEFT's strength; a PEFT folder made back from kohya holds the same tensors and config."""
    folder = SHARED_SEED / "fabric_lora"
    kohya = _convert(folder, tmp_path / "fabric.safetensors", "kohya")
    diffusers = _convert(kohya, tmp_path / "fabric_diffusers", "diffusers")
    peft = _convert(kohya, tmp_path / "fabric_peft", "peft")
    seed, back = (safetensors.torch.load_file(str(f / lora.PEFT_WEIGHTS)) for f in (folder, peft))
    assert seed.keys() == back.keys() and all(torch.equal(seed[k], back[k]) for k in seed)
    config = LoraConfig.from_pretrained(str(peft))
    assert (config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern) == (4, 32, {}, {})

    pipe, reference = _sd15_pipeline_and_peft_output(folder, tmp_path)
    for name, path in (("kohya", kohya), ("diffusers", diffusers)):
        assert torch.allclose(_plain_output(pipe, path, name, name), reference, atol=1e-4), name


def test_what_a_user_can_get_wrong_is_one_line(tmp_path, capsys):
    source = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4),
                                 "lora_unet_x.lora_up.weight": torch.ones(4, 2), "lora_unet_x.alpha": torch.tensor(2.)},
                                str(source))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "taken.safetensors").write_bytes(b"a good file")
    (tmp_path / "notes.txt").write_text("not a LoRA")
    embedding = tmp_path / "embedding.safetensors"
    safetensors.torch.save_file({"<african-fabric>": torch.ones(1, 32)}, str(embedding))
    loha = tmp_path / "loha.safetensors"
    safetensors.torch.save_file({"lora_unet_x.hada_w1_a": torch.ones(2, 4), "lora_unet_x.alpha": torch.tensor(2.)},
                                str(loha))
    # a damaged LoRA whose halves of a layer disagree on the rank (down 2 x 4, up 4 x 3) was converted as it was
    mismatched = tmp_path / "mismatched.safetensors"
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4),
                                 "lora_unet_x.lora_up.weight": torch.ones(4, 3), "lora_unet_x.alpha": torch.tensor(2.)},
                                str(mismatched))
    peft_mismatched = tmp_path / "peft_mismatched"
    LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]).save_pretrained(str(peft_mismatched))
    layer = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    safetensors.torch.save_file({f"{layer}.lora_A.weight": torch.ones(2, 32),
                                 f"{layer}.lora_B.weight": torch.ones(32, 3)}, str(peft_mismatched / lora.PEFT_WEIGHTS))
    # ... and one missing half of a layer, or holding whole numbers, was converted as it was too (lora_A missing in
    # a diffusers file; an integer kohya file; integer halves in PEFT's layout)
    unet_layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    half_missing = tmp_path / "half" / lora.WEIGHT_NAME
    half_missing.parent.mkdir()
    safetensors.torch.save_file({f"{unet_layer}.lora_B.weight": torch.ones(32, 2)}, str(half_missing))
    integers = tmp_path / "integers.safetensors"
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4, dtype=torch.int64),
                                 "lora_unet_x.lora_up.weight": torch.ones(4, 2, dtype=torch.int64),
                                 "lora_unet_x.alpha": torch.tensor(2.)}, str(integers))
    peft_integers = tmp_path / "peft_integers"
    LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]).save_pretrained(str(peft_integers))
    safetensors.torch.save_file({f"{layer}.lora_A.weight": torch.ones(2, 32, dtype=torch.int32),
                                 f"{layer}.lora_B.weight": torch.ones(32, 2, dtype=torch.int32)},
                                str(peft_integers / lora.PEFT_WEIGHTS))
    cases = [
        ([mismatched, tmp_path / "out", "--to", "diffusers"], r"'.*mismatched.safetensors' is damaged: its layer "
         r"'lora_unet_x' holds matrices of ranks 2 and 3, which must be equal. Get the LoRA again, or retrain with "
         r"exercise3b_train_lora.py"),
        ([peft_mismatched, tmp_path / "out", "--to", "diffusers"], r"is damaged: its layer 'unet.down_blocks.0."
         r"attentions.0.transformer_blocks.0.attn1.to_q' holds matrices of ranks 2 and 3"),
        ([tmp_path / "half", tmp_path / "out", "--to", "diffusers"], rf"is damaged: its layer '{unet_layer}' "
         r"holds only "
         rf"one of its two matrices \('{unet_layer}.lora_B.weight' without '{unet_layer}.lora_A.weight'\)"),
        ([integers, tmp_path / "out", "--to", "peft"], r"is damaged: its layer 'lora_unet_x' holds torch.int64/"
         r"torch.int64 numbers, not the decimal ones of a LoRA"),
        ([peft_integers, tmp_path / "out.safetensors", "--to", "kohya"], r"is damaged: its layer "
         r"'unet.down_blocks.*to_q' holds "
         r"torch.int32/torch.int32 numbers"),
        ([tmp_path / "missing", tmp_path / "out", "--to", "diffusers"], "No LoRA at"),
        ([embedding, tmp_path / "out", "--to", "diffusers"], "holds no LoRA layers .*Textual Inversion embedding"),
        ([loha, tmp_path / "out", "--to", "diffusers"], "not a plain LoRA layer"),
        ([source, tmp_path / "full", "--to", "diffusers"], "already exists and is not empty.*--force"),
        ([source, tmp_path / "taken.safetensors", "--to", "kohya"], "already exists.*--force"),
        ([source, tmp_path / "out", "--to", "sdxl"], "invalid choice: 'sdxl'"),
        ([source, tmp_path / "taken.safetensors", "--to", "kohya", "--forc"], "unrecognized arguments: --forc"),
        # the tool's advice names its own argument (the scripts' constant is LORA_PATH)
        ([tmp_path / "full", tmp_path / "out", "--to", "kohya"], "holds no LoRA weights.*point IN at"),
        ([tmp_path / "notes.txt", tmp_path / "out", "--to", "kohya"], "not a LoRA file.*Set IN to"),
        ([source, tmp_path / "out.safetensors", "--to", "peft"], "writes a folder"),
        ([source, tmp_path / "out", "--to", "kohya"], "writes one file"),
        ([source, source, "--to", "kohya", "--force"], "would replace the LoRA being converted"),
        # an empty OUT is the current folder: it was refused as 'OUT '.' would replace the LoRA', or as holding
        # the project's files, neither of which says that OUT was left empty
        ([source, "", "--to", "peft", "--force"], r"^ERROR: OUT must be the name of a file or folder, got ''"),
        ([" ", tmp_path / "out", "--to", "peft"], r"^ERROR: IN must be the name of a file or folder, got ' '"),
        # --force replaced a folder as a whole, with whatever else it held (it deleted notes.txt)
        ([source, tmp_path / "full", "--to", "diffusers", "--force"], r"OUT '.*full' holds 1 thing\(s\) that are "
         r"not a LoRA \(notes.txt\), which --force would delete with the folder. Choose another OUT"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_:
            lesson.run(lambda: convert_lora.main([str(a) for a in argv]))
        assert exit_.value.code != 0, argv
        errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("ERROR: "), errors
        assert re.search(expected, errors[0]), errors[0]
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "taken.safetensors").read_bytes() == b"a good file"
    assert not (tmp_path / "out").exists()

    with pytest.raises(SystemExit) as exit_:  # --force replaces it, and the command line's exit code is 0
        lesson.run(lambda: convert_lora.main([str(source), str(tmp_path / "taken.safetensors"), "--to", "kohya",
                                              "--force"]))
    assert exit_.value.code == 0
    assert safetensors.torch.load_file(str(tmp_path / "taken.safetensors"))["lora_unet_x.alpha"].item() == 2.0
    for _ in range(2):  # a folder holding only a LoRA (the first run's) is replaced with --force
        assert convert_lora.convert([str(source), str(tmp_path / "again"), "--to", "diffusers", "--force"])
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["pytorch_lora_weights.safetensors"]
    with pytest.raises(SystemExit) as exit_:
        convert_lora.main(["--help"])
    assert exit_.value.code == 0 and "--to {kohya,diffusers,peft}" in capsys.readouterr().out


def test_out_that_is_the_lora_under_another_name_is_refused(tmp_path, capsys):
    """macOS' and Windows' disks ignore case: OUT 'Fabric.safetensors' is IN 'fabric.safetensors', and --force
    converted the LoRA in place of itself (its folder too, for --to diffusers/peft). A hard link is the same case
    on this Linux disk: one file under two names."""
    import os

    source = tmp_path / "fabric.safetensors"
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4),
                                 "lora_unet_x.lora_up.weight": torch.ones(4, 2), "lora_unet_x.alpha": torch.tensor(2.)},
                                str(source))
    alias = tmp_path / "Fabric.safetensors"
    os.link(source, alias)
    before = source.read_bytes()
    with pytest.raises(SystemExit) as exit_:
        lesson.run(lambda: convert_lora.main([str(source), str(alias), "--to", "kohya", "--force"]))
    assert exit_.value.code != 0
    assert "would replace the LoRA being converted" in capsys.readouterr().err
    assert source.read_bytes() == before and os.path.samefile(source, alias)
