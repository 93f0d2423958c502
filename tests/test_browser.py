"""The Point Editor canvas in real headless Chromium, on the real ComfyUI frontend of the test server.

A person's session: open the UI, load example workflow (a), see the image on the canvas, place two
pairs by clicking, move a point, undo, move a point again, paint a mask stroke, press Queue Prompt.
Then /history must show the prompt carried exactly those points (in image pixels) and that mask,
and that the run succeeded. The screenshot is kept in out/browser/ (and docs/point-editor.png is
one such screenshot).
"""

import json
import time

import numpy as np
import torch

from conftest import ARTIFACTS, REPO, execution_error, pack_module, pack_page_errors
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
    mask_mod = pack_module("dragnoise.mask")
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
    assert pack_page_errors(result) == []

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


def test_point_editor_editing_resizing_and_saving(server, browser, comfy):
    """Right-click and Delete remove pairs, the canvas follows the node's size with coordinates still
    in image pixels, erase removes paint, everything survives saving and reopening the workflow, and
    choosing another file in Load Image brings its image (points and mask rescaled to it)."""
    mask_mod = pack_module("dragnoise.mask")
    workflow = json.loads(WORKFLOW.read_text())
    upload_png(server, torch.from_numpy(synthetic_photo(W, H).astype(np.float32) / 255), load_image_name(workflow))
    other = synthetic_photo(96, 128)[:, :, ::-1].copy()  # another picture, another size
    upload_png(server, torch.from_numpy(other.astype(np.float32) / 255), "dragnoise_other.png")
    p = [((20, 20), (40, 30)), ((100, 40), (150, 60)), ((60, 100), (80, 110))]
    clicks = [{"do": "click", "at": xy} for pair in p for xy in pair]
    result = browser({"command": "steps", "url": server.url, "out": str(ARTIFACTS), "steps": [
        {"do": "load", "workflow": workflow}, {"do": "wait_image", "size": [W, H]},
        *clicks, {"do": "values", "as": "three"},
        {"do": "click", "at": p[1][0], "button": "right"}, {"do": "values", "as": "right_click"},
        {"do": "click", "at": p[2][1]}, {"do": "key", "key": "Delete"}, {"do": "values", "as": "delete"},
        {"do": "canvas_box", "as": "small"}, {"do": "resize", "by": [180, 120]}, {"do": "canvas_box", "as": "big"},
        {"do": "click", "at": (170, 10)}, {"do": "click", "at": (191, 127)}, {"do": "values", "as": "corners"},
        {"do": "press", "action": "mode"}, {"do": "brush", "size": 10},
        {"do": "drag", "from": (20, 64), "to": (120, 64)},
        {"do": "press", "action": "eraser"}, {"do": "drag", "from": (70, 50), "to": (70, 80)},
        {"do": "values", "as": "painted"},
        {"do": "reload"}, {"do": "wait_image", "size": [W, H]}, {"do": "values", "as": "reopened"},
        {"do": "colors", "at": [p[0][0], p[0][1]], "as": "dots"},
        {"do": "set", "widgets": {"LoadImage": {"image": "dragnoise_other.png"}}},
        {"do": "wait_image", "size": [96, 128], "as": "other"}, {"do": "values", "as": "rescaled"},
        {"do": "colors", "at": [(5, 5), (90, 120)], "as": "other_colors"},
        {"do": "press", "action": "clear"}, {"do": "values", "as": "points_cleared"},  # reopened in points mode
        {"do": "press", "action": "mode"}, {"do": "press", "action": "clear"}, {"do": "values", "as": "all_cleared"},
        {"do": "press", "action": "undo"}, {"do": "values", "as": "mask_back"},
        {"do": "press", "action": "undo"}, {"do": "values", "as": "points_back"},
    ]})
    rec = result["record"]
    assert pack_page_errors(result) == []
    pts = lambda name: json.loads(rec[name]["points"])  # noqa: E731
    three = pairs_json(p)
    assert pts("three") == three
    assert pts("right_click") == [three[0], three[2]]  # right-click on pair 2's handle
    assert pts("delete") == [three[0]]  # pair 3 selected (its target clicked), then Delete
    small, big = rec["small"]["box"], rec["big"]["box"]
    assert big["width"] > small["width"] + 100 and big["height"] > small["height"] + 60
    four = [three[0], {"handle": [170, 10], "target": [191, 127]}]
    assert pts("corners") == four  # still exact image pixels on the bigger canvas, corners included
    paint, erase = mask_mod.decode_painted_mask(rec["painted"]["mask"], W, H)
    assert paint[64, 20:121].sum() == 101 - int(erase[64, 20:121].sum())
    assert erase[50:81, 70].all() and not paint[50:81, 70].any()  # erased where the eraser went
    assert paint[64, 30] and not erase[64, 30]
    assert pts("painted") == four
    assert rec["reopened"] == rec["painted"]  # saved and reopened: the same points and mask
    handle, target = rec["dots"]["colors"]
    assert handle[0] > 180 and handle[2] < 110, handle  # drawn again: red handle
    assert target[2] > 180 and target[0] < 110, target  # blue target
    assert rec["other"]["status"].startswith("2 pairs · 96x128")
    scale = lambda xy: [min(95, int(xy[0] * 96 / W + 0.5)), min(127, int(xy[1] * 128 / H + 0.5))]  # noqa: E731
    assert pts("rescaled") == [{"handle": scale(q["handle"]), "target": scale(q["target"])} for q in four]
    paint2, _ = mask_mod.decode_painted_mask(rec["rescaled"]["mask"], 96, 128)
    assert paint2[64, 15] and not paint2[10, 10]
    for (x, y), shown in zip([(5, 5), (90, 120)], rec["other_colors"]["colors"]):
        assert np.abs(np.array(shown) - other[y, x]).max() <= 12, ((x, y), shown, other[y, x].tolist())
    assert rec["points_cleared"] == {"points": "[]", "mask": rec["rescaled"]["mask"]}
    assert rec["all_cleared"] == {"points": "[]", "mask": ""}
    assert rec["mask_back"] == rec["points_cleared"]
    assert rec["points_back"] == rec["rescaled"]


