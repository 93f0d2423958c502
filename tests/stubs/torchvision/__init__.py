"""Test-only stand-in for torchvision.

No torchvision build exists for the CPU torch this project tests with, and ComfyUI imports it at
start-up (only a few optional nodes use it). Real ComfyUI installs have the real package; this
stub is put on the path by the tests alone and never ships with the pack.
"""
__version__ = "0.0.0+dragnoise-test-stub"
