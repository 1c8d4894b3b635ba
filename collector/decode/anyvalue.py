"""OTLP AnyValue -> Python values (typed for one concept, or whole for JSON output)."""
from __future__ import annotations

import json
import math
from typing import Any

from . import wire
from .aliases import BOOL, FLOAT, INT, RAW, STR, STRS

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def to_python(av, depth: int = 0) -> Any:
    """Whole AnyValue -> JSON-able Python (bytes as hex, kvlists as dicts). Past ``wire.MAX_DEPTH``
    levels of arrays/kvlists, the marker text ``wire.TOO_DEEP``: the same value whether the protobuf
    library read the payload or ``wire`` did (for a payload it refuses)."""
    which = av.WhichOneof("value")
    if which is None:
        return None
    if which in ("array_value", "kvlist_value") and depth >= wire.MAX_DEPTH:
        return wire.TOO_DEEP
    if which == "array_value":
        return [to_python(v, depth + 1) for v in av.array_value.values]
    if which == "kvlist_value":
        return {kv.key: to_python(kv.value, depth + 1) for kv in av.kvlist_value.values}
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


def clean_text(s: str) -> str:
    """``s`` with lone surrogates (which ``json.loads`` makes of a lone ``\\ud800`` escape) replaced by
    U+FFFD: Arrow and DuckDB refuse such a string, and with it the whole batch."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


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
    # not AnyValue.FromString: the receiver did not read inside this value, and the protobuf library
    # refuses the whole of it for one bad string or a deep nesting (wire.py)
    return wire.any_value_json(raw)


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
    read = _READERS.get(kind)
    if read is None:
        raise ValueError(f"unknown concept type {kind!r}")
    return read(raw)


def _as_str(raw: Any) -> str | None:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, (list, dict)):
        return None
    return json.dumps(raw) if isinstance(raw, bool) else str(raw)


def _as_int(raw: Any) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        out = raw
    elif isinstance(raw, float):
        out = int(raw) if math.isfinite(raw) else None
    elif isinstance(raw, str):
        try:
            out = int(raw)                 # exact: a float holds 53 bits of a large count
        except ValueError:
            try:
                out = int(float(raw))
            except (ValueError, OverflowError):
                return None
    else:
        return None
    # a BIGINT column holds no more (pyarrow refuses the whole batch for one such value)
    return out if out is not None and INT64_MIN <= out <= INT64_MAX else None


def _as_float(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        out = float(raw)
    elif isinstance(raw, str):
        try:
            out = float(raw)
        except ValueError:
            return None
    else:
        return None
    return out if math.isfinite(out) else None


def _as_bool(raw: Any) -> bool | None:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        low = raw.strip().lower()
        return True if low in _TRUE else False if low in _FALSE else None
    if isinstance(raw, int):
        return raw != 0
    return None


def _as_strs(raw: Any) -> list[str] | None:
    if isinstance(raw, list):
        return [str(x) for x in raw]
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
                if isinstance(parsed, list):
                    return [clean_text(str(x)) for x in parsed]
            except ValueError:
                pass
        return [raw]
    return None


_READERS = {STR: _as_str, INT: _as_int, FLOAT: _as_float, BOOL: _as_bool, STRS: _as_strs, RAW: lambda raw: raw}
