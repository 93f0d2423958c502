from ..dragnoise.inversion import MAX_STEPS, ddim_invert, edit_step_for
from . import types


class DDIMInvert:
    """Inverts an image latent to the edit timestep (SPEC §1.1)."""

    @classmethod
    def INPUT_TYPES(cls):
        start = edit_step_for(50, 0.7)
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5-type model (with the image's LoRA, if fitted)."}),
            "latent": ("LATENT", {"tooltip": "The image to edit, from VAE Encode."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt. Guidance is 1.0: no negative prompt is used."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": MAX_STEPS, "tooltip":
                      "DDIM steps of the whole schedule (ddim_uniform). Use the same number in the samplers that follow."}),
            "inversion_strength": ("FLOAT", {"default": 0.7, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip":
                      "Share of the schedule to invert. The edit then starts at step "
                      "steps - round(strength x steps): "
                      f"with 50 steps and 0.7, step {start} (timestep 681). That step is "
                      "KSamplerAdvanced's start_at_step for continuing the output latent."}),
        }}

    RETURN_TYPES = ("LATENT", types.INVERSION)
    RETURN_NAMES = ("latent", "inversion")
    OUTPUT_TOOLTIPS = ("The noisy latent at the edit step, ready for KSamplerAdvanced (add_noise disable, "
                       "ddim / ddim_uniform, cfg 1, same steps, start_at_step = the edit step).",
                       "Everything the DragNoise edit needs: noisy latent, schedule, edit step, prompt.")
    FUNCTION = "invert"
    CATEGORY = types.CATEGORY
    DESCRIPTION = "Deterministic DDIM inversion of an image latent to the DragNoise edit timestep."

    def invert(self, model, latent, positive, steps, inversion_strength):
        handoff, inversion = ddim_invert(model, latent["samples"], positive, steps, inversion_strength)
        # No noise_mask on purpose: the ddim sampler would re-noise the area outside it.
        return ({"samples": handoff}, inversion)
