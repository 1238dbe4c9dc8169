import json
import math

import pytest

from quantkit import jsonout


def test_non_finite_floats_become_null_at_any_depth_and_the_rest_is_unchanged():
    data = {"loss": [0.5, math.nan, 1e308 * 10, -math.inf], "nested": {"ppl": (math.nan, 2)}, "ok": 1.25, "s": "NaN"}
    text = jsonout.dumps(data)
    assert "NaN" not in text.replace('"NaN"', "") and "Infinity" not in text
    assert json.loads(text) == {"loss": [0.5, None, None, None], "nested": {"ppl": [None, 2]}, "ok": 1.25, "s": "NaN"}
    assert jsonout.dumps({"a": 1.0}, indent=None) == json.dumps({"a": 1.0})


def test_what_json_cannot_hold_is_still_refused():
    with pytest.raises(TypeError):
        jsonout.dumps({"a": object()})
