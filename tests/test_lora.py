"""LoRA Fit: training with peft, ComfyUI-native patches, a file stock LoraLoader reads, reuse."""

import pytest
import torch

from helpers import (assert_unchanged, progress_hook, progress_until_interrupted, smooth_latent, snapshot,
                     stock_continue)


def fit(node, model, latent, cond, **overrides):
    kwargs = dict(steps=30, learning_rate=5e-3, rank=4, batch_size=2, seed=0)
    kwargs.update(overrides)
    return node("DragNoiseLoRAFit", model=model, latent={"samples": latent}, positive=cond, **kwargs)[0]


def eps_loss(model, latent, cond, seed=123, n=8):
    """eps-MSE of ``model`` on the image at fixed timesteps and noise (the fitting objective)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])  # applies this model's weight patches
    gen = torch.Generator().manual_seed(seed)
    z0 = latent * 0.18215
    ab = 1 / (1 + model.model.model_sampling.sigmas ** 2)
    t = torch.linspace(50, 950, n).long()
    noise = torch.randn([n, *z0.shape[1:]], generator=gen)
    zt = ab[t].sqrt().view(-1, 1, 1, 1) * z0 + (1 - ab[t]).sqrt().view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        eps = model.model.diffusion_model(zt, timesteps=t.float(), context=cond[0][0].expand(n, -1, -1))
    return float(torch.nn.functional.mse_loss(eps, noise))


@pytest.fixture(scope="module")
def image_latent():
    return smooth_latent(21)


@pytest.fixture(scope="module")
def fitted(node, tiny_model, cond, image_latent):
    return fit(node, tiny_model, image_latent, cond)


def test_fitting_lowers_the_loss_on_the_image(tiny_model, cond, image_latent, fitted):
    before, after = eps_loss(tiny_model, image_latent, cond), eps_loss(fitted, image_latent, cond)
    assert after < 0.9 * before, (before, after)


def test_returns_a_patched_clone_and_leaves_the_input_alone(node, tiny_model, cond, image_latent):
    before = snapshot(tiny_model)
    out = fit(node, tiny_model, image_latent, cond, steps=2)
    assert out is not tiny_model and out.model is tiny_model.model  # a ModelPatcher clone
    assert len(out.patches) == 4 * 2 * 16  # q, k, v, out of both attentions in the 16 transformer blocks
    assert all(k.startswith("diffusion_model.") and ".attn" in k for k in out.patches)
    assert_unchanged(tiny_model, before)


def test_saved_file_through_stock_lora_loader_matches(node, comfy_root, tiny_model, cond, image_latent):
    patched = fit(node, tiny_model, image_latent, cond, steps=5, save_name="match")
    path = comfy_root / "models" / "loras" / "dragnoise" / "match.safetensors"
    assert path.is_file()
    (loaded,) = node("LoraLoaderModelOnly", model=tiny_model, lora_name="dragnoise/match.safetensors", strength_model=1.0)
    a, b = eps_loss(patched, image_latent, cond), eps_loss(loaded, image_latent, cond)
    assert a == pytest.approx(b, rel=1e-6)
    assert a != pytest.approx(eps_loss(tiny_model, image_latent, cond), rel=1e-6)
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["dragnoise.rank"] == "4" and meta["dragnoise.steps"] == "5"
    assert meta["dragnoise.learning_rate"] == "0.005" and len(meta["dragnoise.image_hash"]) == 16


def count_training_steps(fn):
    seen = []
    with progress_hook(lambda value, total: seen.append(value)):
        fn()
    return len(seen)


def test_identical_second_run_reuses_the_saved_lora(node, tiny_model, cond, image_latent):
    run = lambda: fit(node, tiny_model, image_latent, cond, steps=4, save_name="reuse")
    assert count_training_steps(run) == 4
    first = run()
    assert count_training_steps(run) == 0
    second = run()
    assert eps_loss(first, image_latent, cond) == eps_loss(second, image_latent, cond)


def test_refuses_to_overwrite_a_different_lora(node, comfy_root, tiny_model, cond, image_latent):
    fit(node, tiny_model, image_latent, cond, steps=2, save_name="keep")
    path = comfy_root / "models" / "loras" / "dragnoise" / "keep.safetensors"
    stamp = path.stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"^save_name: .*already holds a different LoRA \(steps=2"):
        fit(node, tiny_model, image_latent, cond, steps=3, save_name="keep")
    with pytest.raises(ValueError, match=r"^save_name: "):
        fit(node, tiny_model, smooth_latent(99), cond, steps=2, save_name="keep")  # another image
    assert path.stat().st_mtime_ns == stamp


def test_lora_improves_reconstruction(node, tiny_model, cond):
    z0 = smooth_latent(31)

    def reconstruction_error(model):
        latent, inversion = node("DragNoiseDDIMInvert", model=model, latent={"samples": z0}, positive=cond,
                                 steps=50, inversion_strength=0.7)
        recon = stock_continue(node, model, latent, cond, 50, inversion.edit_step)
        return float((recon - z0).norm() / z0.norm())

    base = reconstruction_error(tiny_model)
    with_lora = reconstruction_error(fit(node, tiny_model, z0, cond, steps=60, learning_rate=2e-3))
    print(f"\nreconstruction error, tiny model: {base:.4f} without LoRA, {with_lora:.4f} with")
    assert with_lora < base


@pytest.mark.parametrize("overrides,starts", [
    ({"steps": 0}, "steps: "), ({"rank": 0}, "rank: "), ({"batch_size": 0}, "batch_size: "),
    ({"learning_rate": 0.0}, "learning_rate: "), ({"save_name": "../evil"}, "save_name: "),
])
def test_bad_settings_name_the_input(node, tiny_model, cond, image_latent, overrides, starts):
    with pytest.raises(ValueError) as err:
        fit(node, tiny_model, image_latent, cond, **overrides)
    assert str(err.value).startswith(starts)


def test_image_too_small_and_wrong_model(node, tiny, tiny_model, cond):
    import comfy.model_base

    with pytest.raises(ValueError, match=r"^latent: the image is 32x32 px"):
        fit(node, tiny_model, smooth_latent(0, size=4), cond)
    with torch.inference_mode():
        vpred = tiny.build_model(model_type=comfy.model_base.ModelType.V_PREDICTION)
    with pytest.raises(ValueError, match=r"^model: "):
        fit(node, vpred, smooth_latent(0), cond)


def test_interrupt_stops_training(node, tiny_model, cond, image_latent):
    seen = progress_until_interrupted(2, lambda: fit(node, tiny_model, image_latent, cond, steps=10))
    assert seen == [1, 2]
