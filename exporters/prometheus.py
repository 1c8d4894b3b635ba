"""A prometheus_client Collector over IngestCounters (and, later, the analysis snapshot).

Values are read at scrape time from plain counters: a scrape never touches DuckDB.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from shadowlens.collector.counters import IngestCounters, cap_keys, sum_snapshots

from .catalog import SELF_METRICS

_SPECS = {m.name: m for m in SELF_METRICS}


def _counter(name: str, values) -> CounterMetricFamily:
    spec = _SPECS[name]
    fam = CounterMetricFamily(name, spec.help, labels=spec.labels)
    if spec.labels:
        for key, v in sorted(values.items()):
            fam.add_metric([key], v)
    else:
        fam.add_metric([], values)
    return fam


class IngestCollector(Collector):
    def __init__(self, stats: IngestCounters, store_bytes: Callable[[], float], child_counters: dict | None = None,
                 max_models: int | None = None, derived: Callable[[], dict] | None = None):
        """``derived``: the store writer's derived-write counters (``DerivedQueue.snapshot``); None: not shown."""
        self.stats = stats
        self.derived = derived
        self.store_bytes = store_bytes
        self.child_counters = child_counters if child_counters is not None else {}
        self.max_models = max_models
        # The processes cap their unpriced models each, so their sum may hold twice as many: the models
        # shown are the first max_models seen here, for good (counters never forget, so neither does this).
        self._unpriced_shown: dict[str, None] = {}
        self._lock = threading.Lock()         # scrapes may run at once

    def _unpriced(self, counts: dict) -> dict:
        if self.max_models is None:
            return counts
        with self._lock:
            capped = cap_keys(self._unpriced_shown, counts, self.max_models)
            self._unpriced_shown.update(dict.fromkeys(k for k in capped if k not in self._unpriced_shown))
        return dict(capped)

    def collect(self) -> Iterable:
        s = sum_snapshots(self.stats.snapshot(), dict(self.child_counters))
        yield _counter("shadowlens_spans_received", s["spans_received"])
        yield _counter("shadowlens_spans_rejected", s["spans_rejected"])
        yield _counter("shadowlens_spans_duplicate", s["spans_duplicate"])
        yield _counter("shadowlens_log_records_received", s["logs_received"])
        yield _counter("shadowlens_log_records_rejected", s["logs_rejected"])
        yield _counter("shadowlens_requests_refused", s["requests_refused"])
        yield _counter("shadowlens_records_quarantined",
                       {"decode": 0, "insert": 0, "read": 0, **s.get("records_quarantined", {})})
        yield _counter("shadowlens_unpriced_spans", self._unpriced(s["unpriced_spans"]))
        yield _counter("shadowlens_mixed_spans", {"litellm": 0, **s.get("mixed_spans", {})})
        for name in ("store_commits", "store_commit_seconds", "store_insert_seconds", "store_sync_seconds"):
            yield _counter(f"shadowlens_{name}", s[name])
        if self.derived is not None:
            yield from _derived_families(self.derived())
        # both reasons from the start, so that increase() sees the first error
        yield _counter("shadowlens_store_write_errors", {"disk_full": 0, "disk_quota": 0, **s["store_write_errors"]})
        w = GaugeMetricFamily("shadowlens_store_writable", _SPECS["shadowlens_store_writable"].help)
        w.add_metric([], 0.0 if s["store_write_failing"] else 1.0)
        yield w
        q = GaugeMetricFamily("shadowlens_ingest_queue_spans", _SPECS["shadowlens_ingest_queue_spans"].help)
        q.add_metric([], self.stats.gauges.get("ingest_queue_spans", lambda: 0.0)())
        yield q
        b = GaugeMetricFamily("shadowlens_store_bytes", _SPECS["shadowlens_store_bytes"].help)
        b.add_metric([], self.store_bytes())
        yield b
        name = "shadowlens_store_compaction_pending_bytes"
        p = GaugeMetricFamily(name, _SPECS[name].help)
        p.add_metric([], self.stats.gauges.get("store_compaction_pending_bytes", lambda: 0.0)())
        yield p
        for name in ("store_compacted_input_bytes", "store_compacted_output_bytes"):
            yield _counter(f"shadowlens_{name}", self.stats.gauges.get(name, lambda: 0.0)())


# The writes shadowlens itself queues, shown from the start so that increase() sees the first of each.
DERIVED_WRITES = ("traces", "retention", "reprice", "quarantine")


def _derived_families(snap: dict) -> Iterable:
    name = "shadowlens_store_derived_writes"
    writes = CounterMetricFamily(name, _SPECS[name].help, labels=_SPECS[name].labels)
    names = sorted(set(DERIVED_WRITES) | set(snap["done"]) | set(snap["failed"]))
    for write in names:
        writes.add_metric([write, "done"], snap["done"].get(write, 0))
        writes.add_metric([write, "failed"], snap["failed"].get(write, 0))
    yield writes
    name = "shadowlens_store_derived_write_seconds"
    seconds = CounterMetricFamily(name, _SPECS[name].help, labels=_SPECS[name].labels)
    for write in names:
        seconds.add_metric([write], snap["seconds"].get(write, 0.0))
    yield seconds


class StoreBudgetCollector(Collector):
    """The disk budget and what it deleted, from ``Retention.snapshot`` (kept by the retention thread: a
    scrape never queries DuckDB)."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self) -> Iterable:
        s = self.snapshot()
        for name, value in (("shadowlens_store_max_bytes", s["max_bytes"]),
                            ("shadowlens_store_used_bytes", s["used_bytes"]),
                            ("shadowlens_store_retention_seconds", s["retention_s"])):
            g = GaugeMetricFamily(name, _SPECS[name].help)
            g.add_metric([], float(value))
            yield g
        if s["oldest_s"] is not None:
            name = "shadowlens_store_oldest_age_seconds"
            g = GaugeMetricFamily(name, _SPECS[name].help)
            g.add_metric([], max(0.0, s["now_s"] - s["oldest_s"]))
            yield g
        budget = s["budget"]
        yield _counter("shadowlens_store_budget_deleted_spans", budget.spans)
        yield _counter("shadowlens_store_budget_deleted_segments", budget.segments)
        yield _counter("shadowlens_store_budget_deleted_bytes", budget.bytes)
