"""The few ComfyUI internals this pack relies on, behind one small interface.

ComfyUI moves and renames internals between releases; everything version-dependent is routed
through here so the rest of the code reads the same on the 2024 ComfyUI used in CI and on
current releases.
"""

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils


def scheduler_sigmas(model, scheduler_name, steps):
    """Sigmas of ComfyUI's own scheduler, exactly as its KSampler nodes compute them.

    Args:
        model: a ComfyUI ``ModelPatcher``.
    Returns:
        1-D float tensor, descending, ending with 0.
    """
    if hasattr(comfy.samplers, "calculate_sigmas"):
        model_sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") \
            else model.model.model_sampling
        return comfy.samplers.calculate_sigmas(model_sampling, scheduler_name, steps).cpu()
    return comfy.samplers.calculate_sigmas_scheduler(model.model, scheduler_name, steps).cpu()


def model_sampling(model):
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    return model.model.model_sampling


def throw_if_interrupted():
    comfy.model_management.throw_exception_if_processing_interrupted()


def progress_bar(total):
    return comfy.utils.ProgressBar(total)


def sample_custom(model, sampler_function, sigmas, positive, latent_samples, cfg=1.0):
    """Runs ``sampler_function`` through ComfyUI's own sampling path (model loading, weight
    patches, conditioning) with no added noise, like ``SamplerCustom`` does.

    Args:
        latent_samples: [B, 4, H/8, W/8] raw VAE latents.
    Returns:
        [B, 4, H/8, W/8] the sampler's final state, back in raw VAE units.
    """
    import comfy.sample

    sampler = comfy.samplers.KSAMPLER(sampler_function)
    noise = torch.zeros_like(latent_samples)
    # cfg 1: ComfyUI then skips the uncond pass, so the negative is never evaluated.
    return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, positive,
                                      latent_samples, disable_pbar=True)
