"""Trains the toy model (toy/model.py) on freshly generated scenes (toy/scenes.py), seeded.

    .venv/bin/python toy/train.py                 # the committed weights: 38 minutes on 2 CPU cores
    .venv/bin/python toy/train.py --quick         # a smoke run of a few steps

Phases:
1. VAE (TAESD layout, purely convolutional, so 64 px crops teach it what whole images need):
   the encoder learns the scene latent of ``model.scene_latent`` (MSE) and the decoder paints
   the image back from it (L1).
2. U-Net: eps-prediction on SD1.5's noise schedule, on rendered scene latents (mostly 16x16
   crops, whose attention is cheap on a CPU, then whole 32x32 latents so the attention sees
   the size it is used at), AdamW with warm-up and cosine decay, EMA of the weights.

   The decoder's three lowest-resolution levels (output blocks 0-8) take no skip features: the
   weights that read them are held at zero (``--skipless-blocks``), so the layout has to reach
   the decoder through the bottleneck. Without this a model this small and briefly trained
   predicts everything from its skips and ignores its bottleneck, unlike SD1.5, whose
   bottleneck carries the semantics (the DragNoise paper, Fig. 1-2): the property the method
   builds on. ``toy/probe.py`` measures it. ``--pointwise-top`` (off for the committed weights)
   also keeps the one skip left, the top level's, from seeing more of z_t than each pixel
   (``hold_top_pointwise``).

   ``--moved-pairs`` (off for the committed weights) trains part of each batch on pairs of a
   scene and the same scene with one object moved: the decoder sees the first's noisy latent
   and skips with the second's bottleneck and learns to predict the second. With
   ``--skipless-blocks 11 --moved-pairs 0.5`` the bottleneck's share of the layout goes from 0.01
   to 0.59 (toy/FINDINGS.md). ``--shaded`` trains on shaded objects; ``--bottleneck-rms`` rescales
   the trained bottleneck exactly (``model.rescale_bottleneck``) so that Adam's learning rate
   reaches it (both off for the committed weights).

   ``--heads 1`` (the committed weights have SD1.5's 8) gives the transformers one attention head
   of the top level's 32 channels instead of 8 of 4, which PyTorch's CPU attention runs about 2.2
   times faster per training step on 2 cores (bench/bench_toy_training.py, BENCHMARKS.md). In
   the one-head run of toy/FINDINGS.md a step of 8 whole latents took 0.85 s, one of 32 crops 1.25 s.

   ``--parametric`` (off for the committed weights) replaces these U-Net steps with
   ``train_parametric``: whole latents, the bottleneck taught to hold each object as a few numbers
   and the supervision feature each pixel's offset from its object's centre (toy/parametric.py);
   ``--kinds disc`` keeps the scenes to the one kind of object that map describes.
   ``--map-steps N`` first trains the decoder N steps to draw x0 from that map alone
   (``train_map_decoder``).

   ``--fields`` (off for the committed weights) replaces them with ``train_fields``: a world of
   palette-coloured discs whose bottleneck holds coordinate fields, output blocks 0-8 set to
   carry them to the supervision feature (toy/fields.py), the rest trained.

3. Optionally (``--align-steps``, off for the committed weights), a fine-tune that trains the
   motion loss's gradient itself to head for the moved scene's bottleneck
   (``train_drag_alignment``): the optimization, not only the decoder, is what has to find the
   moved object (toy/FINDINGS.md).
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import comfy_env  # noqa: E402
from toy import batch_render  # noqa: E402
from toy import model as toy_model  # noqa: E402
from toy.probe import (EDIT_TIMESTEP, BottleneckScale, NoisyBottleneck, SwapBottleneck, alphas_cumprod, bottleneck_rms,  # noqa: E402
                       bottleneck_share, noised)
from toy import parametric  # noqa: E402
from toy.scenes import KINDS, moved_pair, moved_part_way, pair_drag, random_scene  # noqa: E402


class SceneSource:
    """Random scenes at the toy's size, drawn on demand from one seeded generator. Rendered by
    the numpy renderer into numpy arrays, or, given a ``device``, by ``toy.batch_render`` into
    tensors on it (the same pixels, a whole batch at once on that device)."""

    def __init__(self, seed, shaded=False, device=None, kinds=KINDS, palette=None):
        self.rng = np.random.default_rng(seed)
        self.shaded = shaded
        self.device = device
        self.kinds = kinds
        self.palette = palette

    def scenes(self, n):
        """``n`` whole random scenes (``toy.scenes.Scene``), not rendered."""
        return [random_scene(self.rng, toy_model.IMAGE_SIZE, kinds=self.kinds, shaded=self.shaded, palette=self.palette)
                for _ in range(n)]

    def images(self, n, crop=None):
        """[n, crop, crop, 3] float32 images (whole scenes when ``crop`` is None), randomly
        flipped and rotated by multiples of 90 degrees."""
        scenes, views = [], []
        for _ in range(n):
            scenes.append(random_scene(self.rng, toy_model.IMAGE_SIZE, kinds=self.kinds, shaded=self.shaded,
                                       palette=self.palette))
            views.append(self._view(crop))
        return self._augment(self._render(scenes), views, crop)

    def moved_pairs(self, n, crop=None, interpolate=False):
        """Three [n, crop, crop, 3] arrays and [n] shares: scenes, the same scenes with one object
        moved by up to a third of the image, and with it moved a random share of that way (all the
        way unless ``interpolate``); same crop, rotation and flip."""
        a, b, part, shares, views = [], [], [], [], []
        for _ in range(n):
            scene, index, moved = moved_pair(self.rng, toy_model.IMAGE_SIZE, shaded=self.shaded)
            a.append(scene)
            b.append(moved)
            shares.append(float(self.rng.uniform(0, 1)) if interpolate else 1.0)
            part.append(moved_part_way(scene, index, moved, shares[-1]) if interpolate else moved)
            views.append(self._view(crop))
        a, b = (self._augment(self._render(s), views, crop) for s in (a, b))
        part = self._augment(self._render(part), views, crop) if interpolate else b
        return a, b, part, torch.tensor(shares)

    def drag_cases(self, n):
        """Moved pairs as a drag sees them, whole scenes, no augmentation: three [n, S, S, 3] arrays
        (A, B = A with one object moved, A with it moved a random share of the way), the shares
        [n], the handles [n, 2] (row, col) in image pixels (on the object, near its centre, moved
        that share of the way) and the drag's unit directions [n, 2] (row, col)."""
        a, b, part, shares, handles, directions = [], [], [], [], [], []
        for _ in range(n):
            scene, index, moved = moved_pair(self.rng, toy_model.IMAGE_SIZE, shaded=self.shaded)
            drag = np.asarray(pair_drag(scene, index, moved))
            share = float(self.rng.uniform(0, 1))
            shares.append(share)
            obj = scene.objects[index]
            x, y = np.add(obj.center, self.rng.uniform(-0.3, 0.3, size=2) * obj.radius) + share * drag
            a.append(scene.render())
            b.append(moved.render())
            part.append(moved_part_way(scene, index, moved, share).render())
            handles.append((y, x))
            directions.append(drag[::-1] / max(float(np.hypot(*drag)), 1e-6))
        return (np.stack(a), np.stack(b), np.stack(part), torch.tensor(shares).float(), torch.tensor(handles).float(),
                torch.tensor(np.stack(directions)).float())

    def drags(self, n):
        """Moved pairs as a user drags them, whole scenes, no augmentation: two [n, S, S, 3]
        arrays (A, and B = A with one object moved) and the drags: handles and targets, [n] of
        (x, y) image pixels, the handle on the object near its centre, the target as far again."""
        a, b, handles, targets = [], [], [], []
        for _ in range(n):
            scene, index, moved = moved_pair(self.rng, toy_model.IMAGE_SIZE, shaded=self.shaded)
            obj = scene.objects[index]
            handle = np.add(obj.center, self.rng.uniform(-0.3, 0.3, size=2) * obj.radius)
            a.append(scene.render())
            b.append(moved.render())
            handles.append(tuple(float(v) for v in handle))
            targets.append(tuple(float(v) for v in handle + np.asarray(pair_drag(scene, index, moved))))
        return np.stack(a), np.stack(b), handles, targets

    def _render(self, scenes):
        if self.device is None:
            return np.stack([s.render() for s in scenes])
        return batch_render.render(scenes, self.device)

    def _view(self, crop):
        """A random crop (its top-left corner on the latent grid), rotation and flip."""
        corner = tuple(int(v) * 8 for v in self.rng.integers(0, (toy_model.IMAGE_SIZE - crop) // 8 + 1, size=2)) if crop else None
        return corner, int(self.rng.integers(4)), bool(self.rng.random() < 0.5)

    def _augment(self, images, views, crop):
        """Image i of the [n, S, S, 3] batch ``images`` cropped, rotated and flipped as ``views[i]``."""
        out = []
        for image, (corner, k, flip) in zip(images, views):
            if corner:
                image = image[corner[0]:corner[0] + crop, corner[1]:corner[1] + crop]
            if torch.is_tensor(image):
                image = torch.rot90(image, k, dims=(0, 1))
                out.append(torch.flip(image, dims=(1,)) if flip else image)
            else:
                image = np.rot90(image, k)
                out.append(np.ascontiguousarray(image[:, ::-1] if flip else image))
        return torch.stack(out) if torch.is_tensor(images) else np.stack(out)


def log(message, start):
    print(f"[{time.time() - start:7.1f}s] {message}", flush=True)


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _cpu_bf16():
    """Whether this CPU computes bfloat16 natively (without it, autocast's bf16 convolutions are
    emulated and many times slower than float32)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_vae(ae, source, steps, batch, lr, start, device=torch.device("cpu")):
    """TAESD encoder: image in [0, 1] -> scene latent in model units (MSE); decoder: scene latent
    -> image (L1). ComfyUI's TAESD wrapper scales by ``vae_scale`` (SD1.5's 0.18215) on the way in
    and out, so its raw latents are the usual raw VAE units."""
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    ae.vae_scale.requires_grad_(False)
    bf16 = device.type != "cpu" or _cpu_bf16()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(100, steps // 10 + 1))
        images = torch.as_tensor(source.images(batch, crop=64)).to(device)
        target = toy_model.scene_latent(images)
        pixels = images.movedim(-1, 1)
        # The decoder sees slightly perturbed latents: the U-Net's outputs are never exact.
        noisy = target + 0.05 * torch.randn_like(target)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            encoded = ae.taesd_encoder(pixels)
            decoded = ae.taesd_decoder(noisy)
        enc_loss = torch.nn.functional.mse_loss(encoded.float(), target)
        dec_loss = (decoded.float() - pixels).abs().mean()
        opt.zero_grad(set_to_none=True)
        (enc_loss + dec_loss).backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps}: encoder mse {enc_loss.item():.4f}, decoder l1 {dec_loss.item():.4f}", start)


def hold_skips_at_zero(unet, blocks):
    """Zeroes, and keeps at zero through training, the weights with which output blocks
    ``blocks`` read their skip feature (the last channels of their concatenated input)."""
    for i in blocks:
        skip_channels = unet.input_blocks[len(unet.output_blocks) - 1 - i][0].out_channels
        res = unet.output_blocks[i][0]
        for conv in (res.in_layers[2], res.skip_connection):
            keep = torch.ones_like(conv.weight)
            keep[:, -skip_channels:] = 0
            _hold(conv.weight, keep)


def hold_top_pointwise(unet):
    """Keeps the decoder's top level from seeing z_t's neighbourhood: ``conv_in``, the part of the
    last output block's first convolution that reads its skip, that block's second convolution
    and the output convolution keep only their centre taps, and that block's transformer is held
    at identity. With the other skips held at zero (``--skipless-blocks 11``), each pixel's noise
    prediction then reads z_t at that pixel alone and every layout from the bottleneck: with the
    stock 3x3 taps it sees 9x9 latent pixels of z_t, enough to denoise an object where z_t has
    it and to paint the background where the bottleneck asks for a moved object
    (toy/FINDINGS.md, "A pointwise top level")."""
    res, transformer = unet.output_blocks[-1][0], unet.output_blocks[-1][1]
    skip_channels = unet.input_blocks[0][0].out_channels
    for conv, channels in ((unet.input_blocks[0][0], slice(None)), (res.in_layers[2], slice(-skip_channels, None)),
                           (res.out_layers[3], slice(None)), (unet.out[2], slice(None))):
        keep = torch.ones_like(conv.weight)
        keep[:, channels] = 0
        keep[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1
        _hold(conv.weight, keep)
    for tensor in (transformer.proj_out.weight, transformer.proj_out.bias):
        _hold(tensor, torch.zeros_like(tensor))


def _hold(weight, keep):
    """Multiplies ``weight`` by ``keep`` now and its gradient at every backward."""
    with torch.no_grad():
        weight.mul_(keep)
    weight.register_hook(lambda grad, keep=keep: grad * keep)


def moved_target(zt, goal, alpha_bar):
    """The noise target [B, 4, h, w] whose x0 estimate from z_t is ``goal``, and its loss weight:
    eps-MSE weighs x0 errors by a/(1-a), next to nothing at the edit step (0.1 at t=681), so
    moved samples are weighed as x0 errors instead (capped at 10)."""
    return (zt - alpha_bar.sqrt() * goal) / (1 - alpha_bar).sqrt(), ((1 - alpha_bar) / alpha_bar).clamp(1, 10)


def step_with_ema(unet, opt, ema, decay):
    """One optimizer step (gradients clipped to norm 1), then the EMA ``ema`` of the weights."""
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        for key, v in unet.state_dict().items():
            ema[key].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.is_floating_point() else ema[key].copy_(v)


def train_unet(unet, source, steps, full_from, batch, full_batch, lr, start, backward_safe,
               moved_fraction=0.0, moved_min_t=300, moved_lag=0, moved_interpolate=False, bottleneck_noise=0.0,
               self_lag=0):
    """eps-MSE at uniform random timesteps; returns the EMA weights.

    With ``moved_fraction`` > 0, that share of each batch are *moved pairs*: a scene A, and B, A
    with one object moved, noised with the same noise, A at t >= ``moved_min_t``, B at up to
    ``moved_lag`` steps noisier (DragNoise propagates the edit step's bottleneck to later steps). A's
    sample runs on A's noisy latent and skips but B's bottleneck, and learns to predict the
    noise that makes its x0 estimate B's: the decoder takes the layout from the bottleneck and
    the noise from the skips. B's sample is an ordinary one. With ``moved_interpolate``, A's
    sample gets its own bottleneck moved a random share s of the way to B's, and learns to predict
    A with the object moved s of the way: the decoder becomes smooth along that line, so small
    steps of the bottleneck move the object a little (what a gradient-based drag needs).
    ``bottleneck_noise`` adds noise of that many times its RMS to every bottleneck, so that
    directions no scene moves the bottleneck in change little downstream.

    With ``self_lag`` > 0, that many ordinary samples per step (at t >= ``moved_min_t``) get their
    *own* bottleneck from up to ``moved_lag`` steps noisier (the same scene and noise, one more
    sample in the batch) and learn to predict their own noise, weighed as an x0 error: what
    DragNoise's propagation asks even of a drag of length zero, whose edit-step bottleneck stands
    in at the later steps.
    """
    device = next(unet.parameters()).device
    ab = alphas_cumprod().to(device)
    context = toy_model.default_conditioning().to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    for step in range(steps):
        decay = min(0.999, (1 + step) / (10 + step))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(200, steps // 10 + 1))
        full = step >= full_from
        n = full_batch if full else batch
        crop = None if full or toy_model.IMAGE_SIZE <= 128 else 128
        k = min(n // 2, round(n * moved_fraction / 2))
        scenes, moved, partial, shares = source.moved_pairs(k, crop, moved_interpolate) if k else ((), (), (), None)
        plain = torch.as_tensor(source.images(n - 2 * k, crop))
        j = min(self_lag, len(plain))
        # Layout: A (k) | ordinary (n - 2k; the first j take a lagged own bottleneck) | those j
        # again, noisier | B (k): SwapBottleneck pairs the first k with the last k.
        images = torch.cat([torch.as_tensor(x) for x in (scenes, plain, plain[:j], moved) if len(x)])
        z0 = toy_model.scene_latent(images).to(device)
        goal = toy_model.scene_latent(partial).to(device) if k and moved_interpolate else z0[-k:]
        t = torch.randint(0, 1000, (n + j,))
        eps = torch.randn_like(z0)
        if k:
            t[:k] = torch.randint(moved_min_t, 1000, (k,))
            t[-k:] = (t[:k] + torch.randint(0, moved_lag + 1, (k,))).clamp(max=999) if moved_lag else t[:k]
            eps[-k:] = eps[:k]
        if j:
            own, lagged = slice(k, k + j), slice(n - k, n - k + j)
            t[own] = torch.randint(moved_min_t, 1000, (j,))
            t[lagged] = (t[own] + torch.randint(0, moved_lag + 1, (j,))).clamp(max=999)
            eps[lagged] = eps[own]
        t = t.to(device)
        a = ab[t][:, None, None, None]
        zt = noised(z0, eps, a)
        target, weight = eps.clone(), torch.ones_like(a)
        if k:
            target[:k], weight[:k] = moved_target(zt[:k], goal, a[:k])
        if j:
            weight[own] = moved_target(zt[own], z0[own], a[own])[1]
        scale = BottleneckScale()
        options = {"patches": {"output_block_patch": [scale, SwapBottleneck(k, shares if moved_interpolate else None),
                                                      CopyBottleneck(k, n - k, j), NoisyBottleneck(bottleneck_noise)]}}
        with backward_safe(unet, "norm inputs"):
            pred = unet(zt, timesteps=t.float(), context=context.expand(n + j, -1, -1), transformer_options=options)
            loss = (weight * (pred - target) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        step_with_ema(unet, opt, ema, decay)
        if step % 50 == 0 or step == steps - 1:
            swapped = f", moved pairs {torch.nn.functional.mse_loss(pred[:k], target[:k]).item():.4f}" if k else ""
            swapped += f", lagged own {torch.nn.functional.mse_loss(pred[own], target[own]).item():.4f}" if j else ""
            rms = scale.mean_square.mean().sqrt().item()
            side = (crop or toy_model.IMAGE_SIZE) // 8
            log(f"unet step {step + 1}/{steps} ({side}x{side}): loss {loss.item():.4f}{swapped}, bottleneck rms {rms:.2f}", start)
    return ema


def shown_scenes(goals, t, moved, taught, source, render_above=None):
    """The scenes the z_t of ``train_parametric``'s samples show, given what each is to predict
    (``goals``) and its timestep ``t`` [B]: the first ``moved`` with one object displaced; then, up
    to ``taught``, where ``t >= render_above``, a fresh scene of ``source``; the rest their goal."""
    shown = [parametric.displaced(s, source.rng) for s in goals[:moved]] + list(goals[moved:])
    if render_above is not None:
        unrelated = [i for i in range(moved, taught) if t[i] >= render_above]
        for i, other in zip(unrelated, source.scenes(len(unrelated))):
            shown[i] = other
    return shown


def quieted(eps, share):
    """``eps`` [B, ...] with that ``share`` of its samples scaled by U(0, 1): DDIM-inverted latents
    hold less noise than forward-noised ones."""
    if not share:
        return eps
    shape = (len(eps),) + (1,) * (eps.ndim - 1)
    quiet = torch.rand(shape, device=eps.device) < share
    return torch.where(quiet, eps * torch.rand(shape, device=eps.device), eps)


def train_parametric(unet, source, steps, batch, lr, start, backward_safe, param_weight=1.0, feature_weight=1.0,
                     render_above=None, quiet_share=0.0):
    """Whole-latent eps-prediction with a parametric bottleneck (``toy.parametric``); returns the
    EMA weights. Every sample's bottleneck learns the ``param_map`` of the scene its z_t shows,
    and its supervision feature the ``offset_field`` of the scene it is asked to predict. Three
    quarters of each batch decode from a true map instead of their own bottleneck (``soften``ed,
    objects held by random nearby cells: the decoder draws an object wherever its offset puts
    it), half of those with z_t of the scene with one object elsewhere (``displaced``, t >= 150):
    the decoder learns to draw what the bottleneck says, not what z_t still shows, as a drag's
    propagation asks. The noise is weighed as an x0 error (capped at 10, as moved pairs are).

    With ``render_above`` = T, the taught samples that are not displaced see, from timestep T up,
    z_t of another scene: there the decoder learns to draw the map alone, whatever z_t shows, so a
    substituted bottleneck is drawn as it is and the old object in z_t leaves no ghost (the
    propagation's own steps below the halt step redraw from the encoder's map down to T). With
    ``quiet_share``, that share of samples has its noise scaled by U(0, 1): a DDIM-inverted latent
    holds far less noise than a forward-noised one, and the encoder must read those too."""
    device = next(unet.parameters()).device
    ab = alphas_cumprod().to(device)
    context = toy_model.default_conditioning().to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    feature = {}
    hook = unet.output_blocks[parametric.FEATURE_BLOCK][-1].register_forward_hook(
        lambda module, inputs, output: feature.__setitem__("F", output))
    taught, moved = (3 * batch) // 4, (3 * batch) // 8
    rng = source.rng
    for step in range(steps):
        decay = min(0.999, (1 + step) / (10 + step))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(200, steps // 10 + 1))
        goals = source.scenes(batch)  # what each sample is to predict
        t = torch.randint(0, 1000, (batch,), device=device)
        t[:moved] = torch.randint(150, 1000, (moved,), device=device)
        shown = shown_scenes(goals, t, moved, taught, source, render_above)  # what each z_t shows
        anchors = shown[:moved] + goals[moved:taught]  # a displaced object stays held by the cell z_t shows it in
        told = parametric.soften(parametric.param_map(goals[:taught], rng, anchors=anchors), rng).to(device)
        goal = toy_model.scene_latent(np.stack([s.render() for s in goals])).to(device)
        z0 = goal.clone()  # the samples that show their own goal: rendered once
        other = [i for i in range(batch) if shown[i] is not goals[i]]
        if other:
            z0[other] = toy_model.scene_latent(np.stack([shown[i].render() for i in other])).to(device)
        eps = torch.randn_like(z0)
        eps = quieted(eps, quiet_share)
        a = ab[t][:, None, None, None]
        zt = noised(z0, eps, a)
        target, weight = moved_target(zt, goal, a)  # = eps where z0 is the goal
        patch = parametric.ParamBottleneck(told)
        with backward_safe(unet, "norm inputs"):
            pred = unet(zt, timesteps=t.float(), context=context.expand(batch, -1, -1),
                        transformer_options={"patches": {"output_block_patch": [patch]}})
            noise_loss = (weight * (pred - target) ** 2).mean()
            param_loss = torch.nn.functional.mse_loss(patch.encoded[:, :parametric.CHANNELS], parametric.param_map(shown).to(device))
            feature_loss = torch.nn.functional.mse_loss(feature["F"][:, :3], parametric.offset_field(goals).to(device))
            loss = noise_loss + param_weight * param_loss + feature_weight * feature_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
        step_with_ema(unet, opt, ema, decay)
        if step % 50 == 0 or step == steps - 1:
            log(f"parametric step {step + 1}/{steps}: noise {noise_loss.item():.4f}, bottleneck map {param_loss.item():.4f}, "
                f"offset field {feature_loss.item():.4f}", start)
    hook.remove()
    return ema


def train_fields(unet, source, steps, batch, lr, start, backward_safe, encoder_weight=100.0, quiet_share=0.25,
                 seconds=None):
    """Whole-latent eps-prediction with a field bottleneck (``toy.fields``; ``fields.build_linear_decoder``
    has set and frozen output blocks 0-8); returns the EMA weights.

    Every sample's bottleneck learns the ``field_map`` of the scene its z_t shows (MSE, times
    ``encoder_weight``). Three quarters of each batch decode from the true field map of the scene
    they are to predict instead of their own bottleneck, a third of those with z_t of that scene
    with one object elsewhere (``parametric.displaced``, t >= 150): the top level learns to draw
    what the fields say, not what z_t still shows, as a drag's propagation asks. The rest decode
    from their own bottleneck, so the decoder also meets the encoder's errors. The noise is weighed
    as an x0 error (capped at 10). ``quiet_share`` of the samples have their noise scaled by
    U(0, 1), as DDIM-inverted latents hold less noise than forward-noised ones.

    With ``seconds``, the run takes at most about that long: after 20 steps, ``steps`` is cut to
    what the measured pace allows (the learning-rate schedule follows the cut). Returns the EMA
    weights and the number of steps taken."""
    from toy import fields

    device = next(unet.parameters()).device
    ab = alphas_cumprod().to(device)
    context = toy_model.default_conditioning().to(device)
    trained = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    taught, moved = (3 * batch) // 4, batch // 4
    rng = source.rng
    step, paced_from = 0, None
    while step < steps:
        if seconds and step == 5:
            paced_from = time.time()  # the first steps include one-off warm-up
        if seconds and step == 20:
            pace = (time.time() - paced_from) / 15
            steps = max(21, min(steps, 20 + int((seconds - (time.time() - start)) / pace)))
            log(f"fields: {pace:.3f} s a step, {steps} steps fit in {seconds:.0f} s", start)
        decay = min(0.999, (1 + step) / (10 + step))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(200, steps // 10 + 1))
        goals = source.scenes(batch)
        t = torch.randint(0, 1000, (batch,), device=device)
        t[:moved] = torch.randint(150, 1000, (moved,), device=device)
        shown = [parametric.displaced(s, rng) for s in goals[:moved]] + list(goals[moved:])
        shown_map = fields.field_map(shown, source.device)
        told = torch.cat([fields.field_map(goals[:moved], source.device), shown_map[moved:taught]]) if moved else shown_map[:taught]
        jitter = torch.randn(told.shape, generator=torch.Generator().manual_seed(int(rng.integers(2 ** 31))))
        told = (told + 0.01 * jitter.to(told.device)).to(device)
        shown_map = shown_map.to(device)
        goal = toy_model.scene_latent(source._render(goals)).to(device)
        z0 = goal.clone()
        if moved:
            z0[:moved] = toy_model.scene_latent(source._render(shown[:moved])).to(device)
        eps = torch.randn_like(z0)
        eps = quieted(eps, quiet_share)
        a = ab[t][:, None, None, None]
        zt = noised(z0, eps, a)
        target, weight = moved_target(zt, goal, a)
        patch = parametric.ParamBottleneck(told)
        with backward_safe(unet, "norm inputs"):
            pred = unet(zt, timesteps=t.float(), context=context.expand(batch, -1, -1),
                        transformer_options={"patches": {"output_block_patch": [patch]}})
            per_sample = weight * (pred - target) ** 2
            noise_loss = per_sample.mean()
            map_loss = torch.nn.functional.mse_loss(patch.encoded[:, :fields.FIELDS], shown_map)
            loss = noise_loss + encoder_weight * map_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
        step_with_ema(unet, opt, ema, decay)  # the frozen blocks have no gradients: the clipping skips them
        if step % 50 == 0 or step == steps - 1:
            log(f"fields step {step + 1}/{steps}: noise {noise_loss.item():.4f} (taught {per_sample[:taught].mean().item():.4f}, "
                f"own {per_sample[taught:].mean().item():.4f}), field map {map_loss.item():.5f}", start)
        step += 1
    return ema, steps


def train_map_decoder(unet, source, steps, batch, lr, start, backward_safe, min_t=300):
    """Teach a ``--parametric`` U-Net's decoder to draw x0 from the bottleneck's map alone, before
    ``train_parametric`` (toy/FINDINGS.md, "What that gate measured, and how fast a decoder learns
    the layout": this is that gate, where its decoder's layout error fell from 0.51 to 0.19 in
    3500 steps). Every sample's bottleneck is the true ``param_map`` of the scene it is to
    predict, and its z_t, at t in [``min_t``, 1000), shows another scene, so only the map can say
    where anything is; the loss is the x0 error of the noise prediction (squared, capped at 100).
    Trains ``unet`` in place (no EMA: ``train_parametric`` starts its own from these weights)."""
    device = next(unet.parameters()).device
    ab = alphas_cumprod().to(device)
    context = toy_model.default_conditioning().to(device).expand(batch, -1, -1)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(40, steps // 10 + 1))
        goals, others = source.scenes(batch), source.scenes(batch)
        goal, other = (toy_model.scene_latent(np.stack([s.render() for s in group])).to(device) for group in (goals, others))
        t = torch.randint(min_t, 1000, (batch,), device=device)
        a = ab[t][:, None, None, None]
        zt = noised(other, torch.randn_like(other), a)
        patch = parametric.ParamBottleneck(parametric.param_map(goals).to(device))
        with backward_safe(unet, "norm inputs"):
            pred = unet(zt, timesteps=t.float(), context=context, transformer_options={"patches": {"output_block_patch": [patch]}})
            loss = ((zt - (1 - a).sqrt() * pred) / a.sqrt() - goal).square().clamp(max=100).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"map decoder step {step + 1}/{steps}: x0 error {loss.item():.4f}", start)


class CopyBottleneck:
    """``output_block_patch``: samples ``dst`` .. ``dst + n`` of the batch continue from the
    bottleneck of samples ``src`` .. ``src + n``."""

    def __init__(self, dst, src, n):
        self.dst, self.src, self.n = dst, src, n

    def __call__(self, h, hsp, transformer_options):
        if self.n and transformer_options.get("block") == ("output", 0):
            h = torch.cat([h[:self.dst], h[self.src:self.src + self.n], h[self.dst + self.n:]])
        return h, hsp


class SetBottleneck:
    """``output_block_patch``: the first ``len(values)`` samples of the batch continue from the
    bottlenecks ``values`` ([k, C, h, w]) instead of their own."""

    def __init__(self, values):
        self.values = values

    def __call__(self, h, hsp, transformer_options):
        if transformer_options.get("block") == ("output", 0):
            h = torch.cat([self.values.to(h), h[len(self.values):]])
        return h, hsp


DDIM_TIMESTEPS = tuple(range(981, 0, -20))  # ComfyUI's ddim_uniform schedule, 50 steps (then 0)
EDIT_INDEX = DDIM_TIMESTEPS.index(EDIT_TIMESTEP)  # inversion strength 0.7
HALT_STEP = 10  # the pack's default: the last 10 steps run without substitution


@torch.no_grad()
def propagation_states(dragnoise, unet, z0, goal_bottleneck_of, context, ab, halt_step=HALT_STEP):
    """The states the pack's drag visits, on the bare U-Net: ``z0`` [2k, 4, h, w] (k scenes A,
    then k scenes B) DDIM-inverted to the edit step as ``dragnoise.inversion`` does (the U-Net
    told the destination timestep), then A's propagation from there as
    ``dragnoise.propagation`` runs it, with the bottleneck ``goal_bottleneck_of(a, b)`` (A's and
    B's edit-step bottlenecks, [k, C, h/8, w/8] each) substituted down to the halt step.

    Returns (z [35k, 4, h, w], t [35k], substituted [35k] bool, pair [35k] index into A,
    bottleneck [k, C, h/8, w/8]) and the propagation's output x0 [k, 4, h, w].
    """
    k = len(z0) // 2

    def eps_of(z, t, patch=None):
        options = {"patches": {"output_block_patch": [patch]}} if patch else {}
        return unet(z, timesteps=torch.full((len(z),), float(t), device=z.device), context=context.expand(len(z), -1, -1),
                    transformer_options=options)

    ddim_step = dragnoise.optimize.ddim_step
    up = (0,) + DDIM_TIMESTEPS[EDIT_INDEX:][::-1]
    z = z0
    for cur, nxt in zip(up, up[1:]):
        z = ddim_step(z, eps_of(z, nxt), ab[cur], ab[nxt])
    # A bare U-Net has no model patches: run_encoder reads only model_options from its model.
    enc = dragnoise.features.run_encoder(SimpleNamespace(model_options={}), unet, z, EDIT_TIMESTEP, 0.0,
                                         context.expand(len(z), -1, -1))
    bottleneck = goal_bottleneck_of(*enc.bottleneck.split(k))
    z = z[:k]
    down = DDIM_TIMESTEPS[EDIT_INDEX:]
    states, times, substituted = [], [], []
    for i, t in enumerate(down):
        sub = i < len(down) - halt_step
        states.append(z)
        times.append(t)
        substituted.append(sub)
        # The last step goes to t = 0: alpha_bar 1, where the DDIM step gives its x0 estimate.
        z = ddim_step(z, eps_of(z, t, SetBottleneck(bottleneck) if sub else None), ab[t],
                      ab[down[i + 1]] if i + 1 < len(down) else torch.ones_like(ab[t]))
    n = len(down)
    return (torch.cat(states), torch.tensor(times).repeat_interleave(k), torch.tensor(substituted).repeat_interleave(k),
            torch.arange(k).repeat(n), bottleneck), z


def pack_drag(base, dragnoise, bottleneck_rms_at=1.0, shaded=False):
    """A callable (z0 [1, 4, h, w], handle (x, y), target (x, y)) -> [1, C, h/8, w/8]: the
    bottleneck the pack's DDIM Invert and Bottleneck Optimize (default settings, no mask) find
    for that drag on ``base`` (the toy's BaseModel, as it is being trained). The drag runs with
    the bottleneck rescaled to the RMS ``bottleneck_rms_at``, as the model will be used (Adam's
    steps of the learning rate are tiny at the trained scale); the result is at the trained scale."""
    import json

    import comfy.model_patcher

    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(base, load_device=next(base.parameters()).device, offload_device=cpu)
    positive = toy_model.conditioning()

    def run(z0, handle, target):
        params = [p for p in base.parameters() if p.requires_grad]
        for p in params:  # the optimization needs no weight gradients
            p.requires_grad_(False)
        unet = base.diffusion_model
        with torch.no_grad():
            factor = bottleneck_rms_at / bottleneck_rms(unet, shaded=shaded)
            toy_model.rescale_bottleneck(unet, factor)
        try:
            with torch.inference_mode():
                _, inversion = dragnoise.inversion.ddim_invert(model, z0.cpu() / toy_model.SCALE_FACTOR, positive, 50, 0.7)
                points = dragnoise.points.parse_points(json.dumps([{"handle": list(handle), "target": list(target)}]),
                                                       toy_model.IMAGE_SIZE, toy_model.IMAGE_SIZE)
                edit = dragnoise.optimize.optimize_bottleneck(model, inversion, points)
        finally:
            with torch.no_grad():
                toy_model.rescale_bottleneck(unet, 1 / factor)
            for p in params:
                p.requires_grad_(True)
        return edit.bottleneck.clone() / factor

    return run


def train_propagation(dragnoise, unet, source, steps, pairs, chain, plain, lr, start, halt_step=HALT_STEP,
                      drag=None, dragged_share=0.0, part_way=0.5):
    """Fine-tunes the U-Net on the states the pack's drag visits; returns the EMA weights.

    Every few steps, ``pairs`` moved pairs (A; B, A with one object moved; a random share s of
    the way for a ``part_way`` share of them, all the way for the rest) run through the drag as
    the pack does it with the best bottleneck an optimization could find
    (``propagation_states``: A's and B's DDIM inversion, A's bottleneck moved s of the way to
    B's, A's propagation). Per step, ``chain`` of
    those states (with the substituted bottleneck where the propagation had it) learn to predict
    A with the object moved s of the way, weighed as x0 errors (capped at 10), next to ``plain``
    ordinary samples. Moved pairs trained on forward-noised latents at one step never see what
    the propagation makes of its own earlier steps; this trains every step on exactly that.

    With ``drag`` (``pack_drag``), a ``dragged_share`` of the refills substitute the bottleneck
    the pack's Bottleneck Optimize finds for the drag from A to B (the handle on the object, the
    target where B has it) instead, and learn to predict B: the decoder learns to draw the move
    the optimizer asked for, where the optimizer goes rather than on the line to B's bottleneck.
    """
    device = next(unet.parameters()).device
    ab = alphas_cumprod().to(device)
    context = toy_model.default_conditioning().to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    buffer = None
    for step in range(steps):
        decay = min(0.999, (1 + step) / (10 + step))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(100, steps // 10 + 1))
        if buffer is None or len(buffer[0]) < chain:
            unet.eval()
            if drag is not None and float(torch.rand(())) < dragged_share:
                a, b, handles, targets = source.drags(pairs)
                za, zb = (toy_model.scene_latent(torch.as_tensor(x)).to(device) for x in (a, b))
                optimized = torch.cat([drag(za[i:i + 1], handles[i], targets[i]) for i in range(pairs)]).to(device)
                goal, bottleneck_of = zb, lambda s_a, s_b: optimized
                log(f"propagation step {step + 1}: {pairs} drags optimized by the pack", start)
            else:
                a, b, part, shares = source.moved_pairs(pairs, None, interpolate=True)
                full = torch.rand(pairs) >= part_way
                shares = torch.where(full, torch.ones_like(shares), shares).to(device)
                za, zb, zpart = (toy_model.scene_latent(torch.as_tensor(x)).to(device) for x in (a, b, part))
                goal = torch.where(full.to(device)[:, None, None, None], zb, zpart)
                bottleneck_of = lambda s_a, s_b: s_a + shares[:, None, None, None] * (s_b - s_a)  # noqa: E731
            (z, t, sub, pair, bottleneck), _ = propagation_states(dragnoise, unet, torch.cat([za, zb]), bottleneck_of,
                                                                  context, ab, halt_step)
            unet.train()
            order = torch.randperm(len(z))
            buffer = (z[order], t[order], sub[order], bottleneck[pair[order]], goal[pair[order]])
        take = [x[:chain] for x in buffer]
        buffer = [x[chain:] for x in buffer]
        z_c, t_c, sub_c, s_c, goal_c = take
        first = torch.argsort(~sub_c, stable=True)  # substituted samples first: SetBottleneck sets the first ones
        z_c, t_c, sub_c, s_c, goal_c = z_c[first], t_c[first], sub_c[first], s_c[first], goal_c[first]
        z_plain = toy_model.scene_latent(torch.as_tensor(source.images(plain))).to(device)
        t_plain = torch.randint(0, 1000, (plain,))
        eps_plain = torch.randn_like(z_plain)
        zt_plain = noised(z_plain, eps_plain, ab[t_plain.to(device)][:, None, None, None])
        a_c = ab[t_c.to(device)][:, None, None, None]
        target = torch.cat([(z_c - a_c.sqrt() * goal_c) / (1 - a_c).sqrt(), eps_plain])
        weight = torch.cat([((1 - a_c) / a_c).clamp(max=10), torch.ones(plain, 1, 1, 1, device=device)])
        t_all = torch.cat([t_c, t_plain]).to(device).float()
        patch = SetBottleneck(s_c[sub_c])
        with dragnoise.features.backward_safe(unet, "norm inputs"):
            pred = unet(torch.cat([z_c, zt_plain]), timesteps=t_all, context=context.expand(chain + plain, -1, -1),
                        transformer_options={"patches": {"output_block_patch": [patch]}})
            loss = (weight * (pred - target) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        step_with_ema(unet, opt, ema, decay)
        if step % 50 == 0 or step == steps - 1:
            chain_loss = (weight[:chain] * (pred[:chain] - target[:chain]) ** 2).mean().item()
            log(f"propagation step {step + 1}/{steps}: loss {loss.item():.4f}, chain states {chain_loss:.4f}", start)
    return ema


def train_drag_alignment(unet, source, steps, pairs, plain, lr, weight, start, dragnoise, path_steps=0):
    """Fine-tunes the U-Net so that the motion loss's descent direction heads for the moved scene.

    Per step: ``pairs`` moved pairs (``SceneSource.drag_cases``) at one timestep near the edit
    step. At A's bottleneck moved a random share s of the way to B's, with the handle moved s of
    the way, minus the gradient of Bottleneck Optimize's motion loss (patch radius 1, supervision
    at up_blocks.2) should point along B's bottleneck minus A's: the loss is 1 - their cosine,
    differentiated through the gradient (double backward; PyTorch's math attention supports it).
    The same samples, given that part-way bottleneck, learn to predict A with the object moved s
    of the way (x0-weighted), and ``plain`` ordinary samples keep the rest of the model.

    With ``path_steps`` > 0 the cosine is taken where the optimizer goes, not on that straight
    line: from the part-way bottleneck, 0 to ``path_steps`` moves of 0.05 times the gradient's sign
    (five of Adam's steps at the default learning rate while the sign holds), and there the
    descent direction should point at B's bottleneck.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    feat, optimize = dragnoise.features, dragnoise.optimize
    device = next(unet.parameters()).device
    ab = alphas_cumprod().to(device)
    context = toy_model.default_conditioning().to(device)
    decoder = feat.Decoder(unet, feat.SUPERVISION_BLOCKS[feat.DEFAULT_SUPERVISION], with_output=False)
    grid = (toy_model.IMAGE_SIZE // optimize.FEATURE_SCALE,) * 2
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(20, steps // 10 + 1))
        a, b, part, shares, handles, directions = source.drag_cases(pairs)
        shares, directions = shares.to(device), directions.to(device)
        handles = handles.to(device) / optimize.FEATURE_SCALE  # onto the supervision-feature grid
        t = int(torch.randint(560, 801, ()))
        eps = torch.randn((pairs, 4) + (toy_model.IMAGE_SIZE // 8,) * 2).to(device)
        alpha = ab[t]
        za, zb, zpart = (toy_model.scene_latent(x).to(device) for x in (a, b, part))
        zta, ztb = (noised(z, eps, alpha) for z in (za, zb))
        # A bare U-Net has no model patches: run_encoder reads only model_options from its model.
        enc = feat.run_encoder(SimpleNamespace(model_options={}), unet, torch.cat([zta, ztb]), t, 0.0,
                               context.expand(2 * pairs, -1, -1)).detached_copy()
        s_a, s_b = enc.bottleneck.split(pairs)
        enc_a = feat.EncoderState(s_a, [x[:pairs] for x in enc.skips], enc.emb[:pairs], enc.context[:pairs], None, {})
        s_part = s_a + shares[:, None, None, None] * (s_b - s_a)

        def motion_at(s):
            feature = torch.nn.functional.interpolate(decoder(s, enc_a)[0].float(), size=grid, mode="bilinear",
                                                      align_corners=False)
            return sum(optimize.motion_loss(feature[i:i + 1], handles[i], directions[i], 1) for i in range(pairs))

        s_path = s_part
        # No draw without path steps: the random stream (and so the fine-tune) stays what it was.
        for _ in range(int(torch.randint(0, path_steps + 1, ())) if path_steps else 0):
            with feat.backward_safe(unet, "norm inputs"):
                s = s_path.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(motion_at(s), s)
            s_path = (s_path - 0.05 * grad.sign()).detach()
        with feat.backward_safe(unet, "norm inputs"):
            with sdpa_kernel(SDPBackend.MATH):
                s = s_path.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(motion_at(s), s, create_graph=True)
                cosine = torch.nn.functional.cosine_similarity(-grad.flatten(1), (s_b - s_path).flatten(1), dim=1)
            z_plain = toy_model.scene_latent(source.images(plain)).to(device)
            t_plain = torch.randint(0, 1000, (plain,)).to(device)
            eps_plain = torch.randn_like(z_plain)
            a_plain = ab[t_plain][:, None, None, None]
            zt_plain = noised(z_plain, eps_plain, a_plain)
            moved, moved_weight = moved_target(zta, zpart, alpha)
            target = torch.cat([moved, eps_plain])
            scale = torch.cat([moved_weight.expand(pairs, 1, 1, 1), torch.ones_like(a_plain)])
            pred = unet(torch.cat([zta, zt_plain]), timesteps=torch.cat([torch.full((pairs,), t, device=device), t_plain]).float(),
                        context=context.expand(pairs + plain, -1, -1),
                        transformer_options={"patches": {"output_block_patch": [SetBottleneck(s_part)]}})
            diffusion = (scale * (pred - target) ** 2).mean()
            loss = diffusion + weight * (1 - cosine).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log(f"drag alignment step {step + 1}/{steps}: diffusion loss {diffusion.item():.4f}, "
                f"cosine {cosine.mean().item():.2f}", start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=toy_model.WEIGHTS, help="where to write the weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--unet-steps", type=int, default=1200)
    parser.add_argument("--full-steps", type=int, default=200, help="of the U-Net steps, how many use whole 32x32 latents (at the end)")
    parser.add_argument("--batch", type=int, default=32, help="U-Net batch of 16x16 crops")
    parser.add_argument("--full-batch", type=int, default=0, help="U-Net batch of whole 32x32 latents (0: a quarter of --batch)")
    parser.add_argument("--unet-lr", type=float, default=1e-3, help="peak learning rate of the U-Net (lower to continue a trained one)")
    parser.add_argument("--skipless-blocks", type=int, default=9,
                        help="how many of the decoder's first blocks take no skip feature (0: plain SD1.5 training)")
    parser.add_argument("--pointwise-top", action="store_true",
                        help="the decoder's top level reads z_t one pixel at a time (hold_top_pointwise); an --init that was "
                             "trained so keeps it")
    parser.add_argument("--moved-pairs", type=float, default=0.0,
                        help="share of each U-Net batch trained as moved pairs (bottleneck of the scene with an object moved)")
    parser.add_argument("--moved-lag", type=int, default=0,
                        help="how many timesteps noisier a moved pair's bottleneck may be than its sample")
    parser.add_argument("--self-lag", type=int, default=0,
                        help="ordinary samples per step that get their own bottleneck from up to --moved-lag steps noisier")
    parser.add_argument("--moved-min-t", type=int, default=300, help="the lowest timestep of a moved pair")
    parser.add_argument("--moved-interpolate", action="store_true",
                        help="moved pairs mix the two bottlenecks by a random share and predict the object moved that share of the way")
    parser.add_argument("--bottleneck-noise", type=float, default=0.0,
                        help="noise added to every bottleneck while training, times its RMS")
    parser.add_argument("--bottleneck-rms", type=float, default=0.0,
                        help="after training, rescale the bottleneck to this RMS at the edit step (toy.model.rescale_bottleneck; 0: leave it)")
    parser.add_argument("--align-steps", type=int, default=0,
                        help="after training (and rescaling), fine-tune this many steps so that the motion loss heads for the "
                             "moved scene (train_drag_alignment; 0: none)")
    parser.add_argument("--align-pairs", type=int, default=4, help="moved pairs per drag-alignment step")
    parser.add_argument("--align-plain", type=int, default=4, help="ordinary samples per drag-alignment step")
    parser.add_argument("--align-lr", type=float, default=3e-4, help="peak learning rate of the drag alignment")
    parser.add_argument("--align-weight", type=float, default=1.0, help="weight of 1 - cosine against the diffusion loss")
    parser.add_argument("--align-path-steps", type=int, default=0,
                        help="take the drag alignment's cosine after up to this many sign moves of 0.05 along the motion loss")
    parser.add_argument("--chain-steps", type=int, default=0,
                        help="after the U-Net steps, fine-tune this many steps on the states the pack's drag visits (train_propagation; 0: none)")
    parser.add_argument("--chain-pairs", type=int, default=4, help="moved pairs run through the drag per refill of train_propagation's states")
    parser.add_argument("--chain-states", type=int, default=4, help="of those states, how many per train_propagation step")
    parser.add_argument("--chain-plain", type=int, default=4, help="ordinary samples per train_propagation step")
    parser.add_argument("--chain-part-way", type=float, default=0.5,
                        help="share of train_propagation's moved pairs moved a random part of the way (the rest all the way)")
    parser.add_argument("--chain-dragged", type=float, default=0.0,
                        help="share of train_propagation's refills that substitute the bottleneck the pack's Bottleneck Optimize finds")
    parser.add_argument("--shaded", action="store_true", help="train on shaded objects (scenes.random_scene(shaded=True))")
    parser.add_argument("--kinds", help="the object kinds of the scenes, comma-separated, of: %s (default: all, or an "
                                         "--init's own)" % ", ".join(KINDS))
    parser.add_argument("--parametric", action="store_true",
                        help="train the U-Net steps with a parametric bottleneck and an offset field in the supervision "
                             "feature (train_parametric, toy/parametric.py), on whole latents")
    parser.add_argument("--fields", action="store_true",
                        help="train the U-Net steps with a field bottleneck (train_fields, toy/fields.py): a world of discs "
                             "in a palette of colours, output blocks 0-8 set to carry the fields bilinearly; an --init "
                             "that was trained so keeps it")
    parser.add_argument("--render-above", type=int,
                        help="with --parametric: from this timestep up, taught samples see z_t of another scene, so the "
                             "decoder draws the bottleneck's map alone (default: off)")
    parser.add_argument("--map-steps", type=int, default=0,
                        help="with --parametric: first train the decoder this many steps to draw x0 from the map alone "
                             "(train_map_decoder; 0: none)")
    parser.add_argument("--map-min-t", type=int, default=300, help="the lowest timestep of --map-steps")
    parser.add_argument("--quiet-share", type=float, default=0.0,
                        help="with --parametric: share of samples whose noise is scaled by U(0, 1), as in inverted latents")
    parser.add_argument("--widths", type=lambda v: tuple(int(w) for w in v.split(",")), default=toy_model.WIDTHS,
                        help="the U-Net's channels per level, 4 comma-separated multiples of the first, a multiple of "
                             "32 (default %s; an --init keeps its own)" % ",".join(map(str, toy_model.WIDTHS)))
    parser.add_argument("--heads", type=int, default=8,
                        help="attention heads per transformer (SD1.5's 8; 1 trains about twice as fast on a CPU); an --init keeps its own")
    parser.add_argument("--image-size", type=int,
                        help="scene size in pixels, a multiple of 64 (default 256, or an --init's own; below 256 the "
                             "U-Net trains on whole latents only)")
    parser.add_argument("--vae-from", help="start the VAE from this weights file's (with --vae-steps 0: keep it as it is)")
    parser.add_argument("--init", help="start both networks from this weights file (to continue training)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: the GPU when there is one)")
    parser.add_argument("--minutes", type=float,
                        help="with --fields: cut the U-Net steps to what fits in this many minutes from the start (for a "
                             "run on a borrowed GPU; the weights' metadata records the steps taken)")
    parser.add_argument("--quick", action="store_true", help="at most a few steps of each phase (smoke test)")
    args = parser.parse_args(argv)
    args.kinds = tuple(args.kinds.split(",")) if args.kinds else toy_model.scene_kinds(args.init) if args.init else KINDS
    if len(args.widths) != 4 or args.widths[0] % 32 or any(w % args.widths[0] for w in args.widths):
        parser.error(f"--widths must be 4 multiples of the first, and the first a multiple of 32, not {args.widths}")
    if not 0 <= args.map_min_t < 1000:
        parser.error(f"--map-min-t must be a timestep in 0..999, not {args.map_min_t}")
    if not set(args.kinds) <= set(KINDS):
        parser.error(f"--kinds must be some of {', '.join(KINDS)}, not {','.join(args.kinds)}")
    if args.quick:  # caps each phase, so a phase asked to be skipped stays skipped
        args.vae_steps, args.unet_steps, args.full_steps = min(args.vae_steps, 3), min(args.unet_steps, 4), min(args.full_steps, 2)
        args.batch = 4
        args.align_steps, args.align_pairs, args.align_plain = min(args.align_steps, 2), 2, 2
        args.chain_steps, args.chain_pairs, args.chain_states, args.chain_plain = min(args.chain_steps, 2), 1, 2, 2
        args.map_steps = min(args.map_steps, 2)
    args.image_size = args.image_size or (toy_model.image_size(args.init) if args.init else toy_model.IMAGE_SIZE)
    if args.image_size < 64 or args.image_size % 64:
        parser.error(f"--image-size must be a multiple of 64 (the VAE trains on 64 px crops), not {args.image_size}")
    # The scene sources and probe.py's measures draw scenes of the toy's world size from here.
    toy_model.IMAGE_SIZE = args.image_size
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dragnoise = comfy_env.start(pytorch_attention=True)
    torch.manual_seed(args.seed)
    start = time.time()

    ae = toy_model.build_autoencoder(args.seed)
    if args.init:
        args.heads, args.widths = toy_model.attention_heads(args.init), toy_model.widths(args.init)
    base = toy_model.build_unet(args.seed, args.heads, args.widths)
    kept_rescaling = None  # (bottleneck_rms, trained_bottleneck_rms) of an --init whose rescaling is kept
    if args.init:
        unet_sd, vae_sd = toy_model.read(args.init)
        base.diffusion_model.load_state_dict(unet_sd)
        ae.load_state_dict(vae_sd)
        settings = toy_model.metadata(args.init)
        args.pointwise_top = args.pointwise_top or settings.get("pointwise_top") == "True"
        args.parametric = args.parametric or settings.get("parametric") == "True"
        args.fields = args.fields or settings.get("fields") == "True"
        if float(settings.get("bottleneck_rms", 0)):
            rescaling = float(settings["bottleneck_rms"]), float(settings["trained_bottleneck_rms"])
            if args.unet_steps or args.chain_steps:
                # Adam's per-weight steps are too large for the rescaled weights (10 steps broke a
                # model, toy/FINDINGS.md): continue from the trained scale, and rescale again at the end.
                undo = rescaling[1] / rescaling[0]
                toy_model.rescale_bottleneck(base.diffusion_model, undo)
                log(f"{args.init}: bottleneck rescaling undone (x{undo:.2f}) to continue training", start)
            else:  # the rescaling stays: record the scale it was trained at, so a later run can still undo it
                kept_rescaling = rescaling
    if args.map_steps and not args.parametric:
        parser.error("--map-steps trains the decoder of a parametric bottleneck: add --parametric (or --init a --parametric model)")
    if args.vae_from:
        ae.load_state_dict(toy_model.read(args.vae_from)[1])
    if args.minutes and not args.fields:
        parser.error("--minutes cuts the steps of a --fields run only: add --fields (or --init a --fields model)")
    if args.fields and (args.parametric or args.shaded):
        parser.error("--fields is a world of flat palette discs of its own: drop --parametric and --shaded")
    if args.fields:
        from toy import fields

        args.kinds = ("disc",)
    palette = fields.PALETTE if args.fields else None
    # Off the CPU the scenes are rendered on the device too: the numpy renderer would bound a GPU run.
    render_on = None if device.type == "cpu" else device
    train_vae(ae.to(device), SceneSource(args.seed + 1, args.shaded, render_on, args.kinds, palette), args.vae_steps, 16, 1e-3,
              start, device)

    unet = base.diffusion_model.to(device).train()
    hold_skips_at_zero(unet, range(args.skipless_blocks))
    if args.pointwise_top:
        hold_top_pointwise(unet)
    if args.fields:
        fields.build_linear_decoder(unet)
        ema, args.unet_steps = train_fields(unet, SceneSource(args.seed + 2, False, render_on, args.kinds, palette),
                                            args.unet_steps, args.full_batch or max(4, args.batch // 4), args.unet_lr, start,
                                            dragnoise.features.backward_safe, quiet_share=args.quiet_share,
                                            seconds=args.minutes and 60 * args.minutes)
    elif args.parametric:
        parametric.hold_bottleneck_reads(unet, _hold)
        train_map_decoder(unet, SceneSource(args.seed + 5, args.shaded, None, args.kinds), args.map_steps,
                          args.full_batch or max(4, args.batch // 4), args.unet_lr, start, dragnoise.features.backward_safe,
                          args.map_min_t)
        ema = train_parametric(unet, SceneSource(args.seed + 2, args.shaded, None, args.kinds), args.unet_steps,
                               args.full_batch or max(4, args.batch // 4), args.unet_lr, start, dragnoise.features.backward_safe,
                               render_above=args.render_above, quiet_share=args.quiet_share)
    else:
        ema = train_unet(unet, SceneSource(args.seed + 2, args.shaded, render_on, args.kinds), args.unet_steps,
                         args.unet_steps - args.full_steps, args.batch, args.full_batch or max(1, args.batch // 4), args.unet_lr,
                         start, dragnoise.features.backward_safe, args.moved_pairs, args.moved_min_t, args.moved_lag,
                         args.moved_interpolate, args.bottleneck_noise, args.self_lag)
    unet.load_state_dict(ema)
    if args.chain_steps:
        unet.load_state_dict(train_propagation(dragnoise, unet, SceneSource(args.seed + 4, args.shaded), args.chain_steps,
                                               args.chain_pairs, args.chain_states, args.chain_plain, args.unet_lr, start,
                                               drag=pack_drag(base, dragnoise, args.bottleneck_rms or 1.0, args.shaded),
                                               dragged_share=args.chain_dragged, part_way=args.chain_part_way))
    rms = bottleneck_rms(unet.eval(), shaded=args.shaded)
    if args.bottleneck_rms:
        toy_model.rescale_bottleneck(unet, args.bottleneck_rms / rms)
        log(f"bottleneck rescaled from an RMS of {rms:.2f} to {bottleneck_rms(unet, shaded=args.shaded):.2f}", start)
    if args.align_steps:
        train_drag_alignment(unet.train(), SceneSource(args.seed + 3, args.shaded), args.align_steps, args.align_pairs,
                             args.align_plain, args.align_lr, args.align_weight, start, dragnoise, args.align_path_steps)
    share = bottleneck_share(unet.eval(), shaded=args.shaded)
    target_rms, trained_rms = kept_rescaling or (0.0, rms)
    log(f"bottleneck share of the layout at the edit step (toy/probe.py): {share:.2f}", start)
    toy_model.save(args.out, unet, ae, metadata={
        "made_by": "toy/train.py", "seed": args.seed, "image_size": args.image_size, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
        "full_steps": args.full_steps, "batch": args.batch, "full_batch": args.full_batch, "unet_lr": args.unet_lr, "skipless_blocks": args.skipless_blocks,
        "pointwise_top": args.pointwise_top, "parametric": args.parametric, "fields": args.fields, "render_above": args.render_above, "map_steps": args.map_steps, "map_min_t": args.map_min_t, "quiet_share": args.quiet_share, "kinds": ",".join(args.kinds), "moved_pairs": args.moved_pairs,
        "moved_min_t": args.moved_min_t, "moved_lag": args.moved_lag, "self_lag": args.self_lag,
        "moved_interpolate": args.moved_interpolate, "bottleneck_noise": args.bottleneck_noise,
        "bottleneck_rms": args.bottleneck_rms or target_rms, "shaded": args.shaded, "attention_heads": args.heads, "widths": ",".join(map(str, args.widths)), "align_steps": args.align_steps,
        "align_pairs": args.align_pairs, "align_plain": args.align_plain, "align_lr": args.align_lr,
        "align_weight": args.align_weight, "align_path_steps": args.align_path_steps,
        "chain_steps": args.chain_steps, "chain_pairs": args.chain_pairs, "chain_states": args.chain_states, "chain_plain": args.chain_plain,
        "chain_dragged": args.chain_dragged, "chain_part_way": args.chain_part_way,
        "bottleneck_share": round(share, 3), "trained_bottleneck_rms": round(trained_rms, 3), "init": args.init or "", "vae_from": args.vae_from or "", "seconds": round(time.time() - start)})
    log(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)", start)


if __name__ == "__main__":
    main()
