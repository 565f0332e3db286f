"""Click validation messages (issue 15 items 8 and 17): honest numbers, wording, leniency where JSON writers
differ, unknown keys, legacy Slicer files, and the Predictor API refusing what the CLI refuses."""
from __future__ import annotations

import numpy as np
import pytest

from fastsam3d_cli.errors import BadInputError, ExitCode, UsageError
from fastsam3d_cli.imaging.clickfile import check_inside, parse_click_data, read_click_file, to_lps
from fastsam3d_cli.interactive.predictor import Predictor
from infer_phantoms import IDENTITY, SphereModel, make_image

LIVER = {"name": "liver", "label": 1, "points": [[1.0, 2.0, 3.0]], "point_labels": [1]}


def _error(data) -> str:
    with pytest.raises(BadInputError) as info:
        parse_click_data(data, source="c.json")
    assert info.value.exit_code == ExitCode.BAD_INPUT and "\n" not in info.value.one_line()
    return info.value.one_line()


def _outside_message(point) -> str:
    image = make_image(np.zeros((30, 20, 10), np.int16), spacing=(1.0, 1.0, 1.0), direction=IDENTITY)
    obj = parse_click_data({"space": "ijk", "objects": [{**LIVER, "points": [point]}]}).objects[0]
    with pytest.raises(BadInputError) as info:
        check_inside(obj, to_lps(obj.points, "ijk", image), image, "ijk")
    return info.value.one_line()


# ---------------------------------------------------------------------------------------- item 17
@pytest.mark.parametrize("point, shown", [([-0.51, 5, 5], "(-0.51, 5.00, 5.00)"),
                                          ([-0.501, 5, 5], "(-0.51, 5.00, 5.00)"),
                                          ([29.5, 5, 5], "(29.50, 5.00, 5.00)"),
                                          ([5, 19.5001, 5], "(5.00, 19.51, 5.00)")])
def test_outside_position_never_looks_inside(point, shown):
    message = _outside_message(point)
    assert f"voxel position (i, j, k) = {shown}" in message
    assert "inside: -0.5 ≤ index < size - 0.5" in message


def test_huge_coordinates_are_short_in_messages():
    message = _outside_message([1e308, 5, 5])
    assert "1e+308" in message and len(message) < 400
    big_int = 10 ** 400  # JSON allows it; float() of it overflows
    assert "a 401-digit number" in _error({"space": "ijk", "objects": [{**LIVER, "points": [[big_int, 1, 2]]}]})
    assert "a 401-digit number" in _error({"space": "ijk", "objects": [{**LIVER, "label": big_int}]})
    assert "a 401-digit number" in _error({"space": "ijk", "version": big_int, "objects": [LIVER]})
    for message in (_error({"space": "x" * 5000, "objects": [LIVER]}),
                    _error({"space": "ijk", "objects": [{**LIVER, "label": -big_int}]})):
        assert len(message) < 300


def test_point_labels_message_counts_like_points():
    message = _error({"space": "ijk", "objects": [{**LIVER, "points": [[1, 2, 3], [4, 5, 6]], "point_labels": [1, 5]}]})
    assert "the point label of point 2 (point_labels entry 2, counting from 1) is 5" in message
    assert "point_labels[" not in message


def test_integral_floats_are_accepted_like_version_1_0():
    parsed = parse_click_data({"version": 1.0, "space": "ijk", "objects": [
        {**LIVER, "label": 2.0, "points": [[1, 2, 3], [4, 5, 6]], "point_labels": [1.0, 0.0]}]})
    obj = parsed.objects[0]
    assert obj.point_labels == (1, 0) and obj.label == 2 and isinstance(obj.label, int)
    assert "is 0.5" in _error({"space": "ijk", "objects": [{**LIVER, "point_labels": [0.5]}]})
    assert "has label 1.5" in _error({"space": "ijk", "objects": [{**LIVER, "label": 1.5}]})


