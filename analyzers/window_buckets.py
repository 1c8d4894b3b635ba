"""The window's older trace rows as sums per time bucket: what ``WindowState`` keeps of the rows no revision can
reach any more.

``WindowState`` (analyzers/window_state.py) keeps a row as itself while a late span may still revise its trace
(the assembler remembers the last ``RECENT_COMPLETED`` traces it wrote, and a revision replaces the earlier row,
which takes the row). Older rows are folded here, per bucket of ``bucket_s`` of their completed_at and per
combination code (route and cohort values):

* sums: rows, and per measure the values known and their sum (steps, cost, refused, escalated);
* the durations as sketch counts (analyzers/sketch.py's keys: relative error ``alpha``), values <= 0 as one key
  that reads as 0;
* per eval name: results and failures.

A bucket leaves the window when all of it is older than the window's edge: folded rows count up to
``bucket_s`` longer than the SQL's exact edge. What a refresh needs, the totals over the buckets, is summed
again only after a bucket came, changed or left.

>>> import polars as pl
>>> rows = pl.DataFrame({"combo": [0, 0, 1], "duration_seconds": [1.0, 0.0, None], "steps": [2, None, 4],
...                      "cost_usd": [0.5, 0.25, None], "refused": [True, False, None],
...                      "escalated": [False, False, True], "completed_us": [10_000_000, 11_000_000, 25_000_000]})
>>> folded = FoldedRows(bucket_s=10)
>>> folded.fold(rows, pl.DataFrame({"combo": [0], "name": [3], "failed": [True], "n": [2],
...                                 "completed_us": [10_000_000]}))
>>> t = folded.totals()
>>> t.combos.tolist(), t.sums[:, SUMS.index("n")].tolist(), t.sums[:, SUMS.index("steps_sum")].tolist()
([0, 1], [2.0, 1.0], [2.0, 4.0])
>>> folded.leaves_at(), folded.rows()     # the first bucket ends at 20 s; it leaves when the edge passes that
(20000000, 3)
>>> folded.expire(20_000_000); folded.rows()
1
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from .buckets import compact_counts, compact_rows, pack, unpack
from .sketch import DEFAULT_ALPHA, QuantileSketch

# what a folded (bucket, combination) keeps; the means are sum / known
MEASURES = ("steps", "cost_usd", "refused", "escalated")
SUMS = ("n", *(f"{m}_{what}" for m in MEASURES for what in ("known", "sum")))
EVAL_SUMS = ("n", "failed")
# the sketch key of durations <= 0 (read as 0): below any key of a double > 0
ZERO_KEY = -(1 << 30)
# quantiles_by_group's dense table at most this many cells (8 bytes each, a few copies while it is read): ~300
# groups (routes x cohorts.max_series 100) over the ~1,150 keys of 1 us..3 h fit; more take the sorted path
_DENSE_CELLS = 1_000_000


def sum_exprs() -> list[pl.Expr]:
    """The SUMS of a group of rows, as polars aggregations (floats: they are added to folded sums)."""
    return [pl.len().cast(pl.Float64).alias("n"),
            *[e for m in MEASURES for e in (pl.col(m).count().cast(pl.Float64).alias(f"{m}_known"),
                                            pl.col(m).cast(pl.Float64).sum().alias(f"{m}_sum"))]]


@dataclass
class _Bucket:
    sums: list = field(default_factory=list)      # (combination codes, rows of SUMS)
    durations: list = field(default_factory=list)     # (pack(combination, sketch key), counts)
    evals: list = field(default_factory=list)     # (pack(combination, eval name code), rows of EVAL_SUMS)
    last_us: int = 0                              # the newest completed_at folded into it

    def compact(self) -> None:
        self.sums = compact_rows(self.sums, len(SUMS))
        self.durations = compact_counts(self.durations)
        self.evals = compact_rows(self.evals, len(EVAL_SUMS))

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for part in (self.sums, self.durations, self.evals) for a, b in part)


@dataclass(frozen=True)
class Totals:
    """The sums over the window's buckets."""
    combos: np.ndarray          # combination codes
    sums: np.ndarray            # (combos, SUMS)
    durations: np.ndarray       # pack(combination, sketch key)
    counts: np.ndarray
    evals: np.ndarray           # pack(combination, eval name code)
    eval_sums: np.ndarray       # (evals, EVAL_SUMS)


