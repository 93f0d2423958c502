"""Handle/target point pairs (``DRAG_POINTS``) and their text forms.

Points are (x, y) in the pixels of the image they were placed on. The canonical text form, used
by the widget, saved workflows and API users, is JSON:
``[{"handle": [x, y], "target": [x, y]}, ...]``; DragBench's flat alternating list
``[[hx, hy], [tx, ty], ...]`` is accepted too.
"""

import json
from dataclasses import dataclass, field

import torch

NO_PAIRS = ("points: no handle/target pairs. In the Point Editor, click a handle (red) and then its target "
            "(blue) on the image.")


@dataclass
class DragPoints:
    """Handle/target pairs in image pixels, with the size of the image they refer to.

    Attributes:
        handles, targets: lists of (x, y) floats, one per pair.
        width, height: the image size in pixels.
        image: [H, W, 3] float image in [0, 1] the points were placed on (for previews), or None.
    """
    handles: list
    targets: list
    width: int
    height: int
    image: torch.Tensor = field(default=None, repr=False)

    def to_json(self):
        return json.dumps([{"handle": list(h), "target": list(t)} for h, t in zip(self.handles, self.targets)])

    def feature_coords(self, scale):
        """([N, 2], [N, 2]) handle and target (row, col) on a grid ``scale`` times smaller than the image."""
        def rc(points):
            return torch.tensor([[round(y / scale), round(x / scale)] for x, y in points], dtype=torch.long)
        return rc(self.handles), rc(self.targets)


def _xy(value, where):
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"points: {where} must be [x, y] numbers, got {json.dumps(value)}.")
    return float(value[0]), float(value[1])


def parse_points(text, width, height, image=None, allow_empty=False):
    """Parses the points text for an image of ``width`` x ``height`` pixels.

    Raises ValueError naming ``points`` for malformed JSON, an odd-length flat list, no pairs
    (unless ``allow_empty``: the Point Editor passes no pairs on, so its first run can show the
    image on the canvas), or a point outside the image. A handle equal to its target is allowed
    (that pair is done).
    """
    try:
        data = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as e:
        raise ValueError(f"points: not valid JSON ({e.msg} at character {e.pos}). Expected "
                         '[{"handle": [x, y], "target": [x, y]}, ...].') from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError('points: expected a list of {"handle": [x, y], "target": [x, y]} pairs.')
    if not data:
        if allow_empty:
            return DragPoints([], [], int(width), int(height), image)
        raise ValueError(NO_PAIRS)
    handles, targets = [], []
    if all(isinstance(p, dict) for p in data):
        for i, pair in enumerate(data, 1):
            if "handle" not in pair or "target" not in pair:
                raise ValueError(f'points: pair {i} needs both "handle" and "target", got {json.dumps(pair)}.')
            handles.append(_xy(pair["handle"], f"pair {i} handle"))
            targets.append(_xy(pair["target"], f"pair {i} target"))
    elif all(isinstance(p, (list, tuple)) for p in data):
        if len(data) % 2:
            raise ValueError(f"points: the flat list has an odd number of points ({len(data)}); it must "
                             "alternate handle, target, handle, target, ...")
        for i in range(0, len(data), 2):
            handles.append(_xy(data[i], f"pair {i // 2 + 1} handle"))
            targets.append(_xy(data[i + 1], f"pair {i // 2 + 1} target"))
    else:
        raise ValueError('points: mixes pair objects and plain [x, y] lists; use one form: '
                         '[{"handle": [x, y], "target": [x, y]}, ...] or [[hx, hy], [tx, ty], ...].')
    for i, (h, t) in enumerate(zip(handles, targets), 1):
        for name, (x, y) in (("handle", h), ("target", t)):
            if not (0 <= x <= width - 1 and 0 <= y <= height - 1):
                raise ValueError(
                    f"points: pair {i} {name} ({x:g}, {y:g}) lies outside the {width}x{height} image; "
                    f"x must be in [0, {width - 1}] and y in [0, {height - 1}] (image pixels).")
    return DragPoints(handles, targets, int(width), int(height), image)
