"""Benchmark of LoRA Fit: time per training step and for the default fit (200 steps).

On the full-size SD1.5 architecture (random weights unless --checkpoint), at 512 px by default.
A CPU cannot run the default fit in reasonable time, so unless --full is given the default fit's
time is extrapolated from the measured steps (and printed as an estimate).

    .venv/bin/python bench/bench_lora.py --steps 3
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512, help="image size in pixels")
    p.add_argument("--steps", type=int, default=3, help="training steps to time")
    p.add_argument("--full", action="store_true", help="also run the whole default fit (200 steps)")
    p.add_argument("--checkpoint", help="an SD1.5 checkpoint (default: the full-size random one)")
    args = p.parse_args()

    import comfy_env
    import torch

    dn = comfy_env.start()
    import comfy.model_management
    import comfy.sd

    lora = sys.modules[dn.__name__ + ".lora"]
    ckpt = args.checkpoint or str(comfy_env.random_sd15_checkpoint())
    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=False)[0]
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn([1, 4, args.size // 8, args.size // 8], generator=gen)
    positive = [[torch.randn([1, 77, 768], generator=gen), {}]]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    print(f"LoRA Fit benchmark, {time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, {args.size} px, "
          f"U-Net {comfy.model_management.unet_dtype()}")

    def timed(steps):
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            lora.fit_lora(model, latent, positive, lora.LoRASettings(steps=steps))
        sync()
        return time.perf_counter() - t

    timed(1)  # warm-up
    setup = timed(1)
    total = timed(args.steps + 1)
    per_step = (total - setup) / args.steps
    print(f"per step (batch 1): {per_step:.2f} s; setup (copy, adapters, first step): {setup:.2f} s")
    print(f"default fit (200 steps): about {setup + 199 * per_step:.0f} s (estimated from the steps above)")
    if args.full:
        print(f"default fit (200 steps), measured: {timed(200):.1f} s")


if __name__ == "__main__":
    main()
