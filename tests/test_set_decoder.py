"""toy/set_decoder.py: a world of palette discs with a radius per colour, a decoder set by
construction to draw the field bottleneck and predict the noise from that drawing, and the
encoder's training and weights file."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.append(str(REPO))  # last: the repository's nodes/ must not shadow ComfyUI's nodes module
from toy import parametric  # noqa: E402
from toy import set_decoder as sd  # noqa: E402
from toy import model as toy_model  # noqa: E402


def scenes(seed, n, n_objects=None):
    rng = np.random.default_rng(seed)
    return [sd.random_scene(rng, n_objects=n_objects) for _ in range(n)]


def coverage(batch):
    """[B, 32, 32] the share of each latent pixel the scenes' discs cover."""
    masks = np.stack([np.any([o.mask(256) for o in s.objects], 0) for s in batch])
    return torch.nn.functional.avg_pool2d(torch.from_numpy(masks).float()[:, None], 8)[:, 0]


@pytest.fixture(scope="module")
def drawn(comfy):
    """A fresh set-decoder U-Net (random encoder) and its outputs of blocks 9 and 10."""
    base = sd.build_unet(seed=0)
    unet = base.diffusion_model
    worst = sd.build_decoder(unet)
    seen = {}
    for i in (9, 10):
        unet.output_blocks[i][0].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out.detach()))
    return unet, seen, worst


def run(unet, zt, t, values):
    with torch.no_grad():
        return unet(zt, timesteps=torch.full((len(zt),), float(t)), context=toy_model.default_conditioning().expand(
            len(zt), -1, -1), transformer_options={"patches": {"output_block_patch": [parametric.ParamBottleneck(values)]}})


def test_the_world_gives_each_colour_its_radius_and_the_map_its_fields():
    batch = scenes(0, 12, n_objects=3)
    for scene in batch:
        for obj in scene.objects:
            assert obj.radius == sd.RADII[sd.slot_of(obj.colour)] and obj.colour in sd.PALETTE
    values = sd.field_map(batch)
    assert values.shape == (12, sd.FIELDS, 4, 4)
    centres = (torch.arange(4) + 0.5) * sd.CELL
    for scene, cells in zip(batch, values):
        used = {sd.slot_of(o.colour) for o in scene.objects}
        for obj in scene.objects:
            k = sd.slot_of(obj.colour)
            assert (cells[2 * k] * sd.UNIT - (centres[None, :] - obj.center[0])).abs().max() < 1e-3
            assert (cells[2 * k + 1] * sd.UNIT - (centres[:, None] - obj.center[1])).abs().max() < 1e-3
        for k in set(range(sd.SLOTS)) - used:
            assert torch.all(cells[2 * k:2 * k + 2] == sd.REACH)


def test_the_decoder_reads_each_field_rigidly(drawn):
    """Blocks 0-1 read each u (v) field by its mean over the cells, and block 8 lays out that mean
    plus the exact x (y) ramp of its pixels: a true map comes out as the true fields at every
    latent pixel, to the border; an absent colour's disc lies far off the image; and an uneven
    change of the cells moves the read field by the change's mean, the same everywhere."""
    unet, _, _ = drawn
    seen = {}
    hooks = [unet.output_blocks[i][j].register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, out.detach().clone())) for i, j in ((1, 0), (8, -1))]
    batch = scenes(5, 6, n_objects=1)
    z0 = toy_model.scene_latent(np.stack([s.render() for s in batch]))
    values = sd.field_map(batch)
    try:
        run(unet, z0, 300, values)
        means, feature = seen[1][:, :sd.FIELDS + 3], seen[8][:, 0:4 * sd.FIELDS:4]
        change = torch.randn(values.shape, generator=torch.Generator().manual_seed(0)) * 0.1
        run(unet, z0, 300, values + change)
        moved = seen[1][:, :2 * sd.SLOTS]
    finally:
        for hook in hooks:
            hook.remove()
    ramp = sd.RAMP_CELLS.float()
    assert (means[:, sd.FIELDS + 1] - ramp[None, None, :]).abs().max() < 1e-5
    assert (means[:, sd.FIELDS + 2] - ramp[None, :, None]).abs().max() < 1e-5
    pixels = (torch.arange(32) + 0.5) * 8
    for scene, cells, read, fields in zip(batch, values, means, feature):
        k = sd.slot_of(scene.objects[0].colour)
        assert (read[2 * k:2 * k + 2] - cells[2 * k:2 * k + 2].mean((1, 2))[:, None, None]).abs().max() * sd.UNIT < 0.3
        assert (read[2 * sd.SLOTS:sd.FIELDS] - cells[2 * sd.SLOTS:]).abs().max() < 1e-4  # the background
        # the supervision feature holds u = (x - cx) / 256 at every latent pixel, the border's too
        cx, cy = scene.objects[0].center
        assert ((fields[2 * k] - (pixels[None, :] - cx) / sd.UNIT).abs().max() * sd.UNIT) < 0.5
        assert ((fields[2 * k + 1] - (pixels[:, None] - cy) / sd.UNIT).abs().max() * sd.UNIT) < 0.5
        for absent in set(range(sd.SLOTS)) - {k}:  # its disc's centre 384 px off, and no tilt
            assert (read[2 * absent] - sd.REACH).abs().max() * sd.UNIT < 3
            assert (read[2 * absent:2 * absent + 2].amax((1, 2)) - read[2 * absent:2 * absent + 2].amin(
                (1, 2))).max() * sd.UNIT < 0.2
    shift = (moved - means[:, :2 * sd.SLOTS]) - change[:, :2 * sd.SLOTS].mean((2, 3), keepdim=True)
    assert shift.abs().max() * sd.UNIT < 0.5 and change[:, :2 * sd.SLOTS].std() * sd.UNIT > 20


