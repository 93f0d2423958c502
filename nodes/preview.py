"""Images the Point Editor sends to its canvas widget (ComfyUI's temp folder, served by /view)."""

import hashlib
import os

import numpy as np
from PIL import Image


def save_preview(image, kind):
    """Saves [H, W, 3] (an image) or [H, W] (a mask) in [0, 1] as a PNG in ComfyUI's temp folder and
    returns the /view reference {"filename", "subfolder", "type"} for the widget.

    The name is a hash of the pixels, so a re-run with the same image rewrites nothing.
    """
    import folder_paths

    pixels = (image.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    digest = hashlib.sha1(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()[:20]
    name = f"dragnoise_{kind}_{digest}.png"
    folder = folder_paths.get_temp_directory()
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        os.makedirs(folder, exist_ok=True)
        tmp = path + ".partial"
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
    return {"filename": name, "subfolder": "", "type": "temp"}
