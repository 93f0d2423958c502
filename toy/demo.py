"""The demo: a real drag on the toy model, run by the pack's nodes on a ComfyUI server.

    bash scripts/demo.sh                      # sets everything up, then runs this
    .venv/bin/python toy/demo.py --out out/demo [--url http://127.0.0.1:8188]

Generates a scene (toy/scenes.py), uploads it, and queues Toy Model -> Load Image -> VAE Encode
-> DDIM Invert -> Point Editor -> Bottleneck Optimize -> Propagated Sampler -> VAE Decode ->
Save Image over ComfyUI's HTTP API (a server of its own on a free loopback port, or ``--url``).
Writes to the output folder: source.png, edited.png, drag.png (the edited image with the handle,
target and tracked path drawn), demo.png (source and drag side by side), preview.png (Bottleneck
Optimize's own preview) and
report.json / report.txt (steps used, final handle-target distance, where the object went).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # last: the repository's nodes/ must not shadow ComfyUI's nodes module

from dragnoise.preview import draw_drag  # noqa: E402  (pure PIL/numpy: no ComfyUI needed here)
from scripts.comfy_local import TOY_NODES, ComfyClient, ComfyServer, user_dir  # noqa: E402
from toy import measure  # noqa: E402
from toy.model import scene_kinds, scene_objects, scene_palette, scene_radii, trained_on_shaded  # noqa: E402
from toy.scenes import random_scene  # noqa: E402

DEMO_SEED = 7
DEMO_DRAG = (56.0, -24.0)  # pixels, applied to object 0


def mask_when_empty(path=None):
    """Bottleneck Optimize's ``mask_when_empty`` for the committed model. The demo paints no mask;
    the authors' whole-image mask loss suits the trained models, but a set decoder draws the whole
    image from the bottleneck, so there that loss holds every pixel in place (even at a weight of
    0.02 the drag stopped; toy/FINDINGS.md, "A decoder set by construction"): skip it there, as
    DragDiffusion does."""
    from toy import model as toy_model

    return "skip mask loss" if toy_model.has_set_decoder(path or toy_model.WEIGHTS) else "regularize whole image"


def default_halt_step(path=None):
    """Propagated Sampler's ``halt_step`` for the committed model: the paper's 10 on the trained
    models; on a set decoder 0, substituting the optimized bottleneck to the end. Its drawing is
    exactly what its bottleneck says, and in the last ten steps without it the encoder re-reads a
    z_t that still holds the faint ghost of where the object was (toy/FINDINGS.md, "A rigid read")."""
    from toy import model as toy_model

    return 0 if toy_model.has_set_decoder(path or toy_model.WEIGHTS) else 10


def demo_case(seed=DEMO_SEED, drag=DEMO_DRAG):
    """(scene, object index, handle (x, y), target (x, y)): the handle on the object's centre;
    shaded objects, the kinds of object and their colours as the committed model was trained on."""
    scene = random_scene(np.random.default_rng(seed), n_objects=scene_objects() or 2, kinds=scene_kinds(),
                         shaded=trained_on_shaded(), palette=scene_palette(), radii=scene_radii())
    handle = scene.objects[0].center
    return scene, 0, handle, (handle[0] + drag[0], handle[1] + drag[1])


def drag_prompt(image_name, handle, target, max_steps=80, halt_step=None):
    """The API-format prompt of the demo graph (node ids are stable: tests read them)."""
    points = json.dumps([{"handle": [round(v, 1) for v in handle], "target": [round(v, 1) for v in target]}])
    halt_step = default_halt_step() if halt_step is None else halt_step
    return {
        "model": {"class_type": "DragNoiseToyModel", "inputs": {}},
        "image": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": ["model", 1]}},
        "invert": {"class_type": "DragNoiseDDIMInvert", "inputs": {
            "model": ["model", 0], "latent": ["encode", 0], "positive": ["model", 2], "steps": 50,
            "inversion_strength": 0.7}},
        "points": {"class_type": "DragNoisePointEditor", "inputs": {"image": ["image", 0], "points": points}},
        "optimize": {"class_type": "DragNoiseBottleneckOptimize", "inputs": {
            "model": ["model", 0], "inversion": ["invert", 1], "points": ["points", 0], "max_steps": max_steps,
            "learning_rate": 0.01, "mask_lambda": 0.1, "mask_when_empty": mask_when_empty(),
            "motion_radius": 1, "tracking_radius": 3}},
        "propagate": {"class_type": "DragNoisePropagatedSampler", "inputs": {
            "model": ["model", 0], "inversion": ["invert", 1], "edit": ["optimize", 0], "halt_step": halt_step}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["propagate", 0], "vae": ["model", 1]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "dragnoise_demo"}},
        "save_preview": {"class_type": "SaveImage", "inputs": {
            "images": ["optimize", 1], "filename_prefix": "dragnoise_demo_preview"}},
    }


def run(client, out, max_steps=80, halt_step=None):
    """Runs the demo against a ComfyUI server (``ComfyClient``) and writes its files to ``out``.

    Returns:
        the report (dict).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scene, index, handle, target = demo_case()
    source = scene.render()
    source_image = Image.fromarray((source * 255).round().astype(np.uint8))
    source_image.save(out / "source.png")
    name = client.upload_image(source_image, "dragnoise_demo_source.png")
    halt_step = default_halt_step() if halt_step is None else halt_step
    start = time.time()
    outputs = client.run(drag_prompt(name, handle, target, max_steps, halt_step))
    seconds = time.time() - start
    edited_image = client.view(outputs["save"]["images"][0]).convert("RGB")
    edited_image.save(out / "edited.png")
    client.view(outputs["save_preview"]["images"][0]).save(out / "preview.png")
    drag = outputs["optimize"]["drag"][0]
    edited = np.asarray(edited_image, np.float32) / 255
    import torch

    drawn = draw_drag(torch.from_numpy(edited), [handle], [target], drag["trajectory"])
    drag_image = Image.fromarray((drawn[0].numpy() * 255).round().astype(np.uint8))
    drag_image.save(out / "drag.png")
    side_by_side(source_image, drag_image).save(out / "demo.png")
    drag_vector = (target[0] - handle[0], target[1] - handle[1])
    score = measure.score_drag(scene, index, drag_vector, edited)
    report = {
        "handle": handle, "target": target, "steps_used": drag["steps_used"], "max_steps": max_steps,
        "final_handle": drag["handles"][0], "final_distance_px": drag["final_distances"][0],
        "object_start": score["start"], "object_end": score["end"], "object_expected": score["expected"],
        "moved_fraction": score["moved_fraction"], "object_error_px": score["error_px"],
        "object_overlap": score["overlap"], "object_mae": score["object_mae"],
        "change_outside_mae": score["outside_mae"], "halt_step": halt_step, "graph_seconds": round(seconds, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.txt").write_text(report_text(report))
    return report


def side_by_side(*images):
    """One picture of ``images`` (PIL, same height) left to right."""
    row = Image.new("RGB", (sum(i.width for i in images), max(i.height for i in images)), "white")
    x = 0
    for image in images:
        row.paste(image.convert("RGB"), (x, 0))
        x += image.width
    return row


def report_text(r):
    return (
        f"DragNoise demo on the toy model\n"
        f"  drag: handle {_xy(r['handle'])} -> target {_xy(r['target'])}\n"
        f"  Bottleneck Optimize: {r['steps_used']} of at most {r['max_steps']} steps; the tracked handle ended at "
        f"{_xy(r['final_handle'])}, {r['final_distance_px']:.1f} px from the target\n"
        f"  the object (measured in the output): {_xy(r['object_start'])} -> {_xy(r['object_end'])}, expected "
        f"{_xy(r['object_expected'])}: moved {100 * r['moved_fraction']:.0f}% of the drag, "
        f"{r['object_error_px']:.1f} px from where it should be\n"
        f"  where it should be: {100 * r['object_overlap']:.0f}% overlap with its shape, colours off by "
        f"{r['object_mae']:.1f} / 255\n"
        f"  mean change away from the object: {r['change_outside_mae']:.1f} / 255\n"
        f"  the graph ran in {r['graph_seconds']:.0f} s\n")


def _xy(p):
    return "none" if p is None else f"({p[0]:.0f}, {p[1]:.0f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "out" / "demo"), help="output folder")
    parser.add_argument("--url", help="a running ComfyUI with this pack and toy/ in its custom_nodes")
    parser.add_argument("--max-steps", type=int, default=80)
    parser.add_argument("--halt-step", type=int, help="Propagated Sampler's halt step (default: default_halt_step())")
    args = parser.parse_args(argv)
    start = time.time()
    if args.url:
        report = run(ComfyClient(args.url), args.out, args.max_steps, args.halt_step)
    else:
        with tempfile.TemporaryDirectory(prefix="dragnoise-demo-") as tmp:
            root = user_dir(tmp, TOY_NODES)
            print("starting ComfyUI ...", flush=True)
            with ComfyServer(root, extra_args=["--use-pytorch-cross-attention"]) as server:
                report = run(server, args.out, args.max_steps, args.halt_step)
    print(report_text(report) + f"  total {time.time() - start:.0f} s; files in {args.out}", flush=True)


if __name__ == "__main__":
    main()
