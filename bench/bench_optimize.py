"""Benchmark of the DragNoise optimization step: ours against the reference's way, in one run.

Ours: encoder, mid block and skips computed once per edit; each step runs only the decoder
blocks it needs (to the supervision block, or through the output when the mask loss is on), no
weight gradients. The reference's way (the authors' code): every step runs the whole U-Net with
the bottleneck replaced, with gradients for every weight.

Each measurement runs in its own process, so peak memory is that configuration's alone: on a
GPU the peak of torch's allocator, on the CPU the peak resident memory of the process (both
include the model's weights). Also times a whole edit (inversion, a fixed number of optimization
steps, propagation) through the pack's nodes.

    .venv/bin/python bench/bench_optimize.py                    # CPU: 256 and 512 px
    .venv/bin/python bench/bench_optimize.py --sizes 256 --steps 2 --edit-size 0   # quick
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


class PeakMemory:
    """Peak memory during a ``with`` block: torch's CUDA allocator, or the process RSS."""

    def __init__(self, device):
        self.device, self.peak, self.base = device, 0, 0

    def __enter__(self):
        import psutil
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = psutil.Process().memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


def _inputs(model, size, torch):
    """Random z_t, prompt embedding, points and mask for a ``size`` px edit."""
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn([1, 4, size // 8, size // 8], generator=gen)
    context = torch.randn([1, 77, 768], generator=gen)
    mask = torch.zeros(size, size)
    mask[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    pairs = f'[{{"handle": [{size // 4}, {size // 4}], "target": [{3 * size // 4}, {size // 2}]}}]'
    return latent, [[context, {}]], pairs, mask


def measure_ours(ckpt, size, mask_on, steps):
    import torch

    dn = __import__("comfy_env").start()
    import comfy.model_management
    import comfy.sd

    from_module = sys.modules
    inversion_mod = from_module[dn.__name__ + ".inversion"]
    optimize_mod = from_module[dn.__name__ + ".optimize"]
    points_mod = from_module[dn.__name__ + ".points"]
    with torch.inference_mode():  # as CheckpointLoaderSimple loads it
        model = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)[0]
    device = comfy.model_management.get_torch_device()
    latent, positive, pairs, mask = _inputs(model, size, torch)
    sigmas = from_module[dn.__name__ + ".comfy_compat"].scheduler_sigmas(model, "ddim_uniform", 50)
    ms = model.model.model_sampling
    inversion = inversion_mod.Inversion(
        noisy_latent=latent * 0.5, source_latent=latent * 0.5, sigmas=sigmas,
        timesteps=[int(round(float(ms.timestep(s)))) for s in sigmas[:-1]], edit_step=15, timestep=681, steps=50,
        positive=positive, sampler_latent=latent)
    pts = points_mod.parse_points(pairs, size, size)
    settings = dict(mask_lambda=0.1 if mask_on else 0.0, mask_when_empty="skip mask loss")
    times = {}
    with torch.inference_mode():
        for n in (1, 0, steps):  # the first run warms up
            t = time.perf_counter()
            with PeakMemory(device) as mem:
                edit = optimize_mod.optimize_bottleneck(model, inversion, pts, mask if mask_on else None,
                                                        optimize_mod.DragSettings(max_steps=n, **settings))
            times[n] = time.perf_counter() - t
    assert edit.steps_used == steps
    return {"step_s": (times[steps] - times[0]) / steps, "setup_s": times[0], "peak_bytes": mem.peak,
            "extra_bytes": mem.peak - mem.base}


def measure_reference(ckpt, size, mask_on, steps):
    """A step as the authors' code does it: the whole U-Net with the bottleneck replaced, weight
    gradients on (the weights are ordinary trainable tensors there), the same losses."""
    import torch
    import torch.nn.functional as F

    dn = __import__("comfy_env").start()
    import comfy.model_management
    import comfy.sd

    optimize_mod = sys.modules[dn.__name__ + ".optimize"]
    with torch.no_grad():
        model = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)[0]
    comfy.model_management.load_models_gpu([model])
    device, dtype = model.load_device, model.model.get_dtype()
    unet = model.model.diffusion_model
    unet.requires_grad_(True)
    ms = model.model.model_sampling
    ab, abp = (float(1 / (1 + ms.sigma(torch.tensor(t)) ** 2)) for t in (681.0, 661.0))
    latent, positive, pairs, mask = _inputs(model, size, torch)
    z = latent.to(device, dtype)
    context = positive[0][0].to(device, dtype)
    ts = torch.tensor([681.0], device=device)
    keep = 1 - F.interpolate(mask[None, None], size=z.shape[-2:], mode="nearest").to(device)
    with torch.no_grad():
        s0 = None

        def grab(h, hsp, to):
            nonlocal s0
            if to["block"] == ("output", 0):
                s0 = h.float().clone()
            return h, hsp
        eps0 = unet(z, timesteps=ts, context=context, transformer_options={"patches": {"output_block_patch": [grab]}})
    s = s0.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([s], lr=0.01)
    feature = {}

    def substitute_and_capture(h, hsp, to):
        if to["block"] == ("output", 0):
            h = s.to(h.dtype)
        if to["block"] == ("output", 9):
            feature["f"] = h  # output of up_blocks[2] (output block 8)
        return h, hsp

    to = {"patches": {"output_block_patch": [substitute_and_capture]}}
    handle, target = torch.tensor([size // 8, size // 8]), torch.tensor([size // 4, 3 * size // 8])

    def step():
        eps = unet(z, timesteps=ts, context=context, transformer_options=dict(to))
        f = F.interpolate(feature["f"].float(), size=(size // 2, size // 2), mode="bilinear", align_corners=False)
        d = (target - handle).float() / (target - handle).float().norm()
        loss = 9 * F.l1_loss(optimize_mod.sample_patch(f, handle.float().to(device) + d.to(device), 1),
                             optimize_mod.sample_patch(f, handle.float().to(device), 1).detach())
        if mask_on:
            diff = optimize_mod.ddim_step(z.float(), eps.float(), ab, abp) - optimize_mod.ddim_step(z.float(), eps0.float(), ab, abp)
            loss = loss + 0.1 * (diff * keep).abs().sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        unet.zero_grad(set_to_none=False)  # the authors' code keeps the weight gradients allocated

    features = sys.modules[dn.__name__ + ".features"]
    # The older ComfyUI's in-place adds need the same backward copies as ours.
    with features.backward_safe(unet, "norm inputs"), PeakMemory(device) as mem:
        step()  # warm-up; inside the memory window, since it allocates the weight gradients
        t = time.perf_counter()
        for _ in range(steps):
            step()
        elapsed = time.perf_counter() - t
    return {"step_s": elapsed / steps, "setup_s": 0.0, "peak_bytes": mem.peak, "extra_bytes": mem.peak - mem.base}


def measure_edit(ckpt, size, steps):
    """A whole edit through the nodes: DDIM Invert, Bottleneck Optimize (fixed steps), Propagated Sampler."""
    import torch

    __import__("comfy_env").start()
    import comfy.model_management
    import comfy.sd
    import nodes

    with torch.inference_mode():
        model = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)[0]
        latent, positive, pairs, _ = _inputs(model, size, torch)
        image = torch.rand(1, size, size, 3)
        run = lambda name, **kw: getattr(nodes.NODE_CLASS_MAPPINGS[name](), nodes.NODE_CLASS_MAPPINGS[name].FUNCTION)(**kw)
        phases = {}
        device = comfy.model_management.get_torch_device()
        with PeakMemory(device) as mem:
            t = time.perf_counter()
            inv_latent, inversion = run("DragNoiseDDIMInvert", model=model, latent={"samples": latent}, positive=positive,
                                        steps=50, inversion_strength=0.7)
            phases["inversion_s"] = time.perf_counter() - t
            pts = run("DragNoisePointEditor", image=image, points=pairs)["result"][0]
            t = time.perf_counter()
            edit, _ = run("DragNoiseBottleneckOptimize", model=model, inversion=inversion, points=pts, max_steps=steps,
                          learning_rate=0.01, mask_lambda=0.1, mask_when_empty="regularize whole image",
                          motion_radius=1, tracking_radius=3)
            phases["optimization_s"] = time.perf_counter() - t
            t = time.perf_counter()
            run("DragNoisePropagatedSampler", model=model, inversion=inversion, edit=edit, halt_step=10)
            phases["propagation_s"] = time.perf_counter() - t
    phases["total_s"] = sum(phases.values())
    phases["peak_bytes"] = mem.peak
    phases["optimization_steps"] = edit.steps_used
    return phases


def run_child(args_list):
    # A fixed mmap threshold makes glibc return freed tensors to the OS at once, so the resident
    # size follows live memory and CPU peaks are comparable.
    out = subprocess.run([sys.executable, __file__, "--child", *args_list], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(HERE), MALLOC_MMAP_THRESHOLD_="65536"))
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark child failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels")
    p.add_argument("--steps", type=int, default=3, help="optimization steps timed per configuration")
    p.add_argument("--edit-size", type=int, default=256, help="image size of the whole-edit timing (0: skip)")
    p.add_argument("--edit-steps", type=int, default=10, help="optimization steps in the whole edit")
    p.add_argument("--checkpoint", help="an SD1.5 checkpoint (default: the full-size random one)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    if args.child:
        kind, ckpt, size, mask_on, steps = args.child
        fn = {"ours": measure_ours, "reference": measure_reference}.get(kind)
        result = (measure_edit(ckpt, int(size), int(steps)) if kind == "edit"
                  else fn(ckpt, int(size), mask_on == "1", int(steps)))
        print("RESULT " + json.dumps(result))
        return
    sys.path.insert(0, str(HERE))
    import platform

    import comfy_env

    ckpt = args.checkpoint
    if ckpt is None:
        comfy_env.start()
        ckpt = str(comfy_env.random_sd15_checkpoint())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    print(f"DragNoise optimization benchmark, {time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, "
          f"U-Net in ComfyUI's default dtype, {args.steps} steps per configuration")
    print("peak: all memory in use at the peak (weights included); extra: the peak over what was in use "
          "before the steps (the model loaded)")
    print(f"{'size':>5} {'mask':>5} | {'ours s/step':>11} {'ref s/step':>10} {'speed-up':>8} | "
          f"{'ours peak':>10} {'ref peak':>10} {'ratio':>6} | {'ours extra':>10} {'ref extra':>10} {'ratio':>6} | ours setup s")
    rows = []
    for size in args.sizes:
        for mask_on in ("1", "0"):
            ours = run_child(["ours", ckpt, str(size), mask_on, str(args.steps)])
            ref = run_child(["reference", ckpt, str(size), mask_on, str(args.steps)])
            gib = lambda b: f"{b / 2**30:.2f} GiB"
            print(f"{size:>5} {('on' if mask_on == '1' else 'off'):>5} | {ours['step_s']:>11.3f} {ref['step_s']:>10.3f} "
                  f"{ref['step_s'] / ours['step_s']:>7.2f}x | {gib(ours['peak_bytes']):>10} {gib(ref['peak_bytes']):>10} "
                  f"{ours['peak_bytes'] / ref['peak_bytes']:>6.2f} | {gib(ours['extra_bytes']):>10} "
                  f"{gib(ref['extra_bytes']):>10} {ours['extra_bytes'] / ref['extra_bytes']:>6.2f} | {ours['setup_s']:.2f}",
                  flush=True)
            rows.append({"size": size, "mask": mask_on == "1", "ours": ours, "reference": ref})
    if args.edit_size:
        edit = run_child(["edit", ckpt, str(args.edit_size), "1", str(args.edit_steps)])
        print(f"whole edit at {args.edit_size} px: inversion {edit['inversion_s']:.1f} s, optimization "
              f"({edit['optimization_steps']} steps, mask on) {edit['optimization_s']:.1f} s, propagation "
              f"{edit['propagation_s']:.1f} s, total {edit['total_s']:.1f} s, peak {edit['peak_bytes'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
