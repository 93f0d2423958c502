"""The DragNoise edit: Bottleneck Optimize, propagation as a sampler and as a model patch."""

import pytest
import torch

from conftest import pack_module
from helpers import assert_unchanged, progress_until_interrupted, smooth_latent, snapshot, stock_continue

SIZE = 64  # image pixels; 8x8 latent, 32x32 supervision grid


def pack(module):
    return pack_module(f"dragnoise.{module}")


@pytest.fixture(scope="module")
def image():
    gen = torch.Generator().manual_seed(0)
    return torch.rand([1, SIZE, SIZE, 3], generator=gen)


@pytest.fixture(scope="module")
def inverted(node, tiny_model, cond):
    return node("DragNoiseDDIMInvert", model=tiny_model, latent={"samples": smooth_latent(11)}, positive=cond,
                steps=50, inversion_strength=0.7)


def points(node, image, pairs):
    text = "[" + ",".join(f'{{"handle": [{hx}, {hy}], "target": [{tx}, {ty}]}}' for (hx, hy), (tx, ty) in pairs) + "]"
    return node("DragNoisePointEditor", image=image, points=text)[0]


def optimize(node, model, inversion, pts, **overrides):
    kwargs = dict(max_steps=5, learning_rate=0.01, mask_lambda=0.1, mask_when_empty="regularize whole image",
                  motion_radius=1, tracking_radius=3)
    kwargs.update(overrides)
    return node("DragNoiseBottleneckOptimize", model=model, inversion=inversion, points=pts, **kwargs)


def test_handles_on_targets_stop_at_step_0(node, tiny_model, inverted, image):
    pts = points(node, image, [((20, 20), (20, 21)), ((40, 10), (40, 10))])
    edit, preview = optimize(node, tiny_model, inverted[1], pts, max_steps=80)
    assert edit.steps_used == 0 and edit.losses == []
    assert torch.equal(edit.bottleneck, edit.original_bottleneck)
    assert edit.handles == [(20.0, 20.0), (40.0, 10.0)]
    assert preview.shape == (1, SIZE, SIZE, 3)


def test_optimization_lowers_motion_loss_and_moves_bottleneck(node, tiny_model, inverted, image):
    pts = points(node, image, [((16, 20), (44, 36))])
    edit, _ = optimize(node, tiny_model, inverted[1], pts, max_steps=12, mask_lambda=0.0, learning_rate=0.05)
    assert edit.steps_used == 12 and len(edit.trajectory) == 13
    assert edit.motion_losses[-1] < edit.motion_losses[0]
    assert not torch.equal(edit.bottleneck, edit.original_bottleneck)
    assert all(m == 0 for m in edit.mask_losses)


def test_mask_loss_is_zero_at_start_and_grows_with_the_edit(node, tiny_model, inverted, image):
    pts = points(node, image, [((16, 20), (44, 36))])
    mask = torch.zeros(SIZE, SIZE)
    mask[8:40, 8:56] = 1
    edit, _ = optimize(node, tiny_model, inverted[1], pts, mask=mask, max_steps=4, mask_lambda=0.5)
    assert edit.mask_losses[0] == 0  # first step: bottleneck still the original
    assert edit.mask_losses[-1] > 0


def test_skip_mask_loss_without_mask(node, tiny_model, inverted, image):
    pts = points(node, image, [((16, 20), (44, 36))])
    edit, _ = optimize(node, tiny_model, inverted[1], pts, max_steps=3, mask_when_empty="skip mask loss")
    assert edit.mask_losses == [0.0, 0.0, 0.0]


def test_tracking_window_is_clamped_to_the_grid(comfy):
    opt = pack("optimize")
    feature = torch.zeros(1, 3, 8, 8)
    feature[0, :, 0, 7] = 1.0  # best match in the corner
    new = opt.track_handles(feature, torch.ones(1, 3), torch.tensor([[1, 6]]), radius=3)
    assert new.tolist() == [[0, 7]]


def test_decoder_reproduces_the_full_unet(comfy, tiny_model, inverted):
    """The per-step decoder (from the cached encoder state) equals one whole U-Net pass."""
    features = pack("features")
    inversion = inverted[1]
    unet = tiny_model.model.diffusion_model
    with torch.inference_mode(False):
        enc = features.run_encoder(tiny_model, unet, inversion.noisy_latent, inversion.timestep,
                                   inversion.edit_sigma, inversion.positive[0][0]).detached_copy()
        decoder = features.Decoder(unet, 8, with_output=True)
        with torch.no_grad():
            feature, eps = decoder(enc.bottleneck, enc)
    assert torch.allclose(eps, enc.eps, atol=1e-5)
    assert feature.shape == (1, 64, 8, 8)  # up_blocks[2] of the tiny model: 2 x 32 channels at latent size


