"""Benchmark of the toy U-Net's training step (toy/train.py) by attention heads.

One step is a forward and a backward pass of the toy U-Net on a batch of whole 32x32 latents
(256 px scenes), as ``train.py --full-steps`` runs them, with ComfyUI's PyTorch attention (what
train.py uses). SD1.5's 8 heads leave 4 channels per head at the toy's 32-channel top level.

    .venv/bin/python bench/bench_toy_training.py --threads 2
"""

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]


def time_step(dragnoise, heads, batch, steps):
    """Seconds per training step (forward + backward, after one warm-up step) and a no-grad
    forward's seconds, for a freshly initialized toy U-Net with ``heads`` attention heads."""
    import torch

    from toy import model as toy_model

    unet = toy_model.build_unet(seed=0, heads=heads).diffusion_model.float().train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn([batch, 4] + [toy_model.IMAGE_SIZE // 8] * 2, generator=gen)
    t = torch.full([batch], 500.0)
    context = toy_model.default_conditioning().expand(batch, -1, -1)
    times = []
    for _ in range(steps + 1):
        begin = time.perf_counter()
        with dragnoise.features.backward_safe(unet, "norm inputs"):
            unet(x, timesteps=t, context=context).square().mean().backward()
        times.append(time.perf_counter() - begin)
    with torch.no_grad():
        begin = time.perf_counter()
        unet(x, timesteps=t, context=context)
        forward = time.perf_counter() - begin
    return sum(times[1:]) / steps, forward


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="whole latents per step (train.py's --full-batch)")
    p.add_argument("--steps", type=int, default=4, help="steps to time per setting")
    p.add_argument("--heads", type=int, nargs="+", default=[8, 1], help="attention heads to compare")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()

    import comfy_env
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dragnoise = comfy_env.start(pytorch_attention=True)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"batch {args.batch} x 4 x 32 x 32")
    for heads in args.heads:
        step, forward = time_step(dragnoise, heads, args.batch, args.steps)
        print(f"heads {heads}: training step {step:.2f} s, forward {forward:.2f} s")


if __name__ == "__main__":
    main()