def test_point_editor_shows_generated_image_after_first_run(server, browser):
    """With no Load Image upstream the canvas waits for a run; the first run, with no points yet,
    brings the image and stops at Bottleneck Optimize asking for points."""
    workflow = json.loads((REPO / "example_workflows" / "dragnoise_generate_and_drag.json").read_text())
    small = {"EmptyLatentImage": {"width": W, "height": H}, "KSampler": {"steps": 2},
             "DragNoiseDDIMInvert": {"steps": 20}, "DragNoiseBottleneckOptimize": {"max_steps": 2}}
    result = browser({"command": "steps", "url": server.url, "out": str(ARTIFACTS), "steps": [
        {"do": "load", "workflow": workflow}, {"do": "swap"}, {"do": "set", "widgets": small},
        {"do": "status", "as": "before"}, {"do": "queue", "as": "run"}, {"do": "wait_image", "size": [W, H], "as": "after"},
        {"do": "close_dialogs"},
        {"do": "colors", "at": [(10, 10), (100, 64), (180, 120)], "as": "shown"},
        {"do": "click", "at": (50, 60)}, {"do": "click", "at": (90, 70)}, {"do": "values", "as": "placed"},
    ]})
    rec = result["record"]
    assert pack_page_errors(result) == []
    assert "no image yet" in rec["before"]["status"]
    entry = server.wait(rec["run"]["promptId"])
    error = execution_error(entry)
    assert error["node_type"] == "DragNoiseBottleneckOptimize", error["exception_message"]
    assert error["exception_message"].startswith("points: no handle/target pairs")
    assert rec["after"]["status"].startswith("0 pairs · 192x128")
    prompt = entry["prompt"][2]
    (editor_id,) = [k for k, v in prompt.items() if v["class_type"] == "DragNoisePointEditor"]
    shown_file = np.asarray(view(server, entry["outputs"][editor_id]["dragnoise_image"][0]).convert("RGB"))
    for (x, y), shown in zip([(10, 10), (100, 64), (180, 120)], rec["shown"]["colors"]):
        assert np.abs(np.array(shown) - shown_file[y, x]).max() <= 12, ((x, y), shown, shown_file[y, x].tolist())
    assert json.loads(rec["placed"]["points"]) == [{"handle": [50, 60], "target": [90, 70]}]
