"""The U-Net at the edit timestep, split where DragNoise needs it (SPEC §1.2-1.3).

z_t is fixed during the edit, so the encoder, the mid block, the time embedding and every skip
feature are constant: ``run_encoder`` computes them once with one real U-Net pass. Each
optimization step then runs only ``Decoder``: the decoder blocks from the bottleneck s_t up to
the supervision block, or through the output head when the mask loss needs the noise.
"""

import copy
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


class Decoder(torch.nn.Module):
    """A private copy of the decoder blocks 0..``last_block`` (and the output head when
    ``with_output``), which autograd can differentiate through with respect to the bottleneck.

    A copy, because ComfyUI creates model weights in inference mode and autograd cannot save
    inference tensors; its weights never require gradients.
    """

    def __init__(self, unet, feature_block, with_output):
        super().__init__()
        last = N_DECODER_BLOCKS - 1 if with_output else feature_block
        with torch.inference_mode(False):
            self.blocks = copy.deepcopy(unet.output_blocks[:last + 1])
            self.out = copy.deepcopy(unet.out) if with_output else None
        self.requires_grad_(False)
        self.feature_block = feature_block

    def forward(self, bottleneck, enc):
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
