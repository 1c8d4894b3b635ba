"""Baseline vs candidate, rule by rule and cohort by cohort: sufficient statistics → judged effects.

Input is a *trace frame* (polars; one row per completed trace in the gate's window):

    route, request_id, start_s, <cohort labels...>, duration, cost, steps, tokens, refused, escalated,
    eval_pass:<name>, eval_fail:<name>          (rates are 0.0 / 1.0, unknown is null)

Each rule is judged on all traffic and on every value of every cohort label with enough traces
(values with fewer than ``gate.min_samples`` per route are pooled into ``label=__other__``):

* rates and means, paired (baseline and candidate traces of one ``shadow.request_id``): the paired
  difference d = candidate - baseline. For a pass/fail outcome its variance is the discordant-pair
  count over n, i.e. McNemar's test; ratio margins use the delta method on log(mean_c / mean_b) with
  the pair covariance. Everything is computed from n, Σb, Σc, Σb², Σc², Σbc, which merge by addition
  (the same counters serve exports and fleets).
* unpaired fallback (no request ids, or too few pairs): two-sample difference / ratio of means.
* quantiles (p99): the ratio of the two routes' quantiles, with the order-statistic standard error
  (analyzers/sequential.py); no verdict below the distribution-free minimum (368 traces for p99).

Every interval is a confidence sequence and every p-value anytime-valid, so repeated looks do not
inflate false blocks. All traffic is tested at ``gate.alpha``; the cohorts of each rule go through
e-BH (false discovery rate ``gate.fdr`` across cohorts).
A rule *fails* when the candidate is significantly worse than the baseline after that correction
and the estimated effect is past the margin; it *passes* when the whole interval is within the margin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from .rules import GateSettings, Rule
from .sequential import anytime_p_one_sided, ebh, quantile_and_log_se, radius

ALL = "all"
OTHER = "__other__"
ANY_VALUE = "__all__"      # a cohort label's value in metrics when the result is not about that label
STATES = ("pass", "fail", "inconclusive", "insufficient_data")
GATE_STATES = ("promote", "block", "inconclusive")
PAIR_STATUSES = ("matched", "unmatched_baseline", "unmatched_candidate")


def cohort_label_values(cohort: str, labels) -> tuple[str, ...]:
    """"language=de" -> ("__all__", "de", "__all__") for labels (intent, language, tier); "all" -> all "__all__"."""
    label, _, value = cohort.partition("=")
    return tuple(value if lab == label else ANY_VALUE for lab in labels)


def measure_column(rule: Rule) -> str:
    """The trace-frame column a rule reads."""
    if rule.eval:
        return f"{rule.column}:{rule.eval}"
    return rule.column


@dataclass(frozen=True)
class Comparison:
    """One rule on one cohort: CONTRACT §7's rule result plus how it was computed."""
    rule: str
    cohort: str                  # "all" or "label=value"
    state: str
    effect: float | None
    lower: float | None
    upper: float | None
    n_baseline: int
    n_candidate: int
    margin: float
    reason: str
    paired: bool = False
    p_value: float | None = None
    critical: bool = False
    kind: str = "ratio"          # ratio | difference: how effect, lower, upper and margin read

    @property
    def label(self) -> tuple[str, str] | None:
        """("language", "de") for a cohort result, None for all traffic."""
        if self.cohort == ALL:
            return None
        k, _, v = self.cohort.partition("=")
        return k, v


@dataclass(frozen=True)
class Verdict:
    verdict: str                             # promote | block | inconclusive
    results: tuple[Comparison, ...]
    reasons: tuple[str, ...]                 # why the verdict (blocking results first)
    as_of: float
    window_s: float
    traces: dict = field(default_factory=dict)   # route -> traces in the window
    pairs: dict = field(default_factory=dict)    # PAIR_STATUSES -> count in the window


# ---------------------------------------------------------------- statistics from sufficient stats

@dataclass
class _Estimate:
    effect: float | None
    lower: float | None
    upper: float | None
    p_worse: float           # anytime p-value for "the candidate is worse than the baseline"
    diff: float              # candidate - baseline on the measure's scale
    diff_upper: float
    n: int