def test_only_the_bottleneck_gets_gradients(comfy, tiny_model, inverted):
    features = pack("features")
    inversion = inverted[1]
    unet = tiny_model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    assert all(p.is_inference() for p in unet.parameters())  # as ComfyUI's loaders leave them
    with torch.inference_mode(False):
        enc = features.run_encoder(tiny_model, unet, inversion.noisy_latent, inversion.timestep,
                                   inversion.edit_sigma, inversion.positive[0][0]).detached_copy()
        decoder = features.Decoder(unet, 8, with_output=True)
        s = enc.bottleneck.clone().requires_grad_(True)
        with features.autograd_weights(decoder.modules()) as modules, \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            feature, eps = decoder(s, enc)
            (feature.abs().mean() + eps.abs().mean()).backward()
            assert all(not p.requires_grad and p.grad is None for p in modules.parameters())
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert all(p.grad is None for p in unet.parameters())
    assert all(t.grad is None for t in [enc.emb, enc.context, *enc.skips])
    # The weights are back as they were: same values, inference tensors again.
    assert all(p.is_inference() for p in unet.parameters())
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_encoder_runs_once_per_edit(node, tiny_model, inverted, image):
    unet = tiny_model.model.diffusion_model
    calls = {"input": 0, "middle": 0}
    hooks = [unet.input_blocks[0][0].register_forward_hook(lambda *a: calls.__setitem__("input", calls["input"] + 1)),
             unet.middle_block[0].register_forward_hook(lambda *a: calls.__setitem__("middle", calls["middle"] + 1))]
    try:
        pts = points(node, image, [((16, 20), (44, 36))])
        edit, _ = optimize(node, tiny_model, inverted[1], pts, max_steps=6)
    finally:
        for h in hooks:
            h.remove()
    assert edit.steps_used == 6
    assert calls == {"input": 1, "middle": 1}


def test_no_node_mutates_the_input_model(node, tiny_model, inverted, image):
    before = snapshot(tiny_model)
    pts = points(node, image, [((16, 20), (44, 36))])
    edit, _ = optimize(node, tiny_model, inverted[1], pts, max_steps=2)
    assert_unchanged(tiny_model, before)
    node("DragNoiseApplyPropagation", model=tiny_model, edit=edit, halt_step=10)
    assert_unchanged(tiny_model, before)
    node("DragNoisePropagatedSampler", model=tiny_model, inversion=inverted[1], edit=edit, halt_step=10)
    assert_unchanged(tiny_model, before)


@pytest.fixture(scope="module")
def moved_edit(node, tiny_model, inverted, image):
    pts = points(node, image, [((16, 20), (44, 36))])
    edit, _ = optimize(node, tiny_model, inverted[1], pts, max_steps=3, learning_rate=0.1)
    return edit


def test_halt_at_edit_step_equals_stock_continuation_exactly(node, tiny_model, cond, inverted, moved_edit):
    latent, inversion = inverted
    (out,) = node("DragNoisePropagatedSampler", model=tiny_model, inversion=inversion, edit=moved_edit, halt_step=35)
    assert torch.equal(out["samples"], stock_continue(node, tiny_model, latent, cond, 50, 15))


def test_bottleneck_copy_reconstruction(node, tiny_model, cond, inverted, image):
    """The paper's "bottleneck copy": substituting the *unchanged* s_t until the halt step."""
    latent, inversion = inverted
    pts = points(node, image, [((20, 20), (20, 20))])
    edit, _ = optimize(node, tiny_model, inversion, pts)
    plain = stock_continue(node, tiny_model, latent, cond, 50, 15)
    (copy_out,) = node("DragNoisePropagatedSampler", model=tiny_model, inversion=inversion, edit=edit, halt_step=10)
    distance = float((copy_out["samples"] - plain).norm() / plain.norm())
    print(f"\nbottleneck-copy reconstruction vs plain (tiny random model): relative distance {distance:.4f}")
    assert 0 < distance < 1


