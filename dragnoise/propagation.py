"""Propagation (SPEC §1.4): denoise from z_t, substituting the optimized bottleneck for the
mid-block output at every step from the edit step down to the halt step.

The halt step counts from the end, like the paper's t': with 50 steps and halt step 10 the last
10 steps run without substitution; a halt step equal to the steps left after the edit step
substitutes nothing.
"""

import torch

from . import comfy_compat


def substitution_steps(num_steps, edit_step, halt_step):
    """Schedule indices whose model call gets the optimized bottleneck: [edit_step, num_steps - halt_step)."""
    steps_left = num_steps - edit_step
    if not isinstance(halt_step, int) or not 0 <= halt_step <= steps_left:
        raise ValueError(f"halt_step: must be from 0 to {steps_left} (the steps left after edit step "
                         f"{edit_step} of {num_steps}), got {halt_step!r}. The paper uses 10.")
    return range(edit_step, num_steps - halt_step)


class BottleneckSubstitution:
    """Model patch that replaces the mid-block output with the optimized bottleneck while the
    sampler's sigma is one of the substituted steps' sigmas, for every cond/uncond chunk.

    Small and cheap to copy: older ComfyUI deep-copies model options on every clone.
    """

    def __init__(self, bottleneck, sigmas, steps):
        """bottleneck: [1, C, h/8, w/8]; sigmas: the schedule; steps: indices to substitute at."""
        self.bottleneck = bottleneck
        # Bounds half-way to the neighbouring sigmas, so float noise in the sampler cannot miss a
        # step; no steps: an empty window.
        if len(steps):
            self.sigma_high = float("inf") if steps.start == 0 else _midpoint(sigmas[steps.start - 1], sigmas[steps.start])
            self.sigma_low = _midpoint(sigmas[steps.stop - 1], sigmas[steps.stop])
        else:
            self.sigma_high, self.sigma_low = 0.0, float("inf")

    def active(self, transformer_options):
        sigmas = transformer_options.get("sigmas")
        if sigmas is None:
            return False
        sigma = float(sigmas.max()) if torch.is_tensor(sigmas) else float(sigmas)
        return self.sigma_low < sigma < self.sigma_high

    def substitute(self, h, transformer_options):
        """h: [B, C, h/8, w/8] mid-block output -> the bottleneck, batch-expanded, when active."""
        if not self.active(transformer_options):
            return h
        if tuple(h.shape[1:]) != tuple(self.bottleneck.shape[1:]):
            raise ValueError(f"edit: the optimized bottleneck is {list(self.bottleneck.shape[1:])} but this "
                             f"sampler's is {list(h.shape[1:])}; sample at the size of the edited image.")
        return self.bottleneck.to(h.device, h.dtype).expand(h.shape[0], -1, -1, -1)

    def output_block_patch(self, h, hsp, transformer_options):
        if transformer_options.get("block") == ("output", 0):
            h = self.substitute(h, transformer_options)
        return h, hsp

    def middle_block_after_patch(self, args):
        return dict(args, h=self.substitute(args["h"], args["transformer_options"]))


def _midpoint(a, b):
    """Geometric midpoint of two sigmas (arithmetic when one is 0, the end of the schedule)."""
    a, b = float(a), float(b)
    return (a * b) ** 0.5 if a > 0 and b > 0 else (a + b) / 2


def apply_propagation(model, edit, halt_step):
    """A clone of ``model`` that substitutes ``edit.bottleneck`` at the edit's steps.

    The patch stacks with the model's others: on ComfyUI with the ``middle_block_after_patch``
    hook it runs right after the mid block; on older versions it goes first in the output-block
    patches, which see the mid-block output at output block 0 before anything else does.
    """
    steps = substitution_steps(len(edit.sigmas) - 1, edit.edit_step, halt_step)
    if edit.bottleneck is None:
        raise ValueError("edit: this edit optimized the noisy latent (the DragDiffusion-style baseline), so it has "
                         "no bottleneck to substitute; denoise it with the DragNoise Propagated Sampler.")
    patch = BottleneckSubstitution(edit.bottleneck, edit.sigmas, steps)
    patched = model.clone()
    if comfy_compat.HAS_MIDDLE_BLOCK_AFTER_PATCH:
        patched.model_options = comfy_compat.with_patch(patched.model_options, "middle_block_after_patch",
                                                        patch.middle_block_after_patch)
    else:
        patched.model_options = comfy_compat.with_patch(patched.model_options, "output_block_patch",
                                                        patch.output_block_patch, first=True)
    return patched


def propagated_sample(model, inversion, edit, halt_step):
    """DDIM (eta 0, cfg 1) from the edit step with substitution until the halt step; for an edit
    of the noisy latent (the DragDiffusion-style baseline), plain DDIM from that latent.

    Returns:
        [1, 4, h, w] raw-unit LATENT samples, for the stock VAE Decode.
    """
    start = inversion.sampler_latent
    if edit.latent is None:
        patched = apply_propagation(model, edit, halt_step)
    else:
        substitution_steps(len(edit.sigmas) - 1, edit.edit_step, halt_step)  # same rule for the input
        patched = model
        # Model units -> the sampler's raw units at the edit sigma (see inversion.Inversion).
        start = model.model.latent_format.process_out(edit.latent) * (1.0 + inversion.edit_sigma ** 2) ** 0.5
    total = len(inversion.sigmas) - 1 - inversion.edit_step
    pbar = comfy_compat.progress_bar(total)

    def callback(step, denoised, x, total_steps):
        comfy_compat.throw_if_interrupted()
        pbar.update_absolute(step + 1, total)

    return comfy_compat.sample_ddim(patched, start, inversion.positive, inversion.steps, inversion.edit_step,
                                    callback=callback)
