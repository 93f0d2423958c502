"""DDIM Invert: schedule, reference convention, exact hand-off to stock samplers, round trip."""

import pytest
import torch

import reference_ddim
from helpers import (assert_unchanged, progress_hook, progress_until_interrupted, smooth_latent, snapshot,
                     stock_continue)

STEPS_AND_STRENGTHS = [(50, 0.7), (50, 1.0), (20, 0.5), (25, 0.8), (30, 0.7), (10, 0.3), (100, 0.55)]


def invert(node, model, latent, cond, steps=50, strength=0.7):
    return node("DragNoiseDDIMInvert", model=model, latent={"samples": latent}, positive=cond,
                steps=steps, inversion_strength=strength)


@pytest.mark.parametrize("steps,strength", STEPS_AND_STRENGTHS)
def test_edit_timestep_is_comfyui_ddim_uniform_at_start_step(comfy, node, tiny_model, cond, steps, strength):
    import comfy.samplers

    _, inversion = invert(node, tiny_model, smooth_latent(0), cond, steps, strength)
    start = steps - round(strength * steps)
    assert inversion.edit_step == start
    # ComfyUI's own KSampler object, as the stock nodes build it: on the ModelPatcher in newer
    # ComfyUI, on its BaseModel in older ones (comfy.sample.sample).
    try:
        sampler = comfy.samplers.KSampler(tiny_model, steps=steps, device="cpu", sampler="ddim", scheduler="ddim_uniform")
    except AttributeError:
        sampler = comfy.samplers.KSampler(tiny_model.model, steps=steps, device="cpu", sampler="ddim",
                                          scheduler="ddim_uniform")
    stock_t = float(tiny_model.model.model_sampling.timestep(sampler.sigmas[start]))
    assert inversion.timestep == round(stock_t)
    assert torch.equal(inversion.sigmas, sampler.sigmas.cpu())
    if (steps, strength) == (50, 0.7):
        assert (inversion.edit_step, inversion.timestep) == (15, 681)


def test_inversion_matches_reference_convention(node, tiny_model, cond):
    z0_raw = smooth_latent(1)
    _, inversion = invert(node, tiny_model, z0_raw, cond)
    unet = tiny_model.model.diffusion_model
    timesteps = list(range(1, 682, 20))  # the 35 inversion steps up to 681
    expected = reference_ddim.invert(unet, z0_raw * 0.18215, cond[0][0], timesteps)
    err = (inversion.noisy_latent.double() - expected).abs().max() / expected.abs().max()
    assert err < 1e-4, err


def test_latent_scale_convention(node, tiny_model, cond):
    latent, inversion = invert(node, tiny_model, smooth_latent(2), cond)
    ab = reference_ddim.sd15_alphas_cumprod()[681]
    # samples = z_t / (0.18215 * sqrt(alpha_bar_t)), about 17.85 * z_681 (SPEC §2)
    expected = inversion.noisy_latent.double() / (0.18215 * ab.sqrt())
    assert torch.allclose(latent["samples"].double(), expected, rtol=1e-4, atol=1e-5)
    assert 17.8 < float(1 / (0.18215 * ab.sqrt())) < 17.9
    assert torch.allclose(inversion.source_latent, smooth_latent(2) * 0.18215)


@pytest.mark.parametrize("steps,strength", [(50, 0.7), (20, 0.5)])
def test_handoff_to_stock_ksampler_advanced_is_exact(node, tiny_model, cond, steps, strength):
    latent, inversion = invert(node, tiny_model, smooth_latent(3), cond, steps, strength)
    stock = stock_continue(node, tiny_model, latent, cond, steps, inversion.edit_step)
    unet = tiny_model.model.diffusion_model
    plain = reference_ddim.denoise(unet, inversion.noisy_latent, cond[0][0], inversion.timesteps[inversion.edit_step:])
    rel = (stock.double() * 0.18215 - plain).abs().max() / plain.abs().max()
    assert rel < 1e-4, rel


def test_round_trip_tiny_model_beats_renoising(node, tiny_model, cond):
    z0 = smooth_latent(4)
    latent, inversion = invert(node, tiny_model, z0, cond)
    recon = stock_continue(node, tiny_model, latent, cond, 50, inversion.edit_step)
    renoised = renoise(z0, inversion, seed=0)
    recon_renoised = stock_continue(node, tiny_model, renoised, cond, 50, inversion.edit_step)
    assert rel_error(recon, z0) < 0.2 * rel_error(recon_renoised, z0)