class Probe:
    """output_block_patch recording, per model call, the sigma and whether the mid-block output
    (as the decoder sees it) is the edit's bottleneck."""

    def __init__(self, bottleneck):
        self.bottleneck, self.calls = bottleneck, []

    def __call__(self, h, hsp, transformer_options):
        if transformer_options["block"] == ("output", 0):
            self.calls.append((float(transformer_options["sigmas"][0]),
                               torch.equal(h, self.bottleneck.expand_as(h).to(h.dtype))))
        return h, hsp


def with_probe(model, probe):
    m = model.clone()
    m.set_model_output_block_patch(probe)
    return m


@pytest.mark.parametrize("halt_step,active", [(10, range(15, 40)), (0, range(15, 50)), (34, range(15, 16)), (35, range(0))])
def test_substitution_is_active_at_exactly_the_right_steps(node, tiny_model, cond, inverted, moved_edit, halt_step, active):
    latent, inversion = inverted
    (patched,) = node("DragNoiseApplyPropagation", model=tiny_model, edit=moved_edit, halt_step=halt_step)
    probe = Probe(moved_edit.bottleneck)
    stock_continue(node, with_probe(patched, probe), latent, cond, 50, 15)
    sigmas = inversion.sigmas
    assert [s for s, _ in probe.calls] == pytest.approx([float(sigmas[i]) for i in range(15, 50)], rel=1e-5)
    assert [i for i, (_, hit) in zip(range(15, 50), probe.calls) if hit] == list(active)


def test_propagated_sampler_equals_stock_sampler_on_patched_model(node, tiny_model, cond, inverted, moved_edit):
    latent, inversion = inverted
    (ours,) = node("DragNoisePropagatedSampler", model=tiny_model, inversion=inversion, edit=moved_edit, halt_step=10)
    (patched,) = node("DragNoiseApplyPropagation", model=tiny_model, edit=moved_edit, halt_step=10)
    stock = stock_continue(node, patched, latent, cond, 50, 15)
    assert torch.equal(ours["samples"], stock)
    assert not torch.equal(stock, stock_continue(node, tiny_model, latent, cond, 50, 15))


def test_substitution_covers_cond_and_uncond(node, tiny_model, cond, tiny, inverted, moved_edit):
    latent, _ = inverted
    (patched,) = node("DragNoiseApplyPropagation", model=tiny_model, edit=moved_edit, halt_step=10)
    probe = Probe(moved_edit.bottleneck)
    negative = tiny.random_conditioning(seed=1)
    (out,) = node("KSamplerAdvanced", model=with_probe(patched, probe), add_noise="disable", noise_seed=0, steps=50,
                  cfg=3.0, sampler_name="ddim", scheduler="ddim_uniform", positive=cond, negative=negative,
                  latent_image=latent, start_at_step=15, end_at_step=10000, return_with_leftover_noise="disable")
    hits = [hit for _, hit in probe.calls]
    assert len(hits) == 35 and hits == [True] * 25 + [False] * 10  # batch of cond + uncond, both substituted


def test_stacks_with_freeu(node, tiny_model, cond, inverted, moved_edit):
    latent, _ = inverted
    (freeu,) = node("FreeU", model=tiny_model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)
    (patched,) = node("DragNoiseApplyPropagation", model=freeu, edit=moved_edit, halt_step=10)
    patches = patched.model_options["transformer_options"]["patches"]["output_block_patch"]
    # Both patches kept; ours first, so FreeU works on the substituted bottleneck as on a real one.
    assert len(patches) == 2
    assert type(patches[0].__self__).__name__ == "BottleneckSubstitution"
    assert freeu.model_options["transformer_options"]["patches"]["output_block_patch"] == patches[1:]
    with_freeu = stock_continue(node, patched, latent, cond, 50, 15)
    (plain_patched,) = node("DragNoiseApplyPropagation", model=tiny_model, edit=moved_edit, halt_step=10)
    assert not torch.equal(with_freeu, stock_continue(node, plain_patched, latent, cond, 50, 15))
    assert not torch.equal(with_freeu, stock_continue(node, freeu, latent, cond, 50, 15))


def test_halt_step_out_of_range(node, tiny_model, inverted, moved_edit):
    with pytest.raises(ValueError, match=r"^halt_step: must be from 0 to 35"):
        node("DragNoiseApplyPropagation", model=tiny_model, edit=moved_edit, halt_step=36)
    with pytest.raises(ValueError, match=r"^halt_step: "):
        node("DragNoisePropagatedSampler", model=tiny_model, inversion=inverted[1], edit=moved_edit, halt_step=40)


