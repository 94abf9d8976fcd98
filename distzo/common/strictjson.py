"""Strict JSON: every machine-readable output (zoctl --json, the run log) goes through here."""

from __future__ import annotations

import math
from typing import Any


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float as None: what strict JSON parsers accept.

    Dict keys become strings, lists and tuples lists; anything that is not a JSON type is given as
    its ``str``.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
