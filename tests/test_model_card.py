"""Files every Stable Diffusion tool opens, and a card that says what they are (issue 13 part 3)."""

import torch
from huggingface_hub import ModelCard

from common import model_card
from common import textual_inversion as ti

SETTINGS = {"MODEL_ID": "stable-diffusion-v1-5/stable-diffusion-v1-5", "INSTANCE_PROMPT": "a sks african fabric pattern",
            "SUBJECT_TOKEN": "sks", "LORA_RANK": 4, "LORA_ALPHA": 4.0, "LEARNING_RATE": 1e-4, "MAX_TRAIN_STEPS": 800}


def test_lora_card_is_yaml_front_matter_and_markdown(tmp_path):
    preview = tmp_path / "grid.png"
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 10, 10)).save(preview)
    folder = tmp_path / "fabric_lora"
    folder.mkdir()
    path = model_card.write_lora_card(folder, SETTINGS, folder / "fabric_lora_kohya.safetensors", preview)
    card = ModelCard.load(path)  # the Hub's own parser: front matter + Markdown
    assert card.data.base_model == SETTINGS["MODEL_ID"] and card.data.license == "creativeml-openrail-m"
    assert card.data.instance_prompt == "a sks african fabric pattern" and "lora" in card.data.tags
    assert "pipe.load_lora_weights(" in card.text and "<lora:fabric_lora_kohya:1>" in card.text
    assert "| `LORA_RANK` | `4` |" in card.text and "![samples during training](preview.png)" in card.text
    assert (folder / "preview.png").read_bytes() == preview.read_bytes()


def test_embedding_card_and_a1111_file(tmp_path):
    from diffusers.loaders.textual_inversion import load_textual_inversion_state_dicts

    vectors = torch.randn(2, 32)
    file = ti.export_a1111(vectors, tmp_path / "african-fabric.safetensors")
    state = load_textual_inversion_state_dicts([str(file)])[0]
    assert list(state) == ["emb_params"] and torch.equal(state["emb_params"], vectors)
    settings = {**SETTINGS, "PLACEHOLDER_TOKEN": "<african-fabric>"}
    card = ModelCard.load(model_card.write_embedding_card(tmp_path, settings, file))
    assert card.data.instance_prompt == "a <african-fabric> pattern" and "textual_inversion" in card.data.tags
    assert "pipe.load_textual_inversion(" in card.text and "embedding:african-fabric" in card.text


def test_a_readme_that_is_not_our_card_is_kept(tmp_path):
    """A student's own README.md in the LoRA folder survives; the card goes beside it. Our own card from
    an earlier run is replaced, as a re-run should."""
    folder = tmp_path / "my_lora"
    folder.mkdir()
    notes = folder / "README.md"
    notes.write_text("# My notes\nrun 3: rank 8 looked best\n", encoding="utf-8")
    path = model_card.write_lora_card(folder, SETTINGS, folder / "fabric_lora_kohya.safetensors")
    assert notes.read_text(encoding="utf-8") == "# My notes\nrun 3: rank 8 looked best\n"
    assert path.name == "README_lora.md" and "pipe.load_lora_weights(" in path.read_text(encoding="utf-8")
    notes.unlink()
    first = model_card.write_lora_card(folder, SETTINGS, folder / "fabric_lora_kohya.safetensors")
    again = model_card.write_lora_card(folder, {**SETTINGS, "LORA_RANK": 8}, folder / "fabric_lora_kohya.safetensors")
    assert first == again == folder / "README.md" and "| `LORA_RANK` | `8` |" in again.read_text(encoding="utf-8")


def test_the_cards_snippet_is_python_that_says_the_prompt_whatever_its_quotes(tmp_path):
    """A prompt with quotes (or a backslash) was pasted between quotes: the card's code did not run."""
    import ast

    prompt = 'a sks "kente" pattern, 5\' wide \\ woven'
    folder = tmp_path / "fabric_lora"
    folder.mkdir()
    card = ModelCard.load(model_card.write_lora_card(folder, {**SETTINGS, "INSTANCE_PROMPT": prompt},
                                                     folder / "fabric_lora_kohya.safetensors"))
    code = card.text.split("```python\n")[1].split("```")[0]
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id: ast.literal_eval(node.args[0])
             for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Call) and node.args}
    assert calls["from_pretrained"] == SETTINGS["MODEL_ID"] and calls["pipe"] == prompt
    assert calls["load_lora_weights"] == folder.as_posix()
