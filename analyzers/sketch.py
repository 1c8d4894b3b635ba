"""A mergeable quantile sketch: counts in log-spaced buckets of a stated relative width (DDSketch's mapping).

Bucket ``k`` holds the values in (gamma^(k-1), gamma^k] with gamma = (1 + alpha) / (1 - alpha) = 1 + 2 alpha /
(1 - alpha). Every value in a bucket is within ``alpha`` (relative) of the bucket's representative
2 gamma^k / (gamma + 1), so any order statistic read off the counts is within ``alpha`` of the exact one, however
many sketches were merged: merging adds counts key by key, which is why one sidecar's minute, a whole window or a
fleet of sidecars (as Prometheus counters, one series per bucket) give the same answer. Only values > 0 are kept
(zero and negative values are counted apart in ``zeros``): the gate's quantile rules read durations > 0.

``quantile(q)`` interpolates between the two order statistics around rank q (n - 1), as DuckDB's
``quantile_cont`` does, so it is within ``alpha`` of ``quantile_cont`` on the same values (both ends are within
``alpha``, and so is their weighted mean). ``interval(q, level)`` is a distribution-free confidence interval for
the population quantile: the order-statistic ranks of the binomial interval, widened to the edges of the buckets
those ranks fall in, so it covers at least as often as the exact order-statistic interval.

>>> s = QuantileSketch(0.01)
>>> s.add_many([float(i) for i in range(1, 1001)])
>>> s.count
1000
>>> abs(s.quantile(0.99) / 990.01 - 1) <= 0.01      # quantile_cont of 1..1000 at 0.99 is 990.01
True
>>> a, b = QuantileSketch(0.01), QuantileSketch(0.01)
>>> a.add_many([float(i) for i in range(1, 501)]); b.add_many([float(i) for i in range(501, 1001)])
>>> a.merge(b).counts() == s.counts()              # merging adds counts: the same sketch as one pass
True
>>> lo, hi = s.interval(0.99, 0.95)
>>> lo < 990.01 < hi, round(lo), round(hi)      # ranks 983..997, widened to their buckets' edges
(True, 973, 1013)
>>> QuantileSketch.quantiles_many([s, a], [0.5, 0.99]) == [s.quantiles([0.5, 0.99]), a.quantiles([0.5, 0.99])]
True
>>> s.key(1.0), s.upper_edge(s.key(1.0)) >= 1.0 > s.lower_edge(s.key(1.0))
(0, True)
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Iterable, Mapping

import numpy as np

DEFAULT_ALPHA = 0.01     # 1 % relative error: a p99 ratio is then within x(1.0202)^±1 of the exact one


class QuantileSketch:
    """Counts per bucket key in one numpy array starting at key ``offset`` (grown as values arrive)."""
    __slots__ = ("alpha", "gamma", "_log_gamma", "offset", "bins", "zeros")

    def __init__(self, alpha: float = DEFAULT_ALPHA):
        if not 0 < alpha < 1:
            raise ValueError(f"sketch alpha must be in (0, 1) (the relative error, e.g. 0.01), got {alpha!r}")
        self.alpha = float(alpha)
        self.gamma = (1 + alpha) / (1 - alpha)
        self._log_gamma = math.log(self.gamma)
        self.offset = 0
        self.bins = np.zeros(0, dtype=np.int64)
        self.zeros = 0

    # ------------------------------------------------------------ the mapping
    def key(self, x: float) -> int:
        """The bucket of a value > 0: ceil(log_gamma(x))."""
        return int(math.ceil(math.log(x) / self._log_gamma))

    def keys(self, values: np.ndarray) -> np.ndarray:
        """key() of many values > 0 at once."""
        return np.ceil(np.log(values) / self._log_gamma).astype(np.int64)

    def lower_edge(self, key: int) -> float:
        return self.gamma ** (key - 1)

    def upper_edge(self, key: int) -> float:
        return self.gamma ** key

    def value(self, key: int) -> float:
        """The bucket's representative: within alpha of every value in the bucket."""
        return 2 * self.gamma ** key / (self.gamma + 1)

    # ------------------------------------------------------------ adding and merging
    def _reserve(self, lo: int, hi: int) -> None:
        """Grow the array to cover keys lo..hi."""
        if not self.bins.size:
            self.offset, self.bins = lo, np.zeros(hi - lo + 1, dtype=np.int64)
            return
        top = self.offset + self.bins.size - 1
        if lo >= self.offset and hi <= top:
            return
        new_lo, new_hi = min(lo, self.offset), max(hi, top)
        grown = np.zeros(new_hi - new_lo + 1, dtype=np.int64)
        grown[self.offset - new_lo:self.offset - new_lo + self.bins.size] = self.bins
        self.offset, self.bins = new_lo, grown

    def add(self, x: float, count: int = 1) -> None:
        if not x > 0:
            self.zeros += count
            return
        k = self.key(x)
        self._reserve(k, k)
        self.bins[k - self.offset] += count

    def add_many(self, values) -> None:
        values = np.asarray(values, dtype=np.float64)
        positive = values[values > 0]
        self.zeros += int(values.size - positive.size - np.isnan(values).sum())
        if positive.size:
            self.add_keys(self.keys(positive))

    def add_keys(self, keys: np.ndarray, counts: np.ndarray | None = None, sign: int = 1) -> None:
        """Add (or with sign=-1 take away) counts at bucket keys; keys may repeat."""
        if not len(keys):
            return
        lo, hi = int(keys.min()), int(keys.max())
        self._reserve(lo, hi)
        add = np.bincount(keys - lo, weights=counts, minlength=hi - lo + 1)
        self.bins[lo - self.offset:hi - self.offset + 1] += sign * add.astype(np.int64)

    def merge(self, other: "QuantileSketch", sign: int = 1) -> "QuantileSketch":
        """Add another sketch's counts to this one (sign=-1 takes them away); returns self."""
        if other.gamma != self.gamma:
            raise ValueError(f"cannot merge sketches of different relative error ({self.alpha} and {other.alpha})")
        if other.bins.size:
            self._reserve(other.offset, other.offset + other.bins.size - 1)
            start = other.offset - self.offset
            self.bins[start:start + other.bins.size] += sign * other.bins
        self.zeros += sign * other.zeros
        return self

    def copy(self) -> "QuantileSketch":
        out = QuantileSketch(self.alpha)
        out.offset, out.bins, out.zeros = self.offset, self.bins.copy(), self.zeros
        return out

    # ------------------------------------------------------------ reading
    @property
    def count(self) -> int:
        """Values > 0 in the sketch."""
        return int(self.bins.sum())

    def counts(self) -> dict[int, int]:
        """{key: count} of the non-empty buckets: what a fleet exports (one counter per bucket)."""
        nz = np.flatnonzero(self.bins)
        return {int(k) + self.offset: int(self.bins[k]) for k in nz}

    @classmethod
    def from_counts(cls, counts: Mapping[int, int] | Iterable[tuple[int, int]], alpha: float = DEFAULT_ALPHA
                    ) -> "QuantileSketch":
        out = cls(alpha)
        items = list(counts.items() if isinstance(counts, Mapping) else counts)
        if items:
            out.add_keys(np.array([k for k, _ in items], dtype=np.int64), np.array([c for _, c in items], dtype=float))
        return out

    def _at_ranks(self, ranks: np.ndarray) -> np.ndarray:
        """The bucket keys of the order statistics at 0-based ranks."""
        cum = np.cumsum(self.bins)
        return np.searchsorted(cum, ranks, side="right") + self.offset

    def quantiles(self, qs) -> list[float]:
        """quantile() at several probabilities in one pass over the counts; nan when empty."""
        cum = np.cumsum(self.bins)
        n = int(cum[-1]) if cum.size else 0
        if n == 0:
            return [math.nan] * len(qs)
        pos = np.clip(np.asarray(qs, dtype=np.float64), 0.0, 1.0) * (n - 1)
        lo = np.floor(pos)
        k = np.searchsorted(cum, np.concatenate([lo, np.minimum(lo + 1, n - 1)]), side="right") + self.offset
        v = (2 / (self.gamma + 1)) * np.power(self.gamma, k.astype(np.float64))
        v_lo, v_hi = v[:pos.size], v[pos.size:]
        return (v_lo + (pos - lo) * (v_hi - v_lo)).tolist()

    def quantile(self, q: float) -> float:
        """The q-quantile, within alpha (relative) of quantile_cont over the same values; nan when empty."""
        return self.quantiles([q])[0]

    def interval(self, q: float, level: float = 0.95) -> tuple[float, float]:
        """A confidence interval (at ``level``) for the population q-quantile: the binomial order-statistic
        ranks, widened to their buckets' edges; 0 or inf where the ranks fall outside the sample."""
        n = self.count
        if n == 0:
            return 0.0, math.inf
        z = NormalDist().inv_cdf(0.5 + level / 2)
        half = z * math.sqrt(n * q * (1 - q))
        lo_rank, hi_rank = math.floor(n * q - half), math.ceil(n * q + half)   # 1-based order statistics
        keys = self._at_ranks(np.array([max(lo_rank, 1), min(hi_rank, n)], dtype=float) - 1)
        lo = self.lower_edge(int(keys[0])) if lo_rank >= 1 else 0.0
        hi = self.upper_edge(int(keys[1])) if hi_rank <= n else math.inf
        return lo, hi

    @staticmethod
    def quantiles_many(sketches: list["QuantileSketch"], qs) -> list[list[float]]:
        """quantiles(qs) of many sketches of one relative error at once: one cumulative sum over all their
        counts and one search, instead of a few numpy calls per sketch (a refresh reads hundreds)."""
        if not sketches:
            return []
        gamma = sketches[0].gamma
        if any(s.gamma != gamma for s in sketches):
            raise ValueError("quantiles_many needs sketches of one relative error")
        sizes = np.array([s.bins.size for s in sketches], dtype=np.int64)
        ends = np.cumsum(sizes)
        starts = ends - sizes
        cum = np.cumsum(np.concatenate([s.bins for s in sketches]))
        before = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0)
        n = np.where(sizes > 0, cum[np.maximum(ends - 1, 0)], 0) - before
        qs = np.clip(np.asarray(qs, dtype=np.float64), 0.0, 1.0)
        pos = qs[None, :] * np.maximum(n - 1, 0)[:, None]               # (sketches, qs)
        lo = np.floor(pos)
        hi = np.minimum(lo + 1, np.maximum(n - 1, 0)[:, None])
        ranks = np.concatenate([lo, hi], axis=1) + before[:, None]
        idx = np.searchsorted(cum, ranks.ravel(), side="right").reshape(ranks.shape)
        offsets = np.array([s.offset for s in sketches], dtype=np.int64)
        keys = idx - starts[:, None] + offsets[:, None]
        v = (2 / (gamma + 1)) * np.power(gamma, keys.astype(np.float64))
        k = qs.size
        out = v[:, :k] + (pos - lo) * (v[:, k:] - v[:, :k])
        out[n == 0] = np.nan
        return out.tolist()

    def __repr__(self) -> str:
        return f"QuantileSketch(alpha={self.alpha}, count={self.count}, buckets={int(np.count_nonzero(self.bins))})"
