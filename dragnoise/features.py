"""The U-Net at the edit timestep, split where DragNoise needs it (SPEC §1.2-1.3).

z_t is fixed during the edit, so the encoder, the mid block, the time embedding and every skip
feature are constant: ``run_encoder`` computes them once with one real U-Net pass. Each
optimization step then runs only ``Decoder``: the decoder blocks from the bottleneck s_t up to
the supervision block, or through the output head when the mask loss needs the noise.
"""

import contextlib
import logging
from dataclasses import dataclass

import torch

from . import comfy_compat

# diffusers up_blocks[k] is ComfyUI output_blocks[3k + 2]; the paper supervises up_blocks[2].
SUPERVISION_BLOCKS = {f"up_blocks.{k}": 3 * k + 2 for k in range(4)}
DEFAULT_SUPERVISION = "up_blocks.2"
N_DECODER_BLOCKS = 12


class _CaptureSkips:
    """``output_block_patch`` that records the mid-block output and the skip of every decoder
    block as the real forward computes them (before other patches touch them)."""

    def __init__(self):
        self.bottleneck = None
        self.skips = []

    def __call__(self, h, hsp, transformer_options):
        if transformer_options.get("block") == ("output", 0):
            self.bottleneck = h
            self.skips = []
        self.skips.append(hsp)
        return h, hsp


@dataclass
class EncoderState:
    """Everything about one U-Net pass at z_t that does not depend on the bottleneck.

    Attributes:
        bottleneck: s_t, [B, 1280, h/8, w/8] mid-block output (channels scale with the model).
        skips: 12 skip features in decoder order (skips[i] joins output block i).
        emb: [B, 4 * model_channels] time embedding of t.
        context: [B, 77, context_dim] prompt embedding.
        eps: [B, 4, h, w] the U-Net's noise prediction with the original bottleneck.
        transformer_options: what the blocks were run with (the model's own patches included).
    """
    bottleneck: torch.Tensor
    skips: list
    emb: torch.Tensor
    context: torch.Tensor
    eps: torch.Tensor
    transformer_options: dict

    def detached_copy(self):
        """Normal (non-inference) tensors that autograd may save: nodes run in inference mode."""
        c = lambda t: t.detach().clone()
        return EncoderState(c(self.bottleneck), [c(s) for s in self.skips], c(self.emb), c(self.context),
                            c(self.eps), self.transformer_options)


@torch.no_grad()
def run_encoder(model, unet, z, timestep, sigma, context):
    """One full U-Net pass at z_t that keeps the bottleneck, the skips and the noise prediction.

    Args:
        model: the ``ModelPatcher`` (its transformer patches are applied as in sampling).
        unet: its loaded ``UNetModel``.
        z: [B, 4, h, w] z_t in model units, on the U-Net's device and dtype.
        timestep, sigma: t and its sigma.
        context: [B, 77, context_dim] prompt embedding, device and dtype as z.
    """
    batch = z.shape[0]
    # What ComfyUI's sampler puts in transformer_options for every model call; patches read them.
    to = dict(model.model_options.get("transformer_options", {}), cond_or_uncond=[0] * batch,
              sigmas=torch.full([batch], float(sigma), device=z.device))
    capture = _CaptureSkips()
    to_capture = comfy_compat.with_patch({"transformer_options": to}, "output_block_patch", capture,
                                         first=True)["transformer_options"]
    ts = torch.full([batch], float(timestep), device=z.device)
    eps = unet(z, timesteps=ts, context=context, transformer_options=to_capture)
    emb = comfy_compat.time_embedding(unet, ts, z.dtype)
    return EncoderState(capture.bottleneck, capture.skips, emb, context, eps, to)


