"""Drag quality on the toy model: DragNoise against a DragDiffusion-style baseline.

Generated cases with known truth (toy/scenes.py): an object, a handle on it, a target elsewhere,
half of them with a mask of the region that may change. Both methods share the inversion, the
points, the supervision feature, the tracking, the losses and the step budget; DragNoise
optimizes the bottleneck and propagates it to the halt step, the baseline optimizes the noisy
latent z_t and denoises it. Scores (toy/measure.py): how far the object is from where it should
be, how much of the drag it made, the change outside the editable region and on the other
objects, PSNR against the ideal result, steps and time. The plain reconstruction (inversion,
then denoising without an edit) is scored too: it is the floor of the change any edit shows.

    .venv/bin/python bench/bench_quality.py                   # 60 cases, about 70 minutes on 2 cores
    .venv/bin/python bench/bench_quality.py --quick           # 2 cases, 3 steps (what the tests run)
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import comfy_env  # noqa: E402
from toy import measure  # noqa: E402
from toy.scenes import KINDS, random_scene  # noqa: E402

METHODS = ("dragnoise", "baseline")


@dataclass
class Case:
    scene: object
    index: int  # the dragged object
    handle: tuple  # (x, y) image pixels
    target: tuple
    mask: np.ndarray = None  # [H, W] bool, True where the image may change; None: no mask

    @property
    def drag(self):
        return self.target[0] - self.handle[0], self.target[1] - self.handle[1]


def make_cases(n, seed=0, size=256, shaded=False, kinds=KINDS, palette=None, radii=None, objects=None):
    """``n`` cases; every other one has a mask: the object's footprint swept along the drag,
    widened by 12 px. ``shaded``, ``kinds``: shaded objects, the kinds of object (for a model
    trained on those), ``palette``: their colours (``toy.fields.PALETTE`` for a ``--fields`` model),
    ``radii``: each colour's radius, ``objects``: objects per scene (a ``toy.set_decoder`` model's world).
    Drag lengths (24-64 px), margins and that widening are for 256 px scenes
    and scale with ``size``."""
    rng = np.random.default_rng(seed)
    k = size / 256
    cases = []
    while len(cases) < n:
        scene = random_scene(rng, size, n_objects=objects, kinds=kinds, shaded=shaded, palette=palette, radii=radii)
        obj = scene.objects[0]
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(24, 64) * k
        handle = (obj.center[0] + rng.uniform(-0.3, 0.3) * obj.radius, obj.center[1] + rng.uniform(-0.3, 0.3) * obj.radius)
        target = (handle[0] + length * np.cos(angle), handle[1] + length * np.sin(angle))
        if not all(16 * k <= v <= size - 16 * k for v in target):
            continue
        case = Case(scene, 0, tuple(map(float, handle)), tuple(map(float, target)))
        if len(cases) % 2:
            swept = np.zeros((size, size), bool)
            for f in np.linspace(0, 1, 9):
                swept |= obj.moved(case.drag[0] * f, case.drag[1] * f).mask(size)
            case.mask = measure._dilate(swept, max(1, round(12 * k)))
        cases.append(case)
    return cases


class Runner:
    """The pack's functions on the toy model, called as its nodes call them."""

    def __init__(self, dragnoise, max_steps, halt_step, weights=None, mask_lambda=0.1,
                 mask_when_empty="regularize whole image"):
        from toy import model as toy_model

        self.dn = dragnoise
        self.model, self.vae, self.cond = toy_model.load(weights or toy_model.WEIGHTS)
        self.settings = dragnoise.optimize.DragSettings(max_steps=max_steps, mask_lambda=mask_lambda,
                                                        mask_when_empty=mask_when_empty)
        self.halt_step = halt_step

    def run(self, case):
        import torch

        dn = self.dn
        source = case.scene.render()
        image = torch.from_numpy(source)[None]
        points = dn.points.parse_points(json.dumps([{"handle": case.handle, "target": case.target}]),
                                        case.scene.size, case.scene.size)
        mask = None if case.mask is None else torch.from_numpy(case.mask.astype(np.float32))
        results = {}
        with torch.inference_mode():
            latent = self.vae.encode(image)
            _, inversion = dn.inversion.ddim_invert(self.model, latent, self.cond, 50, 0.7)
            steps_left = inversion.steps - inversion.edit_step
            for method in METHODS:
                optimize = dn.optimize.optimize_bottleneck if method == "dragnoise" else dn.optimize.optimize_latent
                start = time.perf_counter()
                edit = optimize(self.model, inversion, points, mask, self.settings)
                optimized = time.perf_counter()
                edited = dn.propagation.propagated_sample(self.model, inversion, edit, self.halt_step)
                output = self.vae.decode(edited)[0].float().numpy()
                results[method] = self.score(case, output, source) | {
                    "steps": edit.steps_used, "converged": max(edit.final_distances) < 2 * self.settings.stop_distance,
                    "optimize_s": optimized - start, "total_s": time.perf_counter() - start}
                if method == "dragnoise":  # the same edit with nothing substituted: the plain reconstruction
                    plain = dn.propagation.propagated_sample(self.model, inversion, edit, steps_left)
                    results["reconstruction"] = self.score(case, self.vae.decode(plain)[0].float().numpy(), source)
        return results

    @staticmethod
    def score(case, output, source):
        s = measure.score_drag(case.scene, case.index, case.drag, output, source=source, editable=case.mask)
        return {k: s[k] for k in ("error_px", "moved_fraction", "outside_mae", "others_mae", "psnr_to_truth",
                                    "overlap", "object_mae")}