class FoldedRows:
    def __init__(self, bucket_s: float, alpha: float = DEFAULT_ALPHA):
        self.bucket_us = max(1, int(bucket_s * 1e6))
        self.sketch = QuantileSketch(alpha)      # its key mapping, and gamma for reading keys back
        self._buckets: dict[int, _Bucket] = {}
        self._totals: Totals | None = None
        # the durations' counts over the buckets, kept running (integers: taking a bucket away is exact); summed
        # again from every bucket they took most of a refresh after a fold (~100 keys per combination and bucket)
        self._durations: list = []

    def __bool__(self) -> bool:
        return bool(self._buckets)

    def fold(self, rows: pl.DataFrame, evals: pl.DataFrame) -> None:
        """Rows (combo, duration_seconds, the MEASURES, completed_us) and their evals (combo, name, failed, n,
        completed_us), all codes already given."""
        if not rows.height:
            return
        bucket = (pl.col("completed_us") // self.bucket_us).alias("_b")
        sums = rows.group_by(bucket, "combo").agg(*sum_exprs(), pl.col("completed_us").max().alias("_last"))
        d = rows["duration_seconds"].cast(pl.Float64)
        known = d.is_not_null().to_numpy()
        keys = self.keys(d.to_numpy()[known])
        durations = pl.DataFrame({
            "_b": rows["completed_us"].to_numpy()[known] // self.bucket_us,
            "code": pack(rows["combo"].to_numpy()[known], keys)}).group_by("_b", "code").agg(pl.len().alias("c"))
        if evals.height:
            evals = evals.group_by(bucket, "combo", "name").agg(
                pl.col("n").sum().cast(pl.Float64).alias("n"),
                pl.col("n").filter(pl.col("failed")).sum().cast(pl.Float64).alias("failed"))
        for (b,), part in sums.partition_by("_b", as_dict=True).items():
            bk = self._buckets.setdefault(int(b), _Bucket())
            bk.sums.append((part["combo"].to_numpy().astype(np.int64), part.select(SUMS).to_numpy()))
            bk.last_us = max(bk.last_us, int(part["_last"].max()))
        for (b,), part in durations.partition_by("_b", as_dict=True).items():
            chunk = (part["code"].to_numpy(), part["c"].to_numpy().astype(np.int32))
            self._buckets[int(b)].durations.append(chunk)
            self._durations.append(chunk)
        if evals.height:
            for (b,), part in evals.partition_by("_b", as_dict=True).items():
                self._buckets[int(b)].evals.append((pack(part["combo"].to_numpy(), part["name"].to_numpy()),
                                                    part.select(EVAL_SUMS).to_numpy()))
        self._totals = None

    def keys(self, durations: np.ndarray) -> np.ndarray:
        """The sketch keys of known durations: ZERO_KEY for those <= 0."""
        keys = np.full(durations.size, ZERO_KEY, np.int64)
        positive = durations > 0
        keys[positive] = self.sketch.keys(durations[positive])
        return keys

    def expire(self, cutoff_us: int) -> None:
        """Buckets that end at or before the window's edge leave."""
        gone = [b for b in self._buckets if (b + 1) * self.bucket_us <= cutoff_us]
        for b in gone:
            self._durations.extend((codes, -counts) for codes, counts in self._buckets.pop(b).durations)
        if gone:
            self._totals = None

    def totals(self) -> Totals:
        if self._totals is None:
            for bk in self._buckets.values():
                bk.compact()
            sums = compact_rows([c for bk in self._buckets.values() for c in bk.sums], len(SUMS))
            self._durations = [(c[n != 0], n[n != 0]) for c, n in compact_counts(self._durations)]
            durations = self._durations
            evals = compact_rows([c for bk in self._buckets.values() for c in bk.evals], len(EVAL_SUMS))
            i64 = np.zeros(0, np.int64)
            self._totals = Totals(*(sums[0] if sums else (i64, np.zeros((0, len(SUMS))))),
                                  *(durations[0] if durations else (i64, np.zeros(0, np.int32))),
                                  *(evals[0] if evals else (i64, np.zeros((0, len(EVAL_SUMS))))))
        return self._totals

    def rows(self) -> int:
        return int(self.totals().sums[:, 0].sum())

    def rows_from(self, start_us: int) -> int:
        """Rows folded into the buckets that start at or after ``start_us``."""
        return int(sum(r[:, 0].sum() for b, bk in self._buckets.items() if b * self.bucket_us >= start_us
                       for _, r in bk.sums))

    def newest_us(self) -> int | None:
        return max((bk.last_us for bk in self._buckets.values()), default=None)

    def leaves_at(self) -> int | None:
        """When the oldest bucket leaves: as the window's edge passes its end."""
        return (min(self._buckets) + 1) * self.bucket_us if self._buckets else None

    def names(self) -> np.ndarray:
        return unpack(self.totals().evals)[1]

    def recode(self, new: np.ndarray, names: np.ndarray | None = None) -> None:
        """Combination codes (and eval name codes) renumbered: ``new[old]``."""
        def combos(codes: np.ndarray) -> np.ndarray:
            hi, lo = unpack(codes)
            return pack(new[hi] if new is not None else hi, lo)

        def named(codes: np.ndarray) -> np.ndarray:
            hi, lo = unpack(codes)
            return pack(new[hi] if new is not None else hi, names[lo] if names is not None else lo)

        self.totals()       # the running durations summed: no chunk of a combination that has left remains
        for bk in self._buckets.values():
            bk.compact()
            if new is not None:
                bk.sums = [(new[s].astype(np.int64), r) for s, r in bk.sums]
                bk.durations = [(combos(c), n) for c, n in bk.durations]
            bk.evals = [(named(c), r) for c, r in bk.evals]
            bk.compact()
        if new is not None:
            self._durations = [(combos(c), n) for c, n in self._durations]
        self._totals = None

    def nbytes(self) -> int:
        return sum(bk.nbytes() for bk in self._buckets.values())


def quantiles_by_group(groups: np.ndarray, keys: np.ndarray, counts: np.ndarray, n_groups: int, qs,
                       gamma: float) -> np.ndarray:
    """(n_groups, len(qs)) quantiles of sketch counts given per (group, key): interpolated between the order
    statistics around rank q (n - 1) as ``QuantileSketch.quantiles`` does, ZERO_KEY read as 0; nan for a group
    without counts.

    The counts go into one dense (group, key) table: a refresh's ~50,000 rows and ~100 groups over a few hundred
    keys are a bincount, where sorting them took most of a refresh."""
    qs = np.asarray(qs, dtype=np.float64)
    out = np.full((n_groups, qs.size), math.nan)
    if not keys.size:
        return out
    zero = keys == ZERO_KEY
    lo = int(keys[~zero].min()) if not zero.all() else 0
    width = (int(keys[~zero].max()) if not zero.all() else 0) - lo + 2      # column 0: the values <= 0
    if n_groups * width > _DENSE_CELLS:      # far-apart keys: sorted (group, key) pairs instead
        uniq, inv = np.unique(pack(groups, np.where(zero, lo - 1, keys)), return_inverse=True)
        weights = np.bincount(inv, weights=counts, minlength=uniq.size)
        g, k = unpack(uniq)
        cum = np.cumsum(weights)
        ids = np.arange(n_groups)
        starts, ends = np.searchsorted(g, ids, "left"), np.searchsorted(g, ids, "right")
        before = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0)
        n = np.where(ends > starts, cum[np.maximum(ends - 1, 0)], 0) - before
        column = lambda at: k[at] - lo + 1
    else:
        slot = np.where(zero, 0, keys - lo + 1)
        table = np.bincount(groups * width + slot, weights=counts, minlength=n_groups * width)
        cum = np.cumsum(table.reshape(n_groups, width), axis=1)
        n = cum[:, -1]
        # one search over all groups: each group's running counts shifted past the previous group's
        total = float(n.sum()) + 1
        before = np.arange(n_groups) * total
        cum = (cum + before[:, None]).ravel()
        column = lambda at: at % width
    has = np.flatnonzero(n > 0)
    pos = qs[None, :] * (n[has] - 1)[:, None]
    rank_lo = np.floor(pos)
    rank_hi = np.minimum(rank_lo + 1, (n[has] - 1)[:, None])
    at = np.searchsorted(cum, np.concatenate([rank_lo, rank_hi], axis=1) + before[has, None], side="right")
    col = column(at)
    v = np.where(col == 0, 0.0, (2 / (gamma + 1)) * np.power(gamma, (col - 1 + lo).astype(np.float64)))
    m = qs.size
    out[has] = v[:, :m] + (pos - rank_lo) * (v[:, m:] - v[:, :m])
    return out
