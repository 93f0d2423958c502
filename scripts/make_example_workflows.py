"""Writes example_workflows/: the UI workflows (litegraph format, loadable by the 2024 frontend and
by current ones) and the API-format twin of the photo workflow, from one description each.

    python scripts/make_example_workflows.py

The tests load every file through the real frontend and ComfyUI's own validation
(tests/test_workflows.py), and check that the API file is what the frontend makes of the photo
workflow, so an edit here that breaks either shows up there.
"""

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "example_workflows"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
EXAMPLE_IMAGE = "dragnoise_example.png"

# Per node type: socket inputs (name, type) in the frontend's order, widget names in order (None
# marks the frontend-only control_after_generate / upload values kept in widgets_values), outputs.
TYPES = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "LoadImage": ([], ["image", None], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"], [("LATENT", "LATENT")]),
    "Note": ([], ["text"], []),
    "DragNoiseLoRAFit": ([("model", "MODEL"), ("latent", "LATENT"), ("positive", "CONDITIONING")],
                         ["steps", "learning_rate", "rank", "batch_size", "seed", None, "save_name"],
                         [("model", "MODEL")]),
    "DragNoiseDDIMInvert": ([("model", "MODEL"), ("latent", "LATENT"), ("positive", "CONDITIONING")],
                            ["steps", "inversion_strength"], [("latent", "LATENT"), ("inversion", "DRAGNOISE_INVERSION")]),
    "DragNoisePointEditor": ([("image", "IMAGE"), ("base_mask", "MASK")], ["points", "mask"],
                             [("points", "DRAG_POINTS"), ("mask", "MASK")]),
    "DragNoiseBottleneckOptimize": ([("model", "MODEL"), ("inversion", "DRAGNOISE_INVERSION"),
                                     ("points", "DRAG_POINTS"), ("mask", "MASK")],
                                    ["max_steps", "learning_rate", "mask_lambda", "mask_when_empty", "motion_radius",
                                     "tracking_radius", "supervision_block"],
                                    [("edit", "DRAGNOISE_EDIT"), ("preview", "IMAGE")]),
    "DragNoisePropagatedSampler": ([("model", "MODEL"), ("inversion", "DRAGNOISE_INVERSION"),
                                    ("edit", "DRAGNOISE_EDIT")], ["halt_step"], [("latent", "LATENT")]),
}

