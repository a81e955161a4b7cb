"""SLERP and the morph's keyframe loop; batched generation with fixed seeds on the tiny model."""

import numpy as np
import pytest
import torch

from common import sampling


def _pair(shape=(4, 8, 8), seed=0, same_norm=True):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    if same_norm:
        b = b * (a.norm() / b.norm())
    return a, b


def test_endpoints_are_exact():
    a, b = _pair(same_norm=False)
    assert torch.equal(sampling.slerp(a, b, 0.0), a)
    assert torch.equal(sampling.slerp(a, b, 1.0), b)
    ends = sampling.slerp(a, b, torch.tensor([0.0, 1.0]))
    assert torch.equal(ends[0], a) and torch.equal(ends[1], b)


@pytest.mark.parametrize("angle", ["random", "nearly opposite"])
def test_norm_is_preserved_for_inputs_of_equal_norm(angle):
    a, b = _pair()
    if angle == "nearly opposite":  # dot = -0.9999: still a well-defined great circle
        b = -a + 0.015 * b
        b = b * (a.norm() / b.norm())
        assert (a * b).sum() / (a.norm() * b.norm()) < -0.9995
    t = torch.linspace(0, 1, 11)
    norms = sampling.slerp(a, b, t).flatten(1).norm(dim=1)
    assert torch.allclose(norms, a.norm().expand(11), rtol=1e-4)
    # A straight line would have shrunk the middle frame: that is what SLERP is for.
    assert ((a + b) / 2).norm() < 0.9 * a.norm()


def test_middle_is_on_the_great_circle_halfway():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0])
    mid = sampling.slerp(a, b, 0.5)
    assert torch.allclose(mid, torch.tensor([0.5**0.5, 0.5**0.5, 0.0]), atol=1e-6)


def test_nearly_parallel_inputs_fall_back_to_linear():
    a, b = _pair()
    b = a + 1e-3 * b  # cosine ~ 0.9999995: the sine of the angle is too small to divide by
    t = torch.tensor([0.25, 0.5, 0.75])
    out = sampling.slerp(a, b, t)
    linear = torch.stack([(1 - x) * a + x * b for x in t])
    assert torch.isfinite(out).all()
    assert torch.allclose(out, linear, atol=1e-6)
    assert torch.isfinite(sampling.slerp(a, a.clone(), 0.5)).all()  # identical inputs too


def test_a_batch_of_t_matches_one_at_a_time():
    a, b = _pair(same_norm=False)
    t = [0.0, 0.1, 0.5, 0.9]
    batch = sampling.slerp(a, b, torch.tensor(t))
    assert batch.shape == (4, *a.shape)
    for row, x in zip(batch, t):
        assert torch.allclose(row, sampling.slerp(a, b, x), atol=1e-6)
    assert torch.allclose(sampling.slerp(a, b, t), batch)  # a plain list works as well


def test_fp16_in_fp16_out_and_close_to_fp32():
    a, b = _pair((4, 64, 64))
    out = sampling.slerp(a.half(), b.half(), torch.tensor([0.3, 0.7]))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    ref = sampling.slerp(a.half().float(), b.half().float(), torch.tensor([0.3, 0.7]))
    assert torch.allclose(out.float(), ref, atol=2e-3)
    assert torch.equal(sampling.slerp(a.half(), b.half(), 0.0), a.half())


def test_loop_latents_visit_every_keyframe_and_close_the_loop():
    keys = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    frames = sampling.loop_latents(keys, 450)
    assert frames.shape == (450, 4, 8, 8)
    for k in range(5):  # 90 frames per segment; frame 90k is keyframe k itself
        assert torch.equal(frames[90 * k], keys[k])
    # The last frame is one step before keyframe 0, so the loop does not show a frame twice.
    step = (frames[1] - frames[0]).norm()
    assert (frames[-1] - keys[0]).norm() < 1.5 * step
    assert not torch.equal(frames[-1], keys[0])
    steps = (frames.roll(-1, 0) - frames).flatten(1).norm(dim=1)  # including the wrap-around
    assert steps.max() < 2.0 * steps.min()  # even speed: no jump anywhere in the loop
    uneven = sampling.loop_latents(keys, 7)  # frame counts that do not divide evenly work too
    assert uneven.shape == (7, 4, 8, 8) and torch.equal(uneven[0], keys[0])
    # and every keyframe is still a frame: the one the morph's keyframe strip shows with that keyframe's seed (before,
    # only keyframe 0 was: the strip showed frames between two keyframes under one keyframe's seed)
    assert sampling.keyframe_frames(5, 7) == [0, 1, 2, 4, 5]
    for k, i in enumerate(sampling.keyframe_frames(5, 7)):
        assert torch.equal(uneven[i], keys[k]), k
    assert sampling.keyframe_frames(5, 450) == [0, 90, 180, 270, 360]


def test_keyframe_latents_are_the_noise_the_pipeline_draws_for_that_seed(tiny_pipe):
    sampling.use_multistep_solver(tiny_pipe)
    settings = sampling.SamplingSettings(num_inference_steps=3, guidance_scale=3.0)
    keys = sampling.keyframe_latents(tiny_pipe, [7, 8], 64, 64)
    assert keys.shape == (2, 4, 16, 16)
    by_seed, _ = sampling.generate(tiny_pipe, ["a fabric"] * 2, [7, 8], settings, progress=False)
    by_latent, _ = sampling.generate(tiny_pipe, ["a fabric"] * 2, [0, 0], settings, progress=False, latents=keys)
    for x, y in zip(by_seed, by_latent):  # same noise in, same picture out (within rounding)
        assert _max_pixel_difference(x, y) <= 1


