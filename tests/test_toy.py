"""The toy world: scenes and their scoring, the trained toy model, its training script, the demo
and the quality benchmark."""

import copy
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import COMFY_DIR, REPO, pack_module

sys.path.append(str(REPO))  # last: the repository's nodes/ must not shadow ComfyUI's nodes module
from toy import measure, scenes  # noqa: E402
from toy import model as toy_model  # noqa: E402


def a_scene(seed=3, n_objects=2):
    return scenes.random_scene(np.random.default_rng(seed), n_objects=n_objects)


def test_scene_objects_are_where_the_scene_says():
    scene = a_scene()
    image = scene.render()
    for i, obj in enumerate(scene.objects):
        x, y = measure.centroid(image, scene, i)
        assert abs(x - obj.center[0]) < 1.5 and abs(y - obj.center[1]) < 1.5


def test_score_of_the_ideal_result_and_of_no_edit():
    scene = a_scene()
    drag = (30.0, -20.0)
    ideal = measure.score_drag(scene, 0, drag, scene.with_object_moved(0, *drag).render())
    assert ideal["error_px"] < 1.5 and abs(ideal["moved_fraction"] - 1) < 0.05
    assert ideal["outside_mae"] == 0 and ideal["psnr_to_truth"] == 100
    unmoved = measure.score_drag(scene, 0, drag, scene.render())
    assert abs(unmoved["moved_fraction"]) < 0.05 and abs(unmoved["error_px"] - np.hypot(*drag)) < 1.5
    assert ideal["overlap"] > 0.97 and ideal["object_mae"] < 0.5
    assert unmoved["overlap"] < 0.5 and unmoved["object_mae"] > 20
    # A shaded object's footprint filled with its darkest shade (a dark blob where it should be)
    # passes the nearest-colour centroid, but not object_mae.
    shaded = scenes.random_scene(np.random.default_rng(8), n_objects=3, shaded=True)
    dark = shaded.with_object_moved(0, *drag).render()
    dark[shaded.objects[0].moved(*drag).mask(shaded.size)] = shaded.objects[0].colour_range()[1]
    blob = measure.score_drag(shaded, 0, drag, dark)
    assert blob["error_px"] < 1.5 and blob["overlap"] > 0.9 and blob["object_mae"] > 20, blob
    # A change of the background away from the object is seen, and only there.
    spoiled = scene.render().copy()
    spoiled[:8] = 1 - spoiled[:8]
    assert measure.score_drag(scene, 0, drag, spoiled)["outside_mae"] > 1


def test_shaded_objects_vary_inside_and_are_still_found():
    flat = a_scene(8, n_objects=3)
    scene = scenes.random_scene(np.random.default_rng(8), n_objects=3, shaded=True)
    # Shading is drawn after the layout, so a seed gives the same objects with or without it.
    assert [o.center for o in scene.objects] == [o.center for o in flat.objects]
    image = scene.render()
    for i, obj in enumerate(scene.objects):
        inside = image[obj.mask(scene.size)]
        light, dark = obj.colour_range()
        assert 0.3 <= obj.shading <= 0.5 and inside.std(0).max() > 0.02  # no longer flat
        assert np.allclose(inside.max(0), light, atol=0.02) and (inside >= dark - 1e-6).all()
        assert (measure.labels(image, scene)[obj.mask(scene.size)] == i).mean() > 0.95
        x, y = measure.centroid(image, scene, i)
        assert abs(x - obj.center[0]) < 1.5 and abs(y - obj.center[1]) < 1.5
    # A moved object keeps its shading, which moves with it.
    moved = scene.with_object_moved(0, 20, -10)
    assert np.allclose(moved.objects[-1].colours(256)[110, 120], scene.objects[0].colours(256)[120, 100])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_batch_renderer_draws_the_numpy_renderers_pixels(device):
    from toy import batch_render

    rng = np.random.default_rng(21)
    batch = [scenes.random_scene(rng, n_objects=1 + i % 3, kinds=(scenes.KINDS[i % 3],), shaded=i % 2 == 1)
             for i in range(12)]
    batch.append(batch[1].with_object_moved(0, 17.3, -9.6))
    images = batch_render.render(batch, device)
    assert images.shape == (13, 256, 256, 3) and images.dtype == torch.float32 and images.device.type == device
    reference = np.stack([s.render() for s in batch])
    assert np.abs(images.cpu().numpy() - reference).max() < 1e-5
    with pytest.raises(ValueError, match="same size"):
        batch_render.render([batch[0], scenes.random_scene(rng, size=64)], device)


