"""Test-only torchvision stub; see transforms/functional.py."""
