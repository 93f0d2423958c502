"""The Point Editor's painted mask: COCO run-length text form, combination with an upstream MASK,
the node's outputs and errors, and how Bottleneck Optimize takes an empty mask."""

import json

import pytest
import torch

from conftest import pack_module


@pytest.fixture(scope="module")
def mask_mod(comfy):
    return pack_module("dragnoise.mask")


def random_layer(seed, h, w):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(h, w, generator=gen) > 0.6


def test_rle_is_coco_column_major(mask_mod):
    # 2 x 3: column-major order reads (0,0) (1,0) (0,1) (1,1) (0,2) (1,2).
    layer = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    rle = mask_mod.encode_rle(layer)
    assert rle == {"size": [2, 3], "counts": [0, 2, 1, 1, 2]}  # starts with 1s: a leading 0-run of length 0
    assert torch.equal(mask_mod.decode_rle(rle, "paint"), layer)
    assert mask_mod.encode_rle(torch.zeros(2, 3)) == {"size": [2, 3], "counts": [6]}


@pytest.mark.parametrize("seed,h,w", [(0, 48, 64), (1, 7, 5), (2, 1, 1), (3, 64, 1)])
def test_round_trip(mask_mod, seed, h, w):
    paint, erase = random_layer(seed, h, w), random_layer(seed + 100, h, w)
    text = mask_mod.encode_painted_mask(paint, erase)
    got_paint, got_erase = mask_mod.decode_painted_mask(text, w, h)
    assert torch.equal(got_paint, paint) and torch.equal(got_erase, erase)
    assert mask_mod.decode_painted_mask(mask_mod.encode_painted_mask(paint), w, h)[1] is None


def test_empty_text_is_no_painting(mask_mod):
    assert mask_mod.encode_painted_mask() == ""
    assert mask_mod.decode_painted_mask("", 8, 8) == (None, None)
    assert mask_mod.decode_painted_mask("  ", 8, 8) == (None, None)
    assert mask_mod.decode_painted_mask('{"paint": null}', 8, 8) == (None, None)


def test_combine_upstream_paint_erase(mask_mod):
    base = torch.zeros(1, 4, 4)
    base[0, :2, :] = 1
    paint = torch.zeros(4, 4, dtype=torch.bool)
    paint[3, 3] = True
    erase = torch.zeros(4, 4, dtype=torch.bool)
    erase[0, 0] = True
    before = base.clone()
    out = mask_mod.combine_mask(4, 4, base, paint, erase)
    expected = ((base[0] > 0.5) | paint) & ~erase
    assert out.shape == (1, 4, 4) and out.dtype == torch.float32
    assert torch.equal(out[0] > 0.5, expected)
    assert torch.equal(base, before)  # inputs are never mutated
    assert not mask_mod.combine_mask(4, 4).any()


@pytest.mark.parametrize("text,message", [
    ("{", "mask: not valid JSON"),
    ("[1, 2]", 'mask: expected an object with "paint" and/or "erase"'),
    ('{"paint": {"size": [2, 2], "counts": [4]}, "brush": 3}', "mask: unknown key(s) ['brush']"),
    ('{"paint": [1, 2]}', 'mask: the paint layer must be {"size": [height, width], "counts": [...]}'),
    ('{"erase": {"size": [2], "counts": [4]}}', "mask: the erase layer has size [2]"),
    ('{"paint": {"size": [2, 2], "counts": "PPYo0"}}', "compressed (string) counts"),
    ('{"paint": {"size": [2, 2], "counts": [1, -1, 4]}}', "counts must be a list of non-negative integers"),
    ('{"paint": {"size": [2, 2], "counts": [1, 2]}}', "the run lengths add up to 3 pixels, but a 2x2 layer has 4"),
    ('{"paint": {"size": [3, 2], "counts": [6]}}', "the paint layer was painted on a 2x3 image, but the image is 2x2"),
])
def test_errors_name_the_input(mask_mod, text, message):
    with pytest.raises(ValueError) as err:
        mask_mod.decode_painted_mask(text, 2, 2)
    assert str(err.value).startswith("mask: ")
    assert message in str(err.value)


