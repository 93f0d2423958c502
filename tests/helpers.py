"""Shared test helpers (no fixtures; see conftest.py for those)."""

import contextlib
import copy

import torch


def smooth_latent(seed, size=8, batch=1):
    """A latent with image-like spatial structure (low frequencies), [batch, 4, size, size]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn([batch, 4, max(2, size // 4), max(2, size // 4)], generator=gen)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) * 4


def stock_continue(node, model, latent, cond, steps, start):
    """Stock KSamplerAdvanced continuing ``latent`` from ``start`` (add_noise disable, ddim, cfg 1)."""
    (out,) = node("KSamplerAdvanced", model=model, add_noise="disable", noise_seed=0, steps=steps, cfg=1.0,
                  sampler_name="ddim", scheduler="ddim_uniform", positive=cond, negative=cond,
                  latent_image=latent, start_at_step=start, end_at_step=10000,
                  return_with_leftover_noise="disable")
    return out["samples"]


def snapshot(model):
    """Everything about a MODEL that a node could mutate: options, patches, weights.

    Clones share one torch module whose weights hold whichever clone's patches were loaded last,
    so the model is loaded first: the weights read are then this MODEL's own.
    """
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    return (copy.deepcopy(model.model_options), dict(model.patches), dict(model.object_patches),
            {k: v.clone() for k, v in model.model.state_dict().items()})


def assert_unchanged(model, before):
    options, patches, object_patches, weights = snapshot(model)
    assert options == before[0] and patches == before[1] and object_patches == before[2]
    assert all(torch.equal(weights[k], before[3][k]) for k in weights)


@contextlib.contextmanager
def progress_hook(on_update):
    """Calls ``on_update(value, total)`` on every ComfyUI progress-bar update inside the block."""
    import comfy.utils

    comfy.utils.set_progress_bar_global_hook(lambda value, total, *args, **kwargs: on_update(value, total))
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(None)


def progress_until_interrupted(at, run):
    """Runs ``run()`` with ComfyUI's interrupt raised (as the Cancel button does) once the
    progress bar reaches ``at``; checks it stopped with ComfyUI's interrupt exception and returns
    the progress values seen."""
    import comfy.model_management
    import pytest

    seen = []

    def update(value, total):
        seen.append(value)
        if value == at:
            comfy.model_management.interrupt_current_processing(True)

    try:
        with progress_hook(update), pytest.raises(comfy.model_management.InterruptProcessingException):
            run()
    finally:
        comfy.model_management.interrupt_current_processing(False)
    return seen


def synthetic_photo(width, height):
    """A small made-up picture (sky, ground, a red ball) as a [H, W, 3] uint8 array, for the examples'
    Load Image in tests. Nothing is fetched."""
    import numpy as np
    from PIL import Image, ImageDraw

    y = np.linspace(0, 1, height)[:, None]
    img = np.zeros((height, width, 3))
    img[..., 0], img[..., 1], img[..., 2] = 0.35 + 0.3 * y, 0.55 + 0.25 * y, 0.95 - 0.2 * y
    img[int(height * 0.68):, :] = [0.25, 0.55, 0.2]
    picture = Image.fromarray((img * 255).astype(np.uint8))
    r = height * 0.16
    cx, cy = width * 0.36, height * 0.47
    ImageDraw.Draw(picture).ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 40, 40))
    return np.asarray(picture)

