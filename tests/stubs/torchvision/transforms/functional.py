"""Test-only stand-in for the one torchvision module ComfyUI imports at start-up.

No torchvision build exists for the CPU torch this project tests with. Real ComfyUI installs have
the real package; this stub is put on the path by the tests alone, only while ComfyUI starts (see
tests/comfy_test_nodes/torchvision_stub.py), and never ships with the pack.
"""
import enum


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def rotate(*args, **kwargs):
    raise NotImplementedError("torchvision is a test stub here; install the real torchvision")


def normalize(*args, **kwargs):  # imported by spandrel (newer ComfyUI's upscale-model nodes)
    raise NotImplementedError("torchvision is a test stub here; install the real torchvision")
