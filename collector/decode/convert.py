"""Attribute values -> a concept's column values: the per-value converters (with their caches), the
metadata JSON lookups, and the clean-up of numbers no query can use. Called per span: keep them cheap."""
from __future__ import annotations

import functools
import json
import math
import re
from typing import Any, Mapping

from . import aliases as A
from .anyvalue import clean_text, typed


def converter(kind: str):
    """A fast per-value converter: the common case (already the right type) costs one type check."""
    exact = {A.INT: int, A.FLOAT: float, A.STR: str, A.BOOL: bool}.get(kind)
    if exact is None:
        return lambda v: typed(v, kind)
    return lambda v: v if type(v) is exact else typed(v, kind)


# Answers of the converters below for str values (a few distinct ones in practice); the column
# merge looks them up before calling the converter. Bounded: the values are client-controlled.
_KIND_CACHE: dict = {}
_FINISH_CACHE: dict = {}
CACHES = {"span_kind": _KIND_CACHE, "finish_reason": _FINISH_CACHE}
_CACHE_MAX = 1024


def _remembered(cache: dict):
    """A converter that keeps its answers in ``cache`` (and reads them from it): for str values, and
    for arrays under their tuple (``gen_ai.response.finish_reasons`` is an array of strings, a new
    list object on every span: converting each cost ~11 % of normalizing the benchmark's traffic)."""
    def wrap(convert):
        @functools.wraps(convert)
        def converter(raw):
            t = type(raw)
            key = raw if t is str else tuple(raw) if t is list else None
            if key is not None:
                try:
                    hit = cache.get(key)
                except TypeError:          # an array holding arrays or maps: not hashable
                    key = hit = None
                if hit is not None:
                    return hit
            out = convert(raw)
            if out is not None and key is not None and len(cache) < _CACHE_MAX:
                cache[key] = out
            return out
        return converter
    return wrap


@_remembered(_KIND_CACHE)
def span_kind(raw) -> str | None:
    v = typed(raw, A.STR)
    return A.SPAN_KIND_VALUES.get(v.strip().lower(), v.upper()) if v else None


@_remembered(_FINISH_CACHE)
def finish_text(raw) -> str | None:
    """Finish reasons (an array, a JSON array string or one string) as the stored comma-joined text;
    None for none, so the next alias key is tried."""
    reasons = typed(raw, A.STRS)
    return ",".join(reasons) if reasons else None


# The two below first ask one C-speed question of the whole column (filter(None, ...) drops the Nones,
# and the zeros, which change neither answer); np.array of a list holding None cost ~3 us a span.
def null_nonfinite(col: list | None) -> None:
    """NaN and +-inf in a float column -> None. A sum is NaN or infinite if any term is (or if finite
    terms overflow: then the loop finds nothing to change)."""
    if col is None or math.isfinite(sum(filter(None, col))):
        return
    for i, v in enumerate(col):
        if v is not None and not math.isfinite(v):
            col[i] = None


def null_negative(col: list | None) -> None:
    """Values below 0 in an integer column -> None."""
    if col is None or min(filter(None, col), default=0) >= 0:
        return
    for i, v in enumerate(col):
        if v is not None and v < 0:
            col[i] = None


def meta_lookup(meta: dict | None, concept: str, cohort_keys: Mapping[str, tuple[str, ...]],
                meta_keys: frozenset | None = None) -> Any:
    """A trace concept inside a ``metadata`` JSON object: by attribute key, nested path, or bare label.

    ``meta_keys`` (every top-level key any lookup could use) lets an object with none of them and
    no nested object be skipped at once, which is the common case.
    """
    if not meta:
        return None
    if meta_keys is not None and meta_keys.isdisjoint(meta) and not any(type(v) is dict for v in meta.values()):
        return None
    for key in cohort_keys.get(concept) or A.SPAN_ALIASES.get(concept, ()):
        if key in meta:
            return meta[key]
        node: Any = meta
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    if concept.startswith("cohort:") and concept[7:] in meta:
        return meta[concept[7:]]
    return None


_MODEL_KEY = re.compile(r'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')


@functools.lru_cache(maxsize=1024)      # an instrumentation sends the same few parameter strings
def param_model(text: str) -> str | None:
    """``model`` of a parameters JSON string (OpenInference, traceAI), without parsing the rest.

    These objects are flat (model, temperature, stream, ...), so the first ``"model": "..."`` is it;
    a string with escapes is decoded properly.
    """
    m = _MODEL_KEY.search(text)
    if m is None:
        return None
    raw = m.group(1)
    if "\\" not in raw:
        return raw
    try:
        return clean_text(json.loads(f'"{raw}"'))
    except ValueError:
        return None


def loads_obj(text) -> dict | None:
    """A JSON object from ``text``, or None for anything else (not text, not an object, not JSON)."""
    if not text or not isinstance(text, str) or text[:1] != "{":
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None
