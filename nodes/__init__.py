"""Thin ComfyUI node classes over ``dragnoise``."""

from . import types
from .invert import DDIMInvert

NODE_CLASS_MAPPINGS = {
    types.DDIM_INVERT: DDIMInvert,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    types.DDIM_INVERT: "DragNoise DDIM Invert",
}
