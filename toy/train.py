"""Trains the toy model (toy/model.py) on freshly generated scenes (toy/scenes.py), seeded.

    .venv/bin/python toy/train.py                 # the committed weights: 38 minutes on 2 CPU cores
    .venv/bin/python toy/train.py --quick         # a smoke run of a few steps

Two phases:
1. VAE (TAESD layout, purely convolutional, so 64 px crops teach it what whole images need):
   the encoder learns the scene latent of ``model.scene_latent`` (MSE) and the decoder paints
   the image back from it (L1).
2. U-Net: eps-prediction on SD1.5's noise schedule, on rendered scene latents (mostly 16x16
   crops, whose attention is cheap on a CPU, then whole 32x32 latents so the attention sees
   the size it is used at), AdamW with warm-up and cosine decay, EMA of the weights.

   The decoder's three lowest-resolution levels (output blocks 0-8) take no skip features: the
   weights that read them are held at zero, so the layout reaches the decoder through the
   bottleneck and only the top level sees the encoder's detail. Without this a model this small
   and briefly trained predicts everything from its skips and ignores its bottleneck (swapping
   in another scene's bottleneck changed the predicted image by 0.2%), unlike SD1.5, whose
   bottleneck carries the semantics (the DragNoise paper, Fig. 1-2): the property the method
   builds on.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import comfy_env  # noqa: E402
from toy import model as toy_model  # noqa: E402
from toy.scenes import random_scene  # noqa: E402


class SceneSource:
    """Random scenes at the toy's size, rendered on demand from one seeded generator."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def images(self, n, crop=None):
        """[n, crop, crop, 3] float32 images (whole scenes when ``crop`` is None), randomly
        flipped and rotated by multiples of 90 degrees."""
        out = []
        for _ in range(n):
            image = random_scene(self.rng, toy_model.IMAGE_SIZE).render()
            if crop:
                y, x = (int(v) * 8 for v in self.rng.integers(0, (toy_model.IMAGE_SIZE - crop) // 8 + 1, size=2))
                image = image[y:y + crop, x:x + crop]
            image = np.rot90(image, int(self.rng.integers(4)))
            if self.rng.random() < 0.5:
                image = image[:, ::-1]
            out.append(np.ascontiguousarray(image))
        return np.stack(out)


def log(message, start):
    print(f"[{time.time() - start:7.1f}s] {message}", flush=True)


def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(ae, source, steps, batch, lr, start):
    """TAESD encoder: image in [0, 1] -> scene latent in model units (MSE); decoder: scene latent
    -> image (L1). ComfyUI's TAESD wrapper scales by ``vae_scale`` (SD1.5's 0.18215) on the way in
    and out, so its raw latents are the usual raw VAE units."""
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    ae.vae_scale.requires_grad_(False)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(100, steps // 10 + 1))
        images = torch.from_numpy(source.images(batch, crop=64))
        target = toy_model.scene_latent(images)
        pixels = images.movedim(-1, 1)
        # The decoder sees slightly perturbed latents: the U-Net's outputs are never exact.
        noisy = target + 0.05 * torch.randn_like(target)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            encoded = ae.taesd_encoder(pixels)
            decoded = ae.taesd_decoder(noisy)
        enc_loss = torch.nn.functional.mse_loss(encoded.float(), target)
        dec_loss = (decoded.float() - pixels).abs().mean()
        opt.zero_grad(set_to_none=True)
        (enc_loss + dec_loss).backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps}: encoder mse {enc_loss.item():.4f}, decoder l1 {dec_loss.item():.4f}", start)


def alphas_cumprod():
    """SD1.5's scaled-linear schedule (what ComfyUI's model sampling uses for eps models)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def hold_skips_at_zero(unet, blocks):
    """Zeroes, and keeps at zero through training, the weights with which output blocks
    ``blocks`` read their skip feature (the last channels of their concatenated input)."""
    for i in blocks:
        skip_channels = unet.input_blocks[len(unet.output_blocks) - 1 - i][0].out_channels
        res = unet.output_blocks[i][0]
        for conv in (res.in_layers[2], res.skip_connection):
            keep = torch.ones_like(conv.weight)
            keep[:, -skip_channels:] = 0
            with torch.no_grad():
                conv.weight.mul_(keep)
            conv.weight.register_hook(lambda grad, keep=keep: grad * keep)


def train_unet(unet, source, steps, full_from, batch, full_batch, lr, start, backward_safe):
    """eps-MSE at uniform random timesteps; returns the EMA weights."""
    ab = alphas_cumprod()
    context = toy_model.default_conditioning()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    for step in range(steps):
        decay = min(0.999, (1 + step) / (10 + step))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, min(200, steps // 10 + 1))
        full = step >= full_from
        n = full_batch if full else batch
        z0 = toy_model.scene_latent(source.images(n, crop=None if full else 128))
        t = torch.randint(0, 1000, (n,))
        eps = torch.randn_like(z0)
        a = ab[t][:, None, None, None]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        with backward_safe(unet, "norm inputs"):
            pred = unet(zt, timesteps=t.float(), context=context.expand(n, -1, -1))
            loss = torch.nn.functional.mse_loss(pred, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay) if v.is_floating_point() else ema[k].copy_(v)
        if step % 50 == 0 or step == steps - 1:
            log(f"unet step {step + 1}/{steps} ({'32x32' if full else '16x16'}): loss {loss.item():.4f}", start)
    return ema


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=toy_model.WEIGHTS, help="where to write the weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--unet-steps", type=int, default=1200)
    parser.add_argument("--full-steps", type=int, default=200, help="of the U-Net steps, how many use whole 32x32 latents (at the end)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--skipless-blocks", type=int, default=9,
                        help="how many of the decoder's first blocks take no skip feature (0: plain SD1.5 training)")
    parser.add_argument("--init", help="start both networks from this weights file (to continue training)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quick", action="store_true", help="a few steps of each phase (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.vae_steps, args.unet_steps, args.full_steps, args.batch = 3, 4, 2, 4
    torch.set_num_threads(args.threads)
    dragnoise = comfy_env.start(pytorch_attention=True)
    torch.manual_seed(args.seed)
    start = time.time()

    ae = toy_model.build_autoencoder(args.seed)
    base = toy_model.build_unet(args.seed)
    if args.init:
        unet_sd, vae_sd = toy_model.read(args.init)
        base.diffusion_model.load_state_dict(unet_sd)
        ae.load_state_dict(vae_sd)
    train_vae(ae, SceneSource(args.seed + 1), args.vae_steps, 16, 1e-3, start)

    unet = base.diffusion_model.train()
    hold_skips_at_zero(unet, range(args.skipless_blocks))
    ema = train_unet(unet, SceneSource(args.seed + 2), args.unet_steps, args.unet_steps - args.full_steps,
                     args.batch, max(1, args.batch // 4), 1e-3, start, dragnoise.features.backward_safe)
    unet.load_state_dict(ema)
    toy_model.save(args.out, unet, ae, metadata={
        "made_by": "toy/train.py", "seed": args.seed, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
        "full_steps": args.full_steps, "batch": args.batch, "skipless_blocks": args.skipless_blocks,
        "init": args.init or "", "seconds": round(time.time() - start)})
    log(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)", start)


if __name__ == "__main__":
    main()
