"""A parametric bottleneck: the toy U-Net taught to hold each object as a few numbers.

Every model of toy/FINDINGS.md let Bottleneck Optimize move the handle's patch of the supervision
feature without the object: its bottleneck had room to paint a patch. SD1.5 avoids that through
what its bottleneck and features have learned at scale: an object is one thing in them, and its
features say which part of it a pixel is. This module teaches the toy the same two properties
directly, as extra training targets (``train.py --parametric``):

- the **bottleneck** (mid-block output, [B, 96, G, G], G = image size / 64) holds, in its first
  ``CHANNELS`` channels, each object in one cell: presence, its centre's offset from the cell's
  centre, its radius and its colour, and every cell's background colour (``param_map``); the
  decoder reads nothing else of it (``hold_bottleneck_reads``). Trained also on objects held by a
  cell other than their own (``param_map`` given a generator), the decoder draws an object
  wherever the offset says, so a drag moves it by changing two numbers;
- the **supervision feature** (output block 8, [B, 64, h, w] at the latent's size) gives, in its
  first 3 channels, each pixel's coverage by an object and its offset from that object's centre
  in radii (``offset_field``): the motion loss and the point tracking then see which part of the
  object a patch is.
"""

import numpy as np
import torch

from toy import model as toy_model

CHANNELS = 12  # a multiple of the decoder's GroupNorm group (192 inputs / 32 groups = 6)
UNIT = 128.0  # pixels per unit of offset and radius: Adam's lr 0.01 then moves an object ~1.3 px a step
CELL = 64  # pixels per bottleneck cell (the SD1.5 layout downsamples the latent 8x, the image 64x)
OFFSET_GAIN = 3.0  # the offset channels' scale against the feature's other channels
FEATURE_BLOCK = 8  # output_blocks[8] = diffusers up_blocks[2]: the pack's supervision feature