def import_script(name):
    """A repository script as a module (``toy.train``, ``bench.bench_quality``), with its change of
    ``sys.path`` undone: it puts the repository first, where its nodes/ would shadow ComfyUI's."""
    import importlib

    path = list(sys.path)
    try:
        return importlib.import_module(name)
    finally:
        sys.path[:] = path


def import_train():
    return import_script("toy.train")


def test_copy_bottleneck_hands_samples_the_bottleneck_of_others(comfy):
    """What --self-lag relies on: samples 1-2 continue from samples 3-4's bottleneck, the rest
    from their own, and only at the bottleneck."""
    copy = import_train().CopyBottleneck(1, 3, 2)
    h = torch.arange(6.0)[:, None, None, None].expand(6, 2, 1, 1)
    out, _ = copy(h, None, {"block": ("output", 0)})
    assert out[:, 0, 0, 0].tolist() == [0, 3, 4, 3, 4, 5]
    assert copy(h, None, {"block": ("output", 1)})[0] is h


def test_training_scenes_rendered_on_a_device_are_the_numpy_renderers(comfy):
    SceneSource = import_train().SceneSource
    for shaded in (False, True):
        on_numpy, on_device = SceneSource(11, shaded), SceneSource(11, shaded, torch.device("cpu"))
        for draw in (lambda s: [s.images(3, crop=128)], lambda s: [s.images(2)],
                     lambda s: s.moved_pairs(2, 128, interpolate=True), lambda s: s.moved_pairs(2)):
            expected, got = draw(on_numpy), draw(on_device)
            assert len(expected) == len(got)
            for e, g in zip(expected, got):
                assert torch.is_tensor(g) and g.shape == tuple(e.shape), (g.shape, e.shape)
                assert np.abs(g.numpy() - np.asarray(e)).max() < 1e-5


def test_scene_latent_layout():
    images = np.stack([a_scene(s).render() for s in range(4)])
    z = toy_model.scene_latent(images)
    assert z.shape == (4, 4, 32, 32)
    # A flat block has zero contrast; the colour channels follow the block's mean colour.
    flat = toy_model.scene_latent(np.full((1, 8, 8, 3), 0.5, np.float32))
    assert torch.allclose(flat[0, :3], torch.zeros(3, 1, 1)) and flat[0, 3].item() == pytest.approx(-0.8)


@pytest.fixture(scope="module")
def toy(comfy):
    with torch.inference_mode():
        return toy_model.load()


@pytest.fixture(scope="module")
def trained_kind(comfy):
    """(MODEL, VAE, CONDITIONING) of a model of the kind ``train.py`` trains (seeded random U-Net
    weights, the committed VAE): its tools (propagation states, bottleneck rescaling) are for
    those; the committed model's decoder is set by code and rides on large constants."""
    import comfy.model_management
    import comfy.model_patcher

    base = toy_model.build_unet(seed=0)
    with torch.no_grad():  # its seeded init zeroes the output layers, as SD's does: make them all count
        generator = torch.Generator().manual_seed(0)
        for p in base.diffusion_model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    base.eval()
    model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device())
    _, vae, positive = toy_model.load()
    return model, vae, positive


def test_committed_weights_were_made_by_the_training_script():
    import safetensors

    assert toy_model.WEIGHTS.endswith("toy/weights/toy-sd15.safetensors")
    size = (REPO / "toy" / "weights" / "toy-sd15.safetensors").stat().st_size
    assert size < 20e6
    with safetensors.safe_open(toy_model.WEIGHTS, "pt") as f:
        meta = f.metadata()
    # toy/set_decoder.py: the encoder trained, the decoder set by code (toy/README.md has the commands)
    assert meta["made_by"] == "toy/set_decoder.py" and meta["decoder"] == "set" and int(meta["steps"]) > 100


def test_toy_model_is_sd15_type_and_its_vae_encodes_the_scene_latent(toy, comfy):
    model, vae, cond = toy
    check = pack_module("dragnoise.model_check")
    unet = check.sd15_unet(model)
    assert unet.model_channels == 64 and len(unet.output_blocks) == 12
    assert {m.heads for m in unet.modules() if hasattr(m, "heads")} == {1}  # the set decoder's
    scene = a_scene(5)
    image = torch.from_numpy(scene.render())[None]
    with torch.inference_mode():
        latent = vae.encode(image)
        decoded = vae.decode(latent)
    expected = toy_model.scene_latent(image.numpy())
    encoded = latent * toy_model.SCALE_FACTOR  # model units, as the U-Net sees it
    assert (encoded - expected).abs().mean() < 0.1 * expected.abs().mean()
    assert (decoded - image).abs().mean() < 0.05  # mean error of the round trip: under 13 / 255
    assert cond[0][0].shape == (1, 77, 64)


