"""IngestCounters: plain counters the stages bump and the Prometheus exporter reads at scrape time."""
from __future__ import annotations

import threading
from collections import Counter
from typing import Callable

OVERFLOW = "__overflow__"     # as analyzers/cohorts.py: the label value of everything past a cap


class IngestCounters:
    """Thread-safe counters by label; gauges are callbacks read when collected."""

    def __init__(self, max_models: int | None = None) -> None:
        """``max_models``: the ``model`` values unpriced_spans keeps (metrics.max_models); later models count
        under __overflow__. None: not capped."""
        self.max_models = max_models
        self._lock = threading.Lock()
        self.spans_received: Counter = Counter()      # receiver -> spans
        self.spans_rejected: Counter = Counter()      # reason -> spans
        self.logs_received: Counter = Counter()
        self.logs_rejected: Counter = Counter()
        self.spans_duplicate = 0
        self.records_quarantined: Counter = Counter() # stage (decode, insert) -> acknowledged records set aside
        self.unpriced_spans: Counter = Counter()      # model -> LLM spans with tokens but no price
        self.mixed_spans: Counter = Counter()         # gateway -> spans it wrote two calls onto (decode/litellm.py)
        self.store_commits = 0                        # group commits
        self.store_commit_seconds = 0.0               # from taking a group to durable (insert ∥ sync)
        self.store_insert_seconds = 0.0               # DuckDB insert + commit
        self.store_sync_seconds = 0.0                 # payload fdatasync
        self.requests_refused: Counter = Counter()    # reason (overloaded, too_large, invalid) -> requests
        self.store_write_errors: Counter = Counter()  # reason (disk_full, disk_quota) -> failed writes
        self.store_write_failing = 0                  # writers whose writes fail for want of space now
        self.gauges: dict[str, Callable[[], float]] = {}

    def add(self, counter: str, key: str | None = None, n: int = 1) -> None:
        with self._lock:
            if key is None:
                setattr(self, counter, getattr(self, counter) + n)
            else:
                getattr(self, counter)[key] += n

    def add_many(self, counter: str, counts: Counter) -> None:
        with self._lock:
            if counter == "unpriced_spans" and self.max_models is not None:
                counts = cap_keys(self.unpriced_spans, counts, self.max_models)
            getattr(self, counter).update(counts)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "spans_received": dict(self.spans_received), "spans_rejected": dict(self.spans_rejected),
                "logs_received": dict(self.logs_received), "logs_rejected": dict(self.logs_rejected),
                "spans_duplicate": self.spans_duplicate, "requests_refused": dict(self.requests_refused),
                "records_quarantined": dict(self.records_quarantined),
                "unpriced_spans": dict(self.unpriced_spans), "mixed_spans": dict(self.mixed_spans),
                "store_commits": self.store_commits, "store_commit_seconds": self.store_commit_seconds,
                "store_insert_seconds": self.store_insert_seconds, "store_sync_seconds": self.store_sync_seconds,
                "store_write_errors": dict(self.store_write_errors), "store_write_failing": self.store_write_failing,
            }


def sum_snapshots(a: dict, b: dict) -> dict:
    """Two ``IngestCounters.snapshot()`` results added up (the processes of ``serve`` each count their part)."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict):
            merged = dict(out.get(k) or {})
            for key, n in v.items():
                merged[key] = merged.get(key, 0) + n
            out[k] = merged
        else:
            out[k] = out.get(k, 0) + v
    return out


def cap_keys(kept, counts, limit: int) -> Counter:
    """``counts`` with the keys that are neither in ``kept`` nor among the first to fill it up to ``limit``
    keys summed under __overflow__ (model names are the clients': one series each would be unbounded)."""
    out: Counter = Counter()
    room = limit - sum(1 for k in kept if k != OVERFLOW)
    for key, n in counts.items():
        if key != OVERFLOW and key not in kept and key not in out:
            if room <= 0:
                out[OVERFLOW] += n
                continue
            room -= 1
        out[key] += n
    return out
