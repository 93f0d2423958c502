"""How much the toy U-Net takes the layout from its bottleneck: the property DragNoise builds on
(the paper's Fig. 1-2: SD1.5's bottleneck carries the semantics, its skips the detail).

The probe: scene A and B, A with one object moved, noised with the same noise at the same t. The
U-Net runs on A's noisy latent with B's bottleneck (mid-block output) swapped in; the share is
how far its x0 prediction goes from A's own toward B's own, projected on that direction: 0 when
the decoder ignores the bottleneck, 1 when the layout comes from the bottleneck alone.
``truth_substitution`` goes one further: it propagates the truly moved scene's bottleneck through
the pack's own DDIM inversion and propagation, the best a drag could do on the model;
``feature_match`` optimizes the bottleneck for a whole supervision feature map at once, which locates
what the motion loss, one patch a step, leaves of that.

    .venv/bin/python toy/probe.py [--weights toy/weights/toy-sd15.safetensors] [--cases 3]
"""

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # last: the repository's nodes/ must not shadow ComfyUI's nodes module

from toy import measure  # noqa: E402
from toy import model as toy_model  # noqa: E402
from toy.scenes import moved_pair, pair_drag, random_scene  # noqa: E402

EDIT_TIMESTEP = 681  # DDIM step 35 of 50 (inversion strength 0.7) on SD1.5's schedule


class SwapBottleneck:
    """``output_block_patch``: the first ``k`` samples of the batch continue from the bottleneck of
    the last ``k`` (their own skips unchanged), or, given ``mix`` ([k] in [0, 1]), from their own
    bottleneck moved that share of the way to the last ``k``'s."""

    def __init__(self, k, mix=None):
        self.k, self.mix = k, mix

    def __call__(self, h, hsp, transformer_options):
        if self.k and transformer_options.get("block") == ("output", 0):
            first, last = h[:self.k], h[-self.k:]
            if self.mix is not None:
                last = first + self.mix.to(h)[:, None, None, None] * (last - first)
            h = torch.cat([last, h[self.k:]])
        return h, hsp


class BottleneckScale:
    """``output_block_patch``: keeps the mean square of the bottleneck (before any swap or noise)
    in ``mean_square`` ([B])."""

    mean_square = None

    def __call__(self, h, hsp, transformer_options):
        if transformer_options.get("block") == ("output", 0):
            self.mean_square = h.float().square().mean(dim=(1, 2, 3))
        return h, hsp


class NoisyBottleneck:
    """``output_block_patch``: adds Gaussian noise of ``sigma`` times each sample's own RMS to its
    bottleneck (training only: the decoder learns to shrug off directions no scene moves it in)."""

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, h, hsp, transformer_options):
        if self.sigma and transformer_options.get("block") == ("output", 0):
            rms = h.detach().float().square().mean(dim=(1, 2, 3), keepdim=True).sqrt().to(h)
            h = h + self.sigma * rms * torch.randn_like(h)
        return h, hsp


def alphas_cumprod():
    """SD1.5's scaled-linear schedule (what ComfyUI's model sampling uses for eps models)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def noised(z0, eps, alpha_bar):
    """z_t [B, 4, h, w] = sqrt(alpha_bar) z0 + sqrt(1 - alpha_bar) eps (``alpha_bar`` broadcasts)."""
    return alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * eps


def _predict_noise(unet, zt, timestep, patch):
    """[B, 4, h, w] the toy U-Net's eps prediction for z_t [B, 4, h, w] at ``timestep``, with the
    toy's prompt and one ``output_block_patch``."""
    n = len(zt)
    context = toy_model.default_conditioning().to(zt).expand(n, -1, -1)
    return unet(zt, timesteps=torch.full((n,), float(timestep), device=zt.device), context=context,
                transformer_options={"patches": {"output_block_patch": [patch]}})


def _predict_x0(unet, zt, timestep, patch, alpha_bar):
    """[B, 4, h, w] the x0 estimate of ``_predict_noise``'s prediction (``alpha_bar`` at ``timestep``)."""
    return (zt - (1 - alpha_bar).sqrt() * _predict_noise(unet, zt, timestep, patch)) / alpha_bar.sqrt()


