"""The pack loads through ComfyUI's own loaders and presents well-formed nodes."""

import os
import subprocess
import sys
from pathlib import Path

from conftest import COMFY_DIR, PACK_NAME, REPO, STUBS, pack_module

EXISTING_NODES = ["DragNoiseLoRAFit", "DragNoiseDDIMInvert", "DragNoisePointEditor", "DragNoiseBottleneckOptimize",
                  "DragNoisePropagatedSampler", "DragNoiseApplyPropagation"]


def test_loaded_by_comfyui_custom_node_loader(comfy):
    # The loader imports the pack under the name of its custom_nodes folder (newer ComfyUI: the
    # folder's whole path); finding it there proves it came in through ComfyUI's custom_nodes
    # scan, with relative imports resolved inside the package.
    pack = pack_module()
    assert pack.__name__.split("/")[-1] == PACK_NAME
    assert Path(pack.__file__).resolve() == REPO / "__init__.py"
    for name in EXISTING_NODES:
        assert comfy.NODE_CLASS_MAPPINGS[name].__module__.startswith(pack.__name__ + ".nodes")
        assert name in comfy.NODE_DISPLAY_NAME_MAPPINGS
    assert comfy.EXTENSION_WEB_DIRS[PACK_NAME].endswith("web/js")


def test_every_node_in_one_category_with_tooltips(comfy):
    for name in EXISTING_NODES:
        cls = comfy.NODE_CLASS_MAPPINGS[name]
        assert cls.CATEGORY == "DragNoise"
        inputs = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, spec in inputs.get(section, {}).items():
                assert len(spec) == 2 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)


def test_quick_test_for_ci_loads_the_pack(comfy_root):
    out = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--quick-test-for-ci",
         "--extra-model-paths-config", str(comfy_root / "extra_model_paths.yaml")],
        cwd=COMFY_DIR, env={"PYTHONPATH": os.pathsep.join(filter(None, [str(STUBS), os.environ.get("PYTHONPATH")])),
                            "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    pack_lines = [line for line in log.splitlines() if f"custom_nodes/{PACK_NAME}" in line]
    assert pack_lines, log[-3000:]
    assert not any("IMPORT FAILED" in line for line in pack_lines), log[-3000:]
    # Only our custom_nodes folders: a newer ComfyUI without optional extras (torchaudio) logs
    # its own comfy_extras that fail to import.
    assert not any("Cannot import" in line and "custom_nodes/" in line for line in log.splitlines()), log[-3000:]


def test_object_info_lists_nodes_with_inputs(server):
    info = server.get("/object_info")
    invert = info["DragNoiseDDIMInvert"]
    assert invert["category"] == "DragNoise"
    required = invert["input"]["required"]
    assert list(required) == ["model", "latent", "positive", "steps", "inversion_strength"]
    assert required["steps"][1]["default"] == 50
    assert required["inversion_strength"][1]["default"] == 0.7
    assert invert["output"] == ["LATENT", "DRAGNOISE_INVERSION"]
    assert invert["output_name"] == ["latent", "inversion"]
    assert set(EXISTING_NODES) <= set(info)
    optimize = info["DragNoiseBottleneckOptimize"]["input"]
    assert list(optimize["required"]) == ["model", "inversion", "points", "max_steps", "learning_rate", "mask_lambda",
                                          "mask_when_empty", "motion_radius", "tracking_radius"]
    assert list(optimize["optional"]) == ["mask", "supervision_block"]
    editor = info["DragNoisePointEditor"]
    assert list(editor["input"]["required"]) == ["image", "points"]
    assert list(editor["input"]["optional"]) == ["mask", "base_mask"]
    assert editor["input"]["required"]["points"][0] == "STRING" and editor["input"]["optional"]["mask"][0] == "STRING"
    # The 2024 frontend would treat the JSON's {...} as dynamic-prompt choices otherwise.
    assert editor["input"]["required"]["points"][1]["dynamicPrompts"] is False
    assert editor["input"]["optional"]["mask"][1]["dynamicPrompts"] is False
    assert editor["output"] == ["DRAG_POINTS", "MASK"] and editor["output_name"] == ["points", "mask"]
    assert info["DragNoisePropagatedSampler"]["output"] == ["LATENT"]
    assert info["DragNoiseApplyPropagation"]["output"] == ["MODEL"]
