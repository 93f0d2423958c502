"""Synthetic scenes: a few objects (discs, squares, blobs), flat-coloured or shaded, on varied
backgrounds, with every object's position known, so a drag can be scored against the truth.

Pure numpy and Pillow; no ComfyUI. Images are float32 [H, W, 3] in [0, 1].
"""

import dataclasses
from dataclasses import dataclass, field

import numpy as np

KINDS = ("disc", "square", "blob")


@dataclass
class SceneObject:
    """One object. ``center`` (x, y) and ``radius`` in pixels; ``colour`` RGB in [0, 1];
    ``angle`` rotates squares and blobs; ``lobes`` shapes a blob's outline. ``shading`` (0-1)
    darkens the object away from a highlight offset from its centre toward ``light`` (an angle):
    a shaded object's interior differs from point to point, so a feature patch inside it has
    something to match (a flat interior matches itself everywhere)."""
    kind: str
    center: tuple
    radius: float
    colour: tuple
    angle: float = 0.0
    lobes: tuple = ()
    shading: float = 0.0
    light: float = 0.0

    def mask(self, size, center=None):
        """[size, size] bool: the pixels the object covers (at ``center`` if given)."""
        cx, cy = self.center if center is None else center
        out = np.zeros((size, size), bool)
        # Only the object's bounding box is evaluated (training renders thousands of scenes); no
        # shape reaches past 1.5 radii (a blob's lobes add at most 0.36, a square's corner 0.21).
        reach = 1.5 * self.radius + 1
        (x0, x1), (y0, y1) = ((int(np.clip(np.floor(c - reach), 0, size)), int(np.clip(np.ceil(c + reach), 0, size)))
                              for c in (cx, cy))
        if x0 < x1 and y0 < y1:
            out[y0:y1, x0:x1] = self._covers(*np.mgrid[y0:y1, x0:x1].astype(np.float32), cx, cy)
        return out

    def _covers(self, y, x, cx, cy):
        """Whether the object at (cx, cy) covers the pixels whose top-left corners are (y, x)."""
        x, y = x + 0.5, y + 0.5
        dx, dy = x - cx, y - cy
        c, s = np.cos(self.angle), np.sin(self.angle)
        u, v = c * dx + s * dy, -s * dx + c * dy
        if self.kind == "disc":
            return dx ** 2 + dy ** 2 <= self.radius ** 2
        if self.kind == "square":
            half = self.radius * 0.85  # about the area of a disc of the same radius
            return (np.abs(u) <= half) & (np.abs(v) <= half)
        theta = np.arctan2(v, u)
        edge = self.radius * (1 + sum(a * np.cos(k * theta + p) for k, a, p in self.lobes))
        return np.hypot(u, v) <= edge

    def moved(self, dx, dy):
        return dataclasses.replace(self, center=(self.center[0] + dx, self.center[1] + dy))

    def colours(self, size):
        """[size, size, 3] float32: the object's colour at every pixel (shading included)."""
        return self._colours_at(*np.mgrid[0:size, 0:size].astype(np.float32))

    def _colours_at(self, y, x):
        """[..., 3] the object's colour at the pixels whose top-left corners are (y, x)."""
        x, y = x + 0.5, y + 0.5
        hx = self.center[0] + 0.45 * self.radius * np.cos(self.light)
        hy = self.center[1] + 0.45 * self.radius * np.sin(self.light)
        darkening = np.clip(np.hypot(x - hx, y - hy) / (1.45 * self.radius), 0, 1) * self.shading
        return (1 - darkening)[..., None] * np.asarray(self.colour, np.float32)

    def colour_range(self):
        """(lightest, darkest) RGB the object takes: a flat object's are equal."""
        return np.asarray(self.colour, np.float32), np.asarray(self.colour, np.float32) * (1 - self.shading)


@dataclass
class Scene:
    """A background and objects, drawn back to front."""
    size: int
    background: tuple  # (colour_a, colour_b, angle): a linear gradient from a to b along angle
    objects: list = field(default_factory=list)

    def render(self):
        """[size, size, 3] float32 image in [0, 1]."""
        a, b, angle = self.background
        y, x = np.mgrid[0:self.size, 0:self.size].astype(np.float32) / max(1, self.size - 1)
        ramp = np.clip((np.cos(angle) * (x - 0.5) + np.sin(angle) * (y - 0.5)) + 0.5, 0, 1)[..., None]
        image = (1 - ramp) * np.asarray(a, np.float32) + ramp * np.asarray(b, np.float32)
        for obj in self.objects:
            mask = obj.mask(self.size)
            image[mask] = obj._colours_at(*np.nonzero(mask)) if obj.shading else obj.colour
        return image.astype(np.float32)

    def with_object_moved(self, index, dx, dy):
        """The ideal result of dragging object ``index`` by (dx, dy): drawn last, on top."""
        others = [o for i, o in enumerate(self.objects) if i != index]
        return Scene(self.size, self.background, others + [self.objects[index].moved(dx, dy)])


