"""OTLP AnyValue -> Python values (typed for one concept, or whole for JSON output)."""
from __future__ import annotations

import json
import math
from typing import Any

from .aliases import BOOL, FLOAT, INT, RAW, STR, STRS

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def to_python(av) -> Any:
    """Whole AnyValue -> JSON-able Python (bytes as hex, kvlists as dicts)."""
    which = av.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [to_python(v) for v in av.array_value.values]
    if which == "kvlist_value":
        return {kv.key: to_python(kv.value) for kv in av.kvlist_value.values}
    if which == "bytes_value":
        return av.bytes_value.hex()
    if which == "double_value":
        d = av.double_value
        return d if math.isfinite(d) else str(d)
    return getattr(av, which)


def attributes_to_dict(attrs) -> dict[str, Any]:
    return {kv.key: to_python(kv.value) for kv in attrs}


def attributes_to_json(attrs) -> str:
    return json.dumps(attributes_to_dict(attrs), ensure_ascii=False, separators=(",", ":"))


def typed(av, kind: str) -> Any:
    """AnyValue -> the concept's type, or None when it cannot be read as that type."""
    which = av.WhichOneof("value")
    if which is None:
        return None
    v = getattr(av, which)
    if kind == STR:
        if which == "string_value":
            return v
        if which == "array_value":
            return None
        return str(to_python(av))
    if kind == INT:
        if which == "int_value":
            return v
        if which == "double_value":
            return int(v) if math.isfinite(v) else None
        if which == "string_value":
            try:
                return int(float(v))
            except ValueError:
                return None
        return None
    if kind == FLOAT:
        if which in ("double_value", "int_value"):
            return float(v)
        if which == "string_value":
            try:
                return float(v)
            except ValueError:
                return None
        return None
    if kind == BOOL:
        if which == "bool_value":
            return v
        if which == "string_value":
            low = v.strip().lower()
            return True if low in _TRUE else False if low in _FALSE else None
        if which == "int_value":
            return v != 0
        return None
    if kind == STRS:
        if which == "array_value":
            return [str(to_python(x)) for x in v.values]
        if which == "string_value":
            text = v.strip()
            if text.startswith("["):
                try:
                    parsed = json.loads(text)
                    if isinstance(parsed, list):
                        return [str(x) for x in parsed]
                except ValueError:
                    pass
            return [v]
        return None
    if kind == RAW:
        return to_python(av)
    raise ValueError(f"unknown concept type {kind!r}")
