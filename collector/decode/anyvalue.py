"""OTLP AnyValue -> Python values (typed for one concept, or whole for JSON output)."""
from __future__ import annotations

import json
import math
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue

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


_SCALARS = ("string_value", "bool_value", "int_value", "double_value")


def raw_value(av) -> Any:
    """AnyValue -> the scanners' raw form: a scalar, a list for an array of scalars, or the
    serialized AnyValue for other composites."""
    which = av.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        items = []
        for v in av.array_value.values:
            w = v.WhichOneof("value")
            if w is None:
                items.append(None)
            elif w in _SCALARS:
                items.append(getattr(v, w))
            else:
                return av.SerializeToString()
        return items
    if which in ("kvlist_value", "bytes_value"):
        return av.SerializeToString()
    return getattr(av, which)


def _composite(raw: bytes) -> Any:
    return to_python(AnyValue.FromString(raw))


def typed(raw: Any, kind: str) -> Any:
    """A raw attribute value -> the concept's type, or None when it cannot be read as that type."""
    if raw is None:
        return None
    if isinstance(raw, list) and kind != STRS:
        return None
    if isinstance(raw, bytes):
        raw = _composite(raw)
        if raw is None:
            return None
    if kind == STR:
        if isinstance(raw, str):
            return raw
        if isinstance(raw, (list, dict)):
            return None
        return json.dumps(raw) if isinstance(raw, bool) else str(raw)
    if kind == INT:
        if isinstance(raw, bool):
            return None
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float):
            return int(raw) if math.isfinite(raw) else None
        if isinstance(raw, str):
            try:
                return int(float(raw))
            except (ValueError, OverflowError):
                return None
        return None
    if kind == FLOAT:
        if isinstance(raw, bool):
            return None
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                return None
        return None
    if kind == BOOL:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            low = raw.strip().lower()
            return True if low in _TRUE else False if low in _FALSE else None
        if isinstance(raw, int):
            return raw != 0
        return None
    if kind == STRS:
        if isinstance(raw, list):
            return [str(x) for x in raw]
        if isinstance(raw, str):
            text = raw.strip()
            if text.startswith("["):
                try:
                    parsed = json.loads(text)
                    if isinstance(parsed, list):
                        return [str(x) for x in parsed]
                except ValueError:
                    pass
            return [raw]
        return None
    if kind == RAW:
        return raw
    raise ValueError(f"unknown concept type {kind!r}")
