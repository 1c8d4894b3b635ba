#!/usr/bin/env python3
"""Fleet benchmark: the duration sketch on /metrics at the defaults, and judging a fleet from its counters.

Prints figures (medians) as one JSON document (stdout, or --json FILE), its lines on stderr; it is not a test.
Bar (issue 19): /metrics renders in <= 100 ms at the defaults (3 labels x 50 values) with the sketch.

* sketch series at the defaults: 2 routes x (1 + 3 x 51) keys x --buckets non-empty buckets each;
* render: every key changed since the last scrape (the worst case), and none changed (the usual scrape);
* the sink's cost per batch of completed traces;
* judge_fleet over the summed counters of a 50-value fleet (what `gate --prometheus` does after its queries).

  python bench/fleet.py --repeat 9
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import polars as pl  # noqa: E402
from common import add_json_arg, emit, say, spread  # noqa: E402

from shadowlens.analyzers.assembly import CompletedTraces  # noqa: E402
from shadowlens.analyzers.cohorts import CohortLimiter  # noqa: E402
from shadowlens.analyzers.fleet import DurationSketch, FleetCounters, Sample, judge_fleet  # noqa: E402
from shadowlens.analyzers.pairing import STAT_NAMES  # noqa: E402
from shadowlens.config import default_config  # noqa: E402
from shadowlens.exporters.analysis import GateMetrics  # noqa: E402

LABELS = ("intent", "language", "tier")


def batch(values: int, buckets: int, scale: float = 1.0) -> CompletedTraces:
    rows = [{"route": r, "intent": f"i{k}", "language": f"l{k}", "tier": f"t{k}",
             "duration_seconds": scale * 2 ** ((b + 0.5) / 8)}
            for r in ("baseline", "candidate") for k in range(values) for b in range(buckets)]
    return CompletedTraces(pl.DataFrame(rows), None, None, 0, 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--values", type=int, default=51, help="values per cohort label (50 + __overflow__)")
    ap.add_argument("--buckets", type=int, default=40, help="non-empty buckets per route and cohort value")
    ap.add_argument("--repeat", type=int, default=9)
    add_json_arg(ap)
    args = ap.parse_args(argv)

    limiter = CohortLimiter(LABELS, args.values, 3600)
    sketch = DurationSketch(limiter)
    full = batch(args.values, args.buckets)
    sink = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        sketch(full)
        sink.append(time.perf_counter() - t0)
    gate = GateMetrics(lambda: None, None, LABELS, lambda: 0.0, limiter=limiter, sketch=sketch)
    series = gate._sketch_text().count("\n")
    changed, unchanged = [], []
    for _ in range(args.repeat):
        sketch.generation = {k: g + 1 for k, g in sketch.generation.items()}      # every key changed
        t0 = time.perf_counter()
        gate._sketch_text()
        changed.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gate._sketch_text()
        unchanged.append(time.perf_counter() - t0)
    say(f"sketch: {series:,} series; render all changed {statistics.median(changed) * 1e3:.1f} ms, none changed "
        f"{statistics.median(unchanged) * 1e3:.2f} ms; sink {statistics.median(sink) * 1e3:.1f} ms per "
        f"{full.traces.height:,} traces")

    settings = default_config().gate_settings()
    stats = []
    cohorts = [("__all__",) * 3] + [tuple(f"{lab[0]}{k}" if j == i else "__all__" for j in range(3))
                                    for i, lab in enumerate(LABELS) for k in range(args.values)]
    for rule in settings.rules:
        if rule.quantile is None:
            for c in cohorts:
                for key, name in STAT_NAMES.items():
                    v = {"n": 400, "sb": 400.0, "sc": 410.0, "sbb": 500.0, "scc": 520.0, "sbc": 480.0}[key]
                    stats.append(Sample({"rule": rule.name, **dict(zip(LABELS, c)), "stat": name}, v))
    sketch_samples = [Sample({"route": route, **dict(zip(LABELS, key)), "bucket": str(b)}, n)
                      for (route, key), counts in sketch.snapshot().items() for b, n in counts.items()]
    traces = [Sample({"route": r, "intent": f"i{k}", "language": f"l{k}", "tier": f"t{k}"}, 400.0)
              for r in ("baseline", "candidate") for k in range(args.values)]
    counters = FleetCounters(stats, sketch_samples, traces, [Sample({"status": "matched"}, 400.0 * args.values)], 20)
    judged = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        v = judge_fleet(counters, settings, LABELS, time.time()).verdict
        judged.append(time.perf_counter() - t0)
    say(f"judge_fleet: {len(v.results)} results from {len(stats) + len(sketch_samples):,} summed series in "
        f"{statistics.median(judged) * 1e3:.1f} ms")
    emit("fleet", args, {"sketch_series": series, "render_all_changed_s": spread(changed),
                         "render_unchanged_s": spread(unchanged), "sink_batch_s": spread(sink),
                         "sink_batch_traces": full.traces.height, "judge_fleet_s": spread(judged),
                         "judge_fleet_results": len(v.results), "summed_series": len(stats) + len(sketch_samples)},
         args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
