"""The gate's statistics on seeded simulations (tests/gate_sim.py): false blocks, power, small samples.

Expectations come from the simulation's planted effects and from textbook formulas written out
here, never from the code under test. bench/gate.py runs the same experiments with more seeds and
prints the figures quoted in the README.
"""
from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from gate_sim import Effect, simulate

from analyzers.compare import compare
from analyzers.pairing import pair
from analyzers.rules import RuleError, parse_gate
from analyzers.sequential import anytime_p, anytime_p_one_sided, ebh, min_samples_for_quantile, radius

SETTINGS = parse_gate({})


def judge(frame, labels=("intent",), settings=SETTINGS):
    return compare(frame, settings, labels, now=float(frame["start_s"].max()))


def result(verdict, rule, cohort="all"):
    return next(r for r in verdict.results if r.rule == rule and r.cohort == cohort)


# ------------------------------------------------------------------ building blocks, against formulas

def test_radius_is_the_normal_mixture_boundary():
    # Robbins' normal mixture: |z| >= sqrt((1+k)/k * (2 log(1/alpha) + log(1+k))), k = n / n0
    for n, alpha in ((1000, 0.05), (50, 0.01), (10**6, 0.05)):
        k = n / 250.0
        assert radius(n, alpha) == pytest.approx(math.sqrt((1 + k) / k * (2 * math.log(1 / alpha) + math.log(1 + k))))
    assert radius(2000, 0.05) > 1.96       # wider than a fixed-sample interval: the price of looking often


def test_anytime_p_is_below_alpha_exactly_when_z_crosses_the_radius():
    for n in (200, 2000, 20000):
        r = radius(n, 0.05)
        assert anytime_p(r * 1.001, n) < 0.05 < anytime_p(r * 0.999, n)
    # the one-sided mixture is never larger than twice... and about half the two-sided one for clear effects
    assert anytime_p_one_sided(5.0, 2000) == pytest.approx(anytime_p(5.0, 2000) / 2, rel=0.01)
    assert anytime_p_one_sided(-3.0, 2000) == 1.0


def test_ebh_matches_benjamini_hochberg_by_hand():
    p = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216]
    # BH at q=0.05, m=10: thresholds 0.005, 0.010, 0.015, ...; the largest i with p_(i) <= 0.05 i/10 is i=2
    assert ebh(p, 0.05) == [True, True] + [False] * 8
    assert ebh([0.5, 0.01, 0.02], 0.05) == [False, True, True]     # order does not matter
    assert ebh([], 0.05) == []


def test_p99_needs_368_traces_per_route():
    assert min_samples_for_quantile(0.99) == 368                  # 0.99**368 < 0.025 <= 0.99**367
    assert 0.99 ** 368 < 0.025 <= 0.99 ** 367
    assert parse_gate({}).rules[2].min_samples == 368


def test_pairing_counts_unmatched_traces_instead_of_hiding_them():
    frame = simulate(400, seed=3)
    dropped = frame.filter(~((pl.col("route") == "candidate") & (pl.col("request_id").str.ends_with("7"))))
    pairs, counts = pair(dropped, pairing_window_s=600)
    missing = 40                                                   # ids r3-0..r3-399 ending in 7
    assert counts == {"matched": 400 - missing, "unmatched_baseline": missing, "unmatched_candidate": 0}
    assert pairs.height == 400 - missing


def test_pairs_further_apart_than_the_pairing_window_do_not_pair():
    frame = simulate(200, seed=4)
    shifted = frame.with_columns(pl.when(pl.col("route") == "candidate").then(pl.col("start_s") + 700)
                                 .otherwise(pl.col("start_s")).alias("start_s"))
    assert pair(shifted, 600)[1]["matched"] == 0
    assert pair(shifted, 800)[1]["matched"] == 200


# ------------------------------------------------------------------ A/A: false blocks under repeated looks

def test_identical_routes_over_50_cohorts_are_not_blocked_when_looked_at_repeatedly():
    """A/A: 50 cohorts, 5 rules, 4 looks per seed (1k..10k requests); a seed counts once if any look blocks.
    (bench/gate.py aa runs 300 seeds with 6 looks for the README figure.)"""
    seeds, looks = 40, (1000, 3000, 6000, 10000)
    false_blocks = 0
    for seed in range(seeds):
        frame = simulate(max(looks), seed=seed, n_values=50)
        b, c = frame.filter(pl.col("route") == "baseline"), frame.filter(pl.col("route") == "candidate")
        for n in looks:
            if judge(pl.concat([b.head(n), c.head(n)])).verdict == "block":
                false_blocks += 1
                break
    assert false_blocks / seeds <= 0.05, f"false-block rate {false_blocks}/{seeds}"


def test_identical_routes_in_a_few_large_cohorts_are_not_blocked():
    """A/A where every cohort is large enough for its own p99 verdict (5 cohorts, up to 1,600 traces each)."""
    seeds, looks = 30, (2000, 5000, 8000)
    false_blocks = 0
    for seed in range(seeds):
        frame = simulate(max(looks), seed=500 + seed, n_values=5)
        b, c = frame.filter(pl.col("route") == "baseline"), frame.filter(pl.col("route") == "candidate")
        false_blocks += any(judge(pl.concat([b.head(n), c.head(n)])).verdict == "block" for n in looks)
    assert false_blocks / seeds <= 0.05, f"false-block rate {false_blocks}/{seeds}"


