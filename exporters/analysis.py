"""Prometheus families for the analyzers: streaming aggregates, window gauges, analyzer self metrics.

Everything is read from in-memory snapshots: a scrape never touches DuckDB.
"""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from analyzers.aggregates import COST_BUCKETS, DURATION_BUCKETS, STEPS_BUCKETS, StreamingAggregates
from analyzers.window import QUANTILES, WindowSnapshot

from .catalog import ALL_METRICS

_HELP = {m.name: m.help for m in ALL_METRICS}


def _bound(b: float) -> str:
    return repr(float(b)) if not float(b).is_integer() else f"{float(b):.1f}"


def _buckets(bounds, counts, exemplars):
    out, cum = [], 0
    for i, b in enumerate(list(bounds) + [float("inf")]):
        cum += int(counts[i])
        le = "+Inf" if b == float("inf") else _bound(b)
        ex = exemplars[i] if exemplars is not None else None
        if ex is not None:
            out.append((le, cum, Exemplar({"trace_id": ex[0]}, ex[1], ex[2])))
        else:
            out.append((le, cum))
    return out


class AnalysisCollector(Collector):
    def __init__(self, aggregates: StreamingAggregates, window: Callable[[], WindowSnapshot | None],
                 assembly_stats, limiter):
        self.aggregates = aggregates
        self.window = window
        self.assembly_stats = assembly_stats
        self.limiter = limiter
        self.labels = list(aggregates.labels)

    def collect(self) -> Iterable:
        lab = ["route", *self.labels]
        series, evals, tokens, cost_total = self.aggregates.snapshot()
        fams = {
            "traces": CounterMetricFamily("shadowlens_traces", _HELP["shadowlens_traces"], labels=lab),
            "refusals": CounterMetricFamily("shadowlens_refusals", _HELP["shadowlens_refusals"], labels=lab),
            "escalations": CounterMetricFamily("shadowlens_escalations", _HELP["shadowlens_escalations"], labels=lab),
        }
        hist = {
            "duration": HistogramMetricFamily("shadowlens_trace_duration_seconds",
                                              _HELP["shadowlens_trace_duration_seconds"], labels=lab),
            "steps": HistogramMetricFamily("shadowlens_trajectory_steps", _HELP["shadowlens_trajectory_steps"], labels=lab),
            "cost": HistogramMetricFamily("shadowlens_trace_cost_usd", _HELP["shadowlens_trace_cost_usd"], labels=lab),
        }
        for key, (n, refusals, escalations, dur, steps, cost) in series.items():
            values = list(key)
            fams["traces"].add_metric(values, n)
            fams["refusals"].add_metric(values, refusals)
            fams["escalations"].add_metric(values, escalations)
            for name, bounds, (counts, total, exemplars) in (("duration", DURATION_BUCKETS, dur),
                                                             ("steps", STEPS_BUCKETS, steps),
                                                             ("cost", COST_BUCKETS, cost)):
                hist[name].add_metric(values, _buckets(bounds, counts, exemplars if name == "duration" else None),
                                      total)
        yield from fams.values()
        yield from hist.values()
        ev = CounterMetricFamily("shadowlens_evals", _HELP["shadowlens_evals"], labels=lab + ["eval", "result"])
        for (key, name, result), n in sorted(evals.items()):
            ev.add_metric([*key, name, result], n)
        yield ev
        tok = CounterMetricFamily("shadowlens_tokens", _HELP["shadowlens_tokens"], labels=["route", "model", "type"])
        for k, n in sorted(tokens.items()):
            tok.add_metric(list(k), n)
        yield tok
        cst = CounterMetricFamily("shadowlens_cost_usd", _HELP["shadowlens_cost_usd"], labels=["route", "model"])
        for k, v in sorted(cost_total.items()):
            cst.add_metric(list(k), v)
        yield cst
        yield from self._window(lab)
        yield from self._self()

    def _window(self, lab) -> Iterable:
        snap = self.window()
        g = {name: GaugeMetricFamily(name, _HELP[name], labels=lab) for name in (
            "shadowlens_window_traces", "shadowlens_window_trajectory_steps_mean",
            "shadowlens_window_cost_per_trace_usd", "shadowlens_window_refusal_ratio",
            "shadowlens_window_escalation_ratio")}
        q = GaugeMetricFamily("shadowlens_window_trace_duration_seconds",
                              _HELP["shadowlens_window_trace_duration_seconds"], labels=lab + ["quantile"])
        fail = GaugeMetricFamily("shadowlens_window_eval_fail_ratio", _HELP["shadowlens_window_eval_fail_ratio"],
                                 labels=lab + ["eval"])
        if snap is not None:
            for row in snap.traces.iter_rows(named=True):
                values = [row[c] for c in lab]
                g["shadowlens_window_traces"].add_metric(values, row["n"])
                for quantile, v in zip(QUANTILES, row["q"] or []):
                    if v is not None:
                        q.add_metric(values + [str(quantile)], v)
                for name, col in (("shadowlens_window_trajectory_steps_mean", "steps_mean"),
                                  ("shadowlens_window_cost_per_trace_usd", "cost_mean"),
                                  ("shadowlens_window_refusal_ratio", "refusal_ratio"),
                                  ("shadowlens_window_escalation_ratio", "escalation_ratio")):
                    if row[col] is not None:
                        g[name].add_metric(values, row[col])
            for row in snap.evals.iter_rows(named=True):
                fail.add_metric([row[c] for c in lab] + [row["eval"]], row["fail_ratio"])
        yield from g.values()
        yield q
        yield fail
        took = GaugeMetricFamily("shadowlens_window_refresh_seconds", _HELP["shadowlens_window_refresh_seconds"])
        took.add_metric([], snap.seconds if snap is not None else 0.0)
        yield took

    def _self(self) -> Iterable:
        st = self.assembly_stats
        late = CounterMetricFamily("shadowlens_late_spans", _HELP["shadowlens_late_spans"])
        late.add_metric([], st.late_spans)
        yield late
        open_ = GaugeMetricFamily("shadowlens_open_traces", _HELP["shadowlens_open_traces"])
        open_.add_metric([], st.open_traces)
        yield open_
        ev = CounterMetricFamily("shadowlens_traces_evicted", _HELP["shadowlens_traces_evicted"])
        ev.add_metric([], st.evicted)
        yield ev
        of = CounterMetricFamily("shadowlens_cohort_overflow", _HELP["shadowlens_cohort_overflow"], labels=["label"])
        for label in self.labels:
            of.add_metric([label], self.limiter.overflow.get(label, 0))
        yield of
