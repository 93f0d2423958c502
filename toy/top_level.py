"""Can the decoder's top level draw what the field bottleneck says? (toy/FINDINGS.md, "The top
level's GroupNorms")

Trains only the top level of a ``--fields`` U-Net (output blocks 9-11, the output head and
``conv_in``; encoder random and frozen, output blocks 0-8 set by ``fields.build_linear_decoder``)
to predict the noise whose x0 is the scene whose true field map it is handed, and prints, every
100 steps, on 8 fixed pairs (A, B) at the edit step: how far x0 from z_t of A moves toward B when
handed B's map instead of A's (``pull``: 1 draws the map alone, 0 ignores it), and x0's error
against B split into the error of each channel's mean over the image and the rest.

Half of each batch sees z_t of another scene (t >= 150): the same disc elsewhere, or with
``--backgrounds`` (scenes with no objects) another background, so only the map says what to draw.

    .venv/bin/python toy/top_level.py --widths 32,64,96,96 --backgrounds --minutes 9
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import comfy_env  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="32,64,96,96", help="the U-Net's channels per level (train.py --widths)")
    parser.add_argument("--backgrounds", action="store_true", help="scenes without objects: the map gives only the background")
    parser.add_argument("--minutes", type=float, default=9.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    dragnoise = comfy_env.start(pytorch_attention=True)
    torch.set_num_threads(args.threads)
    from toy import fields, parametric, probe
    from toy import model as toy_model
    from toy.scenes import random_scene
    from toy.train import hold_skips_at_zero, hold_top_pointwise, lr_at, moved_target

    torch.manual_seed(0)
    widths = tuple(int(w) for w in args.widths.split(","))
    unet = toy_model.build_unet(0, 1, widths).diffusion_model.train()
    hold_skips_at_zero(unet, range(11))
    hold_top_pointwise(unet)
    fields.build_linear_decoder(unet)
    top = {id(p) for m in (unet.output_blocks[9:], unet.out, unet.input_blocks[0]) for p in m.parameters()}
    for p in unet.parameters():
        p.requires_grad_(p.requires_grad and id(p) in top)
    trained = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.01)
    ab, context = probe.alphas_cumprod(), toy_model.default_conditioning()
    rng = np.random.default_rng(7)

    def scenes(n, generator=rng):
        return [random_scene(generator, toy_model.IMAGE_SIZE, n_objects=0 if args.backgrounds else None, kinds=("disc",),
                             palette=fields.PALETTE) for _ in range(n)]

    def elsewhere(goals, generator=rng):
        return scenes(len(goals), generator) if args.backgrounds else [parametric.displaced(s, generator) for s in goals]

    def predict(zt, t, told):
        return unet(zt, timesteps=torch.full((len(zt),), float(t)) if np.isscalar(t) else t.float(),
                    context=context.expand(len(zt), -1, -1),
                    transformer_options={"patches": {"output_block_patch": [parametric.ParamBottleneck(told)]}})

    fixed = np.random.default_rng(123)
    a_scenes = scenes(8, fixed)
    b_scenes = elsewhere(a_scenes, fixed)
    z_a, z_b = (toy_model.scene_latent(np.stack([s.render() for s in group])) for group in (a_scenes, b_scenes))
    map_a, map_b = fields.field_map(a_scenes), fields.field_map(b_scenes)
    eps_fixed = torch.randn(z_a.shape, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def measure(t=probe.EDIT_TIMESTEP):
        a = ab[t]
        zt = probe.noised(z_a, eps_fixed, a)
        x_a, x_b = ((zt - (1 - a).sqrt() * predict(zt, t, told)) / a.sqrt() for told in (map_a, map_b))
        direction = (z_b - z_a).flatten(1)
        pull = float((((x_b - x_a).flatten(1) * direction).sum(1) / direction.square().sum(1)).mean())
        mean_error = float((x_b.mean((2, 3)) - z_b.mean((2, 3))).abs().mean())
        rest = float(((x_b - x_b.mean((2, 3), keepdim=True)) - (z_b - z_b.mean((2, 3), keepdim=True))).square().mean().sqrt())
        return f"pull {pull:.2f}, x0 error: channel means {mean_error:.3f}, the rest (RMS) {rest:.3f}"

    start, step, half = time.time(), 0, args.batch // 2
    while time.time() - start < 60 * args.minutes:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, 100000, args.lr, 100)
        goals = scenes(args.batch)
        t = torch.randint(0, 1000, (args.batch,))
        t[:half] = torch.randint(150, 1000, (half,))
        shown = elsewhere(goals[:half]) + goals[half:]
        told = fields.field_map(goals) + 0.01 * torch.randn(args.batch, fields.FIELDS, 4, 4)
        goal = toy_model.scene_latent(np.stack([s.render() for s in goals]))
        z0 = toy_model.scene_latent(np.stack([s.render() for s in shown]))
        a = ab[t][:, None, None, None]
        zt = probe.noised(z0, torch.randn_like(z0), a)
        target, weight = moved_target(zt, goal, a)
        with dragnoise.features.backward_safe(unet, "norm inputs"):
            loss = (weight * (predict(zt, t, told) - target) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        if step % 100 == 0:
            print(f"[{time.time() - start:5.0f}s] step {step}: loss {loss.item():.3f}; at the edit step {measure()}", flush=True)
        step += 1
    print(f"after {step} steps: at the edit step {measure()}; at t=400 {measure(400)}")


if __name__ == "__main__":
    main()
