import os
import re

from ..dragnoise import comfy_compat
from ..dragnoise.lora import (LoRASettings, apply_lora, check_save_target, fit_lora, load_state, metadata_for,
                              save_lora)
from . import types


def lora_path(save_name):
    """<ComfyUI loras folder>/dragnoise/<save_name>.safetensors, or None without a name."""
    name = save_name.strip()
    if name.endswith(".safetensors"):
        name = name[:-len(".safetensors")]
    if not name:
        return None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 _.\-]*", name):
        raise ValueError(f"save_name: {save_name!r} is not a plain file name; use letters, digits, spaces, "
                         "'_', '-' and '.', with no folders.")
    return os.path.join(comfy_compat.loras_folder(), "dragnoise", name + ".safetensors")


class LoRAFit:
    """Fits a LoRA on the image so that inversion and reconstruction keep it faithful."""

    @classmethod
    def INPUT_TYPES(cls):
        d = LoRASettings()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.5-type model to fit the LoRA for (it is not modified)."}),
                "latent": ("LATENT", {"tooltip": "The image to edit, from VAE Encode (one image)."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt used for the edit."}),
                "steps": ("INT", {"default": d.steps, "min": 1, "max": 10000, "tooltip":
                          "Training steps. 200 as in DragBench; the authors' UI uses 60-80 with a larger learning rate."}),
                "learning_rate": ("FLOAT", {"default": d.learning_rate, "min": 1e-6, "max": 0.1, "step": 1e-5,
                                  "round": 1e-6, "tooltip": "AdamW learning rate (constant). 2e-4 for 200 steps; 5e-4 for 80."}),
                "rank": ("INT", {"default": d.rank, "min": 1, "max": 256, "tooltip":
                         "LoRA rank on to_q/to_k/to_v/to_out.0 of every attention."}),
                "batch_size": ("INT", {"default": d.batch_size, "min": 1, "max": 64, "tooltip":
                               "Random crops (up to 512 px) of the image per step."}),
                "seed": ("INT", {"default": d.seed, "min": 0, "max": 2**31 - 1, "tooltip":
                         "Seed for the crops, timesteps, noise and adapter initialization."}),
            },
            "optional": {
                "save_name": ("STRING", {"default": "", "tooltip":
                              "If set, also save the LoRA as loras/dragnoise/<save_name>.safetensors (readable by "
                              "the stock Load LoRA node). A saved file with the same image and settings is reused "
                              "instead of training again; a different LoRA under that name is never overwritten."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A copy of the model with the fitted LoRA applied (as Load LoRA would).",)
    FUNCTION = "fit"
    CATEGORY = types.CATEGORY
    DESCRIPTION = "Per-image LoRA (peft) so DDIM inversion reconstructs a real photo faithfully."

    def fit(self, model, latent, positive, steps, learning_rate, rank, batch_size, seed, save_name=""):
        settings = LoRASettings(steps=steps, learning_rate=learning_rate, rank=rank, batch_size=batch_size, seed=seed)
        settings.check()
        path = lora_path(save_name)
        metadata = metadata_for(settings, latent["samples"], positive)
        if path and check_save_target(path, metadata) == metadata:
            return (apply_lora(model, load_state(path)),)  # the same LoRA was fitted before
        state, _ = fit_lora(model, latent["samples"], positive, settings)
        if path:
            save_lora(path, state, metadata)
        return (apply_lora(model, state),)
