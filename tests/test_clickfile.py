"""Click files: parsing, every validation rule (one clear message each), Slicer markups, space conversions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from fastsam3d_cli.imaging.clickfile import (all_spaces, check_inside, lps_to_ijk, parse_click_data, read_click_file,
                                     safe_file_part, to_lps)
from fastsam3d_cli.errors import BadInputError, ExitCode
from infer_phantoms import RAS_STORED, make_image, rotation

LIVER = {"name": "liver", "label": 1, "points": [[1.0, 2.0, 3.0], [4, 5, 6]], "point_labels": [1, 0]}


def _parse(data):
    return parse_click_data(data, source="c.json")


def _error(data) -> str:
    with pytest.raises(BadInputError) as info:
        _parse(data)
    assert info.value.exit_code == ExitCode.BAD_INPUT
    assert "\n" not in info.value.one_line()
    return info.value.one_line()


def test_valid_file_round_trips(tmp_path):
    data = {"version": 1, "space": "RAS", "objects": [LIVER, {"name": "spleen", "label": 300, "points": [[0, 0, 0]],
                                                              "point_labels": [1]}]}
    path = tmp_path / "clicks.json"
    path.write_text(json.dumps(data))
    parsed = read_click_file(path)
    assert parsed.space == "ras" and parsed.format == "fastsam3d"
    assert [(o.name, o.label) for o in parsed.objects] == [("liver", 1), ("spleen", 300)]
    assert parsed.objects[0].points == ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    assert parsed.objects[0].includes == (True, False)
    assert _parse(parsed.to_dict()) == parsed.__class__(**{**parsed.__dict__, "source": "c.json"})


def test_name_defaults_from_label():
    parsed = _parse({"space": "ijk", "objects": [{"label": 7, "points": [[0, 0, 0]], "point_labels": [1]}]})
    assert parsed.objects[0].name == "label 7"


@pytest.mark.parametrize("data, expected", [
    ([1, 2], "must hold a JSON object, not a list"),
    ({"objects": [LIVER]}, 'has no "space" — add "space": "ijk"'),
    ({"space": "xyz", "objects": [LIVER]}, "unknown space 'xyz'"),
    ({"space": 3, "objects": [LIVER]}, "unknown space 3"),
    ({"space": "ras"}, "has no objects"),
    ({"space": "ras", "objects": []}, "has no objects"),
    ({"space": "ras", "version": 2, "objects": [LIVER]}, "has version 2"),
    ({"space": "ras", "objects": [{**LIVER, "points": [[1, 2], [3, 4, 5]]}]},
     "object 'liver': point 1 has 2 coordinates, expected 3"),
    ({"space": "ras", "objects": [{**LIVER, "points": [[1, 2, 3], [3, 4, 5, 6]]}]},
     "object 'liver': point 2 has 4 coordinates, expected 3"),
    ({"space": "ras", "objects": [{**LIVER, "points": [[1, 2, float("nan")], [3, 4, 5]]}]},
     "point 1 has a non-finite or non-numeric coordinate nan"),
    ({"space": "ras", "objects": [{**LIVER, "points": [[1, 2, float("inf")], [3, 4, 5]]}]},
     "point 1 has a non-finite or non-numeric coordinate inf"),
    ({"space": "ras", "objects": [{**LIVER, "points": [[1, "2", 3], [3, 4, 5]]}]}, "non-numeric coordinate '2'"),
    ({"space": "ras", "objects": [{**LIVER, "points": [7, [3, 4, 5]]}]}, "point 1 is a number, not a list"),
    ({"space": "ras", "objects": [{**LIVER, "points": []}]}, "object 'liver' has no points"),
    ({"space": "ras", "objects": [{**LIVER, "point_labels": [1]}]}, "has 2 points but 1 point_labels"),
    ({"space": "ras", "objects": [{**LIVER, "point_labels": [1, 0, 1]}]}, "has 2 points but 3 point_labels"),
    ({"space": "ras", "objects": [{**LIVER, "point_labels": [1, 2]}]},
     "the point label of point 2 (point_labels entry 2, counting from 1) is 2 — use 1 (include)"),
    ({"space": "ras", "objects": [{**LIVER, "point_labels": [1, True]}]},
     "the point label of point 2 (point_labels entry 2, counting from 1) is true"),
    ({"space": "ras", "objects": [{**LIVER, "point_labels": [0, 0]}]}, "has only exclude clicks"),
    ({"space": "ras", "objects": [{k: v for k, v in LIVER.items() if k != "point_labels"}]}, 'no "point_labels"'),
    ({"space": "ras", "objects": [{k: v for k, v in LIVER.items() if k != "label"}]}, "object 'liver' has no \"label\""),
    ({"space": "ras", "objects": [{**LIVER, "label": 0}]}, "has label 0 — use an integer from 1 to 65535"),
    ({"space": "ras", "objects": [{**LIVER, "label": 70000}]}, "has label 70000"),
    ({"space": "ras", "objects": [{**LIVER, "label": 1.5}]}, "has label 1.5"),
    ({"space": "ras", "objects": [LIVER, {**LIVER, "name": "spleen"}]},
     "objects 'liver' and 'spleen' both use label 1"),
    ({"space": "ras", "objects": [LIVER, {**LIVER, "label": 2}]}, "two objects are called 'liver'"),
    ({"space": "ras", "objects": ["liver"]}, "object 1 must be a JSON object"),
])
def test_invalid_click_data(data, expected):
    assert expected in _error(data)


def test_not_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"space": "ras", "objects": [}')
    with pytest.raises(BadInputError, match=r"is not valid JSON \(line 1, column 30"):
        read_click_file(bad)
    with pytest.raises(BadInputError, match="does not exist"):
        read_click_file(tmp_path / "missing.json")
    with pytest.raises(BadInputError, match="is a folder"):
        read_click_file(tmp_path)


def _markups(system="LPS", points=None, **extra):
    points = points if points is not None else [
        {"id": "1", "label": "F-1", "position": [10.0, 20.0, 30.0], "positionStatus": "defined"},
        {"id": "2", "label": "-F-2", "position": [11.0, 21.0, 31.0], "positionStatus": "defined"},
        {"id": "3", "label": "F-3", "description": "exclude", "position": [12.0, 22.0, 32.0]},
        {"id": "4", "label": "F-4", "position": [0.0, 0.0, 0.0], "positionStatus": "undefined"},
    ]
    return {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                       "Schema/markups-schema-v1.0.3.json#",
            "markups": [{"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm",
                         "controlPoints": points, **extra}]}


def test_slicer_markups_lps_and_ras(tmp_path):
    path = tmp_path / "liver.mrk.json"
    path.write_text(json.dumps(_markups("LPS")))
    lps = read_click_file(path)
    assert lps.format == "slicer-markups" and lps.space == "lps"
    (obj,) = lps.objects
    assert obj.name == "liver" and obj.label == 1
    assert obj.points == ((10.0, 20.0, 30.0), (11.0, 21.0, 31.0), (12.0, 22.0, 32.0))  # undefined point skipped
    assert obj.point_labels == (1, 0, 0)  # "-" label and "exclude" description are exclude clicks
    path.write_text(json.dumps(_markups("RAS")))
    ras = read_click_file(path)
    assert ras.space == "lps" and ras.objects[0].points[0] == (-10.0, -20.0, 30.0)  # converted RAS → LPS


def test_slicer_markups_several_lists_and_errors():
    two = _markups()
    two["markups"].append({**two["markups"][0], "name": "kidney"})
    parsed = parse_click_data(two, source="/x/clicks.mrk.json")
    assert [(o.name, o.label) for o in parsed.objects] == [("clicks-1", 1), ("kidney", 2)]
    with pytest.raises(BadInputError, match="markup 1 is a Line, not a point list"):
        parse_click_data({"markups": [{"type": "Line", "controlPoints": []}]}, "m.mrk.json")
    with pytest.raises(BadInputError, match="coordinateSystem 'IJK'"):
        parse_click_data(_markups("IJK"), "m.mrk.json")
    with pytest.raises(BadInputError, match="has no placed control points"):
        parse_click_data(_markups(points=[]), "m.mrk.json")
    with pytest.raises(BadInputError, match="has only exclude points"):
        parse_click_data(_markups(points=[{"label": "-a", "position": [1, 2, 3]}]), "m.mrk.json")
    with pytest.raises(BadInputError, match="point list .m.: point 1 has 2 coordinates"):
        parse_click_data(_markups(points=[{"label": "a", "position": [1, 2]}]), "m.mrk.json")
    with pytest.raises(BadInputError, match="has no markups"):
        parse_click_data({"markups": []}, "m.mrk.json")


@pytest.mark.parametrize("direction", [RAS_STORED, rotation((1, 2, 3), 25.0)])
def test_space_conversions_round_trip(direction):
    image = make_image(np.zeros((30, 20, 10), np.int16), spacing=(0.7, 1.3, 2.5), origin=(5.0, -7.0, 11.0),
                       direction=direction)
    ijk = np.array([[0, 0, 0], [29, 19, 9], [3.25, 7.5, 1.0]])
    lps = to_lps(ijk, "ijk", image)
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in ijk])
    np.testing.assert_allclose(lps, expected, atol=1e-9)
    np.testing.assert_allclose(lps_to_ijk(lps, image), ijk, atol=1e-9)
    ras = lps * [-1, -1, 1]
    np.testing.assert_allclose(to_lps(ras, "ras", image), lps)
    spaces = all_spaces(lps, image)
    assert spaces[2]["ijk"] == [3.25, 7.5, 1.0]
    np.testing.assert_allclose(spaces[1]["ras"], ras[1], atol=1e-4)
    np.testing.assert_allclose(spaces[1]["lps"], lps[1], atol=1e-4)


def test_click_outside_the_volume_names_object_click_and_voxel():
    image = make_image(np.zeros((30, 20, 10), np.int16), spacing=(2.0, 2.0, 2.0), direction=RAS_STORED)
    obj = _parse({"space": "ijk", "objects": [{"name": "liver", "label": 1, "points": [[5, 5, 5], [29.4, 5, 5],
                                                                                      [29.6, 5, 5]],
                                               "point_labels": [1, 1, 0]}]}).objects[0]
    with pytest.raises(BadInputError) as info:
        check_inside(obj, to_lps(obj.points, "ijk", image), image, "ijk")
    message = info.value.one_line()
    assert message.startswith("click 3 of object 'liver' (ijk [29.6, 5, 5]) is outside the volume: "
                              "voxel position (i, j, k) = (29.60, 5.00, 5.00), volume size 30×20×10 "
                              "(inside: -0.5 ≤ index < size - 0.5)")
    assert "not the reversed numpy-from-SimpleITK order" in message


def test_safe_file_part():
    assert safe_file_part("left kidney/2") == "left_kidney_2"
    assert safe_file_part("...") == "object"
