"""Thin ComfyUI node classes over ``dragnoise``."""

from . import types
from .edit import ApplyPropagation, BottleneckOptimize, PointEditor, PropagatedSampler
from .invert import DDIMInvert
from .lora import LoRAFit

NODE_CLASS_MAPPINGS = {
    types.LORA_FIT: LoRAFit,
    types.DDIM_INVERT: DDIMInvert,
    types.POINT_EDITOR: PointEditor,
    types.BOTTLENECK_OPTIMIZE: BottleneckOptimize,
    types.PROPAGATED_SAMPLER: PropagatedSampler,
    types.APPLY_PROPAGATION: ApplyPropagation,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    types.LORA_FIT: "DragNoise LoRA Fit",
    types.DDIM_INVERT: "DragNoise DDIM Invert",
    types.POINT_EDITOR: "DragNoise Point Editor",
    types.BOTTLENECK_OPTIMIZE: "DragNoise Bottleneck Optimize",
    types.PROPAGATED_SAMPLER: "DragNoise Propagated Sampler",
    types.APPLY_PROPAGATION: "DragNoise Apply Propagation",
}
