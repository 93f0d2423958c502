"""A field bottleneck: the toy U-Net's bottleneck holds each object as smooth coordinate fields.

Why (toy/FINDINGS.md, "A field bottleneck"): every earlier toy drew the bottleneck's map through
the stock decoder, whose nearest-neighbour upsampling gives every latent pixel of a 64 px cell the
same input, so no cell can say *where inside it* an object sits; and whose GroupNorms remove each
channel's mean over the image, so absolute numbers (an object's offset) do not survive them.

Two facts make a map that survives both:

- a nearest-neighbour upsampling followed by a 3x3 convolution with the kernel
  ``[1/4, 1/2, 1/4]`` (outer product) *is* bilinear upsampling, and bilinear upsampling reproduces
  a linear function of position exactly. So a 4x4 grid of the values of ``(x - cx) / UNIT``
  becomes, at the latent's 32x32, that same field: each latent pixel knows its offset from the
  object's centre to sub-pixel precision, and a drag that shifts the field moves the object;
- a GroupNorm group ``[f, -f, A]`` (A a constant) has mean A/3 and a variance that f changes by
  well under one percent: it passes f through as a fixed affine map.

The decoder's first nine blocks (output blocks 0-8, up to the pack's supervision feature) are
*set*, not trained: residual branches and transformers off, each block's skip convolution copying
the field channels, the upsamplers bilinear (``build_linear_decoder``). The supervision feature
is then the fields themselves, laid out in ``[f, -f, A]`` groups (``feature_layout``). The top
level (output blocks 9-11 and the output convolution) is trained to draw x0 from the fields (each
disc where ``u^2 + v^2 < rho^2``) and to read z_t one pixel at a time; the encoder is trained to
write the fields of the scene its z_t shows.

The world is a palette of ``len(PALETTE)`` colours, one disc of each at most per scene: the
palette colour is the object's *slot* (its channels in the map), so the encoder never has to
decide which object goes where.
"""

import numpy as np
import torch

from toy import model as toy_model

PALETTE = ((0.92, 0.16, 0.16), (0.16, 0.78, 0.22), (0.22, 0.36, 0.96), (0.96, 0.84, 0.12), (0.10, 0.82, 0.88),
           (0.88, 0.22, 0.86))
SLOTS = len(PALETTE)
UNIT = 256.0  # pixels per field unit: Adam's lr 0.01 then moves a field by 2.6 px a step
REACH = 1.0  # fields are clipped at +-REACH units (the whole image: a clipped field would not upsample exactly)
FIELDS = 3 * SLOTS + 3  # per slot u, v, rho; then the background's three colour channels
ANCHOR = 10.0  # the constant third channel of each [f, -f, A] group of the supervision feature
CELL = 64  # image pixels per bottleneck cell
FEATURE_BLOCK = 8  # output_blocks[8] = diffusers up_blocks[2]: the pack's supervision feature
BILINEAR = torch.outer(torch.tensor([0.25, 0.5, 0.25]), torch.tensor([0.25, 0.5, 0.25]))


def slot_of(colour):
    """The palette index of an RGB ``colour`` (the nearest palette colour)."""
    return int(np.argmin([np.sum(np.subtract(colour, p) ** 2) for p in PALETTE]))


def upsample(x):
    """[B, C, h, w] -> [B, C, 8h, 8w]: the decoder's three upsamplers as ``build_linear_decoder``
    sets them (nearest x2, then the bilinear kernel with zero padding, three times)."""
    c = x.shape[1]
    kernel = BILINEAR.to(x)[None, None].expand(c, 1, 3, 3)
    for _ in range(3):
        x = torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"), kernel,
                                       padding=1, groups=c)
    return x


