"""Every file in example_workflows/ loads and is a valid prompt; the API one runs end to end.

UI workflows go through the real frontend in Chromium (``app.loadGraphData`` then
``app.graphToPrompt``), and the prompt it makes is checked with ComfyUI's own
``execution.validate_prompt``, as shipped (a placeholder file stands in for the SD1.5 checkpoint so
the loader's choice is valid). The API workflow is queued by the README's Python script on the test
server with the loaders swapped for the tiny test model.
"""

import copy
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, pack_module, pack_page_errors
from helpers import synthetic_photo
from test_server import upload_png, view

WORKFLOWS = REPO / "example_workflows"
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
API_WORKFLOW = WORKFLOWS / "api" / "dragnoise_drag_photo_api.json"
POINTS = '[{"handle": [70, 60], "target": [100, 54]}]'


def test_example_workflows_present():
    names = {p.name for p in UI_WORKFLOWS}
    assert names == {"dragnoise_drag_photo.json", "dragnoise_generate_and_drag.json"}
    for path in UI_WORKFLOWS:
        workflow = json.loads(path.read_text())
        types = [n["type"] for n in workflow["nodes"]]
        assert "CheckpointLoaderSimple" in types and "DragNoisePointEditor" in types
        notes = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "Note"]
        for parameter in ("halt_step", "max_steps", "inversion_strength", "mask"):
            assert any(parameter in text for text in notes), (path.name, parameter)


def test_example_workflows_are_what_the_generator_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_example_workflows", REPO / "scripts" / "make_example_workflows.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    photo_ui, photo_api = make.photo_workflow()
    generated_ui, _ = make.generated_workflow()
    assert json.loads((WORKFLOWS / "dragnoise_drag_photo.json").read_text()) == photo_ui
    assert json.loads((WORKFLOWS / "dragnoise_generate_and_drag.json").read_text()) == generated_ui
    assert json.loads(API_WORKFLOW.read_text()) == photo_api


@pytest.fixture(scope="module")
def checkpoint_placeholder(comfy_root):
    """An empty file under the checkpoint name the workflows use: enough for validation, which only
    checks that the loader's choice exists."""
    names = set()
    for path in UI_WORKFLOWS:
        for n in json.loads(path.read_text())["nodes"]:
            if n["type"] == "CheckpointLoaderSimple":
                names.add(n["widgets_values"][0])
    paths = [comfy_root / "models" / "checkpoints" / name for name in names]
    for path in paths:
        path.write_bytes(b"")
    yield names
    for path in paths:
        path.unlink()


def upload_example_images(server, workflows):
    for workflow in workflows:
        for n in workflow["nodes"]:
            if n["type"] == "LoadImage":
                import torch

                upload_png(server, torch.from_numpy(synthetic_photo(192, 128).astype(np.float32) / 255),
                           n["widgets_values"][0])


def validate_prompt(execution, prompt):
    """ComfyUI's own validation of a prompt (newer versions: async, with a prompt id)."""
    import inspect

    from scripts.comfy_local import comfy_call

    if len(inspect.signature(execution.validate_prompt).parameters) == 1:
        return execution.validate_prompt(prompt)
    return comfy_call(execution.validate_prompt("dragnoise-test", prompt, None))


def test_ui_workflows_convert_to_valid_prompts(server, browser, comfy, checkpoint_placeholder):
    import execution

    workflows = {p.name: json.loads(p.read_text()) for p in UI_WORKFLOWS}
    upload_example_images(server, workflows.values())
    result = browser({"command": "to-prompt", "url": server.url, "workflows": workflows, "widgets": {
        # Points typed into the hidden text widget must reach the prompt unchanged.
        name: {"DragNoisePointEditor": {"points": POINTS}} for name in workflows}})
    assert pack_page_errors(result) == []
    for name, workflow in workflows.items():
        prompt = result["prompts"][name]
        shipped = sorted(n["type"] for n in workflow["nodes"] if n["type"] != "Note")
        assert sorted(v["class_type"] for v in prompt.values()) == shipped, name
        (editor,) = [v for v in prompt.values() if v["class_type"] == "DragNoisePointEditor"]
        assert editor["inputs"]["points"] == POINTS and editor["inputs"]["mask"] == ""
        valid, error, outputs, node_errors = validate_prompt(execution, prompt)
        assert valid, (name, error, node_errors)
        assert node_errors == {}, (name, node_errors)
        assert set(outputs) == {k for k, v in prompt.items() if v["class_type"] in ("SaveImage", "PreviewImage")}


