"""Prometheus families for the analyzers: streaming aggregates, window gauges, analyzer self metrics, gate.

Everything is read from in-memory snapshots: a scrape never touches DuckDB.
"""
from __future__ import annotations

from operator import add
from typing import Callable

from shadowlens.analyzers.aggregates import COST_BUCKETS, DURATION_BUCKETS, STEPS_BUCKETS, StreamingAggregates
from shadowlens.analyzers.cohorts import OVERFLOW
from shadowlens.analyzers.compare import GATE_STATES, OTHER, STATES, cohort_label_values
from shadowlens.analyzers.pairing import PAIR_COUNTS, STAT_NAMES
from shadowlens.analyzers.window import QUANTILES, WindowSnapshot

from .catalog import ALL_METRICS, COMPARE_METRICS
from .exposition import Family, escape, fmt_value, label_string, render

_HELP = {m.name: m.help for m in ALL_METRICS}


def _bound(b: float) -> str:
    return repr(float(b)) if not float(b).is_integer() else f"{float(b):.1f}"


class AnalysisMetrics:
    """Renders the analyzer families from the aggregates, the window snapshot and assembly stats."""

    def __init__(self, aggregates: StreamingAggregates, window: Callable[[], WindowSnapshot | None],
                 assembly_stats, limiter):
        self.aggregates = aggregates
        self.window = window
        self.assembly_stats = assembly_stats
        self.limiter = limiter
        self.labels = ["route", *aggregates.labels]
        self._label_cache: dict[tuple, str] = {}
        self._prefix_cache: dict[tuple, list[str]] = {}
        self._le = {name: [f'le="{_bound(x)}"' for x in bounds] + ['le="+Inf"'] for name, bounds in
                    (("duration", DURATION_BUCKETS), ("steps", STEPS_BUCKETS), ("cost", COST_BUCKETS))}

    def _labels(self, key: tuple) -> str:
        s = self._label_cache.get(key)
        if s is None:
            if len(self._label_cache) > 100_000:
                self._label_cache.clear()
            s = self._label_cache[key] = label_string(self.labels, key)
        return s

    def _bucket_prefixes(self, key: tuple, hist: str, name: str, lab: str) -> list[str]:
        """'name_bucket{labels,le="x"} ' per bucket, built once per series (the values change, these don't)."""
        ck = (key, hist)
        p = self._prefix_cache.get(ck)
        if p is None:
            if len(self._prefix_cache) > 30_000:
                self._prefix_cache.clear()
            p = self._prefix_cache[ck] = [f"{name}_bucket{{{lab},{le}}} " for le in self._le[hist]]
        return p

    def render(self, openmetrics: bool) -> str:
        return render(self.families(openmetrics), openmetrics)

    def families(self, openmetrics: bool = False) -> list[Family]:
        series, evals, tokens, cost_total = self.aggregates.snapshot()
        fam = {name: Family(name, "counter", _HELP[name]) for name in (
            "shadowlens_traces", "shadowlens_refusals", "shadowlens_escalations")}
        hist = {"duration": Family("shadowlens_trace_duration_seconds", "histogram",
                                   _HELP["shadowlens_trace_duration_seconds"]),
                "steps": Family("shadowlens_trajectory_steps", "histogram", _HELP["shadowlens_trajectory_steps"]),
                "cost": Family("shadowlens_trace_cost_usd", "histogram", _HELP["shadowlens_trace_cost_usd"])}
        for key, (n, refusals, escalations, dur, steps, cost) in series.items():
            lab = self._labels(key)
            fam["shadowlens_traces"].add("_total", lab, n)
            fam["shadowlens_refusals"].add("_total", lab, refusals)
            fam["shadowlens_escalations"].add("_total", lab, escalations)
            for name, (counts, total_, exemplars) in (("duration", dur), ("steps", steps), ("cost", cost)):
                f = hist[name]
                prefixes = self._bucket_prefixes(key, name, f.name, lab)
                cum = counts.cumsum().tolist()
                if openmetrics and name == "duration":
                    f.chunks.append("".join(
                        f'{p}{c} # {{trace_id="{ex[0]}"}} {fmt_value(ex[1])} {ex[2]:.3f}\n' if ex else f"{p}{c}\n"
                        for p, c, ex in zip(prefixes, cum, exemplars)))
                else:
                    f.chunks.append("\n".join(map(add, prefixes, map(str, cum))) + "\n")
                f.chunks.append(f"{f.name}_count{{{lab}}} {cum[-1]}\n{f.name}_sum{{{lab}}} {fmt_value(total_)}\n")
        out = list(fam.values()) + list(hist.values())
        ev = Family("shadowlens_evals", "counter", _HELP["shadowlens_evals"])
        names = {name: escape(name) for name in {k[1] for k in evals}}
        # in the order the series first came (sorting 10k+ keys of tuples cost ~10 ms a scrape)
        ev.chunks.extend(f'shadowlens_evals_total{{{self._labels(key)},eval="{names[name]}",result="{result}"}} '
                         f'{fmt_value(n)}\n' for (key, name, result), n in evals.items())
        tok = Family("shadowlens_tokens", "counter", _HELP["shadowlens_tokens"])
        for k, n in sorted(tokens.items()):
            tok.add("_total", label_string(("route", "model", "type"), k), n)
        cst = Family("shadowlens_cost_usd", "counter", _HELP["shadowlens_cost_usd"])
        for k, v in sorted(cost_total.items()):
            cst.add("_total", label_string(("route", "model"), k), v)
        out += [ev, tok, cst]
        out += self._window()
        out += self._self()
        return out

    def _window(self) -> list[Family]:
        snap = self.window()
        names = ("shadowlens_window_traces", "shadowlens_window_trajectory_steps_mean",
                 "shadowlens_window_cost_per_trace_usd", "shadowlens_window_refusal_ratio",
                 "shadowlens_window_escalation_ratio")
        g = {name: Family(name, "gauge", _HELP[name]) for name in names}
        q = Family("shadowlens_window_trace_duration_seconds", "gauge", _HELP["shadowlens_window_trace_duration_seconds"])
        fail = Family("shadowlens_window_eval_fail_ratio", "gauge", _HELP["shadowlens_window_eval_fail_ratio"])
        if snap is not None:
            cols = {"shadowlens_window_traces": "n", "shadowlens_window_trajectory_steps_mean": "steps_mean",
                    "shadowlens_window_cost_per_trace_usd": "cost_mean", "shadowlens_window_refusal_ratio": "refusal_ratio",
                    "shadowlens_window_escalation_ratio": "escalation_ratio"}
            t = snap.traces
            labs = [self._labels(k) for k in zip(*(t[c].to_list() for c in self.labels))]
            for name, col in cols.items():
                fam = g[name]
                fam.chunks.extend(f"{name}{{{lab}}} {fmt_value(v)}\n"
                                  for lab, v in zip(labs, t[col].to_list()) if v is not None)
            for lab, qs in zip(labs, t["q"].to_list()):
                q.chunks.extend(f'{q.name}{{{lab},quantile="{quantile}"}} {fmt_value(v)}\n'
                                for quantile, v in zip(QUANTILES, qs or []) if v is not None)
            e = snap.evals
            if e.height:
                elabs = [self._labels(k) for k in zip(*(e[c].to_list() for c in self.labels))]
                fail.chunks.extend(f'{fail.name}{{{lab},eval="{escape(ev)}"}} {fmt_value(v)}\n'
                                   for lab, ev, v in zip(elabs, e["eval"].to_list(), e["fail_ratio"].to_list()))
        took = Family("shadowlens_window_refresh_seconds", "gauge", _HELP["shadowlens_window_refresh_seconds"])
        took.add("", "", snap.seconds if snap is not None else 0.0)
        return [*g.values(), q, fail, took]

    def _self(self) -> list[Family]:
        st = self.assembly_stats
        late = Family("shadowlens_late_spans", "counter", _HELP["shadowlens_late_spans"])
        late.add("_total", "", st.late_spans)
        open_ = Family("shadowlens_open_traces", "gauge", _HELP["shadowlens_open_traces"])
        open_.add("", "", st.open_traces)
        ev = Family("shadowlens_traces_evicted", "counter", _HELP["shadowlens_traces_evicted"])
        ev.add("_total", "", st.evicted)
        of = Family("shadowlens_cohort_overflow", "counter", _HELP["shadowlens_cohort_overflow"])
        for label in self.labels[1:]:
            of.add("_total", f'label="{label}"', self.limiter.overflow.get(label, 0))
        for limiter in self.aggregates.limiters[1:]:         # series (cohort combinations), model, eval
            of.add("_total", label_string(("label",), limiter.labels), limiter.overflow.get(limiter.labels[0], 0))
        return [late, open_, ev, of]


