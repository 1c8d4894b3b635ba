"""The fleet gate's source: the sidecars' counters read through Prometheus's HTTP API (or a Thanos / Mimir
that answers the same API), summed across the sidecars over the window; analyzers/fleet.py judges them.

Sums over the window are exact where they can be: per series, the last value in the window minus its value
at the window's start (0 for a sidecar that started inside it), so a sum of pairs is the sum the sidecars
counted, with no extrapolation. A series that reset in the window (a sidecar restarted) takes
``increase()``, which handles the reset (and extrapolates at the edges). Sidecars that left during the
window keep their last values; those that came later start from 0. Only the standard library (urllib).
"""
from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from shadowlens.analyzers.compare import readable_duration
from shadowlens.analyzers.fleet import FleetCounters, FleetVerdict, Sample, judge_fleet
from shadowlens.analyzers.rules import GateSettings

from .catalog import COMPARE_METRICS, STREAMING_METRICS, exposed_names

_NAMES = {m.name: exposed_names(m)[0] for m in (*COMPARE_METRICS, *STREAMING_METRICS)}
STAT = _NAMES["shadowlens_compare_stat"]
SKETCH = _NAMES["shadowlens_trace_duration_sketch"]
TRACES = _NAMES["shadowlens_traces"]
PAIRS = _NAMES["shadowlens_pairs"]
DURATION_BUCKETS = "shadowlens_trace_duration_seconds_bucket"    # its exemplars carry trace ids
# what the recording rules in deploy/prometheus/rules record (summed across sidecars, per minute)
RECORDED = {STAT: "shadowlens:compare_stat:increase1m", SKETCH: "shadowlens:trace_duration_sketch:increase1m",
            TRACES: "shadowlens:traces:increase1m", PAIRS: "shadowlens:pairs:increase1m"}


class FleetError(Exception):
    """Prometheus could not answer (unreachable, an error, a bad selector); the message says which and why."""


def matchers(selector: str | None) -> str:
    """--match '{namespace="agents", rollout="v42"}' -> 'namespace="agents", rollout="v42"' (the braces are
    optional); Prometheus itself judges the matchers, and a bad one comes back as its error."""
    s = (selector or "").strip()
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1].strip()
    elif "{" in s or "}" in s:
        raise FleetError(f"--match {selector}: expected label matchers like '{{namespace=\"agents\"}}'")
    return s.rstrip(",")


def _sel(metric: str, match: str, extra: str = "") -> str:
    inner = ", ".join(x for x in (extra, match) if x)
    return f"{metric}{{{inner}}}"


def window_increase(metric: str, match: str, window: str) -> str:
    """Per series, the counter's growth over the window: exact (last - start, or last for a series born in
    the window) unless it reset, then increase()."""
    x = _sel(metric, match)
    last = f"last_over_time({x}[{window}])"
    return (f"((({last} - {x} offset {window}) or {last}) unless (resets({x}[{window}]) > 0))"
            f" or increase({x}[{window}])")


@dataclass(frozen=True)
class FleetQueries:
    """The PromQL of one fleet evaluation (shown by --format json as ``queries``, so they can be rerun)."""
    stats: str
    sketch: str
    traces: str
    pairs: str
    sidecars: str
    first_candidate: str


