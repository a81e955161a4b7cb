"""The pocket model's training stages in fp32 and in bf16 autocast (``--mixed-precision bf16``), side by side.

    python bench/bench_pocket_build.py                        # 5 rounds of 10 steps per stage, then the quality runs
    python bench/bench_pocket_build.py --rounds 1 --steps 2 --quality-steps 0     # does it run?

Speed: each stage of ``tools/train_pocket_model.py`` (classifier, vae, decoder, unet, carry) is run by the trainer's
own functions in two build folders, one per precision, round-robin: every round trains each a further ``--steps``
steps, resuming from its checkpoint as the trainer does, and the stage's own clock (the ``*_seconds`` it keeps for
the model card, which counts training steps, not set-up) gives the round's time. Reported: median seconds per step,
bf16/fp32.

Quality: the vae and unet stages (all but the stage total and the precision as the shipped recipe) trained from
scratch for ``--quality-steps`` steps in each precision, then scored in fp32: the autoencoder's PSNR on held-out
textiles and world pictures (``vae_fidelity``, the card's figure), the UNet's denoising loss (plain MSE) on 256
held-out world latents with fixed noise and timesteps. Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (puts the project root on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import tiny_model, training  # noqa: E402
from tools import train_pocket_model as trainer  # noqa: E402

PRECISIONS = ("fp32", "bf16")
STAGES = ("classifier", "vae", "decoder", "unet", "carry")


def stage_config(work_dir: Path, precision: str, args, **totals) -> types.SimpleNamespace:
    """The trainer's constants as shipped, in another build folder and precision, with these stage totals."""
    constants = {k: v for k, v in vars(trainer).items() if k.isupper()}
    totals = {"NUM_WORLD_IMAGES": args.num_world_images, "VAE_TEXTILES": args.vae_textiles, **totals}
    return types.SimpleNamespace(**{**constants, "WORK_DIR": str(work_dir), "MIXED_PRECISION": precision,
                                    "CHECKPOINT_EVERY": 10**9, **totals})


def run_stage(stage: str, cfg, device, parts: dict):
    """One stage up to cfg's total (resuming), returning its clock; ``parts`` holds what later stages start from."""
    if stage == "classifier":
        return trainer.train_classifier(cfg, device)["classifier_seconds"]
    if stage == "vae":
        parts["vae"], info = trainer.train_vae(cfg, device)
        return info["vae_seconds"]
    if stage == "decoder":
        return trainer.train_decoder(cfg, device, parts["vae"])[1]["decoder_seconds"]
    if stage == "unet":
        parts["unet"], parts["text_encoder"], info = trainer.train_unet(cfg, device, parts["vae"].to(device),
                                                                        parts["tokenizer"])
        return info["unet_seconds"]
    encoder = copy.deepcopy(parts["text_encoder"])  # (the carry stage trains it: each round from the unet stage's)
    return trainer.train_carry(cfg, device, encoder, parts["tokenizer"])[1]["carry_seconds"]