# ------------------------------------------------------------------ power: planted regressions are blocked

@pytest.mark.parametrize("name, effect, rule, n", [
    ("task completion -4 points, 10 % discordance", Effect(pass_drop=0.04), "task_completion", 2000),
    ("refusal x3 from 2 %", Effect(refusal_x=3.0), "refusal_rate", 2000),
    ("p99 x1.5", Effect(latency_x=1.5), "p99_latency", 2000),
    ("cost x1.25", Effect(cost_x=1.25), "cost_per_trace", 2000),
    ("steps x1.4", Effect(steps_x=1.4), "steps", 2000),
])
def test_planted_regressions_are_blocked_and_named(name, effect, rule, n):
    seeds = 30
    named = 0
    for seed in range(seeds):
        v = judge(simulate(n, seed=100 + seed, effect=effect))
        if v.verdict == "block" and result(v, rule).state == "fail":
            named += 1
            assert any(reason.startswith(f"{rule} fails for all") for reason in v.reasons)
    assert named / seeds >= 0.9, f"{name}: blocked in {named}/{seeds} seeds"


def test_a_cohort_regression_blocks_even_when_all_traffic_improves():
    """Refusals x4 in one intent while the candidate is 20 % cheaper everywhere: the gate names the cohort."""
    effect = Effect(refusal_x=4.0, cohort=("intent", "v2"))
    frame = simulate(6000, seed=7, effect=effect, base_refusal=0.03)
    cheaper = frame.with_columns(pl.when(pl.col("route") == "candidate").then(pl.col("cost") * 0.8)
                                 .otherwise(pl.col("cost")).alias("cost"))
    v = judge(cheaper)
    assert v.verdict == "block"
    assert result(v, "refusal_rate", "intent=v2").state == "fail"
    assert result(v, "cost_per_trace").effect < 0.85
    assert any("refusal_rate fails for intent=v2" in r for r in v.reasons)


# ------------------------------------------------------------------ little or no data never promotes

def test_tiny_samples_are_insufficient_and_never_promote():
    v = judge(simulate(60, seed=1))
    assert v.verdict == "inconclusive"
    assert {r.state for r in v.results} == {"insufficient_data"}


def test_no_traces_at_all_is_inconclusive():
    empty = simulate(10, seed=1).head(0)
    v = compare(empty, SETTINGS, ("intent",), now=1e9)
    assert v.verdict == "inconclusive" and v.reasons


def test_small_cohorts_roll_up_into_other():
    frame = simulate(3000, seed=5, n_values=40)       # ~75 requests per value: below min_samples=100
    v = judge(frame)
    cohorts = {r.cohort for r in v.results}
    assert "intent=__other__" in cohorts
    assert not any(c.startswith("intent=v") for c in cohorts)
    other = result(v, "steps", "intent=__other__")
    assert other.n_baseline == 3000


def test_without_request_ids_the_gate_compares_unpaired():
    frame = simulate(3000, seed=9, request_ids=False, effect=Effect(cost_x=1.3))
    v = judge(frame)
    r = result(v, "cost_per_trace")
    assert not r.paired and r.state == "fail"
    assert v.pairs["matched"] == 0


def test_paired_estimates_equal_textbook_formulas():
    frame = simulate(1500, seed=11, effect=Effect(cost_x=1.2))
    v = judge(frame)
    b = frame.filter(pl.col("route") == "baseline").sort("request_id")
    c = frame.filter(pl.col("route") == "candidate").sort("request_id")
    xb, xc = b["cost"].to_numpy(), c["cost"].to_numpy()
    r = result(v, "cost_per_trace")
    assert r.effect == pytest.approx(xc.mean() / xb.mean())
    # delta method for log(mean_c / mean_b) with the pair covariance, inside the confidence sequence
    cov = np.cov(xc, xb)
    var_log = (cov[0, 0] / xc.mean() ** 2 + cov[1, 1] / xb.mean() ** 2 - 2 * cov[0, 1] / (xb.mean() * xc.mean())) / len(xb)
    half = radius(len(xb), 0.05) * math.sqrt(var_log)
    assert r.lower == pytest.approx(r.effect * math.exp(-half))
    assert r.upper == pytest.approx(r.effect * math.exp(half))
    # eval pass rate: the paired difference; McNemar's variance from the discordant pairs
    pb, pc = b["eval_pass:task_completion"].to_numpy(), c["eval_pass:task_completion"].to_numpy()
    t = result(v, "task_completion")
    assert t.effect == pytest.approx(pc.mean() - pb.mean())
    d = pc - pb
    se = math.sqrt(d.var(ddof=1) / len(d))
    assert t.upper - t.effect == pytest.approx(radius(len(d), 0.05) * se)


