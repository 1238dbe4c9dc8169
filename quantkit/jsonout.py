"""JSON results that strict parsers read (``jq``, JavaScript, Go): Python's ``json`` writes a NaN or
infinite float as the bare words ``NaN`` / ``Infinity``, which are not JSON. A diverged loss or
score, or lm-eval's NaN standard error on a handful of samples, is written as ``null`` instead."""

from __future__ import annotations

import json
import math
from typing import Any


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = 2, **kwargs) -> str:
    """``json.dumps`` with every non-finite float as ``null``; refuses anything else JSON cannot hold."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False, **kwargs)