def param_map(scenes, rng=None, anchors=None):
    """The bottleneck's first ``CHANNELS`` channels for ``scenes``.

    Channel 0 presence, 1-2 the centre's (x, y) offset from the holding cell's centre and 3 the
    radius (both in ``UNIT`` pixels), 4-6 the object's colour and 7-9 the cell's mean background
    colour (model units, ``model.scene_latent``'s colour axes), 10-11 zero. An object is held by
    the cell its centre lies in, or, given ``rng``, by a random free cell within one of it (the
    decoder learns to draw objects away from their cell: a drag's offsets). Given ``anchors``
    (scenes with the same objects in the same order, some elsewhere), each object is held by the
    cell its anchor's centre lies in (or near it): how a drag holds an object it has moved.

    Args:
        scenes: ``toy.scenes.Scene`` list, all of one size (a multiple of 64).
    Returns:
        [B, CHANNELS, G, G] float32, G = size / 64.
    """
    if not scenes:
        return torch.zeros(0, CHANNELS, 1, 1)
    size = scenes[0].size
    grid = size // CELL
    out = np.zeros((len(scenes), CHANNELS, grid, grid), np.float32)
    backgrounds = [type(s)(s.size, s.background, []) for s in scenes]
    bg = torch.nn.functional.avg_pool2d(toy_model.scene_latent(np.stack([b.render() for b in backgrounds]))[:, :3],
                                        CELL // 8).numpy()
    out[:, 7:10] = bg
    colours = _latent_colours([o.colour for s in scenes for o in s.objects])
    k = 0
    for b, scene in enumerate(scenes):
        taken = set()
        for i, obj in enumerate(scene.objects):
            cx, cy = obj.center
            ax, ay = anchors[b].objects[i].center if anchors else obj.center
            own = (int(np.clip(ay // CELL, 0, grid - 1)), int(np.clip(ax // CELL, 0, grid - 1)))
            row, col = _holder(own, taken, grid, rng)
            taken.add((row, col))
            out[b, 0, row, col] = 1
            out[b, 1, row, col] = (cx - (col + 0.5) * CELL) / UNIT
            out[b, 2, row, col] = (cy - (row + 0.5) * CELL) / UNIT
            out[b, 3, row, col] = obj.radius / UNIT
            out[b, 4:7, row, col] = colours[k]
            k += 1
    return torch.from_numpy(out)


def displaced(scene, rng, max_shift=1 / 3):
    """``scene`` with one random object moved by up to ``max_shift`` of the image along each axis
    (kept inside it), the objects in the same order: what z_t still shows while a drag's
    bottleneck has the object elsewhere."""
    objects = list(scene.objects)
    i = int(rng.integers(len(objects)))
    obj = objects[i]
    goal = np.clip(np.add(obj.center, rng.uniform(-scene.size * max_shift, scene.size * max_shift, size=2)),
                   obj.radius, scene.size - obj.radius)
    objects[i] = obj.moved(*(goal - np.asarray(obj.center)))
    return type(scene)(scene.size, scene.background, objects)


def soften(values, rng):
    """``values`` ([B, CHANNELS, G, G], a ``param_map``) as an encoder might give them: presence
    0.65-1 where an object is, 0-0.35 with random other values where none is. The decoder learns to
    draw an object only for a clear presence, so the encoder's doubts at a noisy step draw no faint
    objects of their own."""
    out = values.clone()
    presence = out[:, :1]
    empty = (presence == 0).float()
    u = torch.from_numpy(rng.uniform(size=presence.shape).astype(np.float32))
    out[:, :1] = empty * 0.35 * u + (1 - empty) * (0.65 + 0.35 * u)
    out[:, 1:7] += empty * 0.3 * torch.from_numpy(rng.standard_normal(out[:, 1:7].shape).astype(np.float32))
    return out


def _holder(own, taken, grid, rng):
    """The cell that holds an object whose centre lies in ``own``: that one, or (``rng``) a random
    free one within one cell of it; the nearest free one when it is taken."""
    near = [(own[0] + dr, own[1] + dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
    near = [c for c in near if 0 <= c[0] < grid and 0 <= c[1] < grid and c not in taken]
    if rng is not None and near:
        return near[int(rng.integers(len(near)))]
    if own not in taken:
        return own
    free = [(r, c) for r in range(grid) for c in range(grid) if (r, c) not in taken]
    return min(free, key=lambda c: (c[0] - own[0]) ** 2 + (c[1] - own[1]) ** 2)


def _latent_colours(rgbs):
    """[N, 3] RGB in [0, 1] -> [N, 3] in the latent's colour axes (as a flat 8x8 block has them)."""
    if not rgbs:
        return np.zeros((0, 3), np.float32)
    blocks = np.tile(np.asarray(rgbs, np.float32)[:, None, None, :], (1, 8, 8, 1))
    return toy_model.scene_latent(blocks)[:, :3, 0, 0].numpy()


def offset_field(scenes):
    """The supervision feature's first 3 channels for ``scenes``: per latent pixel, how much of it
    objects cover, and the covered part's mean (x, y) offset from its object's centre in radii,
    times ``OFFSET_GAIN`` (later objects cover earlier ones, as they are drawn).

    Returns:
        [B, 3, S/8, S/8] float32.
    """
    size = scenes[0].size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    out = np.zeros((len(scenes), 3, size, size), np.float32)
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            mask = obj.mask(size)
            out[b, :, mask] = 0
            out[b, 0][mask] = 1
            out[b, 1][mask] = OFFSET_GAIN * (xx[mask] - obj.center[0]) / obj.radius
            out[b, 2][mask] = OFFSET_GAIN * (yy[mask] - obj.center[1]) / obj.radius
    return torch.nn.functional.avg_pool2d(torch.from_numpy(out), 8)


def hold_bottleneck_reads(unet, hold):
    """Zeroes, and keeps at zero through training, the weights with which the decoder's first
    block reads the bottleneck's channels past ``CHANNELS`` (``hold``: ``train._hold``): the
    optimizer can then paint nothing with them."""
    res = unet.output_blocks[0][0]
    bottleneck = unet.middle_block[-1].out_layers[-1].out_channels
    for conv in (res.in_layers[2], res.skip_connection):
        keep = torch.ones_like(conv.weight)
        keep[:, CHANNELS:bottleneck] = 0
        hold(conv.weight, keep)


class ParamBottleneck:
    """``output_block_patch``: keeps the encoder's bottleneck ([B, 96, G, G]) in ``encoded`` and
    hands the first ``len(values)`` samples ``values`` ([k, c, G, G]; c = ``CHANNELS`` here,
    ``fields.FIELDS`` for the field bottleneck) in its first channels instead (the truth: the
    decoder learns to draw from it)."""

    encoded = None

    def __init__(self, values):
        self.values = values

    def __call__(self, h, hsp, transformer_options):
        if transformer_options.get("block") == ("output", 0):
            self.encoded = h
            k = len(self.values)
            if k:
                head = torch.cat([self.values.to(h), h[:k, self.values.shape[1]:]], dim=1)
                h = torch.cat([head, h[k:]])
        return h, hsp