def summarize(rows):
    """Markdown table: per method and mask condition, means (and the median of the error)."""
    lines = ["| method | cases | object error px (mean / median) | moved of the drag | moved >= 50% | "
             "overlap with the ideal footprint | object's colour error /255 | "
             "change outside editable /255 | change of other objects /255 | PSNR to truth dB | steps | optimize s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS + ("reconstruction",):
        for label, masked in (("no mask", False), ("mask", True)):
            group = [r[method] for r in rows if r["masked"] == masked]
            if not group:
                continue

            def mean(key, fmt="{:.2f}"):
                values = [g[key] for g in group if g.get(key) is not None]
                return fmt.format(np.mean(values)) if values else "-"

            err = np.array([g["error_px"] for g in group])
            moved = np.array([g["moved_fraction"] for g in group])
            lines.append(f"| {method} ({label}) | {len(group)} | {np.mean(err):.1f} / {np.median(err):.1f} | "
                         f"{np.mean(moved):.2f} | {np.mean(moved >= 0.5):.0%} | {mean('overlap')} | {mean('object_mae', '{:.1f}')} | "
                         f"{mean('outside_mae')} | "
                         f"{mean('others_mae')} | {mean('psnr_to_truth', '{:.1f}')} | {mean('steps', '{:.1f}')} | "
                         f"{mean('optimize_s', '{:.1f}')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--max-steps", type=int, default=80)
    parser.add_argument("--halt-step", type=int,
                        help="Propagated Sampler's halt_step (default: the demo's for the model, toy/demo.py)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", help="write every case's numbers and the table here (JSON)")
    parser.add_argument("--weights", help="another toy model file (default: the committed one)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--mask-lambda", type=float,
                        help="Bottleneck Optimize's mask_lambda (default: 0.1; 0 on a set-decoder model, whose "
                             "drag any mask loss stops, toy/FINDINGS.md)")
    parser.add_argument("--mask-when-empty",
                        help="Bottleneck Optimize's mask_when_empty for the cases without a mask (default: the demo's)")
    parser.add_argument("--quick", action="store_true", help="2 cases, 3 steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.max_steps = 2, 3
    from toy import demo
    from toy import model as toy_model

    weights = args.weights or toy_model.WEIGHTS
    args.halt_step = demo.default_halt_step(weights) if args.halt_step is None else args.halt_step
    if args.mask_lambda is None:
        args.mask_lambda = 0.0 if toy_model.has_set_decoder(weights) else 0.1
    args.mask_when_empty = args.mask_when_empty or demo.mask_when_empty(weights)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    runner = Runner(comfy_env.start(pytorch_attention=True), args.max_steps, args.halt_step, args.weights,
                    args.mask_lambda, args.mask_when_empty)
    rows = []
    start = time.time()
    shaded, size = toy_model.trained_on_shaded(weights), toy_model.image_size(weights)
    for i, case in enumerate(make_cases(args.cases, args.seed, size, shaded, toy_model.scene_kinds(weights),
                                         toy_model.scene_palette(weights), toy_model.scene_radii(weights),
                                         toy_model.scene_objects(weights))):
        rows.append({"case": i, "masked": case.mask is not None, "drag": case.drag} | runner.run(case))
        r = rows[-1]
        print(f"case {i + 1}/{args.cases} ({'mask' if r['masked'] else 'no mask'}, drag {np.hypot(*case.drag):.0f} px): "
              + "; ".join(f"{m} err {r[m]['error_px']:.1f} px moved {r[m]['moved_fraction']:.2f} steps {r[m]['steps']} "
                          f"{r[m]['optimize_s']:.1f}s" for m in METHODS), flush=True)
        table = summarize(rows)
        if args.out:  # after every case, so a long run stopped early keeps what it measured
            Path(args.out).write_text(json.dumps({"args": vars(args), "table": table, "cases": rows}, indent=1,
                                                 default=float))
    print(f"\n{table}\n\n{len(rows)} cases in {time.time() - start:.0f} s; max_steps {args.max_steps}, "
          f"halt_step {args.halt_step}, mask_lambda {args.mask_lambda} ({args.mask_when_empty} without a mask), "
          f"toy model at {size} px{', shaded objects' if shaded else ''}")
    return rows, table


if __name__ == "__main__":
    main()
