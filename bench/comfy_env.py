"""In-process ComfyUI for the benchmarks, set up like the tests' (see tests/conftest.py)."""

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("DRAGNOISE_COMFYUI", REPO / ".venv" / "ComfyUI"))
CACHE = Path(os.environ.get("DRAGNOISE_TEST_CACHE", Path.home() / ".cache" / "dragnoise-tests"))


def start(pytorch_attention=False):
    """Imports ComfyUI (CPU unless CUDA is there), loads the pack through ComfyUI's custom-node
    loader and returns the pack's ``dragnoise`` package. ``pytorch_attention`` is ComfyUI's
    ``--use-pytorch-cross-attention`` (faster than its CPU default for small models)."""
    import torch

    sys.path[:0] = [str(COMFY_DIR), str(REPO / "tests"), str(REPO / "tests" / "stubs")]
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = not torch.cuda.is_available()
    args.use_pytorch_cross_attention = pytorch_attention
    import nodes

    from scripts.comfy_local import comfy_call, pack_module

    if not comfy_call(nodes.load_custom_node(str(REPO))):
        raise RuntimeError("the pack did not load")
    from comfy_test_nodes import torchvision_stub

    torchvision_stub.retire()
    return pack_module("dragnoise")


def random_sd15_checkpoint():
    """The full-size SD1.5-architecture checkpoint with seeded random weights (as in the tests)."""
    from comfy_test_nodes import models

    path = CACHE / "sd15-random-seed0-v1.safetensors"
    if not path.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        models.write_random_sd15_checkpoint(path.with_suffix(".partial"), seed=0)
        path.with_suffix(".partial").rename(path)
    return path