def test_mask_of_wrong_size_is_rejected(node, tiny_model, inverted, image):
    pts = points(node, image, [((16, 20), (44, 36))])
    with pytest.raises(ValueError, match=r"^mask: its size \[32, 32\]"):
        optimize(node, tiny_model, inverted[1], pts, mask=torch.ones(1, 32, 32))


def test_points_for_another_image_size_are_rejected(node, tiny_model, inverted):
    pts = points(node, torch.rand(1, 128, 128, 3), [((16, 20), (44, 36))])
    with pytest.raises(ValueError, match=r"^points: placed on a 128x128 image"):
        optimize(node, tiny_model, inverted[1], pts)


def test_batched_inversion_is_rejected(node, tiny_model, cond, image):
    _, inversion = node("DragNoiseDDIMInvert", model=tiny_model, latent={"samples": smooth_latent(1, batch=2)},
                        positive=cond, steps=50, inversion_strength=0.7)
    with pytest.raises(ValueError, match=r"^inversion: .*holds 2"):
        optimize(node, tiny_model, inversion, points(node, image, [((16, 20), (44, 36))]))


@pytest.mark.parametrize("name,value", [("max_steps", -1), ("learning_rate", 0.0), ("motion_radius", 0),
                                        ("tracking_radius", 0), ("mask_when_empty", "sometimes")])
def test_bad_settings_name_the_input(node, tiny_model, inverted, image, name, value):
    with pytest.raises(ValueError, match=f"^{name}: "):
        optimize(node, tiny_model, inverted[1], points(node, image, [((16, 20), (44, 36))]), **{name: value})


def test_non_sd15_model_is_refused(node, tiny, inverted, image):
    import comfy.model_base

    with torch.inference_mode():
        vpred = tiny.build_model(model_type=comfy.model_base.ModelType.V_PREDICTION)
    with pytest.raises(ValueError, match="^model: "):
        optimize(node, vpred, inverted[1], points(node, image, [((16, 20), (44, 36))]))


def test_interrupt_stops_the_optimization(node, tiny_model, inverted, image):
    pts = points(node, image, [((16, 20), (44, 36))])
    seen = progress_until_interrupted(2, lambda: optimize(node, tiny_model, inverted[1], pts, max_steps=10))
    assert seen == [1, 2]


def test_preview_draws_handles_and_targets(node, tiny_model, inverted):
    black = torch.zeros(1, SIZE, SIZE, 3)
    pts = points(node, black, [((16, 20), (44, 36))])
    edit, preview = optimize(node, tiny_model, inverted[1], pts, max_steps=2)
    red, blue = preview[0, 20, 16], preview[0, 36, 44]
    assert red[0] > 0.8 and red[2] < 0.3
    assert blue[2] > 0.8 and blue[0] < 0.3
    assert preview[0, 60, 2].sum() == 0  # untouched elsewhere


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unet_keeps_fp32_bottleneck(node, tiny, inverted, image, dtype):
    with torch.inference_mode():
        model = tiny.build_model(seed=0)
        model.model.diffusion_model.to(dtype)
        model.model.model_config.unet_config["dtype"] = dtype
    edit, _ = optimize(node, model, inverted[1], points(node, image, [((16, 20), (44, 36))]), max_steps=3)
    assert edit.bottleneck.dtype == torch.float32 and edit.steps_used == 3
    assert torch.isfinite(torch.tensor(edit.losses)).all()


def test_newer_comfyui_hook_substitutes_like_the_output_block_patch(comfy, moved_edit):
    """The ``middle_block_after_patch`` route (newer ComfyUI) gates and substitutes exactly as the
    output-block route this ComfyUI uses."""
    propagation = pack("propagation")
    steps = propagation.substitution_steps(50, 15, 10)
    patch = propagation.BottleneckSubstitution(moved_edit.bottleneck, moved_edit.sigmas, steps)
    h = torch.randn(2, *moved_edit.bottleneck.shape[1:])
    for i, sigma in enumerate(moved_edit.sigmas[:-1].tolist()):
        to = {"sigmas": torch.tensor([sigma, sigma]), "block": ("output", 0)}
        via_hook = patch.middle_block_after_patch({"h": h, "transformer_options": to, "x": None})["h"]
        via_output, _ = patch.output_block_patch(h, None, to)
        assert torch.equal(via_hook, via_output)
        assert torch.equal(via_hook, moved_edit.bottleneck.expand_as(h)) == (i in steps), i
    with pytest.raises(ValueError, match="^edit: "):
        patch.substitute(torch.randn(1, 8, 2, 2), {"sigmas": moved_edit.sigmas[20:21]})