@torch.no_grad()
def map_pull(unet, cases=8, timestep=EDIT_TIMESTEP, seed=0, kinds=("disc",)):
    """How far a ``--parametric`` model draws the map it is handed, against the truth, at one step.

    Scenes A and B (unrelated, of ``kinds``); A noised to ``timestep``. The U-Net runs on that z_t
    once with A's true ``param_map`` and once with B's; ``pull`` is how far its x0 prediction moves
    toward B, projected on B - A: 1 when the decoder draws the map alone, 0 when it ignores it.
    ``x0_error`` (RMS, model units) is its x0 from A's map against A, next to ``mean_error``, that
    of predicting each latent channel's mean: a decoder no better than that draws no layout.
    ``layout_error`` is ``x0_error`` with each channel's mean over the image taken out of both,
    against the same ``mean_error``: the layout alone, whatever the mean colour (toy/FINDINGS.md,
    "What that gate measured": every object 8 px off is 0.23 on disc scenes, 16 px off 0.35).
    """
    from toy import parametric

    rng = np.random.default_rng(seed)
    a_scenes = [random_scene(rng, kinds=kinds) for _ in range(cases)]
    b_scenes = [random_scene(rng, kinds=kinds) for _ in range(cases)]
    a, b = (toy_model.scene_latent(np.stack([s.render() for s in group])) for group in (a_scenes, b_scenes))
    device = next(unet.parameters()).device
    a, b = a.to(device), b.to(device)
    alpha_bar = alphas_cumprod()[timestep].to(device)
    zt = noised(a, torch.randn(a.shape, generator=torch.Generator().manual_seed(seed)).to(device), alpha_bar)

    x0_a, x0_b = (_predict_x0(unet, zt, timestep, parametric.ParamBottleneck(parametric.param_map(scenes).to(device)),
                              alpha_bar) for scenes in (a_scenes, b_scenes))
    direction = b - a
    pull = float(((x0_b - x0_a) * direction).sum() / direction.square().sum())
    rms = lambda v: float(v.square().mean().sqrt())  # noqa: E731
    centred = lambda v: v - v.mean(dim=(2, 3), keepdim=True)  # noqa: E731
    return {"pull": pull, "x0_error": rms(x0_a - a), "layout_error": rms(centred(x0_a) - centred(a)),
            "mean_error": rms(centred(a))}


@torch.no_grad()
def offset_follow(unet, shifts=(-24, -12, 0, 12, 24), timestep=EDIT_TIMESTEP, seed=3):
    """Where a ``--parametric`` model draws a disc its map holds in one cell at different offsets.

    One disc at the centre of cell (1, 1) of a 256 px scene, moved by each of ``shifts`` (px,
    along x) but held by that cell, as a drag holds it; the U-Net runs on the forward-noised empty
    background with that map. Returns, per shift, the x of the centroid of x0's colour change
    from the background (pixels over half its maximum): a decoder that places objects by their
    offset draws them at 96 + shift.
    """
    from toy import parametric

    scene = random_scene(np.random.default_rng(seed), n_objects=1, kinds=("disc",))
    obj = scene.objects[0]
    scene = type(scene)(scene.size, scene.background, [obj.moved(96 - obj.center[0], 96 - obj.center[1])])
    empty = toy_model.scene_latent(type(scene)(scene.size, scene.background, []).render()[None])
    device = next(unet.parameters()).device
    empty = empty.to(device)
    alpha_bar = alphas_cumprod()[timestep].to(device)
    zt = noised(empty, torch.randn(empty.shape, generator=torch.Generator().manual_seed(seed)).to(device), alpha_bar)
    xs = torch.arange(empty.shape[-1], device=device).float() * 8 + 4
    drawn = []
    for shift in shifts:
        values = parametric.param_map([scene.with_object_moved(0, shift, 0)], anchors=[scene]).to(device)
        x0 = _predict_x0(unet, zt, timestep, parametric.ParamBottleneck(values), alpha_bar)
        change = (x0 - empty)[0, :3].square().sum(0).sqrt()
        change = change * (change > 0.5 * change.max())
        drawn.append(float((change.sum(0) * xs).sum() / change.sum()))
    return drawn


