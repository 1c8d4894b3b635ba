"""The scanners' fixed span record as Arrow columns: ids as 64-bit integers, the dedup keys, enums, times."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

# One span's fixed columns as the scanners write them (little-endian, 64 bytes; see _wirescan.c).
SPAN_RECORD = np.dtype([("trace_id", "u1", 16), ("span_id", "u1", 8), ("parent_span_id", "u1", 8),
                        ("start", "<u8"), ("end", "<u8"), ("rs_idx", "<i4"), ("ss_idx", "<i4"), ("sp_idx", "<i4"),
                        ("kind", "u1"), ("status_code", "u1"), ("_pad", "V2")])

_KINDS = ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
_STATUS = ("UNSET", "OK", "ERROR")
KINDS_ARROW = pa.array(_KINDS + (None,), pa.string())     # the last entry: any value OTLP does not define
STATUS_ARROW = pa.array(_STATUS + (None,), pa.string())


def id_columns(rec: np.ndarray) -> tuple[dict[str, pa.Array], np.ndarray]:
    """The ids' storage columns (schema.ID_COLUMNS: big-endian 64-bit integers; no parent -> null)
    and the spans' dedup keys (``span_keys``)."""
    trace = np.ascontiguousarray(rec["trace_id"]).view(">u8").astype(np.uint64)
    span = np.ascontiguousarray(rec["span_id"]).view(">u8")[:, 0].astype(np.uint64)
    parent = np.ascontiguousarray(rec["parent_span_id"]).view(">u8")[:, 0].astype(np.uint64)
    present = parent != 0
    columns = {"trace_id_hi": pa.array(trace[:, 0]), "trace_id_lo": pa.array(trace[:, 1]), "span_id_int": pa.array(span),
               "parent_span_id_int": pa.array(parent, mask=None if present.all() else ~present)}
    return columns, span_keys(trace[:, 0], trace[:, 1], span)


_MIX1, _MIX2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_SALT = np.uint64(0x9E3779B97F4A7C15)
_S33 = np.uint64(33)


def _fmix64(k: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: a bijection in which every input bit flips about half the
    output bits (numpy's uint64 arithmetic wraps, as the hash wants)."""
    k = k ^ (k >> _S33)
    k *= _MIX1
    k ^= k >> _S33
    k *= _MIX2
    k ^= k >> _S33
    return k


def span_keys(trace_hi: np.ndarray, trace_lo: np.ndarray, span: np.ndarray) -> np.ndarray:
    """64-bit keys of span identities, for the store's memory of recent spans: a pre-filter only.

    Equal identities give equal keys; distinct ones almost always differ, whatever the ids' shape.
    Not a fold like span ^ hi ^ lo, which real id schemes defeat: Zipkin/B3 roots (hi = 0,
    span = lo), sequential ids (trace ...01 with span ...01), or one counter XORed into both ids
    all fold to one value. A key match is confirmed on the whole 24-byte identity before a span
    is dropped (store.writer). The writer computes the same from stored columns after a restart.
    """
    h = _fmix64(np.asarray(trace_hi, dtype=np.uint64) + _SALT)
    h = _fmix64(h ^ np.asarray(trace_lo, dtype=np.uint64))
    return _fmix64(h ^ np.asarray(span, dtype=np.uint64))


def enum_array(names: pa.Array, codes: np.ndarray) -> pa.Array:
    """Enum codes -> their names; a code past the known ones -> null (the last entry of ``names``)."""
    return names.take(np.minimum(codes, len(names) - 1))


def int64(values: np.ndarray) -> pa.Array:
    return pa.array(np.ascontiguousarray(values).view(np.int64))


def int32(values: np.ndarray) -> pa.Array:
    return pa.array(np.ascontiguousarray(values))


class HexList:
    """``ids[i]`` as hex text on demand, from an (n, width) uint8 array."""
    __slots__ = ("ids",)

    def __init__(self, ids: np.ndarray):
        self.ids = ids

    def __getitem__(self, i: int) -> str:
        return self.ids[i].tobytes().hex()