def _colour(rng, avoid=(), min_distance=0.45):
    """A saturated colour at least ``min_distance`` (RGB Euclidean) from every colour in ``avoid``."""
    for _ in range(200):
        hue, sat, val = rng.uniform(0, 1), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)
        colour = tuple(float(c) for c in _hsv_to_rgb(hue, sat, val))
        if all(np.linalg.norm(np.subtract(colour, other)) >= min_distance for other in avoid):
            return colour
    return colour


def _hsv_to_rgb(h, s, v):
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def random_scene(rng, size=256, n_objects=None, kinds=KINDS, shaded=False, palette=None, radii=None):
    """A random scene: a muted gradient background and 1-3 non-overlapping objects, each from an
    eighth to a fifth of the image across, whose colours stand out from the background and from
    each other; with ``shaded``, every object is shaded by one light (0.3-0.5 darker at its far side).
    With ``palette`` (RGB colours), each object takes a different one of those colours instead;
    with ``radii`` too (pixels, one per palette colour), each colour always has that radius.

    Args:
        rng: ``numpy.random.Generator``.
    """
    grey = rng.uniform(0.15, 0.85)
    tint = rng.normal(0, 0.08, size=3)
    a = np.clip(grey + tint, 0, 1)
    b = np.clip(a + rng.normal(0, 0.12, size=3), 0, 1)
    background = (tuple(map(float, a)), tuple(map(float, b)), float(rng.uniform(0, 2 * np.pi)))
    n_objects = n_objects or int(rng.integers(1, 4))
    objects = []
    for _ in range(200):
        if len(objects) == n_objects:
            break
        radius = float(rng.uniform(0.12, 0.2) * size)
        if radii is not None:  # the colour is drawn below; a slot's radius is fixed
            free = [i for i, c in enumerate(palette) if tuple(c) not in [o.colour for o in objects]]
            slot = free[int(rng.integers(len(free)))]
            radius = float(radii[slot])
        margin = radius + 0.04 * size
        center = (float(rng.uniform(margin, size - margin)), float(rng.uniform(margin, size - margin)))
        if any(np.hypot(center[0] - o.center[0], center[1] - o.center[1]) < radius + o.radius + 0.05 * size
               for o in objects):
            continue
        kind = str(rng.choice(list(kinds)))
        lobes = tuple((k, float(rng.uniform(0.05, 0.18)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3))
        if radii is not None:
            colour = tuple(float(v) for v in palette[slot])
        elif palette:
            free = [c for c in palette if tuple(c) not in [o.colour for o in objects]]
            colour = tuple(float(v) for v in free[int(rng.integers(len(free)))])
        else:
            colour = _colour(rng, avoid=[a, b] + [o.colour for o in objects])
        objects.append(SceneObject(kind, center, radius, colour, float(rng.uniform(0, np.pi / 2)),
                                   lobes if kind == "blob" else ()))
    if shaded:  # drawn after the objects, so unshaded scenes stay what they were for a seed
        light = float(rng.uniform(0, 2 * np.pi))
        objects = [dataclasses.replace(o, shading=float(rng.uniform(0.3, 0.5)), light=light) for o in objects]
    return Scene(size, background, objects)


def moved_pair(rng, size=256, max_shift=1 / 3, shaded=False):
    """A random scene, the index of one of its objects, and the scene with that object moved by up
    to ``max_shift`` of the image along each axis (kept inside the image)."""
    scene = random_scene(rng, size, shaded=shaded)
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    target = np.clip(np.add(obj.center, rng.uniform(-size * max_shift, size * max_shift, size=2)),
                     obj.radius, size - obj.radius)
    return scene, index, scene.with_object_moved(index, *(target - np.asarray(obj.center)))


def pair_drag(scene, index, moved):
    """(dx, dy) pixels from object ``index`` in ``scene`` to where ``moved`` (from ``moved_pair``)
    has it (drawn last)."""
    return tuple(float(v) for v in np.subtract(moved.objects[-1].center, scene.objects[index].center))


def moved_part_way(scene, index, moved, share):
    """``scene`` with object ``index`` moved ``share`` (0-1) of the way to where ``moved`` (from
    ``moved_pair``) has it: the intermediate positions of a drag."""
    return scene.with_object_moved(index, *(np.multiply(pair_drag(scene, index, moved), share)))
