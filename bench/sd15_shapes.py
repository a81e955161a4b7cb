"""Stable Diffusion v1.5's real shapes with random weights, for the benchmarks (and tests that need SD v1.5's
layer shapes). Nothing is downloaded: speed and memory depend on the shapes, not on the weights' values.

Maintainers' tooling: the lesson scripts never use it (their ``MODEL_ID`` loads real weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.tiny_model import SD15_SCHEDULER_CONFIG, build_tokenizer

# The real UNet's configuration (stable-diffusion-v1-5/unet/config.json), for tests and benchmarks that
# need SD v1.5's layer shapes without downloading its weights.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)


# Its VAE (stable-diffusion-v1-5/vae/config.json) and CLIP ViT-L/14 text encoder (text_encoder/config.json).
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=512, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, norm_num_groups=32, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
)


def _fill_random(model, seed: int, std: float):
    """Give every parameter of ``model`` (built on the meta device) random values, fast.

    Drawing 860M normals one by one takes ~20 s on a laptop CPU; tiling a 1M-value random block is
    near-instant, and the values' statistics are all speed and shape tests care about. Buffers (such
    as CLIP's position ids) keep the values their module gave them.
    """
    buffers = {name: b.clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    model = model.to_empty(device="cpu")
    block = torch.randn(2**20 + 17, generator=torch.Generator().manual_seed(seed)) * std
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            flat = param.view(-1)
            reps = -(-flat.numel() // block.numel()) + 1
            start = (i * 7919) % block.numel()
            flat.copy_(block.repeat(reps)[start:start + flat.numel()])
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    return model


def random_sd15_unet(seed: int = 0, std: float = 0.02):
    """SD v1.5's UNet with random weights (860M parameters), filled fast instead of initialised layer by layer."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    return _fill_random(unet, seed, std)


def build_sd15_shapes_pipeline(tokenizer_dir: Path, seed: int = 0, std: float = 0.02):
    """A ``StableDiffusionPipeline`` with SD v1.5's real UNet, VAE and text-encoder shapes and random weights.

    Nothing is downloaded: the benchmarks (bench/) time it, since speed and memory depend on the shapes,
    not on the weights' values. The tokenizer is the tiny model's (its vocabulary is small, but the
    text encoder's token table keeps SD v1.5's 49408 rows). Its pictures are noise.
    """
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(Path(tokenizer_dir))
    with init_empty_weights():
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            **SD15_TEXT_CONFIG, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        vae=_fill_random(vae, seed + 1, std), text_encoder=_fill_random(text_encoder, seed + 2, std),
        tokenizer=tokenizer, unet=random_sd15_unet(seed, std),
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG, skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.eval()  # as from_pretrained leaves them
    pipe.set_progress_bar_config(disable=True)
    return pipe