def _var(sum_: float, sumsq: float, n: int, binary: bool) -> float:
    var = max((sumsq - sum_ * sum_ / n) / max(n - 1, 1), 0.0)
    # A rate seen as all-0 or all-1 has sample variance 0, which would claim certainty;
    # floor it at one observation's worth (the rule of three's spirit).
    return max(var, 1.0 / n) if binary else max(var, 1e-18)


def _judge_moments(rule: Rule, s: dict, paired: bool, alpha: float) -> _Estimate:
    """Difference or ratio of means from n/sums (paired: one n and cross sums; unpaired: per route)."""
    binary = rule.binary
    if paired:
        n = nb = nc = s["n"]
        mb, mc = s["sb"] / n, s["sc"] / n
        sdd = s["sbb"] + s["scc"] - 2 * s["sbc"]
        var_d = _var(s["sc"] - s["sb"], sdd, n, binary)
        se_d = math.sqrt(var_d / n)
        n_eff = n
    else:
        nb, nc = s["nb"], s["nc"]
        mb, mc = s["sb"] / nb, s["sc"] / nc
        vb, vc = _var(s["sb"], s["sbb"], nb, binary), _var(s["sc"], s["scc"], nc, binary)
        se_d = math.sqrt(vb / nb + vc / nc)
        n_eff = min(nb, nc)
    r = radius(n_eff, alpha)
    d = mc - mb
    z_worse = (d / se_d) * (1 if rule.worse > 0 else -1)
    p = anytime_p_one_sided(z_worse, n_eff)
    if rule.kind == "difference":
        return _Estimate(d, d - r * se_d, d + r * se_d, p, d, d + r * se_d, n_eff)
    # ratio of means, on the log scale; rates get half a pseudo-count so 0 refusals stay finite
    if binary:
        mb_, mc_ = (s["sb"] + 0.5) / (nb + 1), (s["sc"] + 0.5) / (nc + 1)
    else:
        mb_, mc_ = mb, mc
    if mb_ <= 0 or mc_ <= 0:
        return _Estimate(None, None, None, p, d, d + r * se_d, n_eff)
    if paired:
        vb, vc = _var(s["sb"], s["sbb"], n, binary), _var(s["sc"], s["scc"], n, binary)
        cov = (s["sbc"] - s["sb"] * s["sc"] / n) / max(n - 1, 1)
        var_log = (vc / mc_ ** 2 + vb / mb_ ** 2 - 2 * cov / (mb_ * mc_)) / n
    else:
        var_log = vc / (nc * mc_ ** 2) + vb / (nb * mb_ ** 2)
    if binary:      # no discordant pair is not certainty: at least one discordant pair's worth
        var_log = max(var_log, 1.0 / (min(nb, nc) ** 2 * mb_ * mc_))
    se_log = math.sqrt(max(var_log, 1e-18))
    log_ratio = math.log(mc_ / mb_)
    return _Estimate(math.exp(log_ratio), math.exp(log_ratio - r * se_log), math.exp(log_ratio + r * se_log),
                     p, d, d + r * se_d, n_eff)


def _judge_quantile(rule: Rule, b: np.ndarray, c: np.ndarray, alpha: float) -> _Estimate:
    qb, se_b = quantile_and_log_se(b, rule.quantile)
    qc, se_c = quantile_and_log_se(c, rule.quantile)
    n = min(len(b), len(c))
    if not (qb > 0 and qc > 0) or not math.isfinite(se_b + se_c):
        return _Estimate(None, None, None, 1.0, qc - qb, math.inf, n)
    log_ratio = math.log(qc / qb)
    se = math.sqrt(se_b ** 2 + se_c ** 2)
    r = radius(n, alpha)
    p = anytime_p_one_sided(log_ratio / se, n)
    return _Estimate(qc / qb, math.exp(log_ratio - r * se), math.exp(log_ratio + r * se), p, qc - qb, math.inf, n)


