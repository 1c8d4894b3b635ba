"""The fleet's mapping, without Prometheus (fast): three sidecars' counters, summed, judge like one sidecar.

Three PairingSinks and DurationSketches (what three ``serve`` processes keep) are fed one shadow-traffic run
split by request; their counters, summed as Prometheus sums them, go through analyzers/fleet.py. The reference
is the gate's own SQL path (compare()) over all of the traces, computed independently of the counters.
"""
from __future__ import annotations

import math
import time
import uuid

import numpy as np
import polars as pl
import pytest

from shadowlens import config as config_mod
from shadowlens.analyzers.assembly import CompletedTraces
from shadowlens.analyzers.cohorts import CohortLimiter
from shadowlens.analyzers.compare import compare
from shadowlens.analyzers.fleet import (
    FLEET_ALPHA,
    GAMMA,
    NOT_MERGEABLE,
    DurationSketch,
    FleetCounters,
    Sample,
    bucket_index,
    judge_fleet,
    sketch_quantile,
)
from shadowlens.analyzers.pairing import STAT_NAMES, PairingSink
from shadowlens.analyzers.rules import parse_gate
from shadowlens.analyzers.settings import DEFAULT_GATE_RULES
from shadowlens.exporters.fleet import FleetError, matchers, window_increase
from shadowlens.traffic import SCENARIOS, sample_request

LABELS = ("intent", "language", "tier")
SETTINGS = config_mod.default_config().gate_settings()


def test_a_quantile_read_from_the_buckets_is_within_the_stated_error():
    rng = np.random.default_rng(3)
    for _ in range(40):
        x = rng.lognormal(1.0, rng.uniform(0.2, 1.2), int(rng.integers(20, 3000)))
        buckets: dict[int, int] = {}
        for v in x:
            buckets[bucket_index(v)] = buckets.get(bucket_index(v), 0) + 1
        for p in (0.5, 0.9, 0.98, 0.99, 0.995):
            exact = float(np.quantile(x, p))        # numpy's linear = DuckDB's quantile_cont
            assert abs(sketch_quantile(buckets, p) / exact - 1) <= FLEET_ALPHA + 1e-12
    # bucket i holds (2^((i-1)/8), 2^(i/8)]: what the metric's help and README say
    assert [bucket_index(2 ** (i / 8) * 0.9999) for i in (-3, 0, 1, 8, 17)] == [-3, 0, 1, 8, 17]
    assert bucket_index(2 ** (17 / 8) * 1.0001) == 18 and math.isclose(GAMMA, 2 ** 0.125)


def _traffic(scenario: str, n: int, seed: int):
    rng = np.random.default_rng(seed)
    rows, evals = [], []
    now = time.time()
    for i in range(n):
        plan = sample_request(rng, SCENARIOS[scenario])
        for tp in plan.traces:
            tid = uuid.UUID(bytes=rng.bytes(16)).hex
            rows.append({"trace_id": tid, "route": tp.route, "request_id": plan.request_id, **plan.cohort,
                         "start_s": now - 600 + i * 0.1, "duration_seconds": tp.duration_s,
                         "cost_usd": sum(c.cost_usd for c in tp.steps), "steps": len(tp.steps),
                         "input_tokens": sum(c.input_tokens for c in tp.steps),
                         "output_tokens": sum(c.output_tokens for c in tp.steps), "refused": tp.refused,
                         "escalated": tp.escalated})
            evals.append({"trace_id": tid, "name": "task_completion", "passed": tp.passed, "n": 1})
    return pl.DataFrame(rows), pl.DataFrame(evals), now


def _frame(traces: pl.DataFrame, evals: pl.DataFrame) -> pl.DataFrame:
    """The trace frame compare() reads (analyzers/compare.py's columns)."""
    ev = evals.select("trace_id", pl.col("passed").cast(pl.Float64).alias("eval_pass:task_completion"))
    return traces.join(ev, on="trace_id", how="left").select(
        "route", "request_id", "start_s", *LABELS, pl.col("duration_seconds").alias("duration"),
        pl.col("cost_usd").alias("cost"), pl.col("steps").cast(pl.Float64),
        (pl.col("input_tokens") + pl.col("output_tokens")).cast(pl.Float64).alias("tokens"),
        pl.col("refused").cast(pl.Float64), pl.col("escalated").cast(pl.Float64), "eval_pass:task_completion",
        (1.0 - pl.col("eval_pass:task_completion")).alias("eval_fail:task_completion"))


