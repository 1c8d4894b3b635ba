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
    codes = np.concatenate([c for c, _ in chunks])
    uniq, inv = np.unique(codes, return_inverse=True)
    counts = np.bincount(inv, weights=np.concatenate([n for _, n in chunks]), minlength=uniq.size)
    return [(uniq, counts.astype(np.int32))]


def compact_rows(chunks: list, width: int) -> list:
    """Chunks of (slots, rows) summed per slot into one chunk, slots ascending."""
    if len(chunks) <= 1:
        return chunks
    slots = np.concatenate([s for s, _ in chunks])
    rows = np.concatenate([r for _, r in chunks])
    uniq, inv = np.unique(slots, return_inverse=True)
    out = np.empty((uniq.size, width))
    for j in range(width):
        out[:, j] = np.bincount(inv, weights=rows[:, j], minlength=uniq.size)
    return [(uniq, out)]