def test_same_seed_same_image_whatever_the_batch(tiny_pipe):
    sampling.use_multistep_solver(tiny_pipe)
    prompts, seeds = ["a sks african fabric pattern", "a fabric pattern", "a sks african fabric pattern"], [1, 2, 1]
    one = sampling.generate(tiny_pipe, prompts, seeds, sampling.SamplingSettings(3, 7.5, batch_size=1),
                            progress=False)[0]
    three = sampling.generate(tiny_pipe, prompts, seeds, sampling.SamplingSettings(3, 7.5, batch_size=3),
                              progress=False)[0]
    for x, y in zip(one, three):
        assert _max_pixel_difference(x, y) <= 1
    # Rows of one batch may take different CPU kernel paths (vector tails differ with the row's place), so
    # the same seed in two rows gives the same picture within rounding, not bit for bit.
    assert _max_pixel_difference(three[0], three[2]) <= 1
    assert np.abs(np.asarray(three[0], np.int16) - np.asarray(three[1], np.int16)).mean() > 5  # another seed


def _max_pixel_difference(x, y) -> int:
    return int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max())


def test_many_frames_encode_the_prompt_once(tiny_pipe):
    calls = []
    tiny_pipe.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    settings = sampling.SamplingSettings(num_inference_steps=2, guidance_scale=7.5, batch_size=4)
    sampling.generate(tiny_pipe, ["a sks african fabric pattern"] * 10, [0] * 10, settings, progress=False)
    assert len(calls) == 2  # the prompt and the empty negative prompt, once each, for all ten images


def test_a_batch_is_decoded_one_picture_at_a_time(tiny_pipe):
    """The decoder's memory grows with its batch (about 1 GB per 512 px picture for SD v1.5 on a CPU): the
    UNet runs the whole batch, the decoder one picture at a time, and the pictures are those of a batch of 1."""
    decoded, denoised = [], []
    tiny_pipe.vae.decoder.register_forward_hook(lambda module, args, out: decoded.append(args[0].shape[0]))
    tiny_pipe.unet.register_forward_hook(lambda module, args, out: denoised.append(args[0].shape[0]))
    prompts, seeds = ["a sks african fabric pattern"] * 3, [4, 5, 6]
    three = sampling.generate(tiny_pipe, prompts, seeds, sampling.SamplingSettings(2, 7.5, batch_size=3),
                              progress=False)[0]
    assert decoded == [1, 1, 1]
    assert not tiny_pipe.vae.use_slicing  # encoding elsewhere (3b's latent cache) is left as it was
    assert set(denoised) == {6}  # three pictures, each with and without the prompt (guidance)
    one = sampling.generate(tiny_pipe, prompts, seeds, sampling.SamplingSettings(2, 7.5, batch_size=1),
                            progress=False)[0]
    for x, y in zip(one, three):
        assert _max_pixel_difference(x, y) <= 1


def test_every_step_count_the_lessons_allow_stays_within_the_noise_levels(tiny_pipe):
    """The tiny model keeps SD v1.5's scheduler config ('leading' timesteps, offset 1). With it, DPM-Solver++ at 999
    steps started from level 1000 of 0-999 (NaN pictures), and 1000 ended in an IndexError: the limit keeps below."""
    from types import SimpleNamespace

    from common import lesson

    pipe = SimpleNamespace(scheduler=tiny_pipe.scheduler)
    sampling.use_multistep_solver(pipe)
    levels = pipe.scheduler.config.num_train_timesteps
    for steps in range(1, lesson.MAX_STEPS + 1):
        pipe.scheduler.set_timesteps(steps)
        assert 0 <= int(pipe.scheduler.timesteps.min()) and int(pipe.scheduler.timesteps.max()) < levels, steps
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for t in pipe.scheduler.timesteps:  # (the last count, MAX_STEPS, run to the end on a stand-in noise estimate)
        latents = pipe.scheduler.step(0.1 * latents, t, latents).prev_sample
    assert torch.isfinite(latents).all()


def test_a_long_prompt_is_warned_about_by_the_constant_it_came_from(tiny_pipe, capsys, monkeypatch):
    """A long NEGATIVE_PROMPT was warned about as "the prompt 'blurry blurry ...'", which a student looks for
    among the prompts; 3b's INSTANCE_PROMPT and CLASS_PROMPT likewise."""
    from common import training

    monkeypatch.setattr(sampling, "_warned_prompts", set())
    sampling.encode_prompts(tiny_pipe, ["a sks african fabric pattern"], "blurry " * 80)
    training.encode_text(tiny_pipe, "a sks pattern" + " with stripes" * 40, "INSTANCE_PROMPT")
    training.encode_text(tiny_pipe, "a pattern" + " with dots" * 40)
    out = capsys.readouterr().out
    assert "Warning: NEGATIVE_PROMPT ('blurry blurry" in out and "is 80 tokens long" in out, out
    assert "Warning: INSTANCE_PROMPT ('a sks pattern with stripes" in out, out
    assert "Warning: the prompt 'a pattern with dots" in out, out  # (no constant given: as before)
