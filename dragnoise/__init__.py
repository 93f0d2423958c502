"""DragNoise (CVPR 2024) on ComfyUI's SD1.5 models.

The method lives here, free of node classes and UI: inversion, bottleneck features, the
optimization, propagation, LoRA fitting and point handling. ``comfy_compat`` is the only place
that knows how ComfyUI versions differ.
"""