def fields_at(scenes, step, device=None):
    """The fields on a grid of points ``step`` pixels apart (their centres): per slot u, v (the
    point's offset from that slot's disc centre, in ``UNIT``, clipped at ``REACH``; ``REACH`` where
    the slot is empty) and rho (the radius in ``UNIT``, 0 when empty), then the colour of the
    background there (model units, ``model.scene_latent``'s colour axes).

    With ``device``, the backgrounds are rendered there (``toy.batch_render``: one scene at a time
    on one CPU core would bound a training run on a GPU) and the fields returned there.

    Returns:
        [B, FIELDS, S/step, S/step] float32.
    """
    size = scenes[0].size
    side = size // step
    centres = (np.arange(side, dtype=np.float32) + 0.5) * step
    out = np.zeros((len(scenes), FIELDS, side, side), np.float32)
    out[:, :3 * SLOTS] = REACH
    out[:, 2:3 * SLOTS:3] = 0
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            k = slot_of(obj.colour)
            out[b, 3 * k] = np.clip((centres[None, :] - obj.center[0]) / UNIT, -REACH, REACH)
            out[b, 3 * k + 1] = np.clip((centres[:, None] - obj.center[1]) / UNIT, -REACH, REACH)
            out[b, 3 * k + 2] = obj.radius / UNIT
    bare = [type(s)(s.size, s.background, []) for s in scenes]
    if device is None:
        colour = toy_model.scene_latent(np.stack([s.render() for s in bare]))[:, :3]
    else:
        from toy import batch_render

        colour = toy_model.scene_latent(batch_render.render(bare, device))[:, :3]
    out = torch.from_numpy(out).to(colour.device)
    out[:, 3 * SLOTS:] = torch.nn.functional.interpolate(colour, size=(side, side), mode="area")
    return out


def field_map(scenes, device=None):
    """The bottleneck's first ``FIELDS`` channels for ``scenes``: the fields at the centres of its
    cells. ``upsample`` turns them into the fields at every latent pixel, exactly away from the
    image's border (within about 40 px of it, zero padding pulls them toward 0: all of a pixel's
    fields by the same factor, so a disc's test ``u^2 + v^2 < rho^2`` barely moves).

    Returns:
        [B, FIELDS, S/64, S/64] float32.
    """
    return fields_at(scenes, CELL, device)


def feature_layout(fields):
    """[B, FIELDS, h, w] -> [B, 3 * FIELDS (+1 zero), h, w]: the supervision feature's channels
    as ``build_linear_decoder`` lays them out, ``[f, -f, ANCHOR]`` for each field."""
    return torch.stack([fields, -fields, torch.full_like(fields, ANCHOR)], dim=2).flatten(1, 2)


@torch.no_grad()
def build_linear_decoder(unet):
    """Sets output blocks 0-8 of the toy's ``UNetModel`` to carry the bottleneck's first
    ``FIELDS`` channels up to the supervision feature unchanged but bilinearly upsampled, in
    ``feature_layout``, and freezes them. Everything else those blocks read (skips, the
    bottleneck's other channels, the time embedding) then has no effect."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, Upsample

    blocks = unet.output_blocks[:FEATURE_BLOCK + 1]
    feature_channels = blocks[-1][0].out_channels
    if 3 * FIELDS > feature_channels:
        raise ValueError(f"the supervision feature has {feature_channels} channels, the fields need {3 * FIELDS}")
    laid_out = False
    for block in blocks:
        for module in block:
            if isinstance(module, ResBlock):
                module.out_layers[-1].weight.zero_()
                module.out_layers[-1].bias.zero_()
                skip = module.skip_connection
                skip.weight.zero_()
                skip.bias.zero_()
                if module.out_channels == feature_channels and not laid_out:  # the first block of that level
                    for i in range(FIELDS):
                        skip.weight[3 * i, i] = 1
                        skip.weight[3 * i + 1, i] = -1
                        skip.bias[3 * i + 2] = ANCHOR
                    laid_out = True
                elif laid_out:
                    skip.weight[:, :feature_channels, 0, 0] = torch.eye(feature_channels)
                else:
                    skip.weight[:FIELDS, :FIELDS, 0, 0] = torch.eye(FIELDS)
            elif isinstance(module, SpatialTransformer):
                module.proj_out.weight.zero_()
                module.proj_out.bias.zero_()
            elif isinstance(module, Upsample):
                conv = module.conv
                conv.weight.zero_()
                conv.bias.zero_()
                for c in range(conv.out_channels):
                    if laid_out and c % 3 == 2 and c < 3 * FIELDS:
                        conv.bias[c] = ANCHOR  # a constant: zero padding would dim it at the border
                    else:
                        conv.weight[c, c] = BILINEAR
    for p in blocks.parameters():
        p.requires_grad_(False)
