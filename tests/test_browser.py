"""The Point Editor canvas in real headless Chromium, on the real ComfyUI frontend of the test server.

A person's session: open the UI, load example workflow (a), see the image on the canvas, place two
pairs by clicking, move a point, undo, move a point again, paint a mask stroke, press Queue Prompt.
Then /history must show the prompt carried exactly those points (in image pixels) and that mask,
and that the run succeeded. The screenshot is kept in out/browser/ (and docs/point-editor.png is
one such screenshot).
"""

import json
import sys
import time

import numpy as np
import torch

from conftest import ARTIFACTS, PACK_NAME, REPO, execution_error
from helpers import synthetic_photo
from test_server import upload_png, view

WORKFLOW = REPO / "example_workflows" / "dragnoise_drag_photo.json"
W, H = 192, 128
# Test-only settings on the tiny model, to keep the queued run short on a CPU.
SMALL = {"DragNoiseLoRAFit": {"steps": 1, "rank": 4, "batch_size": 1},
         "DragNoiseDDIMInvert": {"steps": 20},
         "DragNoiseBottleneckOptimize": {"max_steps": 2}}


def load_image_name(workflow):
    return next(n for n in workflow["nodes"] if n["type"] == "LoadImage")["widgets_values"][0]


def pairs_json(pairs):
    return [{"handle": list(h), "target": list(t)} for h, t in pairs]


def test_point_editor_in_chromium(server, browser, comfy):
    mask_mod = sys.modules[PACK_NAME + ".dragnoise.mask"]
    workflow = json.loads(WORKFLOW.read_text())
    photo = synthetic_photo(W, H)
    # Upload under the workflow's own file name, as a user who has that file would have it.
    upload_png(server, torch.from_numpy(photo.astype(np.float32) / 255), load_image_name(workflow))

    pairs = [((70, 60), (120, 50)), ((30, 100), (40, 90))]
    move = {"from": [120, 50], "to": [131, 41]}  # pair 1's target, undone afterwards
    final_move = {"from": [30, 100], "to": [24, 106]}  # pair 2's handle, kept
    stroke = {"from": [60, 50], "to": [140, 50]}
    brush = 16
    probe = [(70, 60), (10, 10), (100, 120), (180, 70)]
    started = time.time()
    result = browser({
        "command": "edit", "url": server.url, "out": str(ARTIFACTS), "workflow": workflow, "settings": SMALL,
        "image": {"width": W, "height": H}, "probe": probe, "pairs": pairs, "move": move,
        "final_move": final_move, "brush": brush, "stroke": stroke})
    print(f"browser session {result['seconds']:.1f}s; screenshot {result['screenshot']}")
    assert result["pageErrors"] == []

    # The image from Load Image is on the canvas before any run, at the right place.
    for (x, y), shown in zip(probe, result["shown"]):
        assert np.abs(np.array(shown) - photo[y, x]).max() <= 12, ((x, y), shown, photo[y, x].tolist())

    values = result["values"]
    placed = pairs_json(pairs)
    assert json.loads(values["placed"]["points"]) == placed
    moved = json.loads(values["moved"]["points"])
    assert moved == [{"handle": [70, 60], "target": move["to"]}, placed[1]]
    assert json.loads(values["undone"]["points"]) == placed
    final = [placed[0], {"handle": final_move["to"], "target": [40, 90]}]
    assert json.loads(values["final"]["points"]) == final
    assert values["final"]["mask"] == ""

    # What the UI queued is in /history: exactly these points and the painted stroke.
    entry = server.wait(result["promptId"], timeout=600)
    print(f"queued run finished {time.time() - started:.1f}s after the browser started")
    prompt = entry["prompt"][2]
    (editor_id,) = [k for k, v in prompt.items() if v["class_type"] == "DragNoisePointEditor"]
    inputs = prompt[editor_id]["inputs"]
    assert json.loads(inputs["points"]) == final
    assert inputs["mask"] == values["painted"]["mask"]
    paint, erase = mask_mod.decode_painted_mask(inputs["mask"], W, H)
    assert erase is None or not erase.any()
    line = paint[stroke["from"][1], stroke["from"][0]:stroke["to"][0] + 1]
    assert bool(line.all())  # the whole stroke is painted
    assert not paint[:40].any() and not paint[61:].any()  # and nothing a brush radius away from it
    area = int(paint.sum())
    expected = brush * (stroke["to"][0] - stroke["from"][0]) + np.pi * (brush / 2) ** 2
    assert 0.8 * expected < area < 1.2 * expected, (area, expected)
    # The optimization got that mask: Point Editor's mask output feeds Bottleneck Optimize.
    (optimize_id,) = [k for k, v in prompt.items() if v["class_type"] == "DragNoiseBottleneckOptimize"]
    assert prompt[optimize_id]["inputs"]["mask"] == [editor_id, 1]

    error = execution_error(entry)
    assert entry["status"]["status_str"] == "success", error and (error["node_type"], error["exception_message"])
    (save_id,) = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    assert view(server, entry["outputs"][save_id]["images"][0]).size == (W, H)