class GateMetrics:
    """The comparison families: verdicts and effects from the latest gate evaluation, pair counters."""

    def __init__(self, verdict: Callable[[], object], pairing, labels, refresh_seconds: Callable[[], float],
                 limiter=None, sketch=None):
        """``limiter``: the cohort limiter; then each label shows at most its ``max_values`` values (those the
        other families show first, then the largest) and the results of the rest as one __overflow__ result.
        ``sketch``: analyzers/fleet.py's DurationSketch, shown as shadowlens_trace_duration_sketch_total."""
        self.verdict = verdict
        self.pairing = pairing
        self.labels = tuple(labels)
        self.refresh_seconds = refresh_seconds
        self.limiter = limiter
        self.sketch = sketch
        self._sketch_prefix: dict[tuple, tuple[int, str]] = {}     # key -> (generation, its series' text)

    # the state an __overflow__ result shows for the results it stands for: the one that needs a look first
    _WORST = ("fail", "inconclusive", "insufficient_data", "pass")

    def _capped(self, results) -> tuple[list, list]:
        """(results shown as they are, [(rule, label, state, n_baseline, n_candidate)] of the __overflow__ ones)."""
        if self.limiter is None:
            return list(results), []
        by_label: dict[str, dict[str, int]] = {}
        for r in results:
            label, _, value = r.cohort.partition("=")
            if label in self.labels and value not in (OTHER, OVERFLOW):     # a client's "__overflow__" is pooled
                by_label.setdefault(label, {})
                by_label[label][value] = by_label[label].get(value, 0) + r.n_baseline + r.n_candidate
        keep: dict[str, set] = {}
        for label, sizes in by_label.items():
            allowed = set(self.limiter.allowed(label))
            first = [v for v in sizes if v in allowed]
            rest = sorted((v for v in sizes if v not in allowed), key=lambda v: -sizes[v])
            keep[label] = set((first + rest)[:self.limiter.max_values])
        shown, pooled = [], {}
        for r in results:
            label, _, value = r.cohort.partition("=")
            if label not in keep or value == OTHER or value in keep[label]:
                shown.append(r)
                continue
            state, nb, nc = pooled.get((r.rule, label), ("pass", 0, 0))
            worst = min(state, r.state, key=lambda x: self._WORST.index(x) if x in self._WORST else 0)
            pooled[(r.rule, label)] = (worst, nb + r.n_baseline, nc + r.n_candidate)
        return shown, [(rule, label, *v) for (rule, label), v in pooled.items()]

    def render(self, openmetrics: bool) -> str:
        return render(self.families(), openmetrics)

    def families(self) -> list[Family]:
        fam = {m.name: Family(m.name, m.type, m.help) for m in COMPARE_METRICS}
        v = self.verdict()
        names = ("rule", *self.labels)
        if v is not None:
            for state in GATE_STATES:
                fam["shadowlens_gate_state"].add("", f'state="{state}"', 1 if v.verdict == state else 0)
            shown, pooled = self._capped(v.results)
            for r in shown:
                lab = label_string(names, (r.rule, *cohort_label_values(r.cohort, self.labels)))
                for state in STATES:
                    fam["shadowlens_verdict"].add("", f'{lab},state="{state}"', 1 if r.state == state else 0)
                for bound, x in (("estimate", r.effect), ("lower", r.lower), ("upper", r.upper)):
                    if x is not None:
                        fam["shadowlens_compare_effect"].add("", f'{lab},bound="{bound}"', x)
                fam["shadowlens_compare_samples"].add("", f'{lab},route="baseline"', r.n_baseline)
                fam["shadowlens_compare_samples"].add("", f'{lab},route="candidate"', r.n_candidate)
            for rule, label, worst, nb, nc in pooled:       # no effect: they are several results
                lab = label_string(names, (rule, *cohort_label_values(f"{label}={OVERFLOW}", self.labels)))
                for state in STATES:
                    fam["shadowlens_verdict"].add("", f'{lab},state="{state}"', 1 if worst == state else 0)
                fam["shadowlens_compare_samples"].add("", f'{lab},route="baseline"', nb)
                fam["shadowlens_compare_samples"].add("", f'{lab},route="candidate"', nc)
        if self.pairing is not None:
            pairs, stats = self.pairing.snapshot()
            for status in PAIR_COUNTS:
                fam["shadowlens_pairs"].add("_total", f'status="{status}"', pairs.get(status, 0))
            for (rule, cohort), acc in sorted(stats.items()):
                lab = label_string(names, (rule, *cohort))
                for stat, value in acc.items():
                    fam["shadowlens_compare_stat"].add("_total", f'{lab},stat="{STAT_NAMES[stat]}"', value)
        fam["shadowlens_gate_refresh_seconds"].add("", "", self.refresh_seconds())
        if self.sketch is not None:
            fam["shadowlens_trace_duration_sketch"].chunks.append(self._sketch_text())
        return list(fam.values())

    def _sketch_text(self) -> str:
        """Sparse: one series per non-empty bucket (a few dozen per route and cohort value, see README Fleet).
        A key's text is rebuilt only when its counts changed since the last scrape (DurationSketch.render)."""
        names = ("route", *self.labels)

        def render_key(key: tuple, counts: dict[int, int]) -> str:
            lab = label_string(names, (key[0], *key[1]))
            prefix = f'shadowlens_trace_duration_sketch_total{{{lab},bucket="'
            return "".join(f'{prefix}{b}"}} {n}\n' for b, n in sorted(counts.items()))
        return "".join(self.sketch.render(render_key, self._sketch_prefix))