def build(nodes):
    """nodes: list of dicts with id, type, pos, size, values (widgets_values), links {input: (src, slot)},
    optional title. Returns (ui_workflow, api_prompt)."""
    by_id = {n["id"]: n for n in nodes}
    links, ui_nodes, api = [], [], {}
    outgoing = {}
    for n in nodes:
        inputs, _, _ = TYPES[n["type"]]
        names = [name for name, _ in inputs]
        for name, (src, slot) in n.get("links", {}).items():
            link_id = len(links) + 1
            links.append([link_id, src, slot, n["id"], names.index(name), TYPES[by_id[src]["type"]][2][slot][1]])
            outgoing.setdefault((src, slot), []).append(link_id)
    link_of = {(l[3], l[4]): l[0] for l in links}
    for order, n in enumerate(nodes):
        inputs, widgets, outputs = TYPES[n["type"]]
        assert len(widgets) == len(n["values"]), n
        node = {"id": n["id"], "type": n["type"], "pos": n["pos"], "size": n["size"], "flags": {}, "order": order,
                "mode": 0}
        if n.get("title"):
            node["title"] = n["title"]
        if inputs:
            node["inputs"] = [{"name": name, "type": typ, "link": link_of.get((n["id"], i))}
                              for i, (name, typ) in enumerate(inputs)]
        if outputs:
            node["outputs"] = [{"name": name, "type": typ, "links": outgoing.get((n["id"], i), []), "slot_index": i}
                               for i, (name, typ) in enumerate(outputs)]
        node["properties"] = {"text": ""} if n["type"] == "Note" else {"Node name for S&R": n["type"]}
        node["widgets_values"] = n["values"]
        ui_nodes.append(node)
        if n["type"] == "Note":
            continue
        api_inputs = {name: value for name, value in zip(widgets, n["values"]) if name is not None}
        for name, (src, slot) in n.get("links", {}).items():
            api_inputs[name] = [str(src), slot]
        entry = {"inputs": api_inputs, "class_type": n["type"]}
        entry["_meta"] = {"title": n.get("title") or n["type"]}
        api[str(n["id"])] = entry
    ui = {"last_node_id": max(by_id), "last_link_id": len(links), "nodes": ui_nodes, "links": links, "groups": [],
          "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}
    return ui, api


def note(node_id, pos, size, text, title):
    return {"id": node_id, "type": "Note", "pos": pos, "size": size, "values": [text], "title": title}


OPTIMIZE_NOTE = """Point Editor (canvas): click a handle (red), then its target (blue); drag a point to move it; right-click or Del removes a pair; Undo / Clear. 'Mask mode': paint the region that may change (brush size), Erase, Clear mask. Points and mask are in the image's own pixels and are saved with the workflow.

Bottleneck Optimize: max_steps 80 (DragBench); it stops early when every handle is within 4 px of its target. Long drags need more steps (raise max_steps). mask_lambda 0.1 keeps the area outside the mask unchanged (0.2 in DragBench, 0 = off and faster). Without a painted mask, mask_when_empty decides: regularize the whole image (authors' code) or skip the term (DragDiffusion). Draw a mask when the rest of the image must stay exactly as it was."""

SAMPLER_NOTE = """Propagated Sampler: halt_step 10 (the paper's t'): the last 10 of the 50 steps run without the optimized bottleneck. Lower = stronger edit, higher = more original detail back.

DDIM Invert: steps 50 and inversion_strength 0.7 (the edit starts at step 15 of 50, t = 681), the paper's balance between how far content can move and fidelity. Keep the same prompt and model everywhere in the edit."""


def photo_workflow():
    photo_note = f"""Drag a photograph (DragNoise, CVPR 2024)

1. Load your SD1.5 checkpoint ({CHECKPOINT} or any SD1.5 model) and pick your photo in Load Image (it shows on the Point Editor canvas at once).
2. Write a prompt that describes the photo: it is used for the LoRA, the inversion and the edit (no negative prompt, no CFG in the edit).
3. Place the points, optionally paint a mask, then Queue Prompt.

LoRA Fit: real photos do not survive inversion intact on a stock model, so a small LoRA is fitted on the image first (the authors' UI: 80 steps, lr 5e-4, batch 4, rank 16; DragBench: 200 steps, lr 2e-4, batch 1). Seed 'fixed' keeps the fitted LoRA cached between edits of the same image; set save_name to reuse it across sessions."""
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": [40, 300], "size": [320, 100], "values": [CHECKPOINT]},
        {"id": 2, "type": "CLIPTextEncode", "pos": [400, 420], "size": [320, 110],
         "values": ["a photograph"], "title": "Prompt (describe the photo)", "links": {"clip": (1, 1)}},
        {"id": 3, "type": "LoadImage", "pos": [40, 460], "size": [320, 360], "values": [EXAMPLE_IMAGE, "image"]},
        {"id": 4, "type": "VAEEncode", "pos": [400, 580], "size": [210, 50],
         "links": {"pixels": (3, 0), "vae": (1, 2)}, "values": []},
        {"id": 5, "type": "DragNoiseLoRAFit", "pos": [760, 300], "size": [320, 230],
         "values": [80, 0.0005, 16, 4, 0, "fixed", ""],
         "links": {"model": (1, 0), "latent": (4, 0), "positive": (2, 0)}},
        {"id": 6, "type": "DragNoiseDDIMInvert", "pos": [760, 580], "size": [320, 120], "values": [50, 0.7],
         "links": {"model": (5, 0), "latent": (4, 0), "positive": (2, 0)}},
        {"id": 7, "type": "DragNoisePointEditor", "pos": [1120, 40], "size": [460, 520], "values": ["[]", ""],
         "links": {"image": (3, 0)}},
        {"id": 8, "type": "DragNoiseBottleneckOptimize", "pos": [1120, 600], "size": [340, 260],
         "values": [80, 0.01, 0.1, "regularize whole image", 1, 3, "up_blocks.2"],
         "links": {"model": (5, 0), "inversion": (6, 1), "points": (7, 0), "mask": (7, 1)}},
        {"id": 9, "type": "DragNoisePropagatedSampler", "pos": [1500, 600], "size": [300, 100], "values": [10],
         "links": {"model": (5, 0), "inversion": (6, 1), "edit": (8, 0)}},
        {"id": 10, "type": "VAEDecode", "pos": [1500, 740], "size": [210, 50],
         "links": {"samples": (9, 0), "vae": (1, 2)}, "values": []},
        {"id": 11, "type": "SaveImage", "pos": [1840, 300], "size": [400, 420], "values": ["dragnoise"],
         "links": {"images": (10, 0)}},
        {"id": 12, "type": "PreviewImage", "pos": [1840, 760], "size": [400, 360], "values": [],
         "title": "Optimization preview (handles, targets, tracked paths)", "links": {"images": (8, 1)}},
        note(13, [40, 40], [680, 230], photo_note, "Read me: drag a photo"),
        note(14, [1120, 900], [680, 250], OPTIMIZE_NOTE, "Point Editor and Bottleneck Optimize"),
        note(15, [400, 740], [680, 170], SAMPLER_NOTE, "Inversion and propagation"),
    ]
    return build(nodes)


