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
        return comfy.samplers.calculate_sigmas(model_sampling(model), scheduler_name, steps).cpu()
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


def load_model(model):
    """Loads (and weight-patches, e.g. with LoRAs) a ModelPatcher onto its device, as samplers do."""
    comfy.model_management.load_models_gpu([model])


def compute_dtype(model):
    base = model.model
    return getattr(base, "manual_cast_dtype", None) or base.get_dtype()


def forward_block(block, h, emb, context, transformer_options, output_shape=None):
    """One U-Net block, exactly as ``UNetModel.forward`` runs it."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import forward_timestep_embed

    return forward_timestep_embed(block, h, emb, context, transformer_options, output_shape)


def time_embedding(unet, timesteps, dtype):
    """[B, 4 * model_channels] time embedding, as ``UNetModel.forward`` computes it."""
    from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

    return unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(dtype))


def _has_middle_block_after_patch():
    import inspect

    from comfy.ldm.modules.diffusionmodules import openaimodel

    try:
        source = inspect.getsource(openaimodel.UNetModel)
    except (OSError, TypeError):
        return False
    return "middle_block_after_patch" in source


HAS_MIDDLE_BLOCK_AFTER_PATCH = _has_middle_block_after_patch()


def with_patch(model_options, name, patch, first=False):
    """A copy of ``model_options`` with ``patch`` added to the transformer patch list ``name``.

    Copies every level it touches, so the caller's options (and the MODEL they came from) are
    never modified; ``first`` puts the patch ahead of the ones already there.
    """
    options = dict(model_options)
    to = options["transformer_options"] = dict(options.get("transformer_options", {}))
    patches = to["patches"] = dict(to.get("patches", {}))
    existing = list(patches.get(name, []))
    patches[name] = [patch] + existing if first else existing + [patch]
    return options


def sample_ddim(model, latent_samples, positive, steps, start_step, callback=None):
    """Stock ``KSamplerAdvanced`` (add_noise disable, ddim, ddim_uniform, cfg 1, from
    ``start_step`` to the end, no leftover noise), through the same ComfyUI call it makes.

    Args:
        latent_samples: [B, 4, h, w] raw-unit sampler latent.
    Returns:
        [B, 4, h, w] raw-unit denoised latent.
    """
    import comfy.sample

    noise = torch.zeros(latent_samples.size(), dtype=latent_samples.dtype, layout=latent_samples.layout, device="cpu")
    return comfy.sample.sample(model, noise, steps, 1.0, "ddim", "ddim_uniform", positive, positive, latent_samples,
                               denoise=1.0, disable_noise=True, start_step=start_step, last_step=10000,
                               force_full_denoise=True, noise_mask=None, callback=callback, disable_pbar=True, seed=0)


def soft_empty_cache():
    comfy.model_management.soft_empty_cache()


def load_lora(model, lora_state_dict, strength=1.0):
    """A clone of ``model`` with a LoRA state dict applied as weight patches, through the same
    call ComfyUI's stock LoraLoader makes."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, lora_state_dict, strength, 0.0)[0]


def loras_folder():
    import folder_paths

    return folder_paths.get_folder_paths("loras")[0]