@torch.no_grad()
def bottleneck_share(unet, cases=8, timestep=EDIT_TIMESTEP, seed=0, shaded=False):
    """Mean share (see the module docstring) over ``cases`` moved pairs of whole scenes.

    Args:
        unet: the toy's ``UNetModel`` (ComfyUI's ``diffusion_model``).
    """
    rng = np.random.default_rng(seed)
    pairs = [moved_pair(rng, toy_model.IMAGE_SIZE, shaded=shaded) for _ in range(cases)]
    a_scenes = toy_model.scene_latent(np.stack([a.render() for a, _, _ in pairs]))
    b_scenes = toy_model.scene_latent(np.stack([b.render() for _, _, b in pairs]))
    eps = torch.randn(a_scenes.shape, generator=torch.Generator().manual_seed(seed))
    device = next(unet.parameters()).device
    a_scenes, b_scenes, eps = a_scenes.to(device), b_scenes.to(device), eps.to(device)
    ab = alphas_cumprod()[timestep]

    def x0_prediction(z0, swap):
        zt = noised(z0, eps.repeat(len(z0) // cases, 1, 1, 1), ab)
        return _predict_x0(unet, zt, timestep, SwapBottleneck(swap), ab)

    x0_a = x0_prediction(a_scenes, 0)
    # B's samples are unaffected by the swap, so one pass gives both A-with-B's-bottleneck and B.
    x0_swapped, x0_b = x0_prediction(torch.cat([a_scenes, b_scenes]), cases).split(cases)
    direction = (x0_b - x0_a).flatten(1)
    shares = ((x0_swapped - x0_a).flatten(1) * direction).sum(1) / direction.square().sum(1).clamp_min(1e-8)
    return float(shares.mean())


@torch.no_grad()
def bottleneck_rms(unet, cases=8, timestep=EDIT_TIMESTEP, seed=0, shaded=False):
    """RMS of the bottleneck (mid-block output) at ``timestep`` over ``cases`` noised random scenes."""
    rng = np.random.default_rng(seed)
    z0 = toy_model.scene_latent(np.stack([random_scene(rng, toy_model.IMAGE_SIZE, shaded=shaded).render()
                                          for _ in range(cases)]))
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    ab = alphas_cumprod()[timestep]
    scale = BottleneckScale()
    _predict_noise(unet, noised(z0, eps, ab).to(next(unet.parameters()).device), timestep, scale)
    return float(scale.mean_square.mean().sqrt())


def _inverted_pairs(dragnoise, model, vae, positive, cases, seed, strength, shaded):
    """Yields (scene, index, drag (dx, dy), A's inversion, B's inversion) for ``cases`` moved pairs."""
    rng = np.random.default_rng(seed)
    for _ in range(cases):
        scene, index, moved = moved_pair(rng, toy_model.IMAGE_SIZE, shaded=shaded)
        drag = pair_drag(scene, index, moved)
        with torch.inference_mode():
            a, b = (dragnoise.inversion.ddim_invert(model, vae.encode(torch.from_numpy(s.render())[None]), positive,
                                                    50, strength)[1] for s in (scene, moved))
        yield scene, index, drag, a, b


def _encoder_state(dragnoise, model, inversion):
    with torch.inference_mode(False), torch.no_grad():
        return dragnoise.features.run_encoder(model, model.model.diffusion_model, inversion.noisy_latent,
                                              inversion.timestep, inversion.edit_sigma,
                                              inversion.positive[0][0]).detached_copy()


def truth_substitution(dragnoise, model, vae, positive, cases=3, seed=5, strength=0.7, halt_step=10, shaded=False,
                       forward_noised=False):
    """The best any bottleneck optimization could do: ``measure.score_drag`` of the dragged object
    when A's propagation (from A's DDIM inversion, to ``halt_step``) is given the bottleneck of B,
    the truly moved scene, inverted the same way. One score dict per case: a model can pass the
    demo test only if these pass it (moved_fraction, overlap, object_mae).

    With ``forward_noised``, A and B are noised to the edit step with one Gaussian noise instead
    of inverted: a DDIM-inverted latent still encodes its image, so reconstruction hides how well
    the model *generates* from that noise level, which any edit relies on.

    Args:
        dragnoise: the pack's ``dragnoise`` package as ComfyUI loaded it (``bench.comfy_env.start``).
        model, vae, positive: the toy's MODEL, VAE and CONDITIONING (``toy.model.load``).
    """
    generator = torch.Generator().manual_seed(seed)

    def noised_like(inversion, eps):
        alpha_bar = torch.tensor(1 / (1 + inversion.edit_sigma ** 2))
        zt = noised(inversion.source_latent, eps, alpha_bar)
        return dataclasses.replace(inversion, noisy_latent=zt,
                                   sampler_latent=zt / (toy_model.SCALE_FACTOR * alpha_bar ** 0.5))

    scores = []
    for scene, index, drag, a, b in _inverted_pairs(dragnoise, model, vae, positive, cases, seed, strength, shaded):
        if forward_noised:
            eps = torch.randn(a.source_latent.shape, generator=generator)
            a, b = noised_like(a, eps), noised_like(b, eps)
        bottleneck = _encoder_state(dragnoise, model, b).bottleneck
        scores.append(_propagated_score(dragnoise, model, vae, a, scene, index, drag, bottleneck, halt_step))
    return scores


def _propagated_score(dragnoise, model, vae, inversion, scene, index, drag, bottleneck, halt_step):
    """``measure.score_drag`` of object ``index`` after the pack's propagation from ``inversion``
    with ``bottleneck`` ([1, C, h, w]) substituted down to ``halt_step``."""
    edit = dataclasses.replace(_still_edit(dragnoise, model, inversion, scene, index),
                               bottleneck=bottleneck.detach().float().cpu())
    with torch.inference_mode():
        image = vae.decode(dragnoise.propagation.propagated_sample(model, inversion, edit, halt_step))[0].numpy()
    return measure.score_drag(scene, index, drag, image)


def _still_edit(dragnoise, model, inversion, scene, index):
    """A drag of length zero on object ``index``: the scene's own edit-step bottleneck, unoptimized."""
    import json

    still = json.dumps([{"handle": list(scene.objects[index].center), "target": list(scene.objects[index].center)}])
    with torch.inference_mode():
        return dragnoise.optimize.optimize_bottleneck(model, inversion, dragnoise.points.parse_points(still, scene.size, scene.size))


def zero_drag_cost(dragnoise, model, vae, positive, cases=3, seed=5, strength=0.7, halt_step=10, shaded=False):
    """What the propagation itself costs: a drag of length zero (the scene's own edit-step
    bottleneck substituted down to ``halt_step``) against a plain DDIM reconstruction, on the
    scenes A of ``truth_substitution``'s pairs. One dict per case: ``object`` and ``elsewhere``,
    each (plain, zero drag), the mean change from the scene on the object's footprint and off it,
    0-255. A drag can be no more faithful than its zero drag."""
    rows = []
    for scene, index, _, a, _ in _inverted_pairs(dragnoise, model, vae, positive, cases, seed, strength, shaded):
        edit = _still_edit(dragnoise, model, a, scene, index)
        with torch.inference_mode():
            plain = dragnoise.comfy_compat.sample_ddim(model, a.sampler_latent, a.positive, a.steps, a.edit_step)
            images = [vae.decode(z)[0].float().numpy()
                      for z in (plain, dragnoise.propagation.propagated_sample(model, a, edit, halt_step))]
        source = scene.render()
        change = [np.abs(im - source).mean(-1) * 255 for im in images]
        footprint = scene.objects[index].mask(scene.size)
        rows.append({"object": tuple(float(c[footprint].mean()) for c in change),
                     "elsewhere": tuple(float(c[~footprint].mean()) for c in change)})
    return rows


def motion_alignment(dragnoise, model, vae, positive, radii=(1, 4, 12), cases=3, seed=5, strength=0.7, shaded=False):
    """Whether the first step of Bottleneck Optimize heads for the truly moved scene: the cosine
    between minus the gradient of the motion loss (handle on the object's centre, one feature pixel
    toward the target, patch radius r, supervision at up_blocks.2) with respect to A's bottleneck
    and B's bottleneck minus A's. Near 0: the loss leads elsewhere. One row of ``radii`` per case.
    """
    import torch.nn.functional as F

    feat = dragnoise.features
    scale = dragnoise.optimize.FEATURE_SCALE
    decoder = feat.Decoder(model.model.diffusion_model, feat.SUPERVISION_BLOCKS[feat.DEFAULT_SUPERVISION], False)
    rows = []
    for scene, index, drag, a, b in _inverted_pairs(dragnoise, model, vae, positive, cases, seed, strength, shaded):
        enc, truth = _encoder_state(dragnoise, model, a), _encoder_state(dragnoise, model, b).bottleneck
        handle = torch.tensor(scene.objects[index].center[::-1]) / scale  # (row, col) on the feature grid
        step = torch.tensor(drag[::-1], dtype=torch.float32)
        step = step / step.norm()
        direction = (truth - enc.bottleneck).flatten()
        row = []
        for radius in radii:
            with torch.inference_mode(False), feat.autograd_weights(decoder.modules()), \
                    feat.backward_safe(decoder.modules(), "norm inputs"):
                s = enc.bottleneck.clone().requires_grad_(True)
                feature = F.interpolate(decoder(s, enc)[0].float(), size=(scene.size // scale,) * 2, mode="bilinear",
                                        align_corners=False)
                dragnoise.optimize.motion_loss(feature, handle, step, radius).backward()
            row.append(float(-s.grad.flatten() @ direction / (s.grad.norm() * direction.norm()).clamp_min(1e-12)))
        rows.append(row)
    return rows


def feature_match(dragnoise, model, vae, positive, target="moved", cases=3, seed=5, strength=0.7, halt_step=10,
                  shaded=False, steps=300, learning_rate=0.01):
    """Where Bottleneck Optimize could get if it asked the supervision feature (up_blocks.2) for
    the whole move at once instead of one patch a step: A's bottleneck optimized (Adam, mean L1
    per channel) until its supervision feature matches

    - ``"moved"``: the truly moved scene B's whole feature map, or
    - ``"shifted"``: A's own feature translated by the drag, on the object's moved footprint only
      (what the motion loss asks of the handle's patch, asked of the whole object; the rest free),

    then propagated as ``truth_substitution`` does. One dict per case: ``measure.score_drag``'s
    keys and ``loss`` (first step's, last step's).
    """
    import torch.nn.functional as F

    if target not in ("moved", "shifted"):
        raise ValueError(f"target: {target!r}; use 'moved' or 'shifted'")
    feat = dragnoise.features
    decoder = feat.Decoder(model.model.diffusion_model, feat.SUPERVISION_BLOCKS[feat.DEFAULT_SUPERVISION], False)
    rows = []
    for scene, index, drag, a, b in _inverted_pairs(dragnoise, model, vae, positive, cases, seed, strength, shaded):
        enc = _encoder_state(dragnoise, model, a)
        with torch.inference_mode(False), feat.autograd_weights(decoder.modules()), \
                feat.backward_safe(decoder.modules(), "norm inputs"):
            with torch.no_grad():
                if target == "moved":
                    goal = decoder(_encoder_state(dragnoise, model, b).bottleneck.clone(), enc)[0].float()
                    weight = torch.ones_like(goal[:, :1])
                else:
                    own = decoder(enc.bottleneck.clone(), enc)[0].float()  # [1, C, H, W]
                    pixel = scene.size // own.shape[-1]
                    obj = scene.objects[index]
                    footprint = torch.from_numpy(obj.mask(scene.size, np.add(obj.center, drag))).float()[None, None]
                    weight = (F.avg_pool2d(footprint, pixel) > 0.5).float()
                    goal = torch.roll(own, shifts=(round(drag[1] / pixel), round(drag[0] / pixel)), dims=(-2, -1))
            s = enc.bottleneck.clone().requires_grad_(True)
            optimizer = torch.optim.Adam([s], lr=learning_rate)
            losses = []
            for _ in range(steps):
                loss = ((decoder(s, enc)[0].float() - goal).abs() * weight).sum() / (weight.sum() * goal.shape[1])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        score = _propagated_score(dragnoise, model, vae, a, scene, index, drag, s, halt_step)
        rows.append({**score, "loss": (losses[0], losses[-1])})
    return rows


def _scores(scores):
    return (", ".join(f"{100 * s['moved_fraction']:.0f}%" for s in scores) + " of the drag; overlap with where it should be "
            + ", ".join(f"{s['overlap']:.2f}" for s in scores) + "; colour error there "
            + ", ".join(f"{s['object_mae']:.0f}" for s in scores) + " / 255")


def main(argv=None):
    import argparse

    from bench import comfy_env

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=toy_model.WEIGHTS)
    parser.add_argument("--cases", type=int, default=3, help="moved pairs for the truth substitution")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--shaded", action="store_true", help="probe on shaded scenes (for a model trained with train.py --shaded)")
    parser.add_argument("--forward-noised", action="store_true",
                        help="truth substitution from Gaussian-noised latents instead of DDIM-inverted ones (how well it generates)")
    args = parser.parse_args(argv)
    dragnoise = comfy_env.start(pytorch_attention=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    toy_model.IMAGE_SIZE = toy_model.image_size(args.weights)  # probe scenes of the size it was trained on
    model, vae, positive = toy_model.load(args.weights)
    with torch.inference_mode():
        share = bottleneck_share(model.model.diffusion_model, shaded=args.shaded)
        rms = bottleneck_rms(model.model.diffusion_model, shaded=args.shaded)
    print(f"bottleneck share of the layout at t={EDIT_TIMESTEP}: {share:.3f}; bottleneck RMS {rms:.2f}")
    if toy_model.metadata(args.weights).get("parametric") == "True":
        for t in (900, EDIT_TIMESTEP, 400, 200):
            pull = map_pull(model.model.diffusion_model, timestep=t, kinds=toy_model.scene_kinds(args.weights))
            print(f"t={t}: another scene's true map pulls x0 {pull['pull']:.2f} of the way to that scene; x0 error "
                  f"with its own map {pull['x0_error']:.2f}, of its layout {pull['layout_error']:.2f} (predicting the mean: "
                  f"{pull['mean_error']:.2f})")
        drawn = offset_follow(model.model.diffusion_model)
        print("a disc held by one cell at offsets -24, -12, 0, 12, 24 px is drawn at x = "
              + ", ".join(f"{x:.0f}" for x in drawn) + " (should be 72, 84, 96, 108, 120)")
    scores = truth_substitution(dragnoise, model, vae, positive, args.cases, shaded=args.shaded,
                                forward_noised=args.forward_noised)
    print("truly moved scene's bottleneck propagated: the object moved " + _scores(scores))
    costs = zero_drag_cost(dragnoise, model, vae, positive, args.cases, shaded=args.shaded)
    print("a drag of length zero (own bottleneck substituted) against a plain reconstruction: change on the object "
          + ", ".join(f"{c['object'][1]:.0f} (plain {c['object'][0]:.0f})" for c in costs) + ", elsewhere "
          + ", ".join(f"{c['elsewhere'][1]:.1f} (plain {c['elsewhere'][0]:.1f})" for c in costs) + " / 255")
    rows = motion_alignment(dragnoise, model, vae, positive, cases=args.cases, shaded=args.shaded)
    print("motion loss's first step toward the truly moved bottleneck (cosine), patch radius 1 / 4 / 12: "
          + "; ".join(" / ".join(f"{c:.2f}" for c in row) for row in rows))
    for target, what in (("moved", "the truly moved scene's whole supervision feature"),
                         ("shifted", "A's supervision feature shifted by the drag, on the moved footprint only")):
        scores = feature_match(dragnoise, model, vae, positive, target, args.cases, shaded=args.shaded)
        print(f"bottleneck optimized to match {what}: the object moved " + _scores(scores) + "; loss "
              + ", ".join(f"{s['loss'][0]:.3f} -> {s['loss'][1]:.3f}" for s in scores))


if __name__ == "__main__":
    main()
