"""A decoder set by construction: the toy U-Net's whole decoder draws the field bottleneck.

Why (toy/FINDINGS.md, "A decoder set by construction"): no trained top level drew a moved disc
from its fields in the time two CPU cores give, and at 32 channels it could not have (every
GroupNorm there normalizes one channel alone). At 64 channels a level's GroupNorms work on
groups of two (a ResBlock's second norm, the output head) or four (a ResBlock's first norm, which
reads the skip too), and three facts about a group then make an exact drawing possible:

- ``[f, -f, A, -A]`` (A a large constant) has mean 0 and a spread that f changes by a
  second-order amount: f passes through as a fixed scale, its level kept;
- ``[s, -s]`` normalizes to ``s / rms(s)``: its sign, so a threshold at 0, is kept exactly;
- ``[s + K, -(s + K)]`` normalizes to about ``1 + (s - mean(s)) / K``: a fixed scale, the
  image mean lost; where K comes from the time embedding, a gain that depends on the timestep;

and ``silu(x) - silu(-x) = x`` makes a pair of SiLUs exactly linear.

The world: one disc per scene (``OBJECTS``), of one of the six ``fields.PALETTE`` colours, each
colour with its own radius (``RADII``), on a gradient background. The bottleneck's first
``FIELDS`` channels hold, at the 4x4 cells' centres, u = (x - cx) / 256 and v = (y - cy) / 256
of each colour's disc (``REACH`` where the colour is absent) and the background's colour (model
units);
the encoder is trained to write them (``train_encoder``), the decoder is set (``build_decoder``):

- output blocks 0 and 1 read each u (v) field *rigidly*: its mean over the 16 cells
  (``set_rigid_read``), so the disc is drawn where the fields say on average and moves as one
  piece however unevenly a drag changes the cells (Adam moves every cell the motion loss reaches
  by about its learning rate, and a per-cell read drew a stretched disc);
- output blocks 2-8 carry the means and a constant 1 up by repetition and the x and y ramps as
  exact ramps at every level (``_ramp_upsample``), so nothing is pulled at the border, and lay
  out u = x ramp + mean (v alike) and the background (bilinearly upsampled) as ``[f, -f, A, -A]``
  at the supervision feature: the pack's motion loss and tracking see the rigid fields themselves;
- block 9 computes each disc's inside test ``B^2 - (Q(u) + Q(v)) / Q(rho)`` (Q a SiLU square; B the
  carried constant, which once was the zero padding's pull and is now 1), its coverage (a ramp of
  one latent pixel at the sign change) and its edge;
- block 10 the colour: background where no disc covers, the disc's colour where one does (the
  background times the coverage as a difference of SiLU squares), and the edges' contrast;
- block 11 and the output head the noise: ``G1(t) (z - mean z) - G2(t) (x0 - mean x0)`` with x0
  that drawing, i.e. a Wiener-style denoiser that trusts the drawing while z_t is noisy and
  z_t itself as the noise fades (``SIGMA_P2``); the image means come from z_t alone.

The decoder's anchors and gains are large constants (up to ``TIME_GAIN``) whose small differences
carry the signal: it needs float32; in float16 or bfloat16 it draws nothing useful.
"""

import sys
from pathlib import Path

import numpy as np
import torch

if __name__ == "__main__":  # run as a script: the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toy import model as toy_model  # noqa: E402
from toy import fields  # noqa: E402
from toy.fields import PALETTE, slot_of  # noqa: E402

WIDTHS = (64, 64, 64, 64)
RADII = (34.0, 40.0, 46.0, 31.0, 37.0, 43.0)  # pixels, one per palette colour
# One disc per scene: every slot's fields vary over the whole image, so a motion loss at one disc
# would pull the other discs' fields too (toy/FINDINGS.md, "A decoder set by construction").
OBJECTS = 1
SLOTS = len(PALETTE)
UNIT = 256.0  # pixels per field unit: Bottleneck Optimize's Adam (lr 0.01) moves a field 2.6 px a step
FIELDS = 2 * SLOTS + 3  # u, v per slot, then the background's three colour channels
# An absent colour's u and v (units): its disc's centre then lies 384 px above and left of the
# image, out of sight even after a long drag. A present disc's fields are never clipped (at most
# 0.875 units): the decoder reads their mean over the cells (``set_rigid_read``).
REACH = 2.0
CELL = fields.CELL  # image pixels per bottleneck cell
BILINEAR = torch.outer(torch.tensor([0.25, 0.5, 0.25]), torch.tensor([0.25, 0.5, 0.25]))
Z_CHANNELS = 16  # conv_in's first 16 outputs are set ([z_c, -z_c, A, -A] per latent channel)
A_FIELD = 30.0  # anchor of the supervision feature's groups
A_Z = 30.0  # anchor of z's groups (conv_in's: the encoder reads them too, so not larger)
A_BIG = 300.0  # anchor of x0's groups, read by block 11
# How far (a variance, model units) the decoder expects a scene to differ from its drawing: the
# lower, the longer it trusts the drawing over z_t, and the more of the drawing's errors DDIM
# inversion writes into the inverted latent (0.05 wrecked reconstructions; FINDINGS.md).
SIGMA_P2 = 0.3
MEAN_WEIGHT = 16.0  # of the loss on the fields' means over the cells, next to the per-cell loss
# The encoder trains below this timestep: a drag inverts to 681 (inversion strength 0.7), and
# above it z_t shows too little of a disc to place it, so those samples only add noise.
MAX_T = 720


