"""Mergeable sums kept per time bucket, as numpy chunks: what ``GateState`` and the window's folded rows
(analyzers/window_buckets.py) keep instead of rows.

A chunk is ``(slots, rows)``: one row of sums per slot (a route and cohort value, a combination of cohort
values), or ``(codes, counts)``: counts per (slot, sketch key) packed into one int64 (``pack``), 12 bytes a
count where a (slot, key, count) triple would take 24. Adding is appending a chunk; ``compact_rows`` and
``compact_counts`` sum a bucket's chunks per slot or code into one when it is read.

>>> slots, keys = unpack(pack(np.array([3, 3]), np.array([-5, 7])))
>>> slots.tolist(), keys.tolist()
([3, 3], [-5, 7])
>>> [(s.tolist(), r.tolist()) for s, r in compact_rows([(np.array([2, 1]), np.ones((2, 1))),
...                                                    (np.array([2]), np.ones((1, 1)))], 1)]
[([1, 2], [[1.0], [2.0]])]
"""
from __future__ import annotations

import numpy as np
import polars as pl

_KEY_BIAS = 1 << 31


def pack(slots: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(slot, key) as one int64; keys within +-2^31 (a sketch key at alpha 1 % is within +-36,000)."""
    return (slots.astype(np.int64) << 32) | (keys.astype(np.int64) + _KEY_BIAS)


def unpack(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return codes >> 32, (codes & 0xFFFFFFFF) - _KEY_BIAS


def compact_counts(chunks: list) -> list:
    """Chunks of (codes, counts) summed per code into one chunk, codes ascending."""
    if len(chunks) <= 1:
        return chunks
    summed = _sum_by(np.concatenate([c for c, _ in chunks]), np.concatenate([n for _, n in chunks])[:, None])
    return [(summed[0], summed[1][:, 0].astype(np.int32))]


def compact_rows(chunks: list, width: int) -> list:
    """Chunks of (slots, rows) summed per slot into one chunk, slots ascending."""
    if len(chunks) <= 1:
        return chunks
    slots, rows = _sum_by(np.concatenate([s for s, _ in chunks]), np.concatenate([r for _, r in chunks]))
    return [(slots, rows.reshape(-1, width))]


def _sum_by(keys: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows summed per key, keys ascending (polars' grouping: numpy's unique took ~8 ms for 60,000 keys)."""
    cols = [f"c{j}" for j in range(rows.shape[1])]
    frame = pl.DataFrame({"k": keys, **{c: rows[:, j].astype(np.float64) for j, c in enumerate(cols)}})
    out = frame.group_by("k").agg(pl.col(cols).sum()).sort("k")
    return out["k"].to_numpy(), out.select(cols).to_numpy()
