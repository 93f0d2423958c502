"""Checks that a ComfyUI MODEL is one the method applies to: an SD1.5-type eps U-Net."""

import comfy.latent_formats
import comfy.model_base


def sd15_unet(model, input_name="model"):
    """Returns the ``UNetModel`` of a ComfyUI ``ModelPatcher`` after checking it is SD1.5-type.

    SD1.5-type means: SD1.5's 4-channel latent format, eps prediction, and the SD1.5 U-Net
    layout (12 encoder blocks, a mid block, 12 decoder blocks), whatever the channel count.
    SD2-base checkpoints share that layout and work too; SDXL, v-prediction and other families
    are refused with a message that names the input.
    """
    base = getattr(model, "model", None)
    unet = getattr(base, "diffusion_model", None)
    if base is None or unet is None:
        raise ValueError(f"{input_name}: expected a MODEL from a checkpoint loader, got {type(model).__name__}.")
    problems = []
    if not isinstance(getattr(base, "latent_format", None), comfy.latent_formats.SD15):
        problems.append(f"its latent format is {type(base.latent_format).__name__}, not SD15")
    if getattr(base, "model_type", None) != comfy.model_base.ModelType.EPS:
        problems.append(f"it predicts {getattr(base.model_type, 'name', base.model_type)}, not eps")
    blocks = (len(getattr(unet, "input_blocks", [])), len(getattr(unet, "output_blocks", [])))
    if blocks != (12, 12) or getattr(unet, "in_channels", None) != 4:
        problems.append(f"its U-Net has {blocks[0]} encoder / {blocks[1]} decoder blocks and "
                        f"{getattr(unet, 'in_channels', '?')} input channels (SD1.5: 12 / 12 / 4)")
    if problems:
        raise ValueError(
            f"{input_name}: DragNoise needs an SD1.5-type model ({type(base).__name__} given: "
            + "; ".join(problems) + "). Load an SD1.5 checkpoint (or a fine-tune of it).")
    return unet


def check_latent(latent_samples, input_name="latent"):
    """Checks a LATENT's samples tensor: [B, 4, h, w] in raw VAE units."""
    if latent_samples.ndim != 4 or latent_samples.shape[1] != 4:
        raise ValueError(
            f"{input_name}: expected an SD1.5 latent of shape [batch, 4, height/8, width/8], got "
            f"{list(latent_samples.shape)}. Encode the image with the SD1.5 checkpoint's VAE.")


def check_settings(settings, rules):
    """Raises for the first broken rule, naming the input: ``rules`` is [(name, ok, "rule text")]."""
    for name, ok, rule in rules:
        if not ok:
            raise ValueError(f"{name}: must be {rule}, got {getattr(settings, name)!r}.")