def clean_env():
    return {"DRAGNOISE_COMFYUI": str(COMFY_DIR), "PATH": "/usr/bin:/bin",
            **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}}


def run_quick(script, out, timeout, *args):
    """Runs ``script`` (relative to the repository) with ``--quick --out out`` and ``args`` in a
    clean environment, as a user would; fails with its output's tail. Returns the CompletedProcess."""
    run = subprocess.run([sys.executable, str(REPO / script), "--quick", "--out", str(out), *args], env=clean_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run


def test_training_script_quick_run_writes_a_loadable_model(tmp_path, comfy):
    import safetensors
    import safetensors.torch

    from toy import probe

    out = tmp_path / "toy.safetensors"
    run = run_quick("toy/train.py", out, 600, "--moved-pairs", "0.5", "--skipless-blocks", "11", "--moved-interpolate",
                    "--shaded", "--bottleneck-rms", "4", "--align-steps", "2", "--align-path-steps", "2", "--heads", "1",
                    "--moved-lag", "100", "--self-lag", "1", "--chain-steps", "2", "--chain-dragged", "1")
    assert "unet step 4/4" in run.stdout and "moved pairs" in run.stdout and "bottleneck rescaled" in run.stdout
    assert "propagation step 2/2" in run.stdout and "1 drags optimized by the pack" in run.stdout
    assert "DragNoise step 1/80" in run.stdout + run.stderr  # the pack's own optimizer ran in the loop
    assert "lagged own" in run.stdout
    alignment = re.search(r"drag alignment step 2/2: diffusion loss ([-\d.e]+), cosine ([-\d.e]+)", run.stdout)
    assert alignment and all(np.isfinite(float(v)) for v in alignment.groups()), run.stdout[-2000:]
    with torch.inference_mode():
        model, vae, _ = toy_model.load(str(out))
    assert model.model.diffusion_model.model_channels == 32
    assert {m.heads for m in model.model.diffusion_model.modules() if hasattr(m, "heads")} == {1}
    with safetensors.safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["moved_pairs"] == "0.5" and meta["skipless_blocks"] == "11" and meta["moved_interpolate"] == "True"
    assert meta["shaded"] == "True" and meta["bottleneck_rms"] == "4.0" and float(meta["trained_bottleneck_rms"]) > 0
    assert meta["align_steps"] == "2" and meta["align_path_steps"] == "2" and meta["attention_heads"] == "1"
    assert meta["moved_lag"] == "100" and meta["self_lag"] == "1" and meta["chain_steps"] == "2"
    assert meta["chain_dragged"] == "1.0"
    assert toy_model.trained_on_shaded(str(out))  # so the demo and the benchmark drag shaded scenes on it
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    assert not toy_model.trained_on_shaded(str(tmp_path / "bare.safetensors"))
    rescaled = re.search(r"bottleneck rescaled from an RMS of [\d.]+ to ([\d.]+)", run.stdout)
    assert rescaled and float(rescaled.group(1)) == pytest.approx(4.0, rel=0.01)
    with torch.inference_mode():  # the 2 drag-alignment steps after the rescale move it a little
        assert probe.bottleneck_rms(model.model.diffusion_model, shaded=True) == pytest.approx(4.0, rel=0.1)
    assert np.isfinite(float(meta["bottleneck_share"]))

    # Continuing a rescaled model trains it at its trained scale (Adam's steps break the rescaled one).
    more = tmp_path / "more.safetensors"
    run = run_quick("toy/train.py", more, 600, "--init", str(out), "--skipless-blocks", "11", "--shaded", "--device", "cpu",
                    "--full-batch", "2", "--unet-lr", "3e-4")
    assert "bottleneck rescaling undone" in run.stdout and "unet step 4/4 (32x32)" in run.stdout, run.stdout[-2000:]
    continued = toy_model.metadata(str(more))
    assert continued["bottleneck_rms"] == "0.0" and continued["unet_lr"] == "0.0003" and continued["full_batch"] == "2"
    assert continued["attention_heads"] == "1"  # an --init keeps the heads it was trained with
    trained = float(meta["trained_bottleneck_rms"])
    # Not rescaled back, its RMS would start at 4.
    assert abs(np.log(float(continued["trained_bottleneck_rms"]) / trained)) < abs(np.log(4.0 / trained)) / 2

    # A run that keeps the rescaling (no U-Net steps, as the drag-alignment fine-tunes) records it,
    # so that continuing its output can undo it in turn.
    kept = tmp_path / "kept.safetensors"
    run = run_quick("toy/train.py", kept, 600, "--init", str(out), "--vae-steps", "0", "--unet-steps", "0",
                    "--full-steps", "0", "--skipless-blocks", "11", "--shaded", "--device", "cpu")
    assert "unet step" not in run.stdout and "undone" not in run.stdout, run.stdout[-2000:]
    kept_meta = toy_model.metadata(str(kept))
    assert kept_meta["bottleneck_rms"] == "4.0" and float(kept_meta["trained_bottleneck_rms"]) == trained


def test_training_script_trains_a_smaller_world(tmp_path, comfy):
    """--image-size: scenes of that size, whole latents, recorded so the benchmark drags scenes of it."""
    bench_quality = import_script("bench.bench_quality")
    out = tmp_path / "small.safetensors"
    run = run_quick("toy/train.py", out, 600, "--image-size", "64", "--heads", "1", "--skipless-blocks", "11")
    assert "unet step 1/4 (8x8)" in run.stdout and "unet step 4/4 (8x8)" in run.stdout, run.stdout[-2000:]
    assert toy_model.image_size(str(out)) == 64 and toy_model.image_size() == 256
    with torch.inference_mode():
        model, vae, _ = toy_model.load(str(out))
        latent = vae.encode(torch.zeros([1, 64, 64, 3]))
    assert latent.shape == (1, 4, 8, 8)
    cases = bench_quality.make_cases(4, seed=3, size=64)
    assert all(c.scene.size == 64 and 6 <= np.hypot(*c.drag) <= 16 for c in cases)
    assert cases[1].mask.shape == (64, 64) and cases[0].mask is None
    bad = subprocess.run([sys.executable, str(REPO / "toy/train.py"), "--quick", "--image-size", "100", "--out",
                          str(tmp_path / "no.safetensors")], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--image-size must be a multiple of 64" in bad.stderr
    more = tmp_path / "more.safetensors"  # continuing it stays in its world
    run = run_quick("toy/train.py", more, 600, "--init", str(out), "--vae-steps", "0", "--skipless-blocks", "11")
    assert "unet step 4/4 (8x8)" in run.stdout and toy_model.image_size(str(more)) == 64, run.stdout[-2000:]


def test_pointwise_top_reads_z_t_one_pixel_at_a_time(tmp_path, comfy):
    """--pointwise-top: with the bottleneck held fixed, a pixel's noise prediction depends on z_t
    at that pixel and (through the group norms' statistics) next to nothing elsewhere; recorded,
    and kept by a run that continues the model."""
    out = tmp_path / "pointwise.safetensors"
    run_quick("toy/train.py", out, 600, "--image-size", "64", "--heads", "1", "--skipless-blocks", "11", "--pointwise-top")
    more = tmp_path / "more.safetensors"
    run_quick("toy/train.py", more, 600, "--init", str(out), "--vae-steps", "0", "--skipless-blocks", "11")
    plain = tmp_path / "plain.safetensors"
    run_quick("toy/train.py", plain, 600, "--image-size", "64", "--heads", "1", "--skipless-blocks", "11")
    for path, pointwise in ((out, True), (more, True), (plain, False)):
        assert toy_model.metadata(str(path))["pointwise_top"] == str(pointwise)
        model, _, _ = toy_model.load(str(path))
        unet = model.model.diffusion_model
        # A 32x32 latent, so that the group norms' statistics weigh each other pixel by about 1/1000.
        zt = torch.randn(1, 4, 32, 32, requires_grad=True)

        def fixed_bottleneck(h, hsp, transformer_options):
            if transformer_options.get("block") == ("output", 0):
                h = torch.randn(h.shape, generator=torch.Generator().manual_seed(0))
            return h, hsp

        options = {"patches": {"output_block_patch": [fixed_bottleneck]}}
        with pack_module("dragnoise.features").backward_safe(unet, "norm inputs"):
            eps = unet(zt, timesteps=torch.tensor([681.0]), context=toy_model.default_conditioning(),
                       transformer_options=options)
            (grad,) = torch.autograd.grad(eps[0, :, 16, 16].sum(), zt)
        own = grad[0, :, 16, 16].abs().sum()
        neighbours = grad[0, :, 15:18, 15:18].abs().sum() - own
        assert own > 0
        assert (neighbours < 0.05 * own) == pointwise, (path, own, neighbours)


def test_propagation_states_are_the_packs_inversion_and_propagation(trained_kind, comfy):
    """What --chain-steps trains on must be what a drag visits: on the bare U-Net,
    train.propagation_states gives the pack's DDIM inversion, edit-step bottleneck and propagated
    output (the truly moved scene's bottleneck substituted down to the halt step)."""
    import dataclasses

    from toy import probe
    from toy.train import propagation_states

    model, vae, positive = trained_kind
    dragnoise = pack_module("dragnoise")
    scene, index, moved = scenes.moved_pair(np.random.default_rng(5), toy_model.IMAGE_SIZE)
    za, zb = (toy_model.scene_latent(s.render()[None]) for s in (scene, moved))
    with torch.inference_mode():
        a, b = (dragnoise.inversion.ddim_invert(model, z / toy_model.SCALE_FACTOR, positive, 50, 0.7)[1] for z in (za, zb))
    truth = probe._encoder_state(dragnoise, model, b).bottleneck.float().cpu()
    edit = dataclasses.replace(probe._still_edit(dragnoise, model, a, scene, index), bottleneck=truth)
    with torch.inference_mode():
        output = dragnoise.propagation.propagated_sample(model, a, edit, 10) * toy_model.SCALE_FACTOR
        (z, t, substituted, pair, bottleneck), x0 = propagation_states(
            dragnoise, model.model.diffusion_model, torch.cat([za, zb]), lambda s_a, s_b: s_b, toy_model.default_conditioning(),
            probe.alphas_cumprod())
    assert (z[:1] - a.noisy_latent).abs().max() < 1e-3 * a.noisy_latent.abs().max()
    assert (bottleneck - truth).abs().max() < 1e-3 * truth.abs().max()
    assert (x0 - output).abs().max() < 1e-3 * output.abs().max()
    assert t.tolist() == a.timesteps[a.edit_step:] and int(t[0]) == a.timestep
    assert substituted.tolist() == [True] * 25 + [False] * 10 and pair.tolist() == [0] * 35
    # A's own bottleneck instead: another output (the test above is not blind to the bottleneck).
    with torch.inference_mode():
        _, own = propagation_states(dragnoise, model.model.diffusion_model, torch.cat([za, zb]), lambda s_a, s_b: s_a,
                                    toy_model.default_conditioning(), probe.alphas_cumprod())
    assert (own - x0).abs().max() > 0


def test_moved_pair_moves_one_object_and_keeps_the_rest():
    scene, index, moved = scenes.moved_pair(np.random.default_rng(4))
    assert len(moved.objects) == len(scene.objects)
    start, end = scene.objects[index], moved.objects[-1]  # the moved object is drawn last
    assert (start.kind, start.colour, start.radius) == (end.kind, end.colour, end.radius)
    assert start.center != end.center
    assert end.radius <= min(end.center) and max(end.center) <= scene.size - end.radius
    assert [o for i, o in enumerate(scene.objects) if i != index] == moved.objects[:-1]


def test_moved_part_way_puts_the_object_between_its_start_and_end():
    scene, index, moved = scenes.moved_pair(np.random.default_rng(6))
    start, end = np.array(scene.objects[index].center), np.array(moved.objects[-1].center)
    for share in (0.0, 0.3, 1.0):
        partial = scenes.moved_part_way(scene, index, moved, share)
        measured = measure.centroid(partial.render(), partial, len(partial.objects) - 1)
        assert np.hypot(*(np.array(measured) - (start + share * (end - start)))) < 1.5, (share, measured)
    assert np.array_equal(scenes.moved_part_way(scene, index, moved, 1.0).render(), moved.render())


def test_swap_bottleneck_changes_only_the_receiving_samples(toy):
    from toy import probe

    unet = toy[0].model.diffusion_model
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    run = lambda k, mix=None: unet(z, timesteps=torch.full((2,), 681.0), context=toy_model.default_conditioning().expand(2, -1, -1),
                                   transformer_options={"patches": {"output_block_patch": [probe.SwapBottleneck(k, mix)]}})
    with torch.inference_mode():
        plain, swapped = run(0), run(1)
        none, half, whole = (run(1, torch.tensor([m])) for m in (0.0, 0.5, 1.0))
    assert torch.equal(plain[1], swapped[1])
    assert (plain[0] - swapped[0]).abs().mean() > 1e-4
    # A mix moves the receiving sample's bottleneck that share of the way.
    assert torch.allclose(none, plain, atol=1e-5) and torch.allclose(whole, swapped, atol=1e-5)
    assert min((half[0] - plain[0]).abs().mean(), (half[0] - swapped[0]).abs().mean()) > 1e-5


def test_noisy_bottleneck_perturbs_every_sample_by_its_own_scale():
    from toy import probe

    h = torch.stack([torch.full((3, 4, 4), 1.0), torch.full((3, 4, 4), 100.0)])
    torch.manual_seed(0)
    same, _ = probe.NoisyBottleneck(0.0)(h, None, {"block": ("output", 0)})
    later, _ = probe.NoisyBottleneck(0.5)(h, None, {"block": ("output", 1)})
    noisy, _ = probe.NoisyBottleneck(0.5)(h, None, {"block": ("output", 0)})
    assert torch.equal(same, h) and torch.equal(later, h)
    spread = (noisy - h).std(dim=(1, 2, 3))
    assert 0.3 < spread[0] < 0.7 and 30 < spread[1] < 70, spread


def test_bottleneck_scale_keeps_the_bottlenecks_mean_square():
    from toy import probe

    h = torch.stack([torch.full((3, 4, 4), 2.0), torch.full((3, 4, 4), -3.0)])
    scale = probe.BottleneckScale()
    scale(h * 10, None, {"block": ("output", 1)})  # a later block's input is not the bottleneck
    assert scale.mean_square is None
    out, _ = scale(h, None, {"block": ("output", 0)})
    assert out is h and torch.allclose(scale.mean_square, torch.tensor([4.0, 9.0]))


def test_rescaling_the_bottleneck_changes_nothing_else(trained_kind):
    from toy import probe

    with torch.inference_mode():
        unet = copy.deepcopy(trained_kind[0].model.diffusion_model)
        z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
        run = lambda: unet(z, timesteps=torch.tensor([681.0, 200.0]), context=toy_model.default_conditioning().expand(2, -1, -1))
        before, rms = run(), probe.bottleneck_rms(unet)
        toy_model.rescale_bottleneck(unet, 0.1)
        after = run()
        assert probe.bottleneck_rms(unet) == pytest.approx(0.1 * rms, rel=1e-4)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()


@pytest.fixture(scope="module")
def demo_report(server, tmp_path_factory):
    from toy import demo

    out = tmp_path_factory.mktemp("demo")
    return out, demo.run(server, out)


def test_demo_writes_its_pictures_and_report(demo_report):
    out, report = demo_report
    for name in ("source.png", "edited.png", "drag.png", "demo.png", "preview.png", "report.json", "report.txt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert 1 <= report["steps_used"] <= 80 and np.isfinite(report["final_distance_px"])
    assert report["object_end"] is not None and np.isfinite(report["object_error_px"])
    # The image away from the dragged object stayed as it was (mean change under 8 / 255).
    assert report["change_outside_mae"] < 8, report


def test_demo_moves_the_object_most_of_the_way(demo_report):
    from toy import demo

    _, report = demo_report
    assert report["moved_fraction"] > 0.6, report
    assert report["object_error_px"] < 0.4 * np.hypot(*demo.DEMO_DRAG), report
    # ... as the object, not a blob of a nearby colour (toy/measure.py's overlap and object_mae).
    assert report["object_overlap"] > 0.5 and report["object_mae"] < 20, report


def test_quality_benchmark_quick_mode_computes_its_numbers(tmp_path, comfy):
    out = tmp_path / "quality.json"
    run_quick("bench/bench_quality.py", out, 900)
    result = json.loads(out.read_text())
    assert len(result["cases"]) == 2 and [c["masked"] for c in result["cases"]] == [False, True]
    for case in result["cases"]:
        for method in ("dragnoise", "baseline", "reconstruction"):
            scores = case[method]
            assert np.isfinite(scores["error_px"]) and np.isfinite(scores["psnr_to_truth"])
            assert scores["outside_mae"] >= 0
            assert 0 <= scores["overlap"] <= 1 and scores["object_mae"] >= 0
        for method in ("dragnoise", "baseline"):
            assert 1 <= case[method]["steps"] <= 3 and case[method]["optimize_s"] > 0
    assert "| dragnoise (mask) |" in result["table"] and "| baseline (no mask) |" in result["table"]