@contextlib.contextmanager
def autograd_weights(module):
    """Lets autograd differentiate through ``module`` although ComfyUI created its weights in
    inference mode (autograd cannot save inference tensors for backward).

    Each inference-tensor parameter is swapped for a normal clone, one at a time, so no second
    copy of the weights ever exists; on exit the clones are swapped back for inference tensors
    with the same values. The weights never require gradients.
    """
    swapped = []
    try:
        with torch.inference_mode(False):
            for owner in module.modules():
                for name, p in list(owner._parameters.items()):
                    if p is not None and p.is_inference():
                        owner._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
                        swapped.append((owner, name, p.requires_grad))
                        del p
        yield module
    finally:
        with torch.inference_mode(True):
            for owner, name, requires_grad in swapped:
                p = owner._parameters[name]
                owner._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=requires_grad)
                del p


# How much copying backward needs on this ComfyUI. Older ComfyUI transformer blocks add into x in
# place (x += ...) after their LayerNorms saved x for backward, which autograd refuses:
#   "none": current ComfyUI, nothing to do;
#   "norm inputs": the LayerNorms of transformer blocks get a copy of x (cheap);
#   "all saved tensors": every tensor saved for backward is copied (always works, costs most).
BACKWARD_MODES = ("none", "norm inputs", "all saved tensors")
# The least copying that works on this ComfyUI, found on the first backward and kept.
_backward_mode = {"index": 0}


def backward_with_fallback(module, step):
    """Runs ``step()`` (a forward and its backward through ``module``) with the least copying
    that works on this ComfyUI; ``step`` must start by zeroing the gradients it accumulates.

    A failed attempt is retried from a fresh frame, so its graph is freed first.
    """
    while True:
        try:
            with backward_safe(module, BACKWARD_MODES[_backward_mode["index"]]):
                return step()
        except RuntimeError as e:
            if _backward_mode["index"] == len(BACKWARD_MODES) - 1 or "inplace operation" not in str(e):
                raise
        _backward_mode["index"] += 1
        logging.info(f"DragNoise: this ComfyUI modifies activations in place; backward copies the "
                     f"{BACKWARD_MODES[_backward_mode['index']]}.")


@contextlib.contextmanager
def backward_safe(module, mode):
    """Runs the forward passes inside it so that their backward works under ``mode``."""
    if mode == "none":
        yield
        return
    if mode == "all saved tensors":
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            yield
        return
    handles = []
    for block in module.modules():
        if type(block).__name__ == "BasicTransformerBlock":
            for name in ("norm1", "norm2", "norm3"):
                norm = getattr(block, name, None)
                if norm is not None:
                    handles.append(norm.register_forward_pre_hook(lambda _, args: (args[0].clone(),) + args[1:]))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Decoder:
    """The decoder blocks 0..``feature_block`` of a U-Net (through the output head when
    ``with_output``), run from a given bottleneck; differentiable with respect to it inside
    ``autograd_weights``."""

    def __init__(self, unet, feature_block, with_output):
        last = N_DECODER_BLOCKS - 1 if with_output else feature_block
        self.blocks = list(unet.output_blocks)[:last + 1]
        self.out = unet.out if with_output else None
        self.feature_block = feature_block

    def modules(self):
        """The modules this decoder runs (for ``autograd_weights``)."""
        return torch.nn.ModuleList(self.blocks + ([self.out] if self.out is not None else []))

    def __call__(self, bottleneck, enc):
        """Decoder from the bottleneck.

        Args:
            bottleneck: [B, C, h/8, w/8] s_t in the U-Net's dtype.
            enc: the ``EncoderState`` of z_t.
        Returns:
            (supervision feature [B, C_f, h_f, w_f] of ``feature_block``,
             eps [B, 4, h, w] or None without the output head).
        """
        to = dict(enc.transformer_options)
        patches = list(to.get("patches", {}).get("output_block_patch", []))
        h, feature = bottleneck, None
        for i, block in enumerate(self.blocks):
            to["block"] = ("output", i)
            hsp = enc.skips[i]
            for p in patches:
                h, hsp = p(h, hsp, to)
            h = torch.cat([h, hsp], dim=1)
            output_shape = enc.skips[i + 1].shape if i + 1 < N_DECODER_BLOCKS else None
            h = comfy_compat.forward_block(block, h, enc.emb, enc.context, to, output_shape)
            if i == self.feature_block:
                feature = h
        eps = self.out(h) if self.out is not None else None
        return feature, eps
