"""The Point Editor's painted mask: its text form, and how it combines with a mask from upstream.

The canvas keeps two binary layers at the image's size: ``paint`` (brush: this area may change)
and ``erase`` (eraser: this area must not change). They are kept apart so that a MASK coming from
upstream can be the start::

    mask = (upstream OR paint) AND NOT erase

The text form (the node's ``mask`` widget value, saved in workflows and sent in API prompts) is
JSON holding each layer as an uncompressed COCO run-length encoding::

    {"paint": {"size": [height, width], "counts": [...]},
     "erase": {"size": [height, width], "counts": [...]}}

``counts`` are the lengths of alternating runs of 0s and 1s, starting with 0s (so a layer that
starts with a 1 has a leading 0), over the pixels in column-major order (x outer, y inner), exactly
as pycocotools' ``frPyObjects``/``decode`` read them. Either layer may be left out or ``null``; the
empty string means nothing was painted.
"""

import json

import numpy as np
import torch

EMPTY = ""


def encode_rle(layer):
    """[H, W] bool/0-1 array or tensor -> {"size": [H, W], "counts": [...]} (COCO, column-major)."""
    a = np.asarray(layer.cpu() if isinstance(layer, torch.Tensor) else layer)
    if a.ndim != 2:
        raise ValueError(f"mask: a layer must be [height, width], got shape {list(a.shape)}.")
    flat = (a > 0.5).T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(a.shape[0]), int(a.shape[1])], "counts": [int(c) for c in counts]}


def decode_rle(rle, name):
    """COCO uncompressed RLE -> [H, W] bool tensor; ``name`` says which layer, for errors."""
    where = f"mask: the {name} layer"
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError(f'{where} must be {{"size": [height, width], "counts": [...]}}, got {_short(rle)}.')
    size, counts = rle["size"], rle["counts"]
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        raise ValueError(f"{where} has size {_short(size)}; expected [height, width] positive integers.")
    if isinstance(counts, str):
        raise ValueError(f"{where} uses compressed (string) counts; give the uncompressed list of run lengths.")
    if (not isinstance(counts, list)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
        raise ValueError(f"{where}: counts must be a list of non-negative integers (run lengths).")
    height, width = size
    if sum(counts) != height * width:
        raise ValueError(f"{where}: the run lengths add up to {sum(counts)} pixels, but a {width}x{height} "
                         f"layer has {height * width}. The value is damaged; clear the mask and paint it again.")
    values = np.arange(len(counts)) % 2
    flat = np.repeat(values.astype(bool), counts)
    return torch.from_numpy(flat.reshape(width, height).T.copy())


def encode_painted_mask(paint=None, erase=None):
    """The ``mask`` text for the given layers ([H, W], 1 = painted / erased); "" for none."""
    data = {key: encode_rle(layer) for key, layer in (("paint", paint), ("erase", erase)) if layer is not None}
    return json.dumps(data, separators=(",", ":")) if data else EMPTY


def decode_painted_mask(text, width, height):
    """Parses the ``mask`` text for a ``width`` x ``height`` image.

    Returns (paint, erase): [H, W] bool tensors, or None for a layer that is absent.
    Raises ValueError naming ``mask`` for text that does not decode or a layer of another size.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return None, None
    try:
        data = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as e:
        raise ValueError(f"mask: not valid JSON ({e.msg} at character {e.pos}). Expected "
                         '{"paint": {"size": [h, w], "counts": [...]}, "erase": ...}, or "" for no painting. '
                         "Clear the mask in the Point Editor to reset it.") from None
    if not isinstance(data, dict):
        raise ValueError(f'mask: expected an object with "paint" and/or "erase" layers, got {_short(data)}.')
    unknown = sorted(set(data) - {"paint", "erase"})
    if unknown:
        raise ValueError(f'mask: unknown key(s) {unknown}; only "paint" and "erase" layers are allowed.')
    layers = []
    for name in ("paint", "erase"):
        rle = data.get(name)
        if rle is None:
            layers.append(None)
            continue
        layer = decode_rle(rle, name)
        if tuple(layer.shape) != (height, width):
            raise ValueError(
                f"mask: the {name} layer was painted on a {layer.shape[1]}x{layer.shape[0]} image, but the image "
                f"is {width}x{height}. Clear the mask in the Point Editor (Mask mode -> Clear mask) and paint it "
                "again on this image.")
        layers.append(layer)
    return tuple(layers)


def combine_mask(width, height, base=None, paint=None, erase=None):
    """(base OR paint) AND NOT erase, as a MASK [1, H, W] float (1 = may change).

    ``base`` is an upstream MASK ([H, W] or [1, H, W], values in [0, 1], > 0.5 counts as set); it
    must have the image's size. Nothing is modified in place.
    """
    out = torch.zeros((height, width), dtype=torch.bool)
    if base is not None:
        if base.ndim == 3 and base.shape[0] != 1:
            raise ValueError(f"base_mask: the Point Editor edits one image, but this MASK holds a batch of "
                             f"{base.shape[0]}; pick one mask (e.g. with a mask-from-batch node).")
        b = base if base.ndim == 2 else base[0] if base.ndim == 3 else None
        if b is None or tuple(b.shape) != (height, width):
            raise ValueError(f"base_mask: its size {list(base.shape)[-2:][::-1]} (width, height) differs from the "
                             f"image's {[width, height]}; connect a mask made for this image.")
        out = out | (b.detach().cpu() > 0.5)
    if paint is not None:
        out = out | paint
    if erase is not None:
        out = out & ~erase
    return out.float()[None]


def _short(value, limit=60):
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
