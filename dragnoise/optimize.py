"""Bottleneck optimization with point tracking, motion loss and mask loss (SPEC §1.3).

Only the bottleneck s_t is optimized (Adam); z_t and every U-Net weight stay fixed. Points live
on the supervision-feature grid, half the image size: (row, col) = round(y / 2, x / 2).
"""

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import comfy_compat
from .features import (DEFAULT_SUPERVISION, SUPERVISION_BLOCKS, Decoder, autograd_weights, backward_with_fallback,
                       run_encoder)
from .model_check import check_settings, sd15_unet

FEATURE_SCALE = 2  # image pixels per supervision-feature pixel
MASK_WHEN_EMPTY = ("regularize whole image", "skip mask loss")


@dataclass
class DragSettings:
    """The method's knobs; defaults are DragBench's (SPEC §1.3)."""
    max_steps: int = 80
    learning_rate: float = 0.01
    mask_lambda: float = 0.1
    mask_when_empty: str = MASK_WHEN_EMPTY[0]
    motion_radius: int = 1
    tracking_radius: int = 3
    supervision_block: str = DEFAULT_SUPERVISION
    stop_distance: float = 2.0  # feature pixels

    def check(self):
        checks = [
            ("max_steps", isinstance(self.max_steps, int) and 0 <= self.max_steps <= 1000, "a whole number from 0 to 1000"),
            ("learning_rate", 0 < self.learning_rate <= 1, "in (0, 1]"),
            ("mask_lambda", 0 <= self.mask_lambda <= 100, "in [0, 100]"),
            ("mask_when_empty", self.mask_when_empty in MASK_WHEN_EMPTY, f"one of {MASK_WHEN_EMPTY}"),
            ("motion_radius", isinstance(self.motion_radius, int) and 1 <= self.motion_radius <= 16, "from 1 to 16"),
            ("tracking_radius", isinstance(self.tracking_radius, int) and 1 <= self.tracking_radius <= 32, "from 1 to 32"),
            ("supervision_block", self.supervision_block in SUPERVISION_BLOCKS, f"one of {list(SUPERVISION_BLOCKS)}"),
        ]
        check_settings(self, checks)


@dataclass
class DragEdit:
    """Result of Bottleneck Optimize (the ``DRAGNOISE_EDIT`` type).

    Attributes:
        bottleneck: optimized s_t, [1, C, h/8, w/8] float32 on the CPU (None for a latent edit).
        original_bottleneck: s_t before optimization, same shape.
        latent: the optimized noisy latent z_t [1, 4, h, w] in model units, float32 on the CPU,
            for the DragDiffusion-style baseline (None for a DragNoise edit).
        sigmas, edit_step, timestep, steps: the schedule and edit step of the inversion.
        handles: final handle positions, (x, y) image pixels.
        targets: target positions, (x, y) image pixels.
        trajectory: handle positions at every step, [steps_used + 1][N] of (x, y).
        losses, motion_losses, mask_losses: per optimization step.
        steps_used: optimizer steps taken (0 when the handles started on their targets).
        final_distances: each handle's distance to its target at the end, image pixels.
        image_size: (width, height) of the image the edit was made for.
    """
    bottleneck: torch.Tensor
    original_bottleneck: torch.Tensor
    sigmas: torch.Tensor
    edit_step: int
    timestep: int
    steps: int
    handles: list
    targets: list
    trajectory: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    motion_losses: list = field(default_factory=list)
    mask_losses: list = field(default_factory=list)
    steps_used: int = 0
    final_distances: list = field(default_factory=list)
    image_size: tuple = (0, 0)
    latent: torch.Tensor = None