def _fmt(rule: Rule, x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"x{x:.3g}" if rule.kind == "ratio" else f"{x * 100:+.2f} points"


# ---------------------------------------------------------------- frame → sufficient statistics

def _pool_small_cohorts(frame: pl.DataFrame, labels, min_samples: int) -> pl.DataFrame:
    """Cohort values with fewer than min_samples traces on either route become ``__other__``."""
    exprs = []
    for label in labels:
        counts = frame.group_by(label).agg((pl.col("route") == "baseline").sum().alias("b"),
                                           (pl.col("route") == "candidate").sum().alias("c"))
        small = counts.filter(pl.min_horizontal("b", "c") < min_samples)[label]
        exprs.append(pl.when(pl.col(label).is_in(small.implode()) | pl.col(label).is_null()).then(pl.lit(OTHER))
                     .otherwise(pl.col(label)).alias(label))
    return frame.with_columns(exprs) if exprs else frame


def pair(frame: pl.DataFrame, pairing_window_s: float) -> tuple[pl.DataFrame, dict]:
    """Baseline and candidate traces of one request id whose starts lie within the pairing window.

    Returns the pairs (baseline columns as they are, candidate columns suffixed ``_c``; cohort values
    from the baseline) and the counts per PAIR_STATUSES.
    """
    keyed = frame.filter(pl.col("request_id").is_not_null())
    b = keyed.filter(pl.col("route") == "baseline").unique("request_id", keep="first", maintain_order=False)
    c = keyed.filter(pl.col("route") == "candidate").unique("request_id", keep="first", maintain_order=False)
    pairs = b.join(c, on="request_id", how="inner", suffix="_c").filter(
        (pl.col("start_s") - pl.col("start_s_c")).abs() <= pairing_window_s)
    counts = {"matched": pairs.height, "unmatched_baseline": b.height - pairs.height,
              "unmatched_candidate": c.height - pairs.height}
    return pairs, counts


def _groupings(labels):
    return [None, *labels]


def _cohort_name(label, value) -> str:
    return ALL if label is None else f"{label}={value}"


def _aggregate(df: pl.DataFrame, label, aggs: list[pl.Expr], by_route: bool) -> list[dict]:
    keys = ([label] if label else []) + (["route"] if by_route else [])
    out = df.group_by(keys).agg(aggs) if keys else df.select(aggs)
    rows = out.to_dicts()
    for r in rows:
        r["cohort"] = _cohort_name(label, r.get(label))
    return rows


def paired_sums(col: str) -> list[pl.Expr]:
    ok = pl.col(col).is_not_null() & pl.col(col + "_c").is_not_null()
    b, c = pl.when(ok).then(pl.col(col)), pl.when(ok).then(pl.col(col + "_c"))
    return [ok.sum().alias(f"{col}|n"), b.sum().alias(f"{col}|sb"), c.sum().alias(f"{col}|sc"),
            (b * b).sum().alias(f"{col}|sbb"), (c * c).sum().alias(f"{col}|scc"), (b * c).sum().alias(f"{col}|sbc")]


def _route_aggs(col: str) -> list[pl.Expr]:
    x = pl.col(col)
    return [x.count().alias(f"{col}|n"), x.sum().alias(f"{col}|s"), (x * x).sum().alias(f"{col}|ss")]


def sufficient_stats(frame: pl.DataFrame, pairs: pl.DataFrame, settings: GateSettings, labels) -> dict:
    """(rule name, cohort) -> {"paired": {...}, "unpaired": {...}} or {"quantile": (b, c)}."""
    moment_cols = sorted({measure_column(r) for r in settings.rules if r.quantile is None})
    quantile_cols = sorted({measure_column(r) for r in settings.rules if r.quantile is not None})
    paired: dict = {}
    unpaired: dict = {}
    sorted_values: dict = {}
    for label in _groupings(labels):
        if moment_cols and pairs.height:
            for row in _aggregate(pairs, label, [e for col in moment_cols for e in paired_sums(col)], False):
                for col in moment_cols:
                    paired[(col, row["cohort"])] = {k: row[f"{col}|{k}"] or 0 for k in ("n", "sb", "sc", "sbb", "scc", "sbc")}
        if moment_cols:
            for row in _aggregate(frame, label, [e for col in moment_cols for e in _route_aggs(col)], True):
                for col in moment_cols:
                    side = "b" if row["route"] == "baseline" else "c"
                    d = unpaired.setdefault((col, row["cohort"]), {"nb": 0, "nc": 0, "sb": 0, "sc": 0, "sbb": 0, "scc": 0})
                    d["n" + side] = row[f"{col}|n"] or 0
                    d["s" + side] = row[f"{col}|s"] or 0
                    d["s" + side * 2] = row[f"{col}|ss"] or 0
        if quantile_cols:
            aggs = [pl.col(col).filter(pl.col(col) > 0).sort().alias(col) for col in quantile_cols]
            for row in _aggregate(frame, label, aggs, True):
                for col in quantile_cols:
                    sorted_values.setdefault((col, row["cohort"]), {})[row["route"]] = np.asarray(row[col], dtype=float)
    return {"paired": paired, "unpaired": unpaired, "sorted": sorted_values}


# ---------------------------------------------------------------- judging

def _cohorts(stats: dict) -> list[str]:
    names = {c for (_, c) in stats["unpaired"]} | {c for (_, c) in stats["sorted"]}
    return [ALL] + sorted(n for n in names if n != ALL)


def _judge(rule: Rule, cohort: str, stats: dict, alpha: float):
    """→ (_Estimate or None, n_baseline, n_candidate, paired, why-insufficient)."""
    col = measure_column(rule)
    need = rule.min_samples
    if rule.quantile is not None:
        sides = stats["sorted"].get((col, cohort), {})
        b, c = sides.get("baseline", np.empty(0)), sides.get("candidate", np.empty(0))
        if min(len(b), len(c)) < need:
            return None, len(b), len(c), False, f"needs {need} traces per route for p{rule.quantile * 100:g}"
        return _judge_quantile(rule, b, c, alpha), len(b), len(c), False, ""
    p = stats["paired"].get((col, cohort))
    if p and p["n"] >= need:
        return _judge_moments(rule, p, True, alpha), p["n"], p["n"], True, ""
    u = stats["unpaired"].get((col, cohort), {})
    nb, nc = u.get("nb", 0), u.get("nc", 0)
    if min(nb, nc) >= need:
        return _judge_moments(rule, u, False, alpha), nb, nc, False, ""
    return None, nb, nc, False, f"needs {need} traces per route"


def compare(frame: pl.DataFrame, settings: GateSettings, labels, now: float) -> Verdict:
    """The gate's whole computation over one trace frame."""
    labels = tuple(labels)
    routes = dict(frame.group_by("route").len().iter_rows()) if frame.height else {}
    frame = frame.filter(pl.col("route").is_in(["baseline", "candidate"]))
    frame = _pool_small_cohorts(frame, labels, settings.min_samples)
    pairs, pair_counts = pair(frame, settings.pairing_window_s)
    stats = sufficient_stats(frame, pairs, settings, labels)
    cohorts = _cohorts(stats)

    judged = []
    for rule in settings.rules:
        for cohort in cohorts:
            judged.append((rule, cohort, *_judge(rule, cohort, stats, settings.alpha)))
    significant = _significance(judged, settings)

    results = []
    for j in judged:
        rule, cohort, est, nb, nc, paired, why = j
        if est is None:
            results.append(Comparison(rule.name, cohort, "insufficient_data", None, None, None, nb, nc, rule.margin,
                                      f"{why}; has {nb} baseline / {nc} candidate", paired, None, rule.critical,
                                      rule.kind))
            continue
        state, reason = _state(rule, est, significant[id(j)], settings)
        results.append(Comparison(rule.name, cohort, state, est.effect, est.lower, est.upper, nb, nc, rule.margin,
                                  reason + f" ({'paired' if paired else 'unpaired'}, n={est.n})", paired, est.p_worse,
                                  rule.critical, rule.kind))
    first_candidate = frame.filter(pl.col("route") == "candidate")["start_s"].min() if frame.height else None
    verdict, reasons = _gate(results, settings, now, first_candidate)
    return Verdict(verdict, tuple(results), tuple(reasons), now, settings.window_s, routes, pair_counts)


def _significance(judged: list, settings: GateSettings) -> dict[int, bool]:
    """All traffic: the anytime p-value at alpha (one test per rule, consistent with its interval).
    Cohorts: e-BH across the cohorts of each rule at ``gate.fdr``, so fifty cohorts looked at
    together do not turn noise into a blocked release."""
    out = {}
    for rule in settings.rules:
        mine = [j for j in judged if j[0] is rule and j[2] is not None]
        for j in mine:
            if j[1] == ALL:
                out[id(j)] = j[2].p_worse <= settings.alpha
        cohorts = [j for j in mine if j[1] != ALL]
        out.update(zip([id(j) for j in cohorts], ebh([j[2].p_worse for j in cohorts], settings.fdr)))
    return out


def _state(rule: Rule, est: _Estimate, significant: bool, settings: GateSettings) -> tuple[str, str]:
    ci = f"{_fmt(rule, est.effect)} ({(1 - settings.alpha) * 100:g}% CS {_fmt(rule, est.lower)}..{_fmt(rule, est.upper)})"
    margin = rule.describe_margin()
    if est.effect is None:      # a ratio whose baseline mean is 0: judge the difference alone
        if significant and est.diff > rule.min_increase:
            return "fail", f"baseline is 0, candidate +{est.diff:.3g}: significantly worse"
        return "inconclusive", "baseline mean is 0, no ratio yet"
    beyond = rule.beyond(est.effect) and (rule.min_increase <= 0 or est.diff >= rule.min_increase)
    if significant and beyond:
        return "fail", f"{ci}: significantly worse than baseline (p={est.p_worse:.2g}) and past the margin {margin}"
    bound = est.upper if rule.worse > 0 else est.lower
    within = not rule.beyond(bound) or (rule.min_increase > 0 and est.diff_upper < rule.min_increase)
    if within:
        return "pass", f"{ci}: within the margin {margin}"
    return "inconclusive", f"{ci}: cannot yet tell it from the margin {margin}"


def _gate(results: list[Comparison], settings: GateSettings, now: float, first_candidate_s) -> tuple[str, list[str]]:
    fails = [r for r in results if r.state == "fail"]
    overdue = []
    if first_candidate_s is not None and now - first_candidate_s >= settings.budget_s:
        overdue = [r for r in results if r.cohort == ALL and r.critical and r.state in ("inconclusive", "insufficient_data")]
    if fails or overdue:
        reasons = [f"{r.rule} fails for {r.cohort}: {r.reason}" for r in fails]
        reasons += [f"{r.rule} (critical) is still {r.state} for all traffic after the budget of"
                    f" {settings.budget_s / 60:g} min: {r.reason}" for r in overdue]
        return "block", reasons
    overall = [r for r in results if r.cohort == ALL]
    if overall and all(r.state == "pass" for r in overall):
        return "promote", [f"every rule passes on all traffic and no cohort fails ({len(results)} results)"]
    waiting = [f"{r.rule} is {r.state} for all traffic: {r.reason}" for r in overall if r.state != "pass"]
    return "inconclusive", waiting or ["no baseline and candidate traces in the window"]


def route_summary(frame: pl.DataFrame, labels, eval_names=()) -> list[dict]:
    """Per cohort (all, then each label value) and route: traces and each measure's mean (p99 for duration),
    for the report's side-by-side charts."""
    aggs = [pl.len().alias("traces"), pl.col("duration").quantile(0.99, "linear").alias("p99_duration_s"),
            pl.col("cost").mean().alias("cost_per_trace_usd"), pl.col("steps").mean().alias("steps_mean"),
            pl.col("refused").mean().alias("refusal_rate"), pl.col("escalated").mean().alias("escalation_rate"),
            *[pl.col(f"eval_pass:{n}").mean().alias(f"{n}_pass_rate") for n in eval_names]]
    frame = frame.filter(pl.col("route").is_in(["baseline", "candidate"]))
    out = []
    for label in _groupings(labels):
        out += sorted(_aggregate(frame, label, aggs, True), key=lambda r: (r["cohort"], r["route"]))
    return [{"cohort": r["cohort"], "route": r["route"],
             **{k: v for k, v in r.items() if k not in ("cohort", "route", *labels)}} for r in out]