def renoise(z0_raw, inversion, seed):
    """The stock way into the edit step: the source latent with fresh random noise, as sampler state."""
    gen = torch.Generator().manual_seed(seed)
    sigma = inversion.edit_sigma
    return {"samples": z0_raw + torch.randn(z0_raw.shape, generator=gen) * sigma / 0.18215}


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
def test_round_trip_full_size_random_checkpoint(node, sd15, comfy):
    """Inversion + DDIM denoising at 128 px on the full-size SD1.5 architecture.

    Stated bound: the reconstruction error of the inverted latent is under 10% of the source
    latent's norm and under a fifth of the error of re-noising the source with random noise.
    """
    model, clip, _ = sd15
    (cond,) = node("CLIPTextEncode", clip=clip, text="a photograph of a cat")
    z0 = smooth_latent(5, size=16)
    latent, inversion = invert(node, model, z0, cond)
    recon = stock_continue(node, model, latent, cond, 50, inversion.edit_step)
    recon_renoised = stock_continue(node, model, renoise(z0, inversion, seed=0), cond, 50, inversion.edit_step)
    err, err_renoised = rel_error(recon, z0), rel_error(recon_renoised, z0)
    print(f"\nround trip at 128 px: inversion error {err:.4f}, re-noising error {err_renoised:.4f}")
    assert err < 0.1
    assert err < 0.2 * err_renoised


def test_input_model_not_mutated(node, tiny_model, cond):
    before = snapshot(tiny_model)
    invert(node, tiny_model, smooth_latent(6), cond)
    assert_unchanged(tiny_model, before)


def test_progress_bar_counts_every_step(node, tiny_model, cond):
    seen = []
    with progress_hook(lambda value, total: seen.append((value, total))):
        invert(node, tiny_model, smooth_latent(7), cond, 20, 0.5)
    assert seen == [(i, 10) for i in range(1, 11)]


def test_interrupt_stops_between_steps(node, tiny_model, cond):
    seen = progress_until_interrupted(3, lambda: invert(node, tiny_model, smooth_latent(8), cond))
    assert seen == [1, 2, 3]


def test_batch_inverts_each_latent_like_alone(node, tiny_model, cond):
    z = smooth_latent(9, batch=2)
    batch, _ = invert(node, tiny_model, z, cond)
    single, _ = invert(node, tiny_model, z[1:], cond)
    rel = (batch["samples"][1:] - single["samples"]).abs().max() / single["samples"].abs().max()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("build_kwargs,message", [
    ({"model_type": "V_PREDICTION"}, "not eps"),
    ({"latent_format": "SDXL"}, "not SD15"),
    ({"channel_mult": [1, 2, 4]}, "9 encoder / 9 decoder"),
])
def test_non_sd15_model_is_refused(node, tiny, cond, build_kwargs, message):
    import comfy.latent_formats
    import comfy.model_base

    if "model_type" in build_kwargs:
        build_kwargs = {"model_type": comfy.model_base.ModelType.V_PREDICTION}
    if "latent_format" in build_kwargs:
        build_kwargs = {"latent_format": comfy.latent_formats.SDXL}
    model = tiny.build_model(seed=0, **build_kwargs)
    with pytest.raises(ValueError, match=r"^model: .*SD1\.5") as err:
        invert(node, model, smooth_latent(0), cond)
    assert message in str(err.value)


@pytest.mark.parametrize("latent,steps,strength,starts", [
    (torch.zeros(1, 16, 8, 8), 50, 0.7, "latent: "),
    (torch.zeros(4, 8, 8), 50, 0.7, "latent: "),
    (torch.zeros(1, 4, 8, 8), 0, 0.7, "steps: "),
    (torch.zeros(1, 4, 8, 8), 50, 0.0, "inversion_strength: "),
    (torch.zeros(1, 4, 8, 8), 10, 0.01, "inversion_strength: "),
])
def test_bad_inputs_name_the_input(node, tiny_model, cond, latent, steps, strength, starts):
    with pytest.raises(ValueError) as err:
        invert(node, tiny_model, latent, cond, steps, strength)
    assert str(err.value).startswith(starts)


def test_empty_conditioning_is_refused(node, tiny_model):
    with pytest.raises(ValueError, match="^positive: "):
        invert(node, tiny_model, smooth_latent(0), [])