def generated_workflow():
    gen_note = f"""Generate an image, then drag it (DragNoise, CVPR 2024)

1. Load your SD1.5 checkpoint ({CHECKPOINT} or any SD1.5 model) and write the prompt.
2. Queue Prompt once: the image is generated and appears on the Point Editor canvas (Bottleneck Optimize reports that no points are placed yet).
3. Place the points (and optionally a mask) and queue again: the KSampler's seed is 'fixed', so the same image is edited and only the drag runs.

No LoRA here: an image generated by the same model inverts well, so its latent goes straight into DDIM Invert (with the same prompt). The paper fits a LoRA for every image; add LoRA Fit (as in the photo workflow) if the reconstruction drifts."""
    nodes = [
        {"id": 1, "type": "CheckpointLoaderSimple", "pos": [40, 300], "size": [320, 100], "values": [CHECKPOINT]},
        {"id": 2, "type": "CLIPTextEncode", "pos": [400, 40], "size": [320, 120],
         "values": ["a photo of a red apple on a wooden table, soft daylight"], "title": "Positive prompt",
         "links": {"clip": (1, 1)}},
        {"id": 3, "type": "CLIPTextEncode", "pos": [400, 200], "size": [320, 100], "values": ["blurry, low quality"],
         "title": "Negative prompt (generation only)", "links": {"clip": (1, 1)}},
        {"id": 4, "type": "EmptyLatentImage", "pos": [40, 460], "size": [320, 110], "values": [512, 512, 1]},
        {"id": 5, "type": "KSampler", "pos": [760, 40], "size": [320, 270],
         "values": [42, "fixed", 30, 7.5, "euler", "normal", 1.0],
         "links": {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "latent_image": (4, 0)}},
        {"id": 6, "type": "VAEDecode", "pos": [760, 360], "size": [210, 50],
         "links": {"samples": (5, 0), "vae": (1, 2)}, "values": []},
        {"id": 7, "type": "DragNoiseDDIMInvert", "pos": [760, 460], "size": [320, 120], "values": [50, 0.7],
         "links": {"model": (1, 0), "latent": (5, 0), "positive": (2, 0)}},
        {"id": 8, "type": "DragNoisePointEditor", "pos": [1120, 40], "size": [460, 520], "values": ["[]", ""],
         "links": {"image": (6, 0)}},
        {"id": 9, "type": "DragNoiseBottleneckOptimize", "pos": [1120, 600], "size": [340, 260],
         "values": [80, 0.01, 0.1, "regularize whole image", 1, 3, "up_blocks.2"],
         "links": {"model": (1, 0), "inversion": (7, 1), "points": (8, 0), "mask": (8, 1)}},
        {"id": 10, "type": "DragNoisePropagatedSampler", "pos": [1500, 600], "size": [300, 100], "values": [10],
         "links": {"model": (1, 0), "inversion": (7, 1), "edit": (9, 0)}},
        {"id": 11, "type": "VAEDecode", "pos": [1500, 740], "size": [210, 50],
         "links": {"samples": (10, 0), "vae": (1, 2)}, "values": []},
        {"id": 12, "type": "SaveImage", "pos": [1840, 300], "size": [400, 420], "values": ["dragnoise_generated"],
         "links": {"images": (11, 0)}},
        {"id": 13, "type": "PreviewImage", "pos": [1840, 760], "size": [400, 360], "values": [],
         "title": "Optimization preview (handles, targets, tracked paths)", "links": {"images": (9, 1)}},
        note(14, [40, 620], [680, 230], gen_note, "Read me: generate and drag"),
        note(15, [1120, 900], [680, 250], OPTIMIZE_NOTE, "Point Editor and Bottleneck Optimize"),
        note(16, [400, 900], [680, 170], SAMPLER_NOTE, "Inversion and propagation"),
    ]
    return build(nodes)


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main():
    photo_ui, photo_api = photo_workflow()
    generated_ui, _ = generated_workflow()
    write(OUT / "dragnoise_drag_photo.json", photo_ui)
    write(OUT / "dragnoise_generate_and_drag.json", generated_ui)
    # In a subfolder, so the template browser (example_workflows/*.json) lists only UI workflows.
    write(OUT / "api" / "dragnoise_drag_photo_api.json", photo_api)


if __name__ == "__main__":
    main()