def random_scene(rng, n_objects=OBJECTS, size=256):
    """A scene of this world (``toy.scenes.random_scene`` with the palette and its radii)."""
    from toy.scenes import random_scene as scene

    return scene(rng, size, n_objects=n_objects, kinds=("disc",), palette=PALETTE, radii=RADII)


def field_map(scenes, reach=REACH):
    """The bottleneck's first ``FIELDS`` channels for ``scenes``: each field at the centres of the
    4x4 cells, u and v clipped at +-``reach`` (which ``REACH`` never reaches; ``reach`` for an
    absent colour), and the background's colour (its mean over the cell).

    Returns:
        [B, FIELDS, S/64, S/64] float32.
    """
    size = scenes[0].size
    side = size // CELL
    centres = (np.arange(side, dtype=np.float32) + 0.5) * CELL
    out = np.full((len(scenes), FIELDS, side, side), reach, np.float32)
    for b, scene in enumerate(scenes):
        for obj in scene.objects:
            k = slot_of(obj.colour)
            out[b, 2 * k] = np.clip((centres[None, :] - obj.center[0]) / UNIT, -reach, reach)
            out[b, 2 * k + 1] = np.clip((centres[:, None] - obj.center[1]) / UNIT, -reach, reach)
    out = torch.from_numpy(out)
    out[:, 2 * SLOTS:] = fields.field_map(scenes)[:, 3 * fields.SLOTS:]  # the background, as there
    return out


def build_unet(seed=0):
    """The toy's ComfyUI ``BaseModel`` at ``WIDTHS``, one attention head, with conv_in's set rows and
    the time embedding set and frozen (the decoder's timestep gains are fitted to it)."""
    base = toy_model.build_unet(seed=seed, heads=1, widths=WIDTHS)
    unet = base.diffusion_model
    set_conv_in(unet)
    set_time_embed(unet)
    for p in unet.time_embed.parameters():
        p.requires_grad_(False)
    return base


@torch.no_grad()
def set_conv_in(unet):
    """conv_in's first ``Z_CHANNELS`` outputs: ``[z_c, -z_c, A_Z, -A_Z]`` per latent channel
    (centre taps); a gradient hook keeps them while the encoder trains the rest."""
    conv = unet.input_blocks[0][0]
    conv.weight[:Z_CHANNELS] = 0
    conv.bias[:Z_CHANNELS] = 0
    for c in range(4):
        conv.weight[4 * c, c, 1, 1] = 1
        conv.weight[4 * c + 1, c, 1, 1] = -1
        conv.bias[4 * c + 2] = A_Z
        conv.bias[4 * c + 3] = -A_Z
    if not getattr(conv, "_rows_held", False):
        def hold(grad):
            grad = grad.clone()
            grad[:Z_CHANNELS] = 0
            return grad
        conv.weight.register_hook(hold)
        conv.bias.register_hook(hold)
        conv._rows_held = True


