"""``Scene.render`` for a batch of scenes at once, in torch on any device.

The numpy renderer draws one scene at a time on one CPU core (about 5 ms each), which would
bound a training run on a GPU. This draws the same pixels (``scenes.Scene.render``) for a whole
batch in one set of tensor operations on the training device (``toy/train.py`` uses it off the
CPU; its speed on a GPU is not measured yet). The scenes themselves (their random layout) are
still drawn by ``scenes.random_scene`` from a seeded numpy generator. On a CPU it is slower than
the numpy renderer (it evaluates every pixel for every object, in float64), so training there
keeps that one.
"""

import numpy as np
import torch

from toy.scenes import KINDS


def render(scenes, device=None):
    """[B, S, S, 3] float32 images in [0, 1] of ``scenes`` (all of one size S), on ``device``.

    Same pixels as ``[s.render() for s in scenes]`` except, rarely, one on an object's very edge
    (the geometry is computed in float64, the numpy renderer's disc test in float32).
    """
    device = torch.device(device or "cpu")
    size = scenes[0].size
    if any(s.size != size for s in scenes):
        raise ValueError("scenes: all must have the same size")
    f64 = dict(dtype=torch.float64, device=device)
    y, x = torch.meshgrid(torch.arange(size, **f64), torch.arange(size, **f64), indexing="ij")

    a = torch.tensor([s.background[0] for s in scenes], **f64)[:, None, None, :]
    b = torch.tensor([s.background[1] for s in scenes], **f64)[:, None, None, :]
    angle = torch.tensor([s.background[2] for s in scenes], **f64)[:, None, None]
    yn, xn = y / max(1, size - 1), x / max(1, size - 1)
    ramp = (torch.cos(angle) * (xn - 0.5) + torch.sin(angle) * (yn - 0.5) + 0.5).clamp(0, 1)[..., None]
    image = (1 - ramp) * a + ramp * b

    px, py = x + 0.5, y + 0.5
    for slot in range(max(len(s.objects) for s in scenes)):
        # One batched draw per depth slot: scenes with fewer objects leave this slot empty.
        objs = [s.objects[slot] if slot < len(s.objects) else None for s in scenes]
        present = torch.tensor([o is not None for o in objs], device=device)
        objs = [o or scenes[0].objects[0] for o in objs]

        def param(get):
            return torch.tensor([get(o) for o in objs], **f64)[:, None, None]

        cx, cy, r = param(lambda o: o.center[0]), param(lambda o: o.center[1]), param(lambda o: o.radius)
        kind = torch.tensor([KINDS.index(o.kind) for o in objs], device=device)[:, None, None]
        dx, dy = px - cx, py - cy
        c, s = torch.cos(param(lambda o: o.angle)), torch.sin(param(lambda o: o.angle))
        u, v = c * dx + s * dy, -s * dx + c * dy
        disc = dx ** 2 + dy ** 2 <= r ** 2
        half = r * 0.85
        square = (u.abs() <= half) & (v.abs() <= half)
        theta = torch.atan2(v, u)
        edge = torch.ones_like(theta)
        for k in (2, 3):  # a blob's lobes; other kinds have none
            amp = param(lambda o: dict((n, a_) for n, a_, _ in o.lobes).get(k, 0.0))
            phase = param(lambda o: dict((n, p) for n, _, p in o.lobes).get(k, 0.0))
            edge = edge + amp * torch.cos(k * theta + phase)
        blob = torch.hypot(u, v) <= r * edge
        covers = torch.where(kind == 0, disc, torch.where(kind == 1, square, blob)) & present[:, None, None]

        light, shading = param(lambda o: o.light), param(lambda o: o.shading)
        hx, hy = cx + 0.45 * r * torch.cos(light), cy + 0.45 * r * torch.sin(light)
        darkening = (torch.hypot(px - hx, py - hy) / (1.45 * r)).clamp(0, 1) * shading
        colour = torch.tensor(np.array([o.colour for o in objs]), **f64)[:, None, None, :]
        image = torch.where(covers[..., None], (1 - darkening)[..., None] * colour, image)
    return image.float()
