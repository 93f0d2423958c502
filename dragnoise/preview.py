"""Drawing of handles (red), targets (blue) and tracked trajectories on an image."""

import numpy as np
import torch
from PIL import Image, ImageDraw

HANDLE, TARGET, TRAJECTORY = (230, 40, 40), (40, 90, 230), (255, 210, 40)


def draw_drag(image, handles, targets, trajectory=(), size=None):
    """Returns an IMAGE [1, H, W, 3] in [0, 1] with the drag drawn on ``image``.

    Args:
        image: [H, W, 3] float in [0, 1], or None for a grey canvas of ``size`` (width, height).
        handles, targets: lists of (x, y) image pixels (handles: where they started).
        trajectory: per step, the list of (x, y) handle positions.
    """
    if image is None:
        canvas = Image.new("RGB", size, (128, 128, 128))
    else:
        canvas = Image.fromarray((image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    radius = max(2, min(canvas.size) // 100)
    for i in range(len(handles)):
        path = [tuple(step[i]) for step in trajectory] or [tuple(handles[i])]
        if len(path) > 1:
            draw.line(path, fill=TRAJECTORY, width=max(1, radius // 2))
        draw.line([tuple(handles[i]), tuple(targets[i])], fill=(255, 255, 255), width=1)
        for (x, y), colour in ((handles[i], HANDLE), (targets[i], TARGET), (path[-1], HANDLE)):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(255, 255, 255))
    return torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255.0)[None]