def _fleet_counters(traces: pl.DataFrame, evals: pl.DataFrame, settings) -> FleetCounters:
    """Three sidecars (split by request), their counters summed as `sum by (...)` does."""
    side = traces["request_id"].map_elements(lambda r: uuid.UUID(r).int % 3, return_dtype=pl.Int64)
    stats, sketch, pairs = [], [], []
    for k in range(3):
        t = traces.filter(side == k)
        done = CompletedTraces(t, evals.filter(pl.col("trace_id").is_in(t["trace_id"].implode())), None, 0, 0)
        limiter = CohortLimiter(LABELS, 50, 1800)
        pairing, durations = PairingSink(settings, limiter), DurationSketch(limiter)
        pairing(done)
        durations(done)
        counts, sums = pairing.snapshot()
        pairs += [Sample({"status": s}, v) for s, v in counts.items()]
        stats += [Sample({"rule": rule, **dict(zip(LABELS, cohort)), "stat": STAT_NAMES[s]}, v)
                  for (rule, cohort), acc in sums.items() for s, v in acc.items()]
        sketch += [Sample({"route": route, **dict(zip(LABELS, cohort)), "bucket": str(b)}, n)
                   for (route, cohort), buckets in durations.snapshot().items() for b, n in buckets.items()]
    combos = traces.group_by(["route", *LABELS]).len()
    trace_samples = [Sample({"route": r["route"], **{lab: r[lab] for lab in LABELS}}, r["len"])
                     for r in combos.iter_rows(named=True)]
    return FleetCounters(stats=stats, sketch=sketch, traces=trace_samples, pairs=pairs, sidecars=3)


@pytest.fixture(scope="module")
def regression():
    traces, evals, now = _traffic("regression", 2400, 20)
    return traces, evals, now


def test_three_sidecars_summed_judge_like_one_sidecar_over_all_of_the_traffic(regression):
    traces, evals, now = regression
    ref = compare(_frame(traces, evals), SETTINGS, LABELS, now)
    fv = judge_fleet(_fleet_counters(traces, evals, SETTINGS), SETTINGS, LABELS, now)
    v = fv.verdict
    assert v.verdict == ref.verdict == "block" and fv.sidecars == 3
    fails = lambda verdict: {(r.rule, r.cohort) for r in verdict.results if r.state == "fail"}
    assert fails(v) == fails(ref) and {c for _, c in fails(v)} == {"intent=billing"}
    got = {(r.rule, r.cohort): r for r in v.results}
    assert set(got) == {(r.rule, r.cohort) for r in ref.results}
    for r in ref.results:
        f = got[(r.rule, r.cohort)]
        if r.effect is None or not r.paired and r.rule != "p99_latency":
            continue
        if r.rule == "p99_latency":
            assert 1 / GAMMA <= f.effect / r.effect <= GAMMA
            assert f.lower <= r.lower * GAMMA and f.upper >= r.upper / GAMMA     # wider by the bucket width
        else:
            assert f.n_baseline == r.n_baseline and f.state == r.state
            for a, b in ((f.effect, r.effect), (f.lower, r.lower), (f.upper, r.upper)):
                assert math.isclose(a, b, rel_tol=1e-9), (r, f)


def test_a_rule_that_cannot_be_merged_says_so_in_every_result(regression):
    traces, evals, now = regression
    rules = [*DEFAULT_GATE_RULES, {"name": "p90_cost", "measure": "cost", "quantile": 0.9, "max_ratio": 1.5}]
    settings = parse_gate({"rules": rules})
    counters = _fleet_counters(traces, evals, SETTINGS)       # the sidecars run the default rules
    v = judge_fleet(counters, settings, LABELS, now).verdict
    results = [r for r in v.results if r.rule == "p90_cost"]
    assert results and all(r.state == "insufficient_data" and r.reason.startswith(NOT_MERGEABLE)
                           for r in results)
    assert any(x.startswith("p90_cost cannot be judged: not mergeable") for x in v.reasons)
    # a rule the sidecars do not count (not in their gate.rules) is not mergeable either, never dropped
    extra = parse_gate({"rules": [*DEFAULT_GATE_RULES, {"name": "tokens", "measure": "tokens", "max_ratio": 1.2}]})
    v = judge_fleet(counters, extra, LABELS, now).verdict
    assert all(NOT_MERGEABLE in r.reason for r in v.results if r.rule == "tokens")
    assert v.verdict == "block"         # the mergeable rules still judge


