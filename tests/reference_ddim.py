"""Plain DDIM written straight from the SD1.5 noise schedule, independent of ComfyUI's sampler
code: the yardstick the pack's inversion and hand-off are checked against."""

import torch


def sd15_alphas_cumprod():
    """alpha_bar for t = 0..999 of SD1.5's scaled-linear beta schedule."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def eps(unet, z, t, context):
    """U-Net noise prediction for z [B, 4, h, w] (model units) at integer timestep t."""
    ts = torch.full([z.shape[0]], float(t))
    return unet(z.float(), timesteps=ts, context=context.float()).double()


@torch.no_grad()
def invert(unet, z0, context, timesteps):
    """The reference code's DDIM inversion: U-Net told the *destination* timestep, alpha_bar[0]
    for the source of the first step. ``timesteps`` ascending, e.g. [1, 21, ..., 681]."""
    ab = sd15_alphas_cumprod()
    z = z0.double()
    src = 0
    for t in timesteps:
        e = eps(unet, z, t, context)
        x0 = (z - (1 - ab[src]).sqrt() * e) / ab[src].sqrt()
        z = ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * e
        src = t
    return z


@torch.no_grad()
def denoise(unet, z, context, timesteps):
    """DDIM (eta 0) down ``timesteps`` (descending); the last step lands on the clean latent
    (alpha_bar = 1), as ComfyUI's schedules end at sigma 0."""
    ab = sd15_alphas_cumprod()
    z = z.double()
    for i, t in enumerate(timesteps):
        e = eps(unet, z, t, context)
        x0 = (z - (1 - ab[t]).sqrt() * e) / ab[t].sqrt()
        ab_prev = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
        z = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * e
    return z