def test_unknown_keys_warn_and_known_ones_do_not():
    parsed = parse_click_data({"verison": 1, "space": "ijk", "objects": [{**LIVER, "colour": "red"}]}, source="c.json")
    assert len(parsed.warnings) == 2
    assert "unknown key 'verison' is ignored (known keys: version, space, objects)" in parsed.warnings[0]
    assert "object 'liver': unknown key 'colour' is ignored" in parsed.warnings[1]
    assert parse_click_data({"version": 1, "space": "ijk", "objects": [LIVER]}).warnings == ()


@pytest.mark.parametrize("name, text", [
    ("points.fcsv", "# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n"
                    "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
                    "vtkMRMLMarkupsFiducialNode_0,1,2,3,0,0,0,1,1,1,0,F-1,,\n"),
    ("points.json", "# Markups fiducial file version = 4.6\n# CoordinateSystem = 0\n"),
])
def test_legacy_slicer_fcsv_is_refused_with_the_fix(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(BadInputError) as info:
        read_click_file(path)
    message = info.value.one_line()
    assert "legacy 3D Slicer .fcsv file" in message and "save the point list as Markups JSON (.mrk.json)" in message
    assert "not valid JSON" not in message
    assert path.read_text() == text


# ---------------------------------------------------------------------------------------- item 8
@pytest.fixture()
def predictor() -> Predictor:
    image = make_image(np.full((24, 24, 16), 50, np.int16), spacing=(1.5, 1.5, 1.5), direction=IDENTITY)
    session = Predictor(SphereModel(radius=4.0), "cpu", max_crops=1)
    session.set_volume(image)
    return session


def test_first_click_of_an_object_cannot_be_an_exclude(predictor):
    with pytest.raises(BadInputError, match="object 'liver' would have only exclude clicks"):
        predictor.add_click([10, 10, 8], include=False, space="ijk", object="liver")
    with pytest.raises(BadInputError, match="only exclude clicks"):
        predictor.add_clicks([[10, 10, 8], [11, 10, 8]], [0, 0], space="ijk", object="liver")
    assert predictor.objects == []  # nothing was half-added
    predictor.add_click([10, 10, 8], space="ijk", object="liver")
    mask = predictor.add_click([11, 10, 8], include=False, space="ijk", object="liver")  # later excludes are fine
    assert mask.shape == (24, 24, 16)
    predictor.reset_object("liver")
    with pytest.raises(BadInputError, match="only exclude clicks"):
        predictor.add_click([10, 10, 8], include=False, space="ijk", object="liver")


@pytest.mark.parametrize("point", [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0], [[1.0, 2.0, 3.0]], 5.0])
def test_add_click_point_shape_is_a_clear_usage_error(predictor, point):
    with pytest.raises(UsageError, match=r"a click is 3 numbers \[x, y, z\]"):
        predictor.add_click(point, space="ijk", object="liver")


def test_add_clicks_shape_and_label_errors(predictor):
    with pytest.raises(UsageError, match=r"shape \(N, 3\).*not \(2, 2\)"):
        predictor.add_clicks([[1, 2], [3, 4]], [1, 1], space="ijk", object="liver")
    with pytest.raises(UsageError, match="clicks must be numbers"):
        predictor.add_clicks([[1, 2, "x"]], [1], space="ijk", object="liver")
    with pytest.raises(UsageError, match="point label 0.5 is invalid"):
        predictor.add_clicks([[10, 10, 8]], [0.5], space="ijk", object="liver")
    predictor.add_clicks([[10, 10, 8]], [1.0], space="ijk", object="liver")  # an integral float is fine


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_clicks_are_invalid_not_outside(predictor, bad):
    with pytest.raises(BadInputError) as info:
        predictor.add_click([10.0, bad, 8.0], space="ijk", object="liver")
    message = info.value.one_line()
    assert "click 1 of object 'liver'" in message and "non-finite coordinate" in message
    assert "outside the volume" not in message
