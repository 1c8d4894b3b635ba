"""The fleet: the sidecars' counters, summed across them, -> the gate's sufficient statistics and Verdict.

Every sidecar keeps mergeable counters: the paired sums of each mean/rate rule (pairing.py) and a
duration sketch (DurationSketch below). Summed over a fleet they are the statistics one sidecar would
have computed over all of the traffic, so ``judge`` (compare.py) makes the fleet's verdict with the same
confidence sequences, e-BH, states and reasons. What reads them (Prometheus's HTTP API) lives in
exporters/fleet.py; this module only maps the summed samples, a list of (labels, value), to
sufficient_stats' shape.

The sketch: analyzers/sketch.py's QuantileSketch with FLEET_ALPHA, so bucket ``i`` holds durations in
(GAMMA^(i-1), GAMMA^i] seconds with GAMMA = 2^(1/8) (Prometheus's native-histogram schema 3), only the
non-empty ones exposed. A quantile read from the summed buckets is within FLEET_ALPHA (4.3 %, relative) of
the exact sample quantile, so a ratio of two routes' quantiles within a factor 1/(1 - FLEET_ALPHA)^2 on the
safe side; the p99 interval is widened by that bound (``quantile_side``), so the bucket width never makes the
gate claim more than the buckets know. (The sidecar's own gate keeps 1 % buckets; 4.3 % keeps the exposed
series count at a few dozen per route and cohort value, README "Fleet".)
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace

import polars as pl

from .assembly import CompletedTraces
from .cohorts import OVERFLOW, CohortLimiter
from .compare import ALL, ANY_VALUE, OTHER, Comparison, Verdict, _gate, judge, measure_column
from .effects import quantile_grid
from .pairing import STAT_NAMES
from .rules import GateSettings, Rule
from .sequential import radius
from .sketch import QuantileSketch

SKETCH_SCHEMA = 3
GAMMA = 2.0 ** (2.0 ** -SKETCH_SCHEMA)       # 1.0905: each bucket is 9.05 % wide
FLEET_ALPHA = (GAMMA - 1) / (GAMMA + 1)      # 0.0433: QuantileSketch's relative error for that bucket width
RELATIVE_ERROR = FLEET_ALPHA
# durations are clamped into [1 ms, 1 day]: at most 8 x log2(86.4e6) = 211 buckets per series key
MIN_SECONDS, MAX_SECONDS = 1e-3, 86_400.0
WIDENING = -2 * math.log(1 - FLEET_ALPHA)    # the most a p99 ratio read from the buckets is off, log scale
SKETCHED_MEASURES = {"duration"}             # the quantile rules' measures that have a sketch
STAT_KEYS = {name: key for key, name in STAT_NAMES.items()}
NOT_MERGEABLE = "not mergeable across sidecars"
ROUTES = ("baseline", "candidate")


_MAPPING = QuantileSketch(FLEET_ALPHA)


def bucket_index(seconds: float) -> int:
    """The sketch bucket holding a duration (seconds > 0)."""
    return _MAPPING.key(min(max(seconds, MIN_SECONDS), MAX_SECONDS))


class DurationSketch:
    """A sink of the TraceAssembler: per route and cohort value (all traffic, each label's values),
    the count of traces per sketch bucket. Counts only grow, so they are counters Prometheus sums."""

    def __init__(self, limiter: CohortLimiter):
        self.limiter = limiter
        self.labels = tuple(limiter.labels)
        # (route, cohort values tuple with ANY_VALUE for the other labels) -> {bucket index: traces}
        self.counts: dict[tuple, dict[int, int]] = {}
        self.generation: dict[tuple, int] = {}     # bumped when a key's counts change: scrapes re-render only those
        self._lock = threading.Lock()

    def __call__(self, done: CompletedTraces) -> None:
        t = done.traces
        if t.height == 0:
            return
        labels = self.labels
        t = t.select(pl.col("route"), *[pl.col(lab).fill_null("unknown") for lab in labels],
                     pl.col("duration_seconds").cast(pl.Float64).alias("d"))
        # the quantile rules read durations > 0 (sufficient.py), so do the buckets
        t = t.filter(pl.col("route").is_in(list(ROUTES)) & (pl.col("d") > 0))
        if t.height == 0:
            return
        keys = _MAPPING.keys(t["d"].clip(MIN_SECONDS, MAX_SECONDS).to_numpy())
        t = t.with_columns(*[pl.Series(lab, self.limiter.map(lab, t[lab].to_list(), count=False)) for lab in labels],
                           pl.Series("bucket", keys, dtype=pl.Int32))
        fine = t.group_by(["route", *labels, "bucket"]).len()
        everything = (ANY_VALUE,) * len(labels)
        groups = []         # (routes, cohort keys, buckets, counts) per grouping: all traffic, then each label
        for i, label in enumerate((None, *labels)):
            g = fine.group_by(["route", "bucket", *([label] if label else [])]).agg(pl.col("len").sum())
            cohorts = ([everything] * g.height if label is None else
                       [everything[:i - 1] + (v,) + everything[i:] for v in g[label].to_list()])
            groups.append((g["route"].to_list(), cohorts, g["bucket"].to_list(), g["len"].to_list()))
        with self._lock:
            counts, touched = self.counts, set()
            for routes, cohorts, buckets, ns in groups:
                for route, cohort, b, n in zip(routes, cohorts, buckets, ns):
                    key = (route, cohort)
                    acc = counts.get(key)
                    if acc is None:
                        acc = counts[key] = {}
                    acc[b] = acc.get(b, 0) + n
                    touched.add(key)
            for key in touched:
                self.generation[key] = self.generation.get(key, 0) + 1

    def snapshot(self) -> dict[tuple, dict[int, int]]:
        with self._lock:
            return {k: dict(v) for k, v in self.counts.items()}

    def forget(self) -> int:
        """Drop the keys of cohort values the limiter forgot (unseen for two windows), so a new value taking
        the place does not add series past the bound. Prometheus's window sum keeps their last counts
        (last_over_time), and a value that comes back starts from 0, which it reads as a counter reset."""
        allowed = {lab: set(self.limiter.allowed(lab)) for lab in self.labels}
        with self._lock:
            gone = [k for k in self.counts
                    if any(v not in (ANY_VALUE, OVERFLOW) and v not in allowed[lab] for lab, v in zip(self.labels, k[1]))]
            for k in gone:
                del self.counts[k]
                self.generation.pop(k, None)
        return len(gone)

    def render(self, render_key, cache: dict) -> list[str]:
        """render_key(key, counts) per key, reusing ``cache``'s text of the keys unchanged since the last call
        (at the defaults ~300 keys of a few dozen buckets each: a scrape re-renders only what changed)."""
        out = []
        with self._lock:
            for key, counts in self.counts.items():
                gen = self.generation.get(key, 0)
                hit = cache.get(key)
                if hit is None or hit[0] != gen:
                    hit = cache[key] = (gen, render_key(key, counts))
                out.append(hit[1])
        return out


# ---------------------------------------------------------------- quantiles from buckets

def sketch_quantile(buckets: dict[int, float], p: float) -> float:
    """The p-quantile (as DuckDB's quantile_cont), read from summed bucket counts by QuantileSketch."""
    return QuantileSketch.from_counts(buckets, FLEET_ALPHA).quantile(p)


def quantile_side(rule: Rule, buckets: dict[int, float], n_other: int, alpha: float) -> tuple[int, list[float]]:
    """One route's (n, quantiles on quantile_grid(rule)), as sufficient_stats gives them, from its buckets.

    The bucket width enters as a widening: every quantile read here is within FLEET_ALPHA (relative) of the
    exact one, so on the log scale the effect is judged on, the ratio of two routes' is within
    w = -2 log(1 - FLEET_ALPHA). effects.judge_quantile reads each route's standard error from the grid's
    spread at q -+ sqrt(q(1-q)/n); tilting the grid's log values by (p - q) / that half-width x w / r adds
    w / r to the route's standard error, which adds at least w / r to the combined one
    (sqrt((a+b)^2 + (c+b)^2) >= sqrt(a^2 + c^2) + b), so the interval, r standard errors wide, grows by at
    least w on each side. The estimate (p = q) is untouched.
    """
    n = int(round(sum(c for c in buckets.values() if c > 0)))
    grid = quantile_grid(rule)
    if n <= 0:
        return 0, [math.nan] * len(grid)
    q = rule.quantile
    r = radius(min(n, n_other), alpha) if min(n, n_other) > 0 else math.inf
    half = math.sqrt(q * (1 - q) / n)
    tilt = WIDENING / r / half if math.isfinite(r) else 0.0
    values = QuantileSketch.from_counts({k: c for k, c in buckets.items() if c > 0}, FLEET_ALPHA).quantiles(grid)
    return n, [v * math.exp((p - q) * tilt) for p, v in zip(grid, values)]


# ---------------------------------------------------------------- summed samples -> statistics

@dataclass(frozen=True)
class Sample:
    """One series of a PromQL answer: its labels and value."""
    labels: dict
    value: float


@dataclass(frozen=True)
class FleetCounters:
    """What exporters/fleet.py read from Prometheus, already summed across the sidecars over the window."""
    stats: list[Sample]          # compare_stat: rule, <cohort labels>, stat
    sketch: list[Sample]         # duration sketch: route, <cohort labels>, bucket
    traces: list[Sample]         # traces: route, <cohort labels> (the cohort combinations)
    pairs: list[Sample]          # pairs: status
    sidecars: int
    first_candidate: float | None = None
    notes: tuple[str, ...] = ()


def _cohort(labels: dict, names: tuple) -> str | None:
    """compare_stat's labels -> "all" or "label=value" (None for a combination, which it never exposes)."""
    set_ = [(lab, labels.get(lab, ANY_VALUE)) for lab in names if labels.get(lab, ANY_VALUE) != ANY_VALUE]
    if not set_:
        return ALL
    return f"{set_[0][0]}={set_[0][1]}" if len(set_) == 1 else None


def _pooled(cohort_traces: dict[str, dict[str, float]], names: tuple, min_samples: int) -> dict[str, str]:
    """cohort -> the cohort it is judged in: values with fewer than ``min_samples`` traces on either route
    are pooled into ``label=__other__``, as sufficient.py pools them on one sidecar."""
    out = {}
    for cohort, routes in cohort_traces.items():
        label, _, value = cohort.partition("=")
        small = cohort != ALL and min(routes.get("baseline", 0), routes.get("candidate", 0)) < min_samples
        out[cohort] = f"{label}={OTHER}" if small and label in names else cohort
    return out


def fleet_statistics(c: FleetCounters, settings: GateSettings, labels) -> dict:
    """The summed counters -> sufficient_stats' shape (``judge`` reads it)."""
    names = tuple(labels)
    # traces per cohort and route, from the cohort combinations
    cohort_traces: dict[str, dict[str, float]] = {}
    routes = dict.fromkeys(ROUTES, 0)
    for s in c.traces:
        route = s.labels.get("route")
        if route not in ROUTES:
            continue
        routes[route] += s.value
        for cohort in (ALL, *[f"{lab}={s.labels.get(lab, 'unknown')}" for lab in names]):
            d = cohort_traces.setdefault(cohort, dict.fromkeys(ROUTES, 0))
            d[route] += s.value
    pool = _pooled(cohort_traces, names, settings.min_samples)
    out: dict = {"paired": {}, "unpaired": {}, "quantiles": {}, "routes": {r: int(round(v)) for r, v in routes.items()},
                 "keyed": {}, "first_candidate": c.first_candidate, "cohort_traces": {}}
    for cohort, d in cohort_traces.items():
        key = pool[cohort]
        out["cohort_traces"][key] = out["cohort_traces"].get(key, 0) + int(round(sum(d.values())))

    columns = {r.name: measure_column(r) for r in settings.rules if r.quantile is None}
    for s in c.stats:
        col, stat = columns.get(s.labels.get("rule")), STAT_KEYS.get(s.labels.get("stat"))
        cohort = _cohort(s.labels, names)
        if col is None or stat is None or cohort is None:
            continue
        acc = out["paired"].setdefault((col, pool.get(cohort, cohort)), dict.fromkeys(STAT_KEYS.values(), 0.0))
        acc[stat] += s.value
    for key, acc in out["paired"].items():
        acc["n"] = int(round(acc["n"]))
    # matched pairs, as sufficient_stats keys them, from any one rule's counts
    for (col, cohort), acc in list(out["paired"].items()):
        if col is not None:
            out["paired"][(None, cohort)] = max(out["paired"].get((None, cohort), 0), acc["n"])
    # the unpaired fallback has the same pairs (the fleet keeps no per-trace sums); every cohort with
    # traces is listed, so a rule with too few pairs says insufficient_data rather than vanish
    for col in set(columns.values()):
        for cohort in out["cohort_traces"]:
            p = out["paired"].get((col, cohort))
            out["unpaired"][(col, cohort)] = (
                {"nb": p["n"], "nc": p["n"], "sb": p["sb"], "sc": p["sc"], "sbb": p["sbb"], "scc": p["scc"]} if p
                else dict.fromkeys(("nb", "nc", "sb", "sc", "sbb", "scc"), 0))

    buckets: dict[tuple[str, str], dict[int, float]] = {}
    for s in c.sketch:
        cohort, route = _cohort(s.labels, names), s.labels.get("route")
        if cohort is None or route not in ROUTES:
            continue
        acc = buckets.setdefault((route, pool.get(cohort, cohort)), {})
        b = int(s.labels["bucket"])
        acc[b] = acc.get(b, 0) + s.value
    for rule in settings.rules:
        if rule.quantile is None or rule.measure not in SKETCHED_MEASURES:
            continue
        col = measure_column(rule)
        for cohort in {co for (_, co) in buckets}:
            b, cnd = buckets.get(("baseline", cohort), {}), buckets.get(("candidate", cohort), {})
            nb, nc = sum(b.values()), sum(cnd.values())
            out["quantiles"][(col, cohort)] = {
                "baseline": quantile_side(rule, b, nc, settings.alpha) if nb else (0, None),
                "candidate": quantile_side(rule, cnd, nb, settings.alpha) if nc else (0, None)}
    pairs = {s.labels.get("status"): s.value for s in c.pairs}
    matched = out["paired"].get((None, ALL), 0)
    out["keyed"] = {r: int(round(matched + pairs.get(f"unmatched_{r}", 0))) for r in ROUTES}
    return out


def not_mergeable(rule: Rule, exposed: set[str]) -> str | None:
    """Why a rule cannot be judged from summed counters, or None when it can."""
    if rule.quantile is not None:
        if rule.measure not in SKETCHED_MEASURES:
            return (f"{NOT_MERGEABLE}: a p{rule.quantile * 100:g} of {rule.measure} has no mergeable form (only"
                    " duration has a sketch); judge it on one sidecar (gate --data-dir) or on the Parquet lake")
        return None
    if rule.name not in exposed:
        return (f"{NOT_MERGEABLE}: no sidecar exposes the paired sums of rule `{rule.name}` (shadowlens_compare_stat"
                "_total{rule=...}); the sidecars' gate.rules must hold a rule of that name")
    return None


@dataclass(frozen=True)
class FleetVerdict:
    verdict: Verdict
    sidecars: int
    notes: tuple[str, ...] = field(default_factory=tuple)


def judge_fleet(c: FleetCounters, settings: GateSettings, labels, now: float) -> FleetVerdict:
    """The fleet's verdict from its summed counters: judge() on fleet_statistics, and every rule whose
    statistic cannot be merged says so in each of its results (never dropped)."""
    stats = fleet_statistics(c, settings, labels)
    v = judge(stats, settings, now)
    exposed = {s.labels.get("rule") for s in c.stats}
    why = {r.name: not_mergeable(r, exposed) for r in settings.rules}
    if any(why.values()):
        results = [replace(r, state="insufficient_data", effect=None, lower=None, upper=None, reason=why[r.rule],
                           no_input=True, past_margin=False, p_value=None) if why[r.rule] else r
                   for r in v.results]
        verdict, reasons = _gate(results, settings, now, stats["first_candidate"])
        v = replace(v, verdict=verdict, results=tuple(results), reasons=tuple(reasons))
    return FleetVerdict(v, c.sidecars, c.notes)


__all__ = ["FLEET_ALPHA", "GAMMA", "WIDENING", "NOT_MERGEABLE", "RELATIVE_ERROR", "SKETCH_SCHEMA", "Comparison", "DurationSketch",
           "FleetCounters", "FleetVerdict", "Sample", "bucket_index", "fleet_statistics",
           "judge_fleet", "not_mergeable", "quantile_side", "sketch_quantile"]