def test_critical_rule_still_inconclusive_after_its_budget_blocks():
    frame = simulate(150, seed=2)                 # enough for rates and means, too few for any verdict
    early = compare(frame, SETTINGS, ("intent",), now=float(frame["start_s"].min()) + 60)
    late = compare(frame, SETTINGS, ("intent",), now=float(frame["start_s"].min()) + 3600)
    assert result(early, "task_completion").state == result(late, "task_completion").state == "inconclusive"
    assert early.verdict == "inconclusive"
    assert late.verdict == "block"
    assert any("task_completion (critical)" in r for r in late.reasons)


@pytest.mark.parametrize("section, message", [
    ({"rules": [{"name": "x", "measure": "latency", "max_ratio": 1.2}]}, "measure 'latency'"),
    ({"rules": [{"name": "x", "measure": "cost", "max_ratio": 0.9}]}, "max_ratio: must be > 1"),
    ({"rules": [{"name": "x", "measure": "cost"}]}, "exactly one of max_drop"),
    ({"rules": [{"name": "x", "measure": "eval_pass_rate", "max_drop": 0.02}]}, "needs `eval"),
    ({"rules": [{"name": "x", "measure": "cost", "max_ratio": 1.2, "colour": 1}]}, "unknown key 'colour'"),
    ({"alpah": 0.05}, "unknown config key 'gate.alpah'"),
])
def test_bad_rules_name_the_problem(section, message):
    with pytest.raises(RuleError, match=message.replace("(", r"\(")):
        parse_gate(section)


# ------------------------------------------------------------------ streaming pairs and mergeable counters

def _completed(rows, evals=()):
    from analyzers.assembly import CompletedTraces
    base = {"trace_id": None, "route": None, "request_id": None, "intent": "a", "language": "en", "tier": "free",
            "duration_seconds": 1.0, "cost_usd": 0.01, "steps": 2, "input_tokens": 10, "output_tokens": 5,
            "refused": False, "escalated": False}
    traces = pl.DataFrame([{**base, **r} for r in rows])
    ev = pl.DataFrame(list(evals), schema={"trace_id": pl.Utf8, "name": pl.Utf8, "passed": pl.Boolean, "n": pl.Int64},
                      orient="row")
    return CompletedTraces(traces=traces, evals=ev, models=None, late_spans=0, revised=0)


def test_pairing_sink_sums_matched_pairs_and_counts_the_unmatched_after_the_window():
    from analyzers.cohorts import CohortLimiter
    from analyzers.pairing import PairingSink
    clock = [1000.0]
    settings = parse_gate({"pairing_window": "60s"})
    sink = PairingSink(settings, CohortLimiter(("intent", "language", "tier"), 50, 3600, now=lambda: clock[0]),
                       now=lambda: clock[0])
    sink(_completed([
        {"trace_id": "b1", "route": "baseline", "request_id": "r1", "cost_usd": 0.010, "refused": True},
        {"trace_id": "b2", "route": "baseline", "request_id": "r2"},          # its candidate never comes
        {"trace_id": "c3", "route": "candidate", "request_id": "r3"},         # its baseline never comes
    ], evals=[("b1", "task_completion", True, 1)]))
    clock[0] += 10
    sink(_completed([{"trace_id": "c1", "route": "candidate", "request_id": "r1", "cost_usd": 0.025, "refused": True,
                      "language": "de"}], evals=[("c1", "task_completion", False, 1)]))
    pairs, stats = sink.snapshot()
    assert pairs == {"matched": 1, "unmatched_baseline": 0, "unmatched_candidate": 0}
    everywhere = ("__all__", "__all__", "__all__")
    cost = stats[("cost_per_trace", everywhere)]
    assert cost["n"] == 1 and cost["sb"] == pytest.approx(0.010) and cost["sc"] == pytest.approx(0.025)
    assert cost["sbc"] == pytest.approx(0.010 * 0.025)
    assert stats[("refusal_rate", everywhere)]["sbc"] == 1                  # both refused: concordant
    tc = stats[("task_completion", everywhere)]
    assert (tc["sb"], tc["sc"], tc["sbc"]) == (1, 0, 0)                     # a discordant pair: baseline only
    assert ("cost_per_trace", ("__all__", "en", "__all__")) in stats        # cohort values from the baseline
    clock[0] += 61
    pairs, _ = sink.snapshot()
    assert pairs == {"matched": 1, "unmatched_baseline": 1, "unmatched_candidate": 1}


def test_cohort_values_beyond_the_cap_overflow_the_first_seen_win_and_each_overflowed_trace_counts():
    from analyzers.cohorts import OVERFLOW, CohortLimiter
    limiter = CohortLimiter(("intent",), 2, 3600)
    assert limiter.map("intent", ["a", "b", "c", "a", "c", "d"]) == ["a", "b", OVERFLOW, "a", OVERFLOW, OVERFLOW]
    assert limiter.overflow["intent"] == 3                    # c twice and d once: one per trace
    assert limiter.map("intent", ["d", "b"], count=False) == [OVERFLOW, "b"]
    assert limiter.overflow["intent"] == 3                    # the window refresh maps without counting again
    assert limiter.allowed("intent") == ["a", "b"]
