"""toy/parametric.py: the parametric bottleneck's map, the offset field, and the training option
that teaches a toy U-Net both (train.py --parametric)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, pack_module

sys.path.append(str(REPO))  # last: the repository's nodes/ must not shadow ComfyUI's nodes module
from toy import model as toy_model  # noqa: E402
from toy import parametric, scenes  # noqa: E402
from test_toy import clean_env, import_train, run_quick  # noqa: E402


def disc_scene(seed):
    return scenes.random_scene(np.random.default_rng(seed), kinds=("disc",))


def test_param_map_holds_each_object_in_the_cell_of_its_centre():
    batch = [disc_scene(seed) for seed in range(6)]
    values = parametric.param_map(batch)
    assert values.shape == (6, parametric.CHANNELS, 4, 4)
    for scene, cells in zip(batch, values):
        assert cells[0].sum() == len(scene.objects)
        for obj in scene.objects:
            row, col = int(obj.center[1] // 64), int(obj.center[0] // 64)
            assert cells[0, row, col] == 1
            # The offsets and the radius give the object back.
            x = (col + 0.5) * 64 + parametric.UNIT * cells[1, row, col]
            y = (row + 0.5) * 64 + parametric.UNIT * cells[2, row, col]
            assert (x, y) == pytest.approx(obj.center, abs=1e-3)
            assert parametric.UNIT * cells[3, row, col] == pytest.approx(obj.radius, abs=1e-3)
            assert cells[4:7, row, col].abs().sum() > 0.5  # a saturated colour is far from grey
        assert (cells[1:7] * (1 - cells[:1])).abs().sum() == 0  # empty cells hold nothing
        # The background is the same in every cell only if it is flat: these have gradients.
        assert cells[7:10].std(dim=(1, 2)).max() > 0
    assert values[:, 10:].abs().sum() == 0


def test_param_map_of_a_moved_object_keeps_it_in_its_anchors_cell():
    rng = np.random.default_rng(0)
    scene = disc_scene(4)
    moved = parametric.displaced(scene, rng)
    changed = [i for i, (a, b) in enumerate(zip(scene.objects, moved.objects)) if a.center != b.center]
    assert len(changed) == 1 and [o.colour for o in scene.objects] == [o.colour for o in moved.objects]
    obj, there = scene.objects[changed[0]], moved.objects[changed[0]]
    values = parametric.param_map([moved], anchors=[scene])[0]
    row, col = int(obj.center[1] // 64), int(obj.center[0] // 64)
    assert values[0, row, col] == 1
    x = (col + 0.5) * 64 + parametric.UNIT * values[1, row, col]
    y = (row + 0.5) * 64 + parametric.UNIT * values[2, row, col]
    assert (x, y) == pytest.approx(there.center, abs=1e-3)
    # With a generator each object goes to a free cell next to its own, never two to one cell.
    for seed in range(5):
        jittered = parametric.param_map([scene], np.random.default_rng(seed))[0]
        assert jittered[0].sum() == len(scene.objects) and set(jittered[0].unique().tolist()) == {0.0, 1.0}


def test_offset_field_says_which_part_of_the_object_a_pixel_is():
    scene = scenes.Scene(256, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 0.0),
                         [scenes.SceneObject("disc", (100.0, 140.0), 40.0, (1.0, 0.0, 0.0))])
    field = parametric.offset_field([scene])[0]
    assert field.shape == (3, 32, 32)
    assert field[0, 140 // 8, 100 // 8] == 1 and field[0, 2, 2] == 0 and field[1:, 2, 2].abs().sum() == 0
    # Latent pixel (row 17, col 16) covers x 128-136 (centre 132): 32 px right of the centre, 0.8 radii.
    assert field[1, 17, 16] == pytest.approx(parametric.OFFSET_GAIN * 32 / 40, abs=0.01)
    assert field[2, 17, 16] == pytest.approx(parametric.OFFSET_GAIN * 0 / 40, abs=0.01)


def test_soften_blurs_presence_only_within_its_two_bands():
    values = parametric.param_map([disc_scene(seed) for seed in range(8)])
    soft = parametric.soften(values, np.random.default_rng(1))
    present = values[:, 0] == 1
    assert (soft[:, 0][present] >= 0.65).all() and (soft[:, 0][~present] <= 0.35).all()
    assert torch.equal(soft[:, 1:7][present[:, None].expand_as(soft[:, 1:7])],
                       values[:, 1:7][present[:, None].expand_as(values[:, 1:7])])
    assert torch.equal(soft[:, 7:], values[:, 7:])


def test_render_above_shows_taught_samples_another_scene_from_its_timestep_up(comfy):
    train = import_train()
    source = train.SceneSource(3, kinds=("disc",))
    goals = source.scenes(8)
    t = torch.tensor([500, 500, 500, 500, 99, 500, 500, 500])
    shown = train.shown_scenes(goals, t, moved=3, taught=6, source=source, render_above=100)
    for g, s in zip(goals[:3], shown[:3]):  # one object displaced, the rest where they were
        same = [np.allclose(a.center, b.center) for a, b in zip(g.objects, s.objects)]
        assert len(s.objects) == len(g.objects) and same.count(False) == 1
    assert shown[3] is not goals[3] and shown[5] is not goals[5]  # taught, t >= 100: another scene
    assert shown[3].render().tolist() != goals[3].render().tolist()
    assert shown[4] is goals[4] and shown[6:] == goals[6:]  # below 100, or decoding their own bottleneck
    plain = train.shown_scenes(goals, t, moved=3, taught=6, source=source)
    assert plain[3:] == goals[3:]


def test_parametric_training_writes_a_model_whose_decoder_reads_only_the_map(tmp_path, comfy):
    out = tmp_path / "parametric.safetensors"
    run = run_quick("toy/train.py", out, 600, "--parametric", "--kinds", "disc", "--heads", "1", "--skipless-blocks", "11",
                    "--pointwise-top", "--render-above", "100", "--quiet-share", "0.5", "--widths", "64,64,64,64",
                    "--map-steps", "50", "--map-min-t", "400")
    assert "parametric step 4/4" in run.stdout and "bottleneck map" in run.stdout, run.stdout[-2000:]
    # the decoder's map-alone phase ran first (--quick caps it at 2 steps)
    assert run.stdout.index("map decoder step 2/2") < run.stdout.index("parametric step 1/4"), run.stdout[-2000:]
    meta = toy_model.metadata(str(out))
    assert meta["parametric"] == "True" and meta["kinds"] == "disc" and toy_model.scene_kinds(str(out)) == ("disc",)
    assert meta["map_steps"] == "2" and meta["map_min_t"] == "400"
    assert meta["render_above"] == "100" and meta["quiet_share"] == "0.5" and toy_model.widths(str(out)) == (64,) * 4
    import safetensors.torch

    safetensors.torch.save_file({"x": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    assert toy_model.scene_kinds(str(tmp_path / "bare.safetensors")) == scenes.KINDS  # not recorded: every kind
    model, _, _ = toy_model.load(str(out))
    unet = model.model.diffusion_model
    # 64 channels at the top: its GroupNorms normalize pairs of channels.
    assert unet.out[0].num_channels == 64 and unet.out[0].num_groups == 32 and unet.middle_block[-1].out_layers[-1].out_channels == 64
    zt = torch.randn(1, 4, 32, 32)
    seen = {}

    def bottleneck_as_leaf(h, hsp, transformer_options):
        if transformer_options.get("block") == ("output", 0):
            h = seen.setdefault("h", h.detach().clone().requires_grad_(True))
        return h, hsp

    with pack_module("dragnoise.features").backward_safe(unet, "norm inputs"):
        eps = unet(zt, timesteps=torch.tensor([681.0]), context=toy_model.default_conditioning(),
                   transformer_options={"patches": {"output_block_patch": [bottleneck_as_leaf]}})
        (grad,) = torch.autograd.grad(eps.square().sum(), seen["h"])
    per_channel = grad[0].abs().sum(dim=(1, 2))
    assert per_channel[:parametric.CHANNELS].sum() > 0 and per_channel[parametric.CHANNELS:].sum() == 0
    # probe.map_pull: another scene's map moves x0 only through those reads.
    from toy import probe

    with torch.inference_mode():
        pull = probe.map_pull(unet, cases=2)
        assert pull["pull"] != 0 and pull["x0_error"] > 0 and pull["mean_error"] > 0, pull
        assert 0 < pull["layout_error"] < pull["x0_error"], pull  # the mean colour's error taken out
        drawn = probe.offset_follow(unet, shifts=(-24, 24))
        assert all(0 < x < 256 for x in drawn) and drawn[0] != drawn[1], drawn
        res = unet.output_blocks[0][0]
        for conv in (res.in_layers[2], res.skip_connection):
            conv.weight[:, :parametric.CHANNELS] = 0
        blind = probe.map_pull(unet, cases=2)
        blind_drawn = probe.offset_follow(unet, shifts=(-24, 24))
    assert abs(blind["pull"]) < 1e-5 and blind["mean_error"] == pull["mean_error"], blind
    assert abs(blind_drawn[0] - blind_drawn[1]) < 1e-3, blind_drawn  # the offset no longer reaches x0
    more = tmp_path / "more.safetensors"  # continuing it keeps its training and its world
    run = run_quick("toy/train.py", more, 600, "--init", str(out), "--vae-steps", "0", "--skipless-blocks", "11")
    assert "parametric step 4/4" in run.stdout, run.stdout[-2000:]
    assert toy_model.metadata(str(more))["parametric"] == "True" and toy_model.scene_kinds(str(more)) == ("disc",)
    assert toy_model.widths(str(more)) == (64,) * 4
    bad = subprocess.run([sys.executable, str(REPO / "toy/train.py"), "--quick", "--kinds", "disc,cube", "--out",
                          str(tmp_path / "no.safetensors")], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--kinds must be some of" in bad.stderr
    bad = subprocess.run([sys.executable, str(REPO / "toy/train.py"), "--quick", "--widths", "48,64,96,96", "--out",
                          str(tmp_path / "no.safetensors")], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--widths must be 4 multiples of the first" in bad.stderr
    bad = subprocess.run([sys.executable, str(REPO / "toy/train.py"), "--quick", "--map-steps", "5", "--out",
                          str(tmp_path / "no.safetensors")], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--map-steps trains the decoder of a parametric bottleneck" in bad.stderr
    assert "vae step" not in bad.stdout  # refused before any training
