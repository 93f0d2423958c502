"""Point parsing: the canonical JSON form, DragBench's flat list, and every error case."""

import json

import pytest
import torch

from conftest import pack_module


@pytest.fixture(scope="module")
def points_mod(comfy):
    return pack_module("dragnoise.points")


def test_canonical_form(points_mod):
    p = points_mod.parse_points('[{"handle": [10, 20], "target": [30.5, 40]}, {"handle": [1, 2], "target": [3, 4]}]', 64, 48)
    assert p.handles == [(10.0, 20.0), (1.0, 2.0)] and p.targets == [(30.5, 40.0), (3.0, 4.0)]
    assert (p.width, p.height) == (64, 48)
    assert json.loads(p.to_json()) == [{"handle": [10.0, 20.0], "target": [30.5, 40.0]},
                                       {"handle": [1.0, 2.0], "target": [3.0, 4.0]}]


def test_dragbench_flat_list(points_mod):
    p = points_mod.parse_points("[[10, 20], [30, 40], [5, 6], [7, 8]]", 64, 64)
    assert p.handles == [(10.0, 20.0), (5.0, 6.0)] and p.targets == [(30.0, 40.0), (7.0, 8.0)]


def test_handle_equal_to_target_is_allowed(points_mod):
    p = points_mod.parse_points('[{"handle": [10, 10], "target": [10, 10]}]', 64, 64)
    assert p.handles == p.targets


def test_feature_coords_are_rounded_half_size(points_mod):
    p = points_mod.parse_points('[{"handle": [11, 20], "target": [63, 0]}]', 64, 64)
    handles, targets = p.feature_coords(2)
    assert handles.tolist() == [[10, round(5.5)]] and targets.tolist() == [[0, round(31.5)]]


@pytest.mark.parametrize("text,message", [
    ("[{", "not valid JSON"),
    ("[[1, 2], [3, 4], [5, 6]]", "odd number of points (3)"),
    ("[]", "no handle/target pairs"),
    ('[{"handle": [1, 2]}]', 'needs both "handle" and "target"'),
    ('[{"handle": [1, 2], "target": [3]}]', "pair 1 target must be [x, y]"),
    ('[{"handle": [64, 2], "target": [3, 4]}]', "pair 1 handle (64, 2) lies outside the 64x48 image"),
    ('[{"handle": [1, 2], "target": [3, 4]}, {"handle": [1, 2], "target": [3, -1]}]', "pair 2 target (3, -1) lies outside"),
    ('[{"handle": [1, 2], "target": [3, 48]}]', "y in [0, 47]"),
    ('"hello"', "expected a list"),
    ('[{"handle": [1, 2], "target": [3, 4]}, [1, 2]]', "mixes pair objects"),
])
def test_errors_name_the_input(points_mod, text, message):
    with pytest.raises(ValueError) as err:
        points_mod.parse_points(text, 64, 48)
    assert str(err.value).startswith("points: ")
    assert message in str(err.value)


def test_point_editor_node_uses_image_size(node):
    image = torch.rand(1, 48, 64, 3)
    points, mask = node("DragNoisePointEditor", image=image, points='[{"handle": [63, 47], "target": [0, 0]}]')
    assert (points.width, points.height) == (64, 48)
    assert torch.equal(points.image, image[0])
    assert mask.shape == (1, 48, 64) and not mask.any()  # nothing painted
    with pytest.raises(ValueError, match="^points: pair 1 handle"):
        node("DragNoisePointEditor", image=torch.rand(1, 32, 32, 3), points='[{"handle": [63, 47], "target": [0, 0]}]')