def test_api_workflow_is_the_photo_workflow(server, browser):
    """example_workflows/api is exactly what the frontend queues for the photo workflow."""
    workflow = json.loads((WORKFLOWS / "dragnoise_drag_photo.json").read_text())
    result = browser({"command": "to-prompt", "url": server.url, "workflows": {"photo": workflow}, "widgets": {}})
    from_ui = result["prompts"]["photo"]
    api = json.loads(API_WORKFLOW.read_text())
    info = server.get("/object_info")
    assert set(from_ui) == set(api)
    for node_id, node in api.items():
        assert from_ui[node_id]["class_type"] == node["class_type"]
        spec = info[node["class_type"]]["input"]
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        # The 2024 frontend also sends its upload button's value, which ComfyUI ignores.
        ui_inputs = {k: v for k, v in from_ui[node_id]["inputs"].items() if k in declared}
        assert ui_inputs == node["inputs"], node_id


def readme_script():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (script,) = [b for b in blocks if b.startswith("# dragnoise_api_example.py")]
    return script


def swap_to_test_loaders(prompt):
    """The shipped API prompt with the SD1.5 loaders replaced by the tiny test-model nodes."""
    prompt = copy.deepcopy(prompt)
    for node_id, node in list(prompt.items()):
        if node["class_type"] == "CheckpointLoaderSimple":
            prompt[node_id] = {"class_type": "DragNoiseTestTinyModel", "inputs": {"seed": 0}}
            prompt[f"{node_id}_vae"] = {"class_type": "DragNoiseTestTinyVAE", "inputs": {"seed": 0}}
            for other in prompt.values():
                for key, value in other["inputs"].items():
                    if value == [node_id, 2]:
                        other["inputs"][key] = [f"{node_id}_vae", 0]
        elif node["class_type"] == "CLIPTextEncode":
            prompt[node_id] = {"class_type": "DragNoiseTestTinyConditioning", "inputs": {"seed": 0}}
    return prompt


def test_api_workflow_runs_with_readme_script(server, comfy, tmp_path):
    import torch

    api = json.loads(API_WORKFLOW.read_text())
    prompt = swap_to_test_loaders(api)
    small = {"DragNoiseLoRAFit": {"steps": 1, "rank": 4, "batch_size": 1}, "DragNoiseDDIMInvert": {"steps": 20},
             "DragNoiseBottleneckOptimize": {"max_steps": 2}}  # test-only: CPU time
    for node in prompt.values():
        node["inputs"].update(small.get(node["class_type"], {}))
    (tmp_path / "workflow.json").write_text(json.dumps(prompt))
    Image.fromarray(synthetic_photo(192, 128)).save(tmp_path / "photo.png")
    (tmp_path / "dragnoise_api_example.py").write_text(readme_script())
    mask_mod = pack_module("dragnoise.mask")
    paint = torch.zeros(128, 192, dtype=torch.bool)
    paint[30:90, 40:140] = True
    mask = mask_mod.encode_painted_mask(paint)
    out = subprocess.run(
        [sys.executable, "dragnoise_api_example.py", "--server", server.url, "--workflow", "workflow.json",
         "--image", "photo.png", "--points", POINTS, "--mask", mask, "--out", "edited.png"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    prompt_id = re.search(r"queued (\S+)", out.stdout).group(1)
    entry = server.get(f"/history/{prompt_id}")[prompt_id]
    assert entry["status"]["status_str"] == "success"
    sent = entry["prompt"][2]
    (editor_id,) = [k for k, v in sent.items() if v["class_type"] == "DragNoisePointEditor"]
    assert sent[editor_id]["inputs"]["points"] == POINTS and sent[editor_id]["inputs"]["mask"] == mask
    # The script sent the workflow it was given, with only the image, points and mask filled in.
    assert set(sent) == set(prompt)
    for node_id, node in prompt.items():
        assert sent[node_id]["class_type"] == node["class_type"]
        kept = {k: v for k, v in node["inputs"].items() if k not in ("image", "points", "mask")}
        assert {k: v for k, v in sent[node_id]["inputs"].items() if k in kept} == kept, node_id
    edited = Image.open(tmp_path / "edited.png")
    (save_id,) = [k for k, v in sent.items() if v["class_type"] == "SaveImage"]
    assert edited.size == (192, 128)
    assert np.array_equal(np.asarray(edited), np.asarray(view(server, entry["outputs"][save_id]["images"][0])))