def test_match_and_the_window_sum():
    assert matchers('{namespace="agents", rollout="v42"}') == 'namespace="agents", rollout="v42"'
    assert matchers('fleet="a"') == 'fleet="a"' and matchers(None) == ""
    with pytest.raises(FleetError):
        matchers('x{fleet="a"}')
    q = window_increase("m_total", 'a="b"', "3600s")
    # exact unless a reset: last minus the value at the start (or the last, for a series born in the window)
    assert q == ('(((last_over_time(m_total{a="b"}[3600s]) - m_total{a="b"} offset 3600s) or last_over_time('
                 'm_total{a="b"}[3600s])) unless (resets(m_total{a="b"}[3600s]) > 0)) or increase(m_total{a="b"}[3600s])')


def test_the_window_sum_is_exact_across_sidecars_that_come_go_and_restart(tmp_path):
    """fleet_queries' window sum, evaluated by promtool (Prometheus's own engine) over four sidecars: one there
    all along, one that starts inside the window, one that leaves, one that restarts (its counter resets)."""
    import shutil
    import subprocess

    import yaml
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool is not on PATH (sh scripts/install-prometheus.sh)")
    series = {"a": "100+10x10",                                   # +100 in the window
              "b": "_ _ _ _ _ 5 10 15 20 25 30",                   # born at 5m: all of its 30
              "c": "50 60 70 _ _ _ _ _ _ _ _",                     # gone after 2m: +20
              "d": "0 10 20 5 15 25 35 45 55 65 75"}               # restarted at 3m: 20 + 5 + 70 = 95
    expr = "sum by (stat) (" + window_increase("shadowlens_compare_stat_total", 'job="x"', "600s") + ")"
    test = {"rule_files": [], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": f'shadowlens_compare_stat_total{{job="x",instance="{k}",stat="pairs"}}',
                          "values": v} for k, v in series.items()],
        "promql_expr_test": [{"expr": expr, "eval_time": "10m",
                              "exp_samples": [{"labels": '{stat="pairs"}', "value": 245}]}]}]}
    path = tmp_path / "window.test.yml"
    path.write_text(yaml.safe_dump(test))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_report_renders_a_fleet_verdict_in_every_format(regression):
    from shadowlens.exporters.fleet import fleet_json
    from shadowlens.exporters.report import render
    from shadowlens.exporters.verdict_json import verdict_to_json
    traces, evals, now = regression
    v = judge_fleet(_fleet_counters(traces, evals, SETTINGS), SETTINGS, LABELS, now).verdict
    ex = {(r.rule, r.cohort): [{"request_id": "-", "baseline_trace_id": "-", "candidate_trace_id": "ab" * 16,
                                "value": 9.5, "timestamp": now, "display": "a candidate trace (exemplar)"}]
          for r in v.results if r.state == "fail"}
    doc = fleet_json(verdict_to_json(v), {"source": "prometheus", "sidecars": 3, "examples": ex})
    assert doc["source"] == "prometheus" and doc["sidecars"] == 3 and "examples" not in {k for k in doc if k != "rules"}
    for fmt in ("table", "markdown", "html", "json"):
        text = render(doc, fmt, None)
        assert "ab" * 16 in text and "block" in text, fmt


def test_the_sketch_forgets_the_cohort_values_the_limiter_forgot():
    """Without it a churn of cohort values would add sketch series past the /metrics bound."""
    clock = [100.0]
    limiter = CohortLimiter(("intent",), 50, 10, now=lambda: clock[0])
    sketch = DurationSketch(limiter)
    one = lambda value: CompletedTraces(pl.DataFrame({"route": ["baseline"], "intent": [value],
                                                      "duration_seconds": [1.0]}), None, None, 0, 0)
    sketch(one("a"))
    clock[0] = 105
    sketch(one("b"))
    clock[0] = 112          # "a" unseen for 12 s > 10 s
    limiter.forget_stale()
    assert sketch.forget() == 1
    assert sorted(sketch.snapshot()) == [("baseline", ("__all__",)), ("baseline", ("b",))]
    assert sketch.snapshot()[("baseline", ("__all__",))] == {bucket_index(1.0): 2}     # all traffic keeps counting