def sample_patch(feature, center, radius):
    """Bilinearly sampled (2r+1)^2 patch around a fractional (row, col).

    Args:
        feature: [1, C, H, W]; center: [2] float tensor (row, col).
    Returns:
        [C, (2r+1)^2]
    """
    _, _, height, width = feature.shape
    offsets = torch.arange(-radius, radius + 1, device=feature.device, dtype=feature.dtype)
    rows = (center[0] + offsets)[:, None].expand(-1, offsets.numel())
    cols = (center[1] + offsets)[None, :].expand(offsets.numel(), -1)
    grid = torch.stack([cols / (width - 1) * 2 - 1, rows / (height - 1) * 2 - 1], dim=-1)[None]
    patch = F.grid_sample(feature, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return patch[0].flatten(1)


def motion_loss(feature, handle, step, radius):
    """The motion supervision of one handle: the patch one ``step`` toward the target is pulled
    toward the (detached) patch at the handle, so the content under the handle moves by ``step``.

    Args:
        feature: [1, C, H, W] supervision feature; handle, step: [2] float (row, col) on its grid.
    Returns:
        scalar: L1 over the (2r+1)^2 patch, summed over the patch's positions.
    """
    moved = sample_patch(feature, handle + step, radius)
    fixed = sample_patch(feature, handle, radius).detach()
    return (2 * radius + 1) ** 2 * F.l1_loss(moved, fixed)


def track_handles(feature, handle_features, handles, radius):
    """Moves each handle to the best match of its original feature in a window around it.

    The window is clamped to the grid (the reference code does not, a known bug).

    Args:
        feature: [1, C, H, W] current supervision feature.
        handle_features: [N, C] features at the initial handles, from the original bottleneck.
        handles: [N, 2] long (row, col).
    Returns:
        [N, 2] long, new (row, col).
    """
    _, _, height, width = feature.shape
    out = handles.clone()
    for i, (r, c) in enumerate(handles.tolist()):
        r0, r1 = max(0, r - radius), min(height - 1, r + radius)
        c0, c1 = max(0, c - radius), min(width - 1, c + radius)
        window = feature[0, :, r0:r1 + 1, c0:c1 + 1]
        distance = (window - handle_features[i][:, None, None]).abs().sum(0)
        best = int(torch.argmin(distance))
        out[i, 0] = r0 + best // distance.shape[1]
        out[i, 1] = c0 + best % distance.shape[1]
    return out


def ddim_step(z, eps, alpha_bar, alpha_bar_prev):
    """Deterministic DDIM step z_t -> z_{t-1} for noise ``eps`` ([B, 4, h, w])."""
    x0 = (z - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5
    return alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps


def editable_mask(mask, points, latent_hw):
    """MASK (1 = may change) at the image's size -> [1, 1, h, w] at latent size (nearest).

    A mask of another size is rejected rather than stretched, since a stretched mask would
    silently protect the wrong region.
    """
    if mask is None:
        return None
    m = mask if mask.ndim == 2 else mask[0]
    if mask.ndim not in (2, 3) or tuple(m.shape) != (points.height, points.width):
        raise ValueError(
            f"mask: its size {list(mask.shape)[-2:][::-1]} (width, height) differs from the image's "
            f"{[points.width, points.height]}; draw or load the mask for the image being edited.")
    return F.interpolate(m.float()[None, None], size=latent_hw, mode="nearest")


def _check_inputs(inversion, points):
    batch, _, h, w = inversion.noisy_latent.shape
    if batch != 1:
        raise ValueError(f"inversion: Bottleneck Optimize edits one image at a time; this inversion holds "
                         f"{batch}. Split the batch (e.g. Latent From Batch) before DDIM Invert.")
    if (points.width, points.height) != (w * 8, h * 8):
        raise ValueError(f"points: placed on a {points.width}x{points.height} image, but the inverted latent "
                         f"is for {w * 8}x{h * 8}; use the image that was encoded.")


def optimize_bottleneck(model, inversion, points, mask=None, settings=None):
    """Runs the DragNoise optimization of the bottleneck at the edit timestep.

    Args:
        model: ComfyUI ``ModelPatcher`` (never modified).
        inversion: ``Inversion`` from DDIM Invert (batch of 1).
        points: ``DragPoints`` on the inverted image.
        mask: optional MASK [H, W] or [1, H, W], 1 where the image may change.
    Returns:
        ``DragEdit`` with ``bottleneck`` set.
    """
    return _run(model, inversion, points, mask, settings, variable="bottleneck")


def optimize_latent(model, inversion, points, mask=None, settings=None):
    """The DragDiffusion-style baseline: the same supervision, tracking, losses and step budget,
    but the variable is the noisy latent z_t itself, so every step runs the whole U-Net forward
    and backward (DragDiffusion's way; without its reference-attention control).

    Returns:
        ``DragEdit`` with ``latent`` (the optimized z_t) set and no bottleneck.
    """
    return _run(model, inversion, points, mask, settings, variable="latent")


def _run(model, inversion, points, mask, settings, variable):
    settings = settings or DragSettings()
    settings.check()
    unet = sd15_unet(model)
    _check_inputs(inversion, points)
    latent_hw = tuple(inversion.noisy_latent.shape[-2:])
    mask_latent = editable_mask(mask, points, latent_hw)
    use_mask_loss = settings.mask_lambda > 0 and (
        mask_latent is not None or settings.mask_when_empty == MASK_WHEN_EMPTY[0])
    if use_mask_loss and mask_latent is None:
        mask_latent = torch.zeros((1, 1) + latent_hw)
    if not use_mask_loss:
        mask_latent = None

    comfy_compat.load_model(model)
    device, dtype = model.load_device, comfy_compat.compute_dtype(model)
    feature_block = SUPERVISION_BLOCKS[settings.supervision_block]
    sigma = inversion.edit_sigma
    sigma_prev = float(inversion.sigmas[inversion.edit_step + 1])
    alpha_bar, alpha_bar_prev = 1 / (1 + sigma ** 2), 1 / (1 + sigma_prev ** 2)
    grid_hw = (points.height // FEATURE_SCALE, points.width // FEATURE_SCALE)

    def resized(feature):
        return F.interpolate(feature.float(), size=grid_hw, mode="bilinear", align_corners=False)

    with torch.inference_mode(False):
        z = inversion.noisy_latent.to(device, dtype)
        context = inversion.positive[0][0].to(device, dtype)
        enc = run_encoder(model, unet, z, inversion.timestep, sigma, context).detached_copy()
        if variable == "bottleneck":
            decoder = Decoder(unet, feature_block, with_output=use_mask_loss)

            def forward(s):
                feature, eps = decoder(s.to(dtype), enc)
                z_prev = None if eps is None else ddim_step(z.float(), eps.float(), alpha_bar, alpha_bar_prev)
                return resized(feature), z_prev

            modules, start = decoder.modules(), enc.bottleneck.float()
        else:
            def forward(zt):
                feature, eps = unet_features(unet, zt.to(dtype), inversion.timestep, enc, feature_block)
                return resized(feature), ddim_step(zt, eps.float(), alpha_bar, alpha_bar_prev)

            modules, start = unet, z.float()
        with autograd_weights(modules):
            result, optimized = _optimize(start, forward, modules, points, mask_latent, settings, dtype)
    comfy_compat.soft_empty_cache()
    result.original_bottleneck = enc.bottleneck.float().cpu()
    if variable == "bottleneck":
        result.bottleneck = optimized
    else:
        result.latent = optimized
    result.sigmas, result.edit_step, result.timestep, result.steps = (
        inversion.sigmas, inversion.edit_step, inversion.timestep, inversion.steps)
    result.image_size = (points.width, points.height)
    return result


def unet_features(unet, z, timestep, enc, feature_block):
    """One whole, differentiable U-Net pass at ``z`` (the DragDiffusion way).

    Args:
        z: [1, 4, h, w] in the U-Net's dtype.
        timestep: t.
        enc: the ``EncoderState`` of the original z_t (prompt and transformer options).
    Returns:
        (output of decoder block ``feature_block`` [1, C_f, h_f, w_f], eps [1, 4, h, w]).
    """
    captured = {}
    # ComfyUI runs a block's layers one by one (forward_timestep_embed), so the hook goes on the
    # block's last layer, whose output is the block's.
    hook = unet.output_blocks[feature_block][-1].register_forward_hook(
        lambda module, args, output: captured.__setitem__("feature", output))
    try:
        timesteps = torch.full([z.shape[0]], float(timestep), device=z.device)
        eps = unet(z, timesteps=timesteps, context=enc.context, transformer_options=dict(enc.transformer_options))
    finally:
        hook.remove()
    return captured["feature"], eps


def _optimize(start, forward, modules, points, mask_latent, settings, dtype):
    """The shared loop: motion supervision, point tracking and the mask term on one variable.

    Args:
        start: the variable's initial value (float32; optimized in float32).
        forward: variable -> (supervision feature [1, C, H/2, W/2] float32, z_{t-1} [1, 4, h, w]
            float32 or None when the mask term is off).
        modules: what ``forward`` runs, for ``backward_with_fallback``.
    Returns:
        (``DragEdit`` with the tracking record, the optimized variable float32 on the CPU).
    """
    device = start.device
    handles, targets = points.feature_coords(FEATURE_SCALE)
    handles, targets = handles.to(device), targets.to(device)
    rm, rp = settings.motion_radius, settings.tracking_radius

    with torch.no_grad():
        feature0, z_prev0 = forward(start)
        handle_features = feature0[0, :, handles[:, 0], handles[:, 1]].T  # [N, C]
        keep = None if mask_latent is None else (1 - mask_latent.to(device))

    v = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=settings.learning_rate)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    edit = DragEdit(bottleneck=None, original_bottleneck=None, sigmas=None, edit_step=0,
                    timestep=0, steps=0, handles=[], targets=[(x, y) for x, y in points.targets])
    pbar = comfy_compat.progress_bar(max(settings.max_steps, 1))

    def loss_at(step, handles):
        """(loss terms or None when done, handle-target distances [N], handles after tracking)."""
        feature, z_prev = forward(v)
        if step > 0:
            handles = track_handles(feature.detach(), handle_features, handles, rp)
        remaining = (targets - handles).float().norm(dim=1)
        if bool((remaining < settings.stop_distance).all()) or step == settings.max_steps:
            return None, remaining, handles
        motion = feature.new_zeros(())
        for i in range(handles.shape[0]):
            if remaining[i] < settings.stop_distance:
                continue
            p = handles[i].float()
            motion = motion + motion_loss(feature, p, (targets[i].float() - p) / remaining[i], rm)
        mask_term = feature.new_zeros(())
        if keep is not None:
            mask_term = settings.mask_lambda * ((z_prev - z_prev0) * keep).abs().sum()
        return (motion, mask_term), remaining, handles

    def forward_backward(step):
        optimizer.zero_grad(set_to_none=True)
        terms, remaining, tracked = loss_at(step, handles)
        if terms is None:
            return None, remaining, tracked
        loss = terms[0] + terms[1]
        (scaler.scale(loss) if scaler else loss).backward()
        return (terms[0].detach(), terms[1].detach()), remaining, tracked

    for step in range(settings.max_steps + 1):
        comfy_compat.throw_if_interrupted()
        terms, remaining, handles = backward_with_fallback(modules, lambda: forward_backward(step))
        edit.trajectory.append(_to_image_xy(handles))
        if terms is None:
            break
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        edit.motion_losses.append(terms[0].item())
        edit.mask_losses.append(terms[1].item())
        edit.losses.append(edit.motion_losses[-1] + edit.mask_losses[-1])
        pbar.update(1)
        logging.info(f"DragNoise step {step + 1}/{settings.max_steps}: loss {edit.losses[-1]:.4f}, "
                     f"mean handle-target distance {float(remaining.mean()) * FEATURE_SCALE:.1f} px")
    edit.steps_used = len(edit.losses)
    edit.handles = edit.trajectory[-1]
    edit.final_distances = [float(d) * FEATURE_SCALE for d in remaining.tolist()]
    return edit, v.detach().float().cpu()


def _to_image_xy(handles):
    return [(float(c) * FEATURE_SCALE, float(r) * FEATURE_SCALE) for r, c in handles.tolist()]
