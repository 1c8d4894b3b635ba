"""Cardinality safety for cohort labels: each label keeps at most ``cohorts.max_values`` values.

The first values seen win; later new values become ``__overflow__`` and are counted per label in
``shadowlens_cohort_overflow_total``. Values unseen for ``forget_after_s`` (two windows) free their
place, so a cohort that disappears stops occupying a series.

Every other label whose values come from clients is capped by a limiter of its own, the same way:
``model`` (``metrics.max_models``), ``eval`` (``metrics.max_evals``) and ``series``, whose values are
whole cohort combinations (``cohorts.max_series``: per-label caps alone still allow 51^3 combinations).
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Callable

OVERFLOW = "__overflow__"


class CohortLimiter:
    def __init__(self, labels, max_values: int, forget_after_s: float, now: Callable[[], float] = time.time):
        self.labels = tuple(labels)
        self.max_values = max_values
        self.forget_after_s = forget_after_s
        self.now = now
        self._seen: dict[str, dict[str, float]] = {label: {} for label in self.labels}
        self.overflow = Counter()
        self._lock = threading.Lock()

    def map(self, label: str, values: list[str], count: bool = True) -> list[str]:
        """Values of one label -> the values to use as metric labels (``__overflow__`` beyond the cap).

        ``count`` adds the overflowed values to ``overflow`` (one per trace on the streaming path;
        the window refresh maps distinct values and does not count them again).
        """
        now = self.now()
        seen = self._seen[label]
        # decided once per distinct value, in order of first appearance: the same answers as value by
        # value, since a repeat neither frees nor takes a place
        as_label = {}
        overflowed = 0
        with self._lock:
            for v, n in Counter(values).items():
                if v in seen or len(seen) < self.max_values:
                    seen[v] = now
                    as_label[v] = v
                else:
                    overflowed += n
                    as_label[v] = OVERFLOW
            if overflowed and count:
                self.overflow[label] += overflowed
        return [as_label[v] for v in values]

    def add_overflow(self, label: str, n: int) -> None:
        """Counts ``n`` overflowed occurrences where one value stands for several (an eval row's results)."""
        if n:
            with self._lock:
                self.overflow[label] += n

    def allowed(self, label: str) -> list[str]:
        with self._lock:
            return list(self._seen[label])

    def forget_stale(self) -> list[tuple[str, str]]:
        """Drop values unseen for ``forget_after_s``; returns the (label, value) pairs dropped."""
        cutoff = self.now() - self.forget_after_s
        dropped = []
        with self._lock:
            for label, seen in self._seen.items():
                for v, t in list(seen.items()):
                    if t < cutoff:
                        del seen[v]
                        dropped.append((label, v))
        return dropped