def test_the_decoder_draws_the_discs_and_colours_its_fields_say(drawn):
    unet, seen, _ = drawn
    batch = scenes(1, 6)
    z0 = toy_model.scene_latent(np.stack([s.render() for s in batch]))
    run(unet, z0, 500, sd.field_map(batch))
    covered = (seen[9][:, 0] + seen[9][:, 12]) / 2  # block 9's groups hold C + bg / s and C - bg / s
    truth = coverage(batch)
    inner = (slice(None), slice(5, 27), slice(5, 27))
    assert (covered - truth)[inner].abs().mean() < 0.04
    assert (covered[truth == 0]).abs().mean() < 0.05
    x0 = seen[10][:, 0:16:4]  # block 10's groups [x0_c, -x0_c, A, -A]: x0 up to a constant per channel
    centred = lambda v: v[inner[:1] + (slice(None),) + inner[1:]] - v[inner[:1] + (slice(None),) + inner[1:]].mean(
        (2, 3), keepdim=True)
    colour_error = (centred(x0[:, :3]) - centred(z0[:, :3])).abs().mean()
    assert colour_error < 0.12
    # the drawing follows the map: the same map drawn with a disc moved puts its colour there
    moved = [s.with_object_moved(0, 24.0, -16.0) for s in batch]
    run(unet, z0, 500, sd.field_map(moved))
    assert ((seen[9][:, 0] + seen[9][:, 12]) / 2 - coverage(moved))[inner].abs().mean() < 0.04


def test_the_decoder_predicts_the_noise_of_a_wiener_estimate(drawn):
    """Block 11 and the head: eps = G1(t) (z - mean z) - G2(t) (x0 - mean x0), x0 block 10's drawing,
    with the timestep gains of ``gains``: its x0 estimate is best where little noise is left."""
    from toy.probe import alphas_cumprod, noised

    unet, seen, worst = drawn
    assert worst < 0.1  # the timestep gains' fit
    batch = scenes(2, 4)
    z0 = toy_model.scene_latent(np.stack([s.render() for s in batch]))
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    ab = alphas_cumprod()
    centred = lambda v: v - v.mean((2, 3), keepdim=True)
    errors = {}
    for t in (981, 681, 201, 21):
        zt = noised(z0, eps, ab[t])
        pred = run(unet, zt, t, sd.field_map(batch))
        g1, g2 = (float(g) for g in sd.gains([t]))
        drawing = seen[10][:, 0:12:4]
        expected = g1 * centred(zt[:, :3]) - g2 * centred(drawing)
        assert (pred[:, :3] - expected).abs().mean() < 0.02 * expected.abs().mean() + 1e-3, t
        x0 = (zt - (1 - ab[t]).sqrt() * pred) / ab[t].sqrt()
        errors[t] = float((x0 - z0).abs().mean())
    assert min(errors, key=errors.get) == 21 and errors[21] < 0.12 and max(errors.values()) < 0.5, errors


def test_a_true_map_moves_the_disc_through_ddim_inversion_and_sampling(drawn):
    """The decoder's half of a drag: DDIM-invert a scene to the edit step with its own true map,
    then sample with the map of the scene with one disc moved; the disc moves, the rest stays."""
    from toy import measure
    from toy.probe import alphas_cumprod

    unet, _, _ = drawn
    ab = alphas_cumprod().double()
    scene = scenes(4, 1, n_objects=2)[0]
    drag = (40.0, -24.0)
    moved = scene.with_object_moved(0, *drag)
    steps = list(range(1, 1000, 20))[:35]
    _, vae, _ = toy_model.load()

    def eps(z, t, values):
        return run(unet, z.float(), t, values).double()

    z = toy_model.scene_latent(scene.render()[None]).double()
    for i, t in enumerate(steps):  # the reference's inversion step: label t, alpha_bar of the step before
        a_src = ab[steps[i - 1]] if i else ab[0]
        e = eps(z, t, sd.field_map([scene]))
        z = ab[t].sqrt() * (z - (1 - a_src).sqrt() * e) / a_src.sqrt() + (1 - ab[t]).sqrt() * e
    scores = {}
    for name, target, shift in (("same", scene, (0.0, 0.0)), ("moved", moved, drag)):
        x = z.clone()
        down = steps[::-1]
        for i, t in enumerate(down):
            e = eps(x, t, sd.field_map([target]))
            a, a_prev = ab[t], (ab[down[i + 1]] if i + 1 < len(down) else ab[0])
            x = a_prev.sqrt() * (x - (1 - a).sqrt() * e) / a.sqrt() + (1 - a_prev).sqrt() * e
        with torch.no_grad():
            image = vae.decode((x / toy_model.SCALE_FACTOR).float())[0].numpy()
        scores[name] = measure.score_drag(scene, 0, shift, image)
    assert scores["same"]["overlap"] > 0.85 and scores["same"]["outside_mae"] < 8
    assert 0.8 < scores["moved"]["moved_fraction"] < 1.3 and scores["moved"]["overlap"] > 0.6
    assert scores["moved"]["outside_mae"] < 10