@torch.no_grad()
def denoising_loss(unet, text_encoder, vae, tokenizer, device, n: int = 256) -> float:
    """The UNet's plain MSE on held-out world pictures' latents, fixed noise and timesteps, in fp32."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(tiny_model.SD15_SCHEDULER_CONFIG)
    pictures, truths, _ = trainer.scene_batch(4242, 0, n, with_held_out=True)
    rng = np.random.default_rng(4242)
    captions = [trainer.fabric_world.scene_caption(*t, rng) for t in truths]
    g = torch.Generator().manual_seed(4242)
    params = training.cache_latent_distributions(vae, trainer.to_pixels(pictures), False, 64)
    latents = training.sample_latents(params, g, vae.config).to(device)
    noise = torch.randn(latents.shape, generator=g).to(device)
    timesteps = torch.randint(0, 1000, (n,), generator=g).to(device)
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    losses = [F.mse_loss(unet(scheduler.add_noise(latents[i:i + 64], noise[i:i + 64], timesteps[i:i + 64]),
                              timesteps[i:i + 64], text_encoder(ids[i:i + 64].to(device))[0]).sample,
                         noise[i:i + 64]).item() for i in range(0, n, 64)]
    return float(np.mean(losses))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per stage")
    parser.add_argument("--steps", type=int, default=10, help="steps per stage per round")
    parser.add_argument("--quality-steps", type=int, default=300,
                        help="steps of the vae and unet stages trained in each precision for the quality check "
                             "(0: none)")
    parser.add_argument("--num-world-images", type=int, default=2000, help="world pictures encoded for the UNet")
    parser.add_argument("--vae-textiles", type=int, default=40,
                        help="textiles drawn for the vae and decoder stages (shipped: 400; drawn again each round)")
    parser.add_argument("--name", default="pocket-build-cpu", help="the record's name")
    parser.add_argument("--results-dir", type=Path, default=harness.RESULTS_DIR, help="where <name>.json goes")
    args = parser.parse_args(argv)
    harness.require_counts(parser, args, "rounds", "steps", "num_world_images", "vae_textiles")
    device = torch.device("cpu")
    results, notes = {}, []

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_model.build_tokenizer(Path(tmp) / "tokenizer", trainer.VOCABULARY)
        parts = {p: {"tokenizer": tokenizer} for p in PRECISIONS}
        clocks = {p: {s: [] for s in STAGES} for p in PRECISIONS}
        for stage in STAGES:
            before = {p: 0.0 for p in PRECISIONS}
            # one untimed round first (the stages before it are trained to a few steps, once, and the UNet's latent
            # cache is encoded), then the timed ones
            for r in range(args.rounds + 1):
                for precision in PRECISIONS:
                    total = args.steps * (r + 1)
                    cfg = stage_config(Path(tmp) / precision, precision, args,
                                       CLASSIFIER_STEPS=total if stage == "classifier" else args.steps,
                                       VAE_STEPS=total if stage == "vae" else args.steps,
                                       DECODER_STEPS=total if stage == "decoder" else args.steps,
                                       UNET_STEPS=total if stage == "unet" else args.steps,
                                       CARRY_STEPS=total if stage == "carry" else args.steps)
                    seconds = run_stage(stage, cfg, device, parts[precision])
                    if r > 0:
                        clocks[precision][stage].append((seconds - before[precision]) / args.steps)
                    before[precision] = seconds
                    print(f"  {stage:<10} {precision:<5} round {r}: "
                          f"{clocks[precision][stage][-1] if r else 0:.3f} s/step")
        rows = []
        for stage in STAGES:
            fp32, bf16 = (float(np.median(clocks[p][stage])) for p in PRECISIONS)
            results[stage] = {"fp32_s_per_step": fp32, "bf16_s_per_step": bf16, "bf16_over_fp32": bf16 / fp32,
                              "fp32_times": clocks["fp32"][stage], "bf16_times": clocks["bf16"][stage]}
            rows.append([stage, fp32, bf16, bf16 / fp32])
        harness.print_table("Pocket build stages, seconds per step (median)",
                            ["stage", "fp32", "bf16", "bf16/fp32"], rows)

        if args.quality_steps:
            quality, vaes = {}, {}
            for precision in PRECISIONS:  # the autoencoder in each precision
                cfg = stage_config(Path(tmp) / f"quality-{precision}", precision, args, VAE_STEPS=args.quality_steps)
                vaes[precision] = trainer.train_vae(cfg, device)[0].cpu()
                quality[precision] = trainer.vae_fidelity(vaes[precision])
            for precision in PRECISIONS:  # the UNet in each precision, both on the fp32 autoencoder's latents
                cfg = stage_config(Path(tmp) / f"quality-{precision}", precision, args, VAE_STEPS=args.quality_steps,
                                   UNET_STEPS=args.quality_steps)
                unet, encoder, _ = trainer.train_unet(cfg, device, vaes["fp32"], tokenizer)
                quality[precision]["unet_denoising_loss"] = denoising_loss(unet, encoder, vaes["fp32"], tokenizer,
                                                                           device)
            results["quality"] = {"steps": args.quality_steps, **quality}
            keys = list(quality["fp32"])
            harness.print_table(f"After {args.quality_steps} steps from scratch, scored in fp32",
                                ["measure", "fp32", "bf16"], [[k, quality["fp32"][k], quality["bf16"][k]] for k in keys])
            notes.append("quality: each of the vae and unet stages trained once per precision from the same seed; "
                         "one run, no spread")

    path = harness.write_results("pocket-build", args.name, args.results_dir,
                                 {"rounds": args.rounds, "steps": args.steps, "quality_steps": args.quality_steps,
                                  "num_world_images": args.num_world_images,
                                  "vae_textiles": args.vae_textiles, "threads": torch.get_num_threads()},
                                 results, notes, device)
    print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
