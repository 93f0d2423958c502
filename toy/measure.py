"""Where did the dragged object end up, and what else changed? Scores a drag on a synthetic
scene against the truth that ``toy/scenes.py`` knows. Pure numpy.

Every pixel of an output image is labelled with the nearest of the scene's colours: the
background's own colour at that pixel or one of the objects' colours (for a shaded object, the
nearest of its shades). The dragged object's
pixels are those labelled with its colour; their centroid is where it is.
"""

import numpy as np


def labels(image, scene):
    """[H, W] int: -1 where the pixel is nearest to the background, else the index of the
    nearest object colour. ``image``: [H, W, 3] float in [0, 1]."""
    background = type(scene)(scene.size, scene.background, []).render()
    distances = [np.linalg.norm(image - background, axis=-1)]
    distances += [_distance_to_shades(image, *o.colour_range()) for o in scene.objects]
    return np.argmin(np.stack(distances), axis=0) - 1


def centroid(image, scene, index):
    """(x, y) centroid of the pixels labelled as object ``index``, or None if there are none."""
    return _centroid(labels(image, scene) == index)


def _centroid(mask):
    """(x, y) centroid of a [H, W] bool mask's pixels, or None if it has none."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def score_drag(scene, index, drag, output, source=None, editable=None):
    """Scores an edit that should have moved object ``index`` by ``drag`` = (dx, dy) pixels.

    Args:
        scene: the source ``Scene``.
        output: [H, W, 3] the edited image in [0, 1].
        source: [H, W, 3] the image the edit started from (default: the rendered scene); use the
            VAE round trip of the scene to leave the VAE's own error out of the fidelity terms.
        editable: [H, W] bool, the region allowed to change (default: the object's footprint at
            its start and its end, dilated by 8 px).
    Returns:
        dict: ``start``, ``end`` (measured centroids, x y), ``expected``; ``error_px`` (distance
        from the expected centre); ``moved_fraction`` (displacement along the drag / its length);
        ``outside_mae`` (mean absolute change outside ``editable``, 0-255 scale);
        ``others_mae`` (same over the other objects' footprints); ``psnr_to_truth`` (dB against
        the ideal result drawn by the scene itself); ``overlap`` (intersection over union of the
        pixels labelled as the object with its ideal moved footprint) and ``object_mae`` (mean
        absolute difference from the ideal result inside that footprint, 0-255): the nearest-colour
        labelling alone counts any blob of a nearby colour, e.g. a dark one at the target, as
        the object, so a real move also needs the right shape and colours where it should be.
    """
    source = scene.render() if source is None else source
    obj = scene.objects[index]
    start = centroid(source, scene, index)
    expected = (start[0] + drag[0], start[1] + drag[1])
    labelled = labels(output, scene) == index
    end = _centroid(labelled)
    length = float(np.hypot(*drag))
    if end is None:
        error, moved = float("inf"), 0.0
    else:
        error = float(np.hypot(end[0] - expected[0], end[1] - expected[1]))
        moved = float(((end[0] - start[0]) * drag[0] + (end[1] - start[1]) * drag[1]) / max(length, 1e-6) ** 2)
    if editable is None:
        moved_obj = obj.moved(*drag)
        editable = _dilate(obj.mask(scene.size) | moved_obj.mask(scene.size), 8)
    change = np.abs(output - source).mean(-1) * 255
    others = np.zeros((scene.size, scene.size), bool)
    for i, o in enumerate(scene.objects):
        if i != index:
            others |= o.mask(scene.size)
    others &= ~editable
    truth = scene.with_object_moved(index, *drag).render()
    mse = float(((output - truth) ** 2).mean())
    footprint = obj.moved(*drag).mask(scene.size)
    return {
        "start": start, "end": end, "expected": expected, "error_px": error, "moved_fraction": moved,
        "outside_mae": float(change[~editable].mean()) if (~editable).any() else 0.0,
        "others_mae": float(change[others].mean()) if others.any() else None,
        "psnr_to_truth": float(10 * np.log10(1 / max(mse, 1e-10))),
        "overlap": float((labelled & footprint).sum() / max(int((labelled | footprint).sum()), 1)),
        "object_mae": float(np.abs(output - truth).mean(-1)[footprint].mean() * 255),
    }


def _distance_to_shades(image, light, dark):
    """[H, W] RGB distance from each pixel to the nearest colour between ``light`` and ``dark``."""
    span = light - dark
    share = np.clip(((image - dark) @ span) / max(float(span @ span), 1e-12), 0, 1)
    return np.linalg.norm(image - (dark + share[..., None] * span), axis=-1)


def _dilate(mask, radius):
    """Square dilation of a bool mask by ``radius`` pixels."""
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out