def test_the_weights_file_holds_the_encoder_and_loads_with_the_decoder_built(tmp_path, comfy):
    base = sd.build_unet(seed=3)
    unet = base.diffusion_model
    sd.build_decoder(unet)
    path = tmp_path / "set.safetensors"
    sd.save(str(path), unet, toy_model.read()[1], {"seed": 3})
    unet_state, vae_state = toy_model.read(str(path))
    assert unet_state and all(k.startswith(sd.ENCODER_PREFIXES) for k in unet_state) and vae_state
    meta = toy_model.metadata(str(path))
    assert meta["decoder"] == "set" and toy_model.scene_radii(str(path)) == sd.RADII
    assert toy_model.widths(str(path)) == sd.WIDTHS and toy_model.scene_palette(str(path)) == sd.PALETTE
    from toy import demo

    # the demo paints no mask, and substitutes to the end (FINDINGS.md); the committed model is one
    assert demo.mask_when_empty(str(path)) == demo.mask_when_empty() == "skip mask loss"
    assert demo.default_halt_step(str(path)) == demo.default_halt_step() == 0
    import safetensors.torch

    trained = tmp_path / "trained.safetensors"  # a trained model's file: the paper's settings
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(trained), metadata={"made_by": "toy/train.py"})
    assert demo.mask_when_empty(str(trained)) == "regularize whole image" and demo.default_halt_step(str(trained)) == 10
    model, _, _ = toy_model.load(str(path))
    loaded = model.model.diffusion_model
    batch = scenes(5, 2)
    z0 = toy_model.scene_latent(np.stack([s.render() for s in batch]))
    with torch.no_grad():
        kwargs = dict(timesteps=torch.full((2,), 681.0), context=toy_model.default_conditioning().expand(2, -1, -1))
        assert torch.allclose(unet(z0, **kwargs), loaded(z0, **kwargs), atol=2e-2)
    for p in loaded.output_blocks.parameters():
        assert not p.requires_grad


def test_the_encoder_training_writes_a_weights_file(tmp_path, comfy):
    out = tmp_path / "enc.safetensors"
    done = subprocess.run([sys.executable, str(REPO / "toy" / "set_decoder.py"), "--out", str(out), "--steps", "3",
                           "--batch", "2", "--threads", "1", "--inverted-share", "0.5"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "encoder step 3/3" in done.stdout
    meta = toy_model.metadata(str(out))
    assert meta["decoder"] == "set" and meta["inverted_share"] == "0.5" and meta["made_by"] == "toy/set_decoder.py"


def test_inverted_states_are_the_packs_ddim_inversion(tmp_path, comfy):
    """What --inverted-share trains the encoder on must be what a drag meets: the pack's DDIM
    inversion (its step convention) through the same U-Net, at every step to the edit step."""
    from bench import comfy_env

    dragnoise = comfy_env.start(pytorch_attention=True)
    base = sd.build_unet(seed=4)
    unet = base.diffusion_model
    sd.build_decoder(unet)
    path = tmp_path / "set.safetensors"
    sd.save(str(path), unet, toy_model.read()[1], {})
    model, vae, positive = toy_model.load(str(path))
    batch = scenes(6, 2)
    states, timesteps = sd.inverted_states(model.model.diffusion_model, batch, toy_model.default_conditioning())
    assert states.shape == (70, 4, 32, 32) and timesteps[::2].tolist() == list(range(1, 700, 20))
    for i, scene in enumerate(batch):
        latent = toy_model.scene_latent(scene.render()[None]) / toy_model.SCALE_FACTOR
        with torch.inference_mode():
            _, inversion = dragnoise.inversion.ddim_invert(model, latent, positive, 50, 0.7)
        assert inversion.timestep == 681
        assert (states[68 + i] - inversion.noisy_latent).abs().max() < 1e-2 * inversion.noisy_latent.abs().max()


def test_benchmark_cases_follow_the_worlds_objects_and_radii():
    from bench import bench_quality

    cases = bench_quality.make_cases(6, seed=3, kinds=("disc",), palette=sd.PALETTE, radii=sd.RADII, objects=1)
    assert [c.mask is not None for c in cases] == [False, True] * 3
    for case in cases:
        (obj,) = case.scene.objects
        assert obj.radius == sd.RADII[sd.slot_of(obj.colour)]