def test_point_editor_outputs_mask_at_image_size(node, comfy, mask_mod):
    import folder_paths

    image = torch.rand(1, 24, 40, 3)
    paint = torch.zeros(24, 40, dtype=torch.bool)
    paint[4:12, 10:30] = True
    erase = torch.zeros(24, 40, dtype=torch.bool)
    erase[6:8, 12:14] = True
    base = torch.zeros(1, 24, 40)
    base[0, 20:, :5] = 1
    cls = comfy.NODE_CLASS_MAPPINGS["DragNoisePointEditor"]
    with torch.inference_mode():
        out = cls().points(image=image, points='[{"handle": [5, 6], "target": [30, 20]}]',
                           mask=mask_mod.encode_painted_mask(paint, erase), base_mask=base)
    points, mask = out["result"]
    assert points.handles == [(5.0, 6.0)] and (points.width, points.height) == (40, 24)
    assert mask.shape == (1, 24, 40)
    assert torch.equal(mask[0] > 0.5, ((base[0] > 0.5) | paint) & ~erase)
    # The canvas gets the image (and the upstream mask) through /view from the temp folder.
    from PIL import Image

    ref = out["ui"]["dragnoise_image"][0]
    assert ref["type"] == "temp"
    shown = Image.open(f"{folder_paths.get_temp_directory()}/{ref['filename']}")
    assert shown.size == (40, 24)
    shown_mask = Image.open(f"{folder_paths.get_temp_directory()}/{out['ui']['dragnoise_base_mask'][0]['filename']}")
    assert shown_mask.getpixel((0, 23)) == 255 and shown_mask.getpixel((39, 0)) == 0


@pytest.fixture(scope="module")
def inversion(node, tiny_model, cond):
    from helpers import smooth_latent

    return node("DragNoiseDDIMInvert", model=tiny_model, latent={"samples": smooth_latent(5)}, positive=cond,
                steps=10, inversion_strength=0.7)[1]


def test_point_editor_without_pairs_passes_on_none_and_optimize_says_so(node, tiny_model, inversion):
    points, mask = node("DragNoisePointEditor", image=torch.rand(1, 64, 64, 3), points="[]")
    assert points.handles == [] and not mask.any()
    with pytest.raises(ValueError, match=r"^points: no handle/target pairs"):
        node("DragNoiseBottleneckOptimize", model=tiny_model, inversion=inversion, points=points, max_steps=2,
             learning_rate=0.01, mask_lambda=0.1, mask_when_empty="skip mask loss", motion_radius=1,
             tracking_radius=3, mask=mask)


def test_point_editor_mask_errors(node, mask_mod):
    image = torch.rand(1, 16, 16, 3)
    pts = '[{"handle": [1, 2], "target": [3, 4]}]'
    with pytest.raises(ValueError, match=r"^mask: the paint layer was painted on a 8x8 image, but the image is 16x16"):
        node("DragNoisePointEditor", image=image, points=pts,
             mask=mask_mod.encode_painted_mask(torch.ones(8, 8, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"^base_mask: its size \[8, 16\] \(width, height\) differs"):
        node("DragNoisePointEditor", image=image, points=pts, base_mask=torch.ones(1, 16, 8))
    with pytest.raises(ValueError, match=r"^base_mask: the Point Editor edits one image"):
        node("DragNoisePointEditor", image=image, points=pts, base_mask=torch.ones(2, 16, 16))


def test_all_zero_mask_is_no_mask_in_optimize(node, tiny_model, inversion):
    """An empty painted mask must behave exactly like no mask, so mask_when_empty decides."""
    points, zeros = node("DragNoisePointEditor", image=torch.rand(1, 64, 64, 3),
                         points='[{"handle": [16, 20], "target": [40, 36]}]')
    kwargs = dict(model=tiny_model, inversion=inversion, points=points, max_steps=2, learning_rate=0.01,
                  mask_lambda=0.5, motion_radius=1, tracking_radius=3)
    skipped, _ = node("DragNoiseBottleneckOptimize", mask_when_empty="skip mask loss", mask=zeros, **kwargs)
    assert skipped.mask_losses == [0.0, 0.0]
    regularized, _ = node("DragNoiseBottleneckOptimize", mask_when_empty="regularize whole image", mask=zeros, **kwargs)
    without, _ = node("DragNoiseBottleneckOptimize", mask_when_empty="regularize whole image", **kwargs)
    assert regularized.losses == without.losses
    assert regularized.mask_losses[-1] > 0
    assert json.loads(points.to_json()) == [{"handle": [16.0, 20.0], "target": [40.0, 36.0]}]
