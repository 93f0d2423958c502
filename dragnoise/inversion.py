"""Deterministic DDIM inversion (SPEC §1.1) run through ComfyUI's own sampling path.

Conventions (SPEC §2): ComfyUI's sampler state for an eps model is x = z / sqrt(alpha_bar), with
sigma = sqrt((1 - alpha_bar) / alpha_bar); z is the latent in model units (raw VAE latent x
0.18215). A DDIM step in that state is x_next = x + (sigma_next - sigma) * eps, in both
directions, which is why the inverted state hands off exactly to ComfyUI's ``ddim`` sampler.
"""

from dataclasses import dataclass

import torch

from . import comfy_compat
from .model_check import check_latent, sd15_unet

MAX_STEPS = 1000


@dataclass
class Inversion:
    """What the later DragNoise nodes need from DDIM Invert (the ``DRAGNOISE_INVERSION`` type).

    Attributes:
        noisy_latent: z_t, [B, 4, h, w] in model units (raw VAE latent x scale factor).
        source_latent: z_0, [B, 4, h, w] in model units.
        sigmas: [N + 1] the ``ddim_uniform`` schedule for ``steps``, descending, ending at 0.
        timesteps: [N] the U-Net timestep of each sigma but the last.
        edit_step: index into ``sigmas`` of the edit timestep (KSamplerAdvanced's start_at_step).
        timestep: the edit timestep t (681 for 50 steps at strength 0.7).
        steps: the ``steps`` the schedule was made for.
        positive: the CONDITIONING used (guidance 1.0, no negative).
        sampler_latent: [B, 4, h, w] the same z_t as raw-unit LATENT samples that stock samplers
            continue from ``edit_step`` (z_t / (scale_factor * sqrt(alpha_bar_t))).
    """
    noisy_latent: torch.Tensor
    source_latent: torch.Tensor
    sigmas: torch.Tensor
    timesteps: list
    edit_step: int
    timestep: int
    steps: int
    positive: list
    sampler_latent: torch.Tensor

    @property
    def edit_sigma(self):
        return float(self.sigmas[self.edit_step])


def edit_step_for(steps, strength):
    """Index of the edit step: ``steps - round(strength * steps)`` (15 for 50 steps at 0.7)."""
    return steps - round(strength * steps)


def check_inversion_settings(steps, strength):
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps: must be a whole number from 1 to {MAX_STEPS}, got {steps!r}.")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"inversion_strength: must be in (0, 1], got {strength!r}.")
    if round(strength * steps) < 1:
        raise ValueError(
            f"inversion_strength: {strength} of {steps} steps rounds to no inversion step at all; "
            f"raise it above {0.5 / steps:.3f} or use more steps.")


def ddim_inversion_sampler(label="destination"):
    """A ComfyUI sampler function that runs DDIM *up* an ascending list of sigmas.

    ``label="destination"`` reproduces the reference code: the U-Net sees the current latent
    but is told the destination timestep. ``"source"`` is the textbook variant.
    """
    if label not in ("destination", "source"):
        raise ValueError(f"label: 'destination' or 'source', got {label!r}")

    @torch.no_grad()
    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        n = len(sigmas) - 1
        pbar = comfy_compat.progress_bar(n)
        s_in = x.new_ones([x.shape[0]])
        # x arrives as z_0; read it as the state at sigmas[0] (the reference uses alpha_bar[0]).
        state = x * (1.0 + sigmas[0] ** 2) ** 0.5
        for i in range(n):
            comfy_compat.throw_if_interrupted()
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            told = sigma_next if label == "destination" else sigma
            z = state / (1.0 + sigma ** 2) ** 0.5
            # ComfyUI divides its input by sqrt(1 + sigma^2) for the sigma it is given, so the
            # U-Net receives exactly z while being told the timestep of ``told``.
            model_in = z * (1.0 + told ** 2) ** 0.5
            denoised = model(model_in, told * s_in, **extra_args)
            eps = (model_in - denoised) / told
            state = state + (sigma_next - sigma) * eps
            if callback is not None:
                callback({"x": state, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
            pbar.update(1)
        return state

    return sample


def ddim_invert(model, latent_samples, positive, steps=50, strength=0.7, label="destination"):
    """Inverts a LATENT to the edit timestep of ComfyUI's ``ddim_uniform`` schedule.

    Args:
        model: ComfyUI ``ModelPatcher`` of an SD1.5-type model (never modified).
        latent_samples: [B, 4, h, w] raw VAE latents (``LATENT["samples"]``).
        positive: CONDITIONING with the prompt (guidance 1.0).
    Returns:
        (handoff_samples [B, 4, h, w] raw units that stock KSamplerAdvanced continues from
        ``edit_step``, ``Inversion``).
    """
    sd15_unet(model)
    check_latent(latent_samples)
    check_inversion_settings(steps, strength)
    if not positive:
        raise ValueError("positive: empty CONDITIONING; connect a CLIP Text Encode with the prompt.")
    sigmas = comfy_compat.scheduler_sigmas(model, "ddim_uniform", steps)
    edit_step = edit_step_for(steps, strength)
    if edit_step >= len(sigmas) - 1:
        raise ValueError(f"inversion_strength: no inversion step left for steps={steps}.")
    ms = comfy_compat.model_sampling(model)
    # Up the same sigmas the sampler will come down, the final 0 read as timestep 0.
    up = torch.cat([ms.sigmas[:1].float().cpu(), sigmas[edit_step:-1].flip(0)])
    handoff = comfy_compat.sample_custom(model, ddim_inversion_sampler(label), up, positive,
                                         latent_samples.float())
    handoff = handoff.float().cpu()
    latent_format = model.model.latent_format
    edit_sigma = float(sigmas[edit_step])
    inversion = Inversion(
        noisy_latent=latent_format.process_in(handoff) / (1.0 + edit_sigma ** 2) ** 0.5,
        source_latent=latent_format.process_in(latent_samples.float().cpu()),
        sigmas=sigmas,
        timesteps=[int(round(float(ms.timestep(s)))) for s in sigmas[:-1]],
        edit_step=edit_step,
        timestep=int(round(float(ms.timestep(sigmas[edit_step])))),
        steps=steps,
        positive=positive,
        sampler_latent=handoff,
    )
    return handoff, inversion