def fleet_queries(labels, window_s: float, match: str = "", recorded: bool = False) -> FleetQueries:
    w = f"{max(int(math.ceil(window_s)), 1)}s"
    cohort = ", ".join(labels)
    by = lambda *names: ", ".join(x for x in names if x)
    if recorded:
        grow = lambda m: f"sum_over_time({_sel(RECORDED[m], match)}[{w}])"
    else:
        grow = lambda m: window_increase(m, match, w)
    step = max(int(window_s // 240), 1)
    candidate = _sel(TRACES, match, 'route="candidate"')
    return FleetQueries(
        stats=f"sum by ({by('rule', cohort, 'stat')}) ({grow(STAT)})",
        sketch=f"sum by ({by('route', cohort, 'bucket')}) ({grow(SKETCH)})",
        traces=f"sum by ({by('route', cohort)}) ({grow(TRACES)})",
        pairs=f"sum by (status) ({grow(PAIRS)})",
        # a sidecar contributed when it counted a trace in the window (raw series: recorded ones have no instance)
        sidecars=f"count(sum by (job, instance) ({window_increase(TRACES, match, w)}) > 0)",
        first_candidate=f"min_over_time(timestamp(sum({candidate}) > 0)[{w}:{step}s])")


class PrometheusAPI:
    """GET /api/v1/query and /api/v1/query_exemplars on ``url``."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict) -> object:
        target = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(target, timeout=self.timeout) as resp:
                doc = json.loads(resp.read())
        except urllib.error.HTTPError as exc:       # 400 bad_data / 422 execution: the body says why
            try:
                doc = json.loads(exc.read())
            except ValueError:
                raise FleetError(f"--prometheus {self.url}: HTTP {exc.code} from {path}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise FleetError(f"--prometheus {self.url}: cannot reach Prometheus ({getattr(exc, 'reason', exc)});"
                             " check the URL and that Prometheus is up") from None
        if not isinstance(doc, dict) or doc.get("status") != "success":
            err = doc.get("error", "no answer") if isinstance(doc, dict) else "no answer"
            raise FleetError(f"--prometheus {self.url}: Prometheus refused the query ({err});"
                             " check --match (label matchers like '{namespace=\"agents\"}')")
        return doc["data"]

    def query(self, promql: str, at: float) -> list[Sample]:
        data = self._get("/api/v1/query", {"query": promql, "time": f"{at:.3f}"})
        if data.get("resultType") == "scalar":
            return [Sample({}, float(data["result"][1]))]
        return [Sample({k: v for k, v in r["metric"].items() if k != "__name__"}, float(r["value"][1]))
                for r in data.get("result", []) if math.isfinite(float(r["value"][1]))]

    def exemplars(self, promql: str, start: float, end: float) -> list[dict]:
        """[{labels, exemplars: [{labels: {trace_id}, value, timestamp}]}]; [] when exemplar storage is off."""
        try:
            return self._get("/api/v1/query_exemplars", {"query": promql, "start": f"{start:.3f}",
                                                         "end": f"{end:.3f}"}) or []
        except FleetError:
            return []


def read_fleet(api: PrometheusAPI, labels, window_s: float, match: str = "", now: float | None = None
               ) -> tuple[FleetCounters, FleetQueries]:
    """The fleet's summed counters over the window ending ``now``; the recording rules' series when Prometheus
    has them (deploy/prometheus/rules), else the sidecars' own."""
    now = time.time() if now is None else now
    w = f"{max(int(math.ceil(window_s)), 1)}s"
    # the recorded sums only where they cover the whole window (rules loaded an hour ago cannot sum a day)
    since = api.query(f"min(min_over_time(timestamp({_sel(RECORDED[STAT], match)})[{w}:1m]))", now)
    recorded = bool(since) and since[0].value <= now - window_s + 120
    q = fleet_queries(labels, window_s, match, recorded)
    sidecars = api.query(q.sidecars, now)
    first = api.query(q.first_candidate, now)
    notes = ("read the recording rules' series (shadowlens:*:increase1m): sums are per-minute increases",) if recorded else ()
    if since and not recorded:
        notes += ("the recording rules' series do not cover the window yet: read the sidecars' own series",)
    if not sidecars or not sidecars[0].value:
        notes += (f"no sidecar counted a trace in the last {readable_duration(window_s)}{' matching ' + match if match else ''}:"
                  " check --match and that Prometheus scrapes the sidecars (up{job=...})",)
    counters = FleetCounters(stats=api.query(q.stats, now), sketch=api.query(q.sketch, now),
                             traces=api.query(q.traces, now), pairs=api.query(q.pairs, now),
                             sidecars=int(sidecars[0].value) if sidecars else 0,
                             first_candidate=first[0].value if first else None, notes=notes)
    return counters, q


def _cohort_matcher(cohort: str, labels) -> str:
    label, _, value = cohort.partition("=")
    if cohort == "all" or label not in labels or value.startswith("__"):
        return ""
    return f'{label}="{value}"'


def fleet_examples(api: PrometheusAPI, verdict, labels, window_s: float, match: str = "", now: float | None = None,
                   limit: int = 5) -> dict[tuple[str, str], list[dict]]:
    """(rule, cohort) of each failing result -> candidate trace ids of that cohort from the duration
    histogram's exemplars (the slowest first), where the sidecars expose OpenMetrics exemplars and
    Prometheus stores them (--enable-feature=exemplar-storage)."""
    now = time.time() if now is None else now
    out = {}
    for r in verdict.results:
        if r.state != "fail":
            continue
        extra = ", ".join(x for x in ('route="candidate"', _cohort_matcher(r.cohort, labels)) if x)
        found = []
        for series in api.exemplars(_sel(DURATION_BUCKETS, match, extra), now - window_s, now):
            for ex in series.get("exemplars", []):
                tid = ex.get("labels", {}).get("trace_id")
                if tid:
                    value = float(ex.get("value", "nan"))
                    # the example-pair shape (evidence_text reads it); an exemplar has no baseline partner
                    found.append({"request_id": "-", "baseline_trace_id": "-", "candidate_trace_id": tid,
                                  "value": value, "timestamp": float(ex.get("timestamp", 0)),
                                  "display": f"a candidate trace of {r.cohort} that took {value:.3g} s (exemplar)"})
        found.sort(key=lambda e: -e["value"])
        seen, uniq = set(), []
        for e in found:
            if e["candidate_trace_id"] not in seen:
                seen.add(e["candidate_trace_id"])
                uniq.append(e)
        out[(r.rule, r.cohort)] = uniq[:limit]
    return out


def judge_prometheus(url: str, settings: GateSettings, labels, selector: str | None = None,
                     now: float | None = None, examples: bool = True) -> tuple[FleetVerdict, dict]:
    """(the fleet's verdict, the JSON fields it adds: source, sidecars, prometheus, match, queries, examples)."""
    now = time.time() if now is None else now
    api = PrometheusAPI(url)
    match = matchers(selector)
    counters, q = read_fleet(api, labels, settings.window_s, match, now)
    fv = judge_fleet(counters, settings, labels, now)
    ex = fleet_examples(api, fv.verdict, labels, settings.window_s, match, now) if examples else {}
    extra = {"source": "prometheus", "sidecars": fv.sidecars, "prometheus": api.url, "match": selector or "",
             "notes": list(fv.notes), "queries": {k: getattr(q, k) for k in q.__dataclass_fields__},
             "examples": ex}
    return fv, extra


def fleet_json(doc: dict, extra: dict) -> dict:
    """verdict_json's document plus the fleet's fields; a failing result carries the exemplars' trace ids."""
    examples = extra.get("examples", {})
    for r in doc["rules"]:
        key = (r["rule"], r["cohort"])
        if r["state"] == "fail":
            r["examples"] = [dict(e) for e in examples.get(key, [])]
            r["examples_note"] = ("candidate traces of this cohort from the sidecars' exemplars (the slowest first)"
                                  if r["examples"] else
                                  "no exemplars: the sidecars' OpenMetrics exemplars are stored only when Prometheus"
                                  " runs with --enable-feature=exemplar-storage and scrapes OpenMetrics")
    out = {**doc, **{k: v for k, v in extra.items() if k != "examples"}}
    return out