@torch.no_grad()
def set_time_embed(unet):
    """The time embedding as 256 smooth ramps of t: ``silu(slope (t / 1000) + offset)`` with their
    bends spread over [0, 1000] (t / 1000 read off the sinusoidal embedding's slowest sine, linear
    to 0.3% there). A random one is a sum of fast oscillations of t, on which block 11's timestep
    gains fit no better than a few percent; on ramps they fit closely."""
    first, second = unet.time_embed[0], unet.time_embed[2]
    n = first.out_features
    half = unet.model_channels // 2
    slowest = float(torch.exp(-torch.log(torch.tensor(10000.0)) * (half - 1) / half))
    bends = torch.cat([torch.linspace(-0.05, 1.05, n - n // 4), torch.linspace(-0.01, 0.12, n // 4)])
    slopes = torch.tensor([8.0, 20.0, 50.0]).repeat(n // 3 + 1)[:n]
    slopes[n - n // 4:] = 100.0  # the gains bend most near t = 0
    first.weight.zero_()
    first.weight[:, 2 * half - 1] = slopes / (1000 * slowest)
    first.bias.copy_(-slopes * bends)
    second.weight.copy_(torch.eye(n))
    second.bias.zero_()


def encode(unet, zt, t, context):
    """The bottleneck (the mid block's output) for z_t: [B, 64, h/8, w/8], running only the encoder."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed, timestep_embedding

    emb = unet.time_embed(timestep_embedding(t, unet.model_channels).to(zt.dtype))
    h = zt
    options = {}
    for module in unet.input_blocks:
        h = forward_timestep_embed(module, h, emb, context, options)
    return forward_timestep_embed(unet.middle_block, h, emb, context, options)


@torch.no_grad()
def inverted_states(unet, scenes, context, steps=35):
    """The latents the pack's DDIM inversion (50-step schedule, its convention: each step labelled
    with the timestep it goes to, alpha_bar of the one it leaves) visits for ``scenes`` through
    this U-Net: ([len(scenes) * steps, 4, h, w] z_t, [same] t). Needs the decoder built."""
    from toy.probe import alphas_cumprod

    ab = alphas_cumprod()
    z = toy_model.scene_latent(np.stack([s.render() for s in scenes]))
    zs, ts = [], []
    a_src = ab[0]
    for t in range(1, 20 * steps, 20):
        t_batch = torch.full((len(z),), float(t))
        eps = unet(z, timesteps=t_batch, context=context.expand(len(z), -1, -1))
        z = ab[t].sqrt() * (z - (1 - a_src).sqrt() * eps) / a_src.sqrt() + (1 - ab[t]).sqrt() * eps
        a_src = ab[t]
        zs.append(z)
        ts.append(t_batch)
    return torch.cat(zs), torch.cat(ts)


def train_encoder(unet, seed, steps, batch, lr, log, backward_safe, quiet_share=0.25, seconds=None, save=None,
                  max_t=MAX_T, objects=OBJECTS, reach=REACH, inverted_share=0.0, refresh=25):
    """Trains the encoder (input blocks, mid block, conv_in's free rows) to write the ``field_map``
    of the scene its z_t shows (MSE x 100), at timesteps below ``max_t``; ``quiet_share`` of the samples have
    their noise scaled by U(0, 1), as DDIM-inverted latents hold less noise. ``backward_safe``:
    the pack's ``dragnoise.features.backward_safe``. ``objects`` per scene (None: 1-3) and the
    fields' ``reach`` are the world's unless given (the committed encoder's first stages used
    others, toy/README.md). ``inverted_share`` of each batch comes instead from the latents DDIM
    inversion through this U-Net visits (``inverted_states`` of ``batch`` fresh scenes every
    ``refresh`` steps; the decoder must be built): the latents a drag meets are not forward-noised.
    Returns the EMA state dict and the number of steps taken. ``save(state, step)`` is called every 200 steps."""
    import time

    from toy.probe import alphas_cumprod, noised
    from toy.train import lr_at, quieted, step_with_ema

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    ab = alphas_cumprod()
    context = toy_model.default_conditioning()
    params = [p for m in (unet.input_blocks, unet.middle_block) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    start = time.time()
    step = 0
    while step < steps:
        if seconds and step == 20:
            pace = (time.time() - start) / 20
            steps = max(21, min(steps, int(seconds / pace)))
            log(f"encoder: {pace:.2f} s a step, {steps} steps")
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(200, steps // 10 + 1))
        if inverted_share and step % refresh == 0:
            pool_scenes = [random_scene(rng, objects) for _ in range(batch)]
            pool_z, pool_t = inverted_states(unet, pool_scenes, context)
            pool_target = field_map(pool_scenes, reach).repeat(len(pool_z) // batch, 1, 1, 1)
        inverted = int(round(inverted_share * batch))
        scenes = [random_scene(rng, objects) for _ in range(batch - inverted)]
        target = field_map(scenes, reach)
        z0 = toy_model.scene_latent(np.stack([s.render() for s in scenes]))
        t = torch.randint(0, max_t, (len(scenes),))
        eps = quieted(torch.randn_like(z0), quiet_share)
        zt = noised(z0, eps, ab[t][:, None, None, None])
        if inverted:
            pick = torch.from_numpy(rng.choice(len(pool_z), inverted, replace=False))
            zt, t = torch.cat([zt, pool_z[pick]]), torch.cat([t, pool_t[pick].long()])
            target = torch.cat([target, pool_target[pick]])
        with backward_safe(unet, "norm inputs"):
            out = encode(unet, zt, t.float(), context.expand(batch, -1, -1))
            loss = 100 * torch.nn.functional.mse_loss(out[:, :FIELDS], target)
            # The decoder reads u and v by their means over the cells: hold those most of all.
            loss = loss + 100 * MEAN_WEIGHT * torch.nn.functional.mse_loss(
                out[:, :2 * SLOTS].mean((2, 3)), target[:, :2 * SLOTS].mean((2, 3)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        step_with_ema(unet, opt, ema, min(0.999, (1 + step) / (10 + step)))  # only the encoder has gradients
        if step % 50 == 0 or step == steps - 1:
            uv = ((out[:, :2 * SLOTS] - target[:, :2 * SLOTS]).abs().mean() * UNIT).item()
            means = ((out[:, :2 * SLOTS] - target[:, :2 * SLOTS]).mean((2, 3)).abs().mean() * UNIT).item()
            log(f"encoder step {step + 1}/{steps}: loss {loss.item():.4f} (u, v off by {uv:.1f} px on average, "
                f"their means by {means:.1f} px)")
        if save and (step + 1) % 200 == 0:
            save(ema, step + 1)
        step += 1
    return ema, steps


# The decoder's constants (see ``build_decoder``).
A_SUM = 100.0  # anchor of block 10's product groups
Q_SCALE = 5.0  # a in Q(s) = (2 / a^2) (silu(a s) + silu(-a s)) ~ s^2 (block 9's disc test)
RAMP = 200.0  # block 9's coverage ramp: its slope in units of d / rms(d)
B_SCALE = 0.5  # block 9's square of the border's pull B
Q2_SCALE = 0.1  # block 10's squares, whose differences are products
BG_SCALE = 2.0  # the background's colour is divided by this before it is squared
K_PRODUCT = 100.0  # offset of block 10's second-norm pairs
A_HEAD = 1000.0  # anchor of the output head's pairs
ABS_SCALE = 20.0  # block 11's absolute value of the edges' contrast
TIME_GAIN = 2e4  # numerator of block 11's timestep gains (their offsets must dwarf z and x0)


def palette_latents():
    """[SLOTS, 3] each palette colour's latent colour channels (model units)."""
    flat = np.stack([np.broadcast_to(np.asarray(c, np.float32), (8, 8, 3)) for c in PALETTE])
    return toy_model.scene_latent(flat)[:, :3, 0, 0]


def gains(t, sigma_p2=SIGMA_P2):
    """(G1, G2) [len(t)]: the noise the decoder predicts is G1 (z - mean z) - G2 (x0 - mean x0),
    x0 its drawing: with lambda = sigma_p2 / (sigma_p2 + (1 - a) / a) (how far the Wiener estimate
    leans on z_t), G1 = (1 - lambda) / sqrt(1 - a) and G2 = G1 sqrt(a), a = alpha_bar(t)."""
    from toy.probe import alphas_cumprod

    ab = alphas_cumprod().double()
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, 999)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=999)
    a = ab[lo] + (ab[hi] - ab[lo]) * (t - lo)
    r = (1 - a) / a
    g1 = (r / (sigma_p2 + r)) / (1 - a).sqrt()
    return g1, g1 * a.sqrt()


@torch.no_grad()
def fit_time_gains(unet, sigma_p2=SIGMA_P2):
    """Sets block 11's time-embedding layer so that its pair offsets are TIME_GAIN / G1(t) and
    TIME_GAIN / G2(t) (least squares in relative error over t in [0, 999]). Returns the largest
    relative error of the fitted gains."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import timestep_embedding

    t = torch.linspace(0, 999, 4000)
    feats = torch.nn.functional.silu(unet.time_embed(timestep_embedding(t, unet.model_channels))).double()
    feats = torch.cat([feats, torch.ones(len(t), 1, dtype=torch.float64)], 1)
    g1, g2 = gains(t, sigma_p2)
    worst = 0.0
    coefs = []
    for g in (g1, g2):
        target = TIME_GAIN / g
        scale = 1 / target
        sol = torch.linalg.lstsq(feats * scale[:, None], torch.ones_like(target)[:, None], driver="gelsd").solution[:, 0]
        fitted = feats @ sol
        worst = max(worst, float(((fitted - target) / target).abs().max()))
        coefs.append(sol)
    linear = unet.output_blocks[11][0].emb_layers[1]
    linear.weight.zero_()
    linear.bias.zero_()
    for c in range(4):
        for row, sign, sol in ((4 * c, 1, coefs[0]), (4 * c + 1, -1, coefs[0]), (4 * c + 2, 1, coefs[1]),
                               (4 * c + 3, -1, coefs[1])):
            linear.weight[row] = sign * sol[:-1].float()
            linear.bias[row] = sign * sol[-1].float()
    return worst


def _edge_peak():
    """Block 9's edge bump at a disc's boundary (x = 0): silu(1) + silu(1) - 2 silu(0) - 1."""
    return float(2 * torch.nn.functional.silu(torch.tensor(1.0)) - 1)


def _q(s, a):
    """The SiLU square (2 / a^2) (silu(a s) + silu(-a s)) of a number."""
    s = torch.as_tensor(float(s))
    return float(2 / a ** 2 * (torch.nn.functional.silu(a * s) + torch.nn.functional.silu(-a * s)))

# The rigid read's constants (``set_rigid_read``).
RAMP_CELLS = (torch.arange(4, dtype=torch.float64) * CELL + CELL / 2 - 128) / UNIT  # cell centres, centred
L_EXTRACT = 1000.0  # amplitude of the ramps in block 0's extractor groups
G_EXTRACT = 1e-3  # block 1's first-norm gain on them: its SiLU then bends the mean by under 0.2%
L_CARRY = 1000.0  # amplitude of the ramp that carries each mean through block 1's second norm


def _ramp_taps(edge):
    """[2, 3]: the weights on (silu(e), silu(-e)) at the taps dx = -1, 0, 1 whose zero-padded
    correlation is ``RAMP_CELLS``, for ``edge`` [4] the normalized edge pattern e along one axis."""
    silu = torch.nn.functional.silu
    patterns = (silu(edge), silu(-edge))

    def shifted(p, d):
        return torch.stack([p[i + d] if 0 <= i + d < 4 else p.new_zeros(()) for i in range(4)])

    basis = torch.stack([shifted(p, d) for p in patterns for d in (-1, 0, 1)], 1)
    taps = torch.linalg.pinv(basis) @ RAMP_CELLS
    if not torch.allclose(basis @ taps, RAMP_CELLS, atol=1e-9):
        raise RuntimeError("the ramp is not in the span of the edge patterns")
    return taps.view(2, 3)


@torch.no_grad()
def _ramp_upsample(conv, out, ramp, axis, side, gain):
    """Adds to ``conv`` (an ``Upsample``'s: after a nearest x2 to ``side`` pixels) the taps that
    turn channel ``ramp``, the exact ramp of the level below (x for ``axis`` 0, y for 1), into
    ``gain`` times the exact ramp at ``side``: the bilinear taps along the axis, and at the two
    border rows (columns) the part the zero padding drops, (1/4) of the ramp one pixel beyond,
    from channel ``FIELDS`` (a constant 1): its bias and a tap on that neighbour (0 beyond the border)."""
    below = ((torch.arange(side // 2, dtype=torch.float64) + 0.5) * (2 * 256 / side) - 128) / UNIT
    step = float(below[1] - below[0])
    lost_low, lost_high = 0.25 * float(below[0] - step), 0.25 * float(below[-1] + step)
    for j, w in enumerate((0.25, 0.5, 0.25)):
        if axis == 0:
            conv.weight[out, ramp, 1, j] += gain * w
        else:
            conv.weight[out, ramp, j, 1] += gain * w
    low, high = ((1, 0), (1, 2)) if axis == 0 else ((0, 1), (2, 1))
    conv.bias[out] += gain * (lost_low + lost_high)
    conv.weight[out, FIELDS, low[0], low[1]] -= gain * lost_low
    conv.weight[out, FIELDS, high[0], high[1]] -= gain * lost_high


@torch.no_grad()
def set_rigid_read(unet):
    """Sets output blocks 0 and 1 (4x4 cells) so that block 1's output holds, in channel f < 2 SLOTS,
    each u (v) field's mean over the cells (at every cell); then the background's colour, a
    constant 1 (channel FIELDS) and the cells' x and y ramps (channels FIELDS + 1, FIELDS + 2), from
    which blocks 2-8 make u = x ramp + mean, the field a disc at the mean centre would have.

    GroupNorm keeps a mean only where its group also holds a large zero-mean pattern: the group's
    mean is then (field mean) / 4 and its spread is the pattern's to second order, so the
    pattern's normalized output carries the field's mean at every cell. Here:

    - block 0 makes edge patterns from a constant (a norm bias, then zero-padded taps), the ramps
      from them (``_ramp_taps``), and lays out each field as the group
      ``[f, L rx, -L rx, L ry]``, next to a pure group ``[L rx, -L rx, L ry, -L ry]``;
    - block 1's first norm reads each group's ``L rx`` and ``-L rx`` at a small gain (its SiLU
      near-linear) and the pure group's at a matched gain; the difference of their SiLUs' sums is
      the mean, with the same gain at every cell; the mean rides through the second norm as
      ``[m + L rx, -(m + L rx)]`` and ``[m - L rx, -(m - L rx)]`` (``[s, -s]`` normalizes to
      s / rms(s), and both rms are the ramp's to second order), whose sum drops the ramp. Any
      tilt of the read matters: the tracking follows the absent colours' fields too.

    Exact to about 0.1 px for fields of up to ``REACH`` units (tests/test_set_decoder.py)."""
    blocks = unet.output_blocks
    fields = 2 * SLOTS
    silu = torch.nn.functional.silu
    r_ms = float((RAMP_CELLS ** 2).mean())
    for block in (blocks[0], blocks[1]):
        for p in block.parameters():
            p.zero_()
    # Block 0. Channel 0 of norm1 is the constant silu(1); conv1's taps turn it into the edges
    # E = [-1, 0, 0, 1] c along x (channels 0, 1: E, -E) and y (2, 3); norm2 makes them E / rms.
    res = blocks[0][0]
    norm1, conv1, norm2, conv2 = res.in_layers[0], res.in_layers[2], res.out_layers[0], res.out_layers[3]
    skip = res.skip_connection
    norm1.bias[0] = 1.0
    for out, sign in ((0, 1), (1, -1)):
        conv1.weight[out, 0, 1, 0], conv1.weight[out, 0, 1, 2] = sign, -sign
        conv1.weight[out + 2, 0, 0, 1], conv1.weight[out + 2, 0, 2, 1] = sign, -sign
    norm2.weight[:4] = 1
    edge = torch.tensor([-1.0, 0, 0, 1], dtype=torch.float64) * float(silu(torch.tensor(1.0)))
    taps = _ramp_taps(edge / (edge.pow(2).mean() + norm2.eps).sqrt())

    def ramp(out, axis, gain):
        for ch in range(2):
            for j in range(3):
                if axis == 0:
                    conv2.weight[out, ch, 1, j] += gain * float(taps[ch, j])
                else:
                    conv2.weight[out, 2 + ch, j, 1] += gain * float(taps[ch, j])

    extract, rx, ry, background, constant, pure = 0, 4 * fields, 4 * fields + 1, 4 * fields + 2, 4 * fields + 5, 56
    for f in range(fields):
        skip.weight[extract + 4 * f, f, 0, 0] = 1
        for j, axis, sign in ((1, 0, 1), (2, 0, -1), (3, 1, 1)):
            ramp(extract + 4 * f + j, axis, sign * L_EXTRACT)
    ramp(rx, 0, 1.0)
    ramp(ry, 1, 1.0)
    for c in range(3):
        skip.weight[background + c, fields + c, 0, 0] = 1
    skip.bias[constant] = 1
    for j, (axis, gain) in enumerate(((0, L_EXTRACT), (0, -L_EXTRACT), (1, L_EXTRACT), (1, -L_EXTRACT))):
        ramp(pure + j, axis, gain)
    # Block 1. The extractor's normalized ramp is G (L rx - m / 4) / s, s = L sqrt(3 r_ms / 4) to
    # second order; the pure group's, read at a matched gain, G L rx / s.
    res = blocks[1][0]
    norm1, conv1, norm2, conv2 = res.in_layers[0], res.in_layers[2], res.out_layers[0], res.out_layers[3]
    skip = res.skip_connection
    spread = L_EXTRACT * (3 * r_ms / 4) ** 0.5
    gain_pure = G_EXTRACT * r_ms ** 0.5 * L_EXTRACT / spread
    for f in range(fields):
        norm1.weight[extract + 4 * f + 1] = norm1.weight[extract + 4 * f + 2] = G_EXTRACT
    norm1.weight[pure] = norm1.weight[pure + 1] = gain_pure
    # silu(a - d) + silu(-a - d) - silu(a) - silu(-a) = -d to second order, as silu'(a) + silu'(-a) = 1:
    # reading the group's ramp and its negative makes the mean's gain the same at every cell.
    mean_gain = -4 * spread / G_EXTRACT
    carry_gain = L_CARRY * r_ms ** 0.5 / gain_pure  # (silu(y) - silu(-y)) of the pure pair -> L_CARRY rx
    # Per field the pairs [s+, -s+] and [s-, -s-], s+- = m +- L_CARRY rx: each normalizes to s / rms
    # with the same rms, so their sum is 2 m / rms at every cell (one pair alone tilted m by
    # rx m^2 / (2 L_CARRY r_ms)).
    for f in range(fields):
        for out, sign, ramp_sign in ((4 * f, 1, 1), (4 * f + 1, -1, 1), (4 * f + 2, 1, -1), (4 * f + 3, -1, -1)):
            for ch in (extract + 4 * f + 1, extract + 4 * f + 2):
                conv1.weight[out, ch, 1, 1] = sign * mean_gain
            conv1.weight[out, pure, 1, 1] = -sign * mean_gain + sign * ramp_sign * carry_gain
            conv1.weight[out, pure + 1, 1, 1] = -sign * mean_gain - sign * ramp_sign * carry_gain
    norm2.weight[:4 * fields] = 1
    carried_rms = L_CARRY * r_ms ** 0.5
    for f in range(fields):
        for ch, sign in ((4 * f, 1), (4 * f + 1, -1), (4 * f + 2, 1), (4 * f + 3, -1)):
            conv2.weight[f, ch, 1, 1] = sign * carried_rms / 2
    for c in range(3):
        skip.weight[fields + c, background + c, 0, 0] = 1
    skip.weight[FIELDS, constant, 0, 0] = 1
    skip.weight[FIELDS + 1, rx, 0, 0] = skip.weight[FIELDS + 2, ry, 0, 0] = 1


@torch.no_grad()
def build_decoder(unet, sigma_p2=SIGMA_P2):
    """Sets the whole decoder of the toy's ``UNetModel`` (output blocks 0-11 and the output head)
    to draw the bottleneck's fields and predict the noise from that drawing and z_t (the module
    docstring), and freezes it. Returns the time fit's largest relative error."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, Upsample

    blocks = unet.output_blocks
    for p in list(blocks.parameters()) + list(unet.out.parameters()):
        p.zero_()
    sqrt2 = 2 ** 0.5
    # Blocks 0-1: each u (v) field's mean over the cells, the cells' x and y ramps and a constant 1
    # (``set_rigid_read``). Blocks 2-8 carry them up: the means and the constant by repetition
    # (exact to the border), the ramps as exact ramps at every level (``_ramp_upsample``), the
    # background bilinearly; block 8 lays out u = x ramp + mean (v alike) at the supervision feature.
    set_rigid_read(unet)
    carried = FIELDS + 3
    ramp_x, ramp_y = FIELDS + 1, FIELDS + 2
    side = 4
    for i in range(2, 9):
        for module in blocks[i]:
            if isinstance(module, ResBlock):
                module.skip_connection.weight[:carried, :carried, 0, 0] = torch.eye(carried)
            elif isinstance(module, Upsample):
                conv = module.conv
                side *= 2
                if i < 8:
                    for f in list(range(2 * SLOTS)) + [FIELDS]:
                        conv.weight[f, f, 1, 1] = 1
                    for f in range(2 * SLOTS, FIELDS):
                        conv.weight[f, f] = BILINEAR
                    _ramp_upsample(conv, ramp_x, ramp_x, 0, side, 1.0)
                    _ramp_upsample(conv, ramp_y, ramp_y, 1, side, 1.0)
                    continue
                for f in range(FIELDS + 1):
                    for j, sign in ((4 * f, 1), (4 * f + 1, -1)):
                        if f < 2 * SLOTS:
                            conv.weight[j, f, 1, 1] = sign
                            _ramp_upsample(conv, j, ramp_y if f % 2 else ramp_x, f % 2, side, sign)
                        elif f < FIELDS:
                            conv.weight[j, f] = sign * BILINEAR
                        else:
                            conv.weight[j, f, 1, 1] = sign
                    conv.bias[4 * f + 2] = A_FIELD
                    conv.bias[4 * f + 3] = -A_FIELD
    # Block 9: each disc's inside test d = B^2 - (Q(u) + Q(v)) / Q(rho); from d / rms(d) (x, after
    # RAMP) its coverage silu(x + 1/2) - silu(x - 1/2) and its edge, a bump of about sqrt(c (1 - c)).
    res = blocks[9][0]
    norm1, conv1, norm2, conv2 = res.in_layers[0], res.in_layers[2], res.out_layers[0], res.out_layers[3]
    for f in range(2 * SLOTS):
        norm1.weight[4 * f] = norm1.weight[4 * f + 1] = Q_SCALE * A_FIELD / sqrt2
    norm1.weight[4 * FIELDS] = norm1.weight[4 * FIELDS + 1] = B_SCALE * A_FIELD / sqrt2
    w_b = (2 / B_SCALE ** 2) / _q(1.0, B_SCALE)
    # Per slot 8 channels, 4 pairs [d, -d]; (channel offset, sign of n, bias) of the SiLUs used.
    cov_hi, edge_neg1, cov_lo, edge_neg0, edge_pos1, edge_pos0 = (0, 1, 0.5), (1, -1, 1.0), (2, 1, -0.5), \
        (3, -1, 0.0), (4, 1, 1.0), (6, 1, 0.0)
    for k in range(SLOTS):
        w = -(2 / Q_SCALE ** 2) / _q(RADII[k] / UNIT, Q_SCALE)
        for j in range(8):
            out, sign = 8 * k + j, (1 if j % 2 == 0 else -1)
            for f in (2 * k, 2 * k + 1):
                conv1.weight[out, 4 * f, 1, 1] = conv1.weight[out, 4 * f + 1, 1, 1] = sign * w
            conv1.weight[out, 4 * FIELDS, 1, 1] = conv1.weight[out, 4 * FIELDS + 1, 1, 1] = sign * w_b
        for j, _, bias in (cov_hi, edge_neg1, cov_lo, edge_neg0, edge_pos1, edge_pos0):
            norm2.weight[8 * k + j] = RAMP
            norm2.bias[8 * k + j] = bias
    colours = palette_latents()

    def coverage(out, k, weight):
        conv2.weight[out, 8 * k + cov_hi[0], 1, 1] += weight
        conv2.weight[out, 8 * k + cov_lo[0], 1, 1] -= weight

    def edge(out, k, weight):
        for j, sign in ((edge_pos1[0], 1), (edge_neg1[0], 1), (edge_pos0[0], -1), (edge_neg0[0], -1)):
            conv2.weight[out, 8 * k + j, 1, 1] += sign * weight
        conv2.bias[out] -= weight

    def product_groups(base_plus, base_minus, factor_of, field):
        """[s, -s, A, -A] at base_plus and base_minus, s = factor +- field / BG_SCALE."""
        for base, sign in ((base_plus, 1), (base_minus, -1)):
            for k in range(SLOTS):
                factor_of(base, k, 1)
                factor_of(base + 1, k, -1)
            res.skip_connection.weight[base, 4 * field, 0, 0] = sign / BG_SCALE
            res.skip_connection.weight[base + 1, 4 * field, 0, 0] = -sign / BG_SCALE
            res.skip_connection.bias[base + 2] = A_SUM
            res.skip_connection.bias[base + 3] = -A_SUM

    for c in range(3):  # C = summed coverage; s+- = C +- bg_c / BG_SCALE
        product_groups(4 * c, 12 + 4 * c, coverage, 2 * SLOTS + c)
        for k in range(SLOTS):  # the carrier L_c = bg_c + sum_k colour_kc coverage_k
            coverage(24 + c, k, float(colours[k, c]))
        res.skip_connection.weight[24 + c, 4 * (2 * SLOTS + c), 0, 0] = 1
    product_groups(28, 32, edge, 2 * SLOTS)  # E = summed edges; t+- = E +- bg_0 / BG_SCALE
    for k in range(SLOTS):  # the carrier M = sum_k luminance_k edge_k
        edge(27, k, float(colours[k, 0]))
    # Block 10: x0_c = L_c - bg_c C, and the edges' contrast M - bg_0 E; each product of two fields as
    # BG_SCALE ((s+)^2 - (s-)^2) / 4 of block 9's groups.
    res = blocks[10][0]
    norm1, conv1, norm2, conv2 = res.in_layers[0], res.in_layers[2], res.out_layers[0], res.out_layers[3]
    w = BG_SCALE / 4 * 2 / Q2_SCALE ** 2
    for c, (plus, minus, carrier) in enumerate(((0, 12, 24), (4, 16, 25), (8, 20, 26), (28, 32, 27))):
        for base in (plus, minus):
            norm1.weight[base] = norm1.weight[base + 1] = Q2_SCALE * A_SUM / sqrt2
        for out, sign in ((2 * c, -1), (2 * c + 1, 1)):  # the pair [-prod + K, prod - K]
            conv1.weight[out, plus, 1, 1] = conv1.weight[out, plus + 1, 1, 1] = sign * w
            conv1.weight[out, minus, 1, 1] = conv1.weight[out, minus + 1, 1, 1] = -sign * w
            conv1.bias[out] = -sign * K_PRODUCT
        norm2.weight[2 * c] = norm2.weight[2 * c + 1] = 1
        for out, sign in ((4 * c, 1), (4 * c + 1, -1)):
            conv2.weight[out, 2 * c, 1, 1] = sign * K_PRODUCT
            conv2.weight[out, 2 * c + 1, 1, 1] = -sign * K_PRODUCT
            conv2.bias[out] = -sign * K_PRODUCT
            res.skip_connection.weight[out, carrier, 0, 0] = sign
        res.skip_connection.bias[4 * c + 2] = A_BIG
        res.skip_connection.bias[4 * c + 3] = -A_BIG
    # Block 11: h = G1(t) (z - mean z) - G2(t) (x0 - mean x0), next to the head's anchors; x0's
    # contrast channel is the edges' |contrast| (a SiLU absolute value) in the latent's units.
    res = blocks[11][0]
    norm1, conv1, norm2, conv2 = res.in_layers[0], res.in_layers[2], res.out_layers[0], res.out_layers[3]
    contrast = float(toy_model._CONTRAST_GAIN / toy_model._COLOUR_GAIN[0]) * 0.5 / _edge_peak()
    for c in range(4):
        norm1.weight[64 + 4 * c] = norm1.weight[64 + 4 * c + 1] = A_Z / sqrt2
        norm1.weight[4 * c] = norm1.weight[4 * c + 1] = (A_BIG if c < 3 else ABS_SCALE * A_BIG) / sqrt2
        for out, src in ((4 * c, 64 + 4 * c), (4 * c + 2, 4 * c)):
            if out == 4 * c + 2 and c == 3:
                pos, neg = (contrast / ABS_SCALE,) * 2  # silu(a E) + silu(-a E) ~ a |E|
            else:
                pos, neg = 1.0, -1.0  # silu(x) - silu(-x) = x
            conv1.weight[out, src, 1, 1], conv1.weight[out, src + 1, 1, 1] = pos, neg
            conv1.weight[out + 1, src, 1, 1], conv1.weight[out + 1, src + 1, 1, 1] = -pos, -neg
        norm2.weight[4 * c:4 * c + 4] = 1
        for out, sign in ((4 * c, 1), (4 * c + 2, -1)):
            conv2.weight[out, 4 * c, 1, 1] = sign * TIME_GAIN
            conv2.weight[out, 4 * c + 1, 1, 1] = -sign * TIME_GAIN
            conv2.weight[out, 4 * c + 2, 1, 1] = -sign * TIME_GAIN
            conv2.weight[out, 4 * c + 3, 1, 1] = sign * TIME_GAIN
        res.skip_connection.bias[4 * c + 1] = A_HEAD
        res.skip_connection.bias[4 * c + 3] = -A_HEAD
    worst = fit_time_gains(unet, sigma_p2)
    # The head: eps_c = (A_HEAD / 2) (n + 1) of the pair [h_c, A_HEAD], about h_c - mean h_c.
    norm, conv = unet.out[0], unet.out[2]
    norm.weight[:16] = 1
    for c in range(4):
        conv.weight[c, 4 * c, 1, 1] = A_HEAD / 2
        conv.weight[c, 4 * c + 2, 1, 1] = -A_HEAD / 2
        conv.bias[c] = A_HEAD / 2
    for p in list(blocks.parameters()) + list(unet.out.parameters()):
        p.requires_grad_(False)
    return worst


ENCODER_PREFIXES = ("input_blocks.", "middle_block.")


def load_encoder(unet, state):
    """Loads a weights file's encoder (``ENCODER_PREFIXES`` keys of ``state``) into the toy's
    ``UNetModel`` from ``build_unet`` and sets its decoder (``build_decoder``): the file does not
    hold the decoder, which is made by this code, not trained."""
    missing = [k for k in unet.state_dict() if k.startswith(ENCODER_PREFIXES) and k not in state]
    if missing:
        raise ValueError(f"the weights lack {len(missing)} encoder tensors, e.g. {missing[0]}")
    unet.load_state_dict({k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}, strict=False)
    set_conv_in(unet)
    set_time_embed(unet)
    build_decoder(unet)


def save(path, unet, vae_state, metadata):
    """Writes the encoder (fp16) and the VAE into one safetensors file, with ``metadata``."""
    import os

    import safetensors.torch

    sd = {"unet." + k: v.detach().half().cpu().contiguous() for k, v in unet.state_dict().items()
          if k.startswith(ENCODER_PREFIXES)}
    sd.update({"vae." + k: v.detach().half().cpu().contiguous() for k, v in vae_state.items()})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {k: str(v) for k, v in metadata.items()} | {
        "decoder": "set", "fields": "True", "kinds": "disc", "attention_heads": "1", "objects": str(OBJECTS),
        "widths": ",".join(map(str, WIDTHS))}
    safetensors.torch.save_file(sd, path, metadata=meta)


def main(argv=None):
    """Trains the encoder of a set-decoder toy model and writes it with the VAE of ``--vae-from``."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", default=toy_model.WEIGHTS)
    parser.add_argument("--seed", type=int, default=71)
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--minutes", type=float, help="cut the steps to this time budget")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-t", type=int, default=MAX_T, help="train on timesteps below this")
    parser.add_argument("--objects", type=int, default=OBJECTS, help="objects per scene (0: 1-3)")
    parser.add_argument("--reach", type=float, default=REACH, help="clip the fields' targets at this")
    parser.add_argument("--inverted-share", type=float, default=0.0,
                        help="share of each batch from latents DDIM inversion through this U-Net visits")
    parser.add_argument("--init", help="continue from this weights file's encoder")
    parser.add_argument("--vae-from", default=toy_model.WEIGHTS, help="the VAE to ship (a weights file)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from bench import comfy_env

    dragnoise = comfy_env.start(pytorch_attention=True)
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(message):
        print(f"[{time.time() - start:7.1f} s] {message}", flush=True)

    vae_state = toy_model.read(args.vae_from)[1]
    base = build_unet(seed=args.seed)
    unet = base.diffusion_model
    if args.init:
        load_encoder(unet, toy_model.read(args.init)[0])
    else:
        build_decoder(unet)  # inverted_share's latents go through it
    meta = {"made_by": "toy/set_decoder.py", "seed": args.seed, "batch": args.batch, "lr": args.lr,
            "max_t": args.max_t, "trained_objects": args.objects or "1-3", "reach": args.reach,
            "inverted_share": args.inverted_share, "init": args.init or ""}

    def checkpoint(ema, step):
        trained = build_unet(seed=args.seed).diffusion_model
        trained.load_state_dict(ema)
        save(args.out, trained, vae_state, meta | {"steps": step})
        log(f"wrote {args.out} at step {step}")

    ema, steps = train_encoder(unet, args.seed, args.steps, args.batch, args.lr, log, dragnoise.features.backward_safe,
                               seconds=args.minutes * 60 if args.minutes else None, save=checkpoint,
                               max_t=args.max_t, objects=args.objects or None, reach=args.reach,
                               inverted_share=args.inverted_share)
    unet.load_state_dict(ema)
    save(args.out, unet, vae_state, meta | {"steps": steps})
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
