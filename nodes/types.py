"""Node type names and custom types: fixed, since workflows and API users rely on them."""

CATEGORY = "DragNoise"

# Custom socket types.
INVERSION = "DRAGNOISE_INVERSION"
POINTS = "DRAG_POINTS"
EDIT = "DRAGNOISE_EDIT"

# Node type names (the keys of NODE_CLASS_MAPPINGS).
LORA_FIT = "DragNoiseLoRAFit"
DDIM_INVERT = "DragNoiseDDIMInvert"
POINT_EDITOR = "DragNoisePointEditor"
BOTTLENECK_OPTIMIZE = "DragNoiseBottleneckOptimize"
PROPAGATED_SAMPLER = "DragNoisePropagatedSampler"
APPLY_PROPAGATION = "DragNoiseApplyPropagation"
