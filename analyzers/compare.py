"""Baseline vs candidate, rule by rule and cohort by cohort: sufficient statistics → judged effects.

Input is a *trace relation*, one row per completed trace in the gate's window (the store's
``traces`` through analyzers/gate.py's SQL, or any polars/Arrow frame with these columns):

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

Every interval is a confidence sequence (level ``gate.alpha``) and every p-value anytime-valid, so
repeated looks do not inflate false blocks. A result *passes* when its whole interval is within the
margin. It *fails* only when the candidate is shown worse than the margin itself: its whole interval is
past the margin, and its anytime p-value against "the effect is within the margin" survives one
weighted e-BH over every rule x cohort result at ``gate.fdr`` (all traffic holds half the weight,
the cohorts share the other half). So while every true effect is within its margin, the chance that
the gate ever blocks on a fail, over all looks, is at most ``gate.fdr``.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from .rules import GateSettings, Rule
from .sequential import anytime_p_one_sided, ebh, log_se_from_grid, radius

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
    # insufficient_data because neither route sent a single value of the measure (an agent without
    # the eval), not because there are too few: a missing input, which no amount of waiting fixes
    no_input: bool = False
    # inconclusive with the whole confidence sequence past the margin, not yet a fail after the
    # correction for every result: holds the verdict at inconclusive (never promote on it)
    past_margin: bool = False


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
class _Test:
    """One one-sided comparison with the margin, on the scale its standard error is on."""
    estimate: float          # e.g. log(ratio), or candidate - baseline
    se: float
    bound: float             # the margin on that scale (log(max_ratio), the signed difference, the floor)
    worse: int               # +1: larger is worse


@dataclass
class _Estimate:
    effect: float | None
    lower: float | None
    upper: float | None
    tests: list              # _Test: every one must be past its bound for a fail (intersection-union)
    diff: float              # candidate - baseline on the measure's scale
    diff_lower: float
    diff_upper: float
    n: int
    radius: float

    @property
    def p_past(self) -> float:
        """Anytime p-value for "the effect is within the margin" (one-sided; the largest of its tests)."""
        return max((anytime_p_one_sided((t.estimate - t.bound) * t.worse / t.se, self.n) for t in self.tests),
                   default=1.0)

    @property
    def past(self) -> bool:
        """The whole confidence sequence is past the margin (and past the floor, if the rule has one)."""
        return bool(self.tests) and all((t.estimate - t.worse * self.radius * t.se - t.bound) * t.worse > 0
                                        for t in self.tests)

    @property
    def within(self) -> bool:
        """The whole confidence sequence is within the margin (or the rise is bounded below the floor)."""
        return any((t.estimate + t.worse * self.radius * t.se - t.bound) * t.worse <= 0 for t in self.tests)


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
    floor = [_Test(d, se_d, rule.min_increase, 1)] if rule.min_increase > 0 else []
    if rule.kind == "difference":
        return _Estimate(d, d - r * se_d, d + r * se_d, [_Test(d, se_d, rule.margin, rule.worse)],
                         d, d - r * se_d, d + r * se_d, n_eff, r)
    # ratio of means, on the log scale; rates get half a pseudo-count so 0 refusals stay finite
    if binary:
        mb_, mc_ = (s["sb"] + 0.5) / (nb + 1), (s["sc"] + 0.5) / (nc + 1)
    else:
        mb_, mc_ = mb, mc
    if mb_ <= 0 or mc_ <= 0:
        # no ratio (a baseline mean of 0): any rise is past a ratio margin, so judge the rise alone
        rise = floor or [_Test(d, se_d, 0.0, 1)]
        return _Estimate(None, None, None, rise, d, d - r * se_d, d + r * se_d, n_eff, r)
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
                     [_Test(log_ratio, se_log, math.log(rule.margin), 1), *floor],
                     d, d - r * se_d, d + r * se_d, n_eff, r)


def _judge_quantile(rule: Rule, b: tuple, c: tuple, alpha: float) -> _Estimate:
    """b, c: (n, quantiles on quantile_grid(rule)) per route."""
    grid = quantile_grid(rule)
    (nb, gb), (nc, gc) = b, c
    qb, se_b = log_se_from_grid(grid, gb, rule.quantile, nb)
    qc, se_c = log_se_from_grid(grid, gc, rule.quantile, nc)
    n = min(nb, nc)
    if not (qb > 0 and qc > 0) or not math.isfinite(se_b + se_c):
        return _Estimate(None, None, None, [], qc - qb, -math.inf, math.inf, n, math.inf)
    log_ratio = math.log(qc / qb)
    se = math.sqrt(se_b ** 2 + se_c ** 2)
    r = radius(n, alpha)
    # the quantiles' difference, for a floor (min_increase): delta method from the log scale
    se_d = math.hypot(qb * se_b, qc * se_c)
    floor = [_Test(qc - qb, se_d, rule.min_increase, 1)] if rule.min_increase > 0 else []
    return _Estimate(qc / qb, math.exp(log_ratio - r * se), math.exp(log_ratio + r * se),
                     [_Test(log_ratio, se, math.log(rule.margin), 1), *floor],
                     qc - qb, qc - qb - r * se_d, qc - qb + r * se_d, n, r)


def _fmt(rule: Rule, x: float | None, decimals: int = 2, unit: bool = True) -> str:
    if x is None:
        return "n/a"
    if rule.kind == "ratio":
        return f"x{x:.{decimals}f}"
    return f"{x * 100:+.{decimals}f}{' points' if unit else ''}"


def _decimals(values, bound: float, scale: float = 1.0) -> int:
    """Decimals (2 to 6) with which no value that differs from the bound prints as the bound, so a
    bound just past the margin reads past it (x1.1004 is "x1.1004", never "x1.10" next to "x1.10")."""
    for d in range(2, 7):
        shown = f"{bound * scale:.{d}f}"
        if all(v is None or v == bound or f"{v * scale:.{d}f}" != shown for v in values):
            return d
    return 6


def describe(rule: Rule, est: _Estimate, alpha: float) -> tuple[str, str]:
    """(the effect with its confidence sequence, the margin) written with the same decimals, in the
    rule's unit: ("x1.27 (95% CS x1.15..x1.41)", "x1.10"); a floor (min_increase) adds the rise in points."""
    level = f"{(1 - alpha) * 100:g}% CS"
    if est.effect is None:
        ci, margin = "no ratio (baseline mean is 0)", rule.describe_margin()
    else:
        d = _decimals((est.effect, est.lower, est.upper), rule.margin, 1.0 if rule.kind == "ratio" else 100.0)
        ci = (f"{_fmt(rule, est.effect, d)} ({level} {_fmt(rule, est.lower, d, False)}.."
              f"{_fmt(rule, est.upper, d)})")
        margin = _fmt(rule, rule.margin, d)
    if rule.min_increase > 0:
        d = _decimals((est.diff, est.diff_lower, est.diff_upper), rule.min_increase, 100.0)
        pts = lambda x: f"{x * 100:+.{d}f}"
        ci += f", {pts(est.diff)} points ({level} {pts(est.diff_lower)}..{pts(est.diff_upper)} points)"
        margin += f" and {pts(rule.min_increase)} points"
    return ci, margin


# ---------------------------------------------------------------- trace relation → sufficient statistics
#
# One DuckDB statement over a relation ``t`` with the trace-frame columns (the store's traces table
# in analyzers/gate.py, or a polars frame registered as ``t``): pool small cohorts, pair, and
# aggregate with GROUPING SETS (all traffic and each label). 1M traces take well under a second.

def sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_literal(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


_q, _lit = sql_ident, sql_literal   # short forms for the SQL builders below

def quantile_grid(rule: Rule) -> list[float]:
    """Probabilities around the rule's quantile wide enough for its smallest sample (see log_se_from_grid)."""
    q = rule.quantile
    d = min(math.sqrt(q * (1 - q) / rule.min_samples) * 1.05, q * 0.999, (1 - q) * 0.999)
    return [q - d, q - d / 2, q, q + d / 2, q + d]


def stats_sql(settings: GateSettings, labels, source: str = "t") -> str:
    """The statement computing every rule's sufficient statistics from ``source`` (a relation or a subquery)."""
    labels = tuple(labels)
    moment_cols = sorted({measure_column(r) for r in settings.rules if r.quantile is None})
    quantile_rules = {measure_column(r): r for r in settings.rules if r.quantile is not None}
    cohort = " ".join(f"WHEN GROUPING({_q(lab)}) = 0 THEN {_lit(lab + '=')} || {_q(lab)}" for lab in labels)
    cohort = f"CASE {cohort} ELSE 'all' END" if labels else "'all'"
    # every pair has exactly one value of the first label, so all traffic is the sum of its cohorts:
    # one grouping set fewer over the pairs (sufficient_stats adds them up)
    sets = ", ".join([f"({_q(lab)})" for lab in labels] or ["()"])
    route_sets = ", ".join(["(route)", *[f"(route, {_q(lab)})" for lab in labels]])
    n = settings.min_samples
    small = ", ".join(
        f"{_q('small_' + lab)} AS (SELECT {_q(lab)} AS v FROM t0 GROUP BY {_q(lab)} HAVING least("
        f"count(*) FILTER (WHERE route = 'baseline'), count(*) FILTER (WHERE route = 'candidate')) < {n})"
        for lab in labels)
    pooled = ", ".join(
        f"CASE WHEN {_q(lab)} IN (SELECT v FROM {_q('small_' + lab)}) THEN '{OTHER}' ELSE {_q(lab)} END AS {_q(lab)}"
        for lab in labels)
    fill = ", ".join(f"coalesce({_q(lab)}, 'unknown') AS {_q(lab)}" for lab in labels)
    # only the columns the rules read: tp is materialized, and narrower is cheaper
    needed = [_q(c) for c in dict.fromkeys(["route", "request_id", "start_s", *moment_cols, *quantile_rules])]
    ctes = [f"t0 AS (SELECT {', '.join(needed + ([fill] if labels else []))}"
            f" FROM {source} WHERE route IN ('baseline', 'candidate'))"]
    if labels:
        ctes.append(small)
    ctes.append(f"tp AS MATERIALIZED (SELECT * {'REPLACE (' + pooled + ')' if labels else ''} FROM t0)")
    # pairing as one hash aggregate by request id (cheaper than two de-duplications and a join); a request
    # id seen twice on one route keeps one of its traces
    keep = [*labels, "start_s", *moment_cols]
    per_route = ", ".join(f"any_value({_q(col)}) FILTER (WHERE route = '{route}') AS {_q(col + suffix)}"
                          for route, suffix in (("baseline", ""), ("candidate", "_c")) for col in keep)
    # grouping on hash(request_id) (64 bits; a collision among a million ids has odds ~1e-8) is much
    # cheaper than grouping on the text
    ctes.append("k AS (SELECT hash(request_id) AS rid, count(*) FILTER (WHERE route = 'baseline') AS nb,"
                f" count(*) FILTER (WHERE route = 'candidate') AS nc, {per_route}"
                " FROM tp WHERE request_id IS NOT NULL GROUP BY rid)")
    # pairs, each measure masked to NULL unless both routes know it (so n and the sums agree)
    masked = ", ".join(
        f"CASE WHEN {_q(col)} IS NOT NULL AND {_q(col + '_c')} IS NOT NULL THEN {_q(col + side)} END AS {_q(col + side)}"
        for col in moment_cols for side in ("", "_c"))
    ctes.append(f"p AS (SELECT {', '.join([*map(_q, labels), masked]) if (labels or masked) else '1 AS one'}"
                f" FROM k WHERE nb > 0 AND nc > 0 AND abs(start_s - start_s_c) <= {float(settings.pairing_window_s)!r})")
    binary = {measure_column(r) for r in settings.rules if r.binary}
    paired = []
    for col in moment_cols:
        b, c = _q(col), _q(col + "_c")
        paired += [f"count({b}) AS {_q(col + '|n')}", f"sum({b}) AS {_q(col + '|sb')}", f"sum({c}) AS {_q(col + '|sc')}",
                   f"sum({b} * {c}) AS {_q(col + '|sbc')}"]
        if col not in binary:       # for 0/1 values x*x = x: Σb² = Σb, no need to sum it again
            paired += [f"sum({b} * {b}) AS {_q(col + '|sbb')}", f"sum({c} * {c}) AS {_q(col + '|scc')}"]
    unpaired = ["count(*) AS traces", "min(start_s) AS first_start"]
    for col in moment_cols:
        unpaired += [f"count({_q(col)}) AS {_q(col + '|n')}", f"sum({_q(col)}) AS {_q(col + '|s')}",
                     f"sum({_q(col)} * {_q(col)}) AS {_q(col + '|ss')}"]
    for col, rule in quantile_rules.items():
        grid = ", ".join(repr(x) for x in quantile_grid(rule))
        unpaired += [f"count({_q(col)}) FILTER (WHERE {_q(col)} > 0) AS {_q(col + '|qn')}",
                     f"quantile_cont({_q(col)}, [{grid}]) FILTER (WHERE {_q(col)} > 0) AS {_q(col + '|qs')}"]
    selects = [f"SELECT 'paired' AS kind, NULL AS route, {cohort} AS cohort, count(*) AS pairs"
               f"{''.join(', ' + x for x in paired)} FROM p GROUP BY GROUPING SETS ({sets})",
               f"SELECT 'route' AS kind, route, {cohort} AS cohort, {', '.join(unpaired)}"
               f" FROM tp GROUP BY GROUPING SETS ({route_sets})",
               "SELECT 'keyed' AS kind, NULL AS route, 'all' AS cohort, count(*) FILTER (WHERE nb > 0) AS keyed_b,"
               " count(*) FILTER (WHERE nc > 0) AS keyed_c FROM k"]
    return "WITH " + ", ".join(ctes) + " " + " UNION ALL BY NAME ".join(selects)


def sufficient_stats(rows: list[dict], settings: GateSettings, labels=()) -> dict:
    """stats_sql's rows → {"paired": {(col, cohort): {n, sb, ...}}, "unpaired": {...}, "quantiles": {...}, ...}."""
    moment_cols = sorted({measure_column(r) for r in settings.rules if r.quantile is None})
    quantile_cols = sorted({measure_column(r) for r in settings.rules if r.quantile is not None})
    out: dict = {"paired": {}, "unpaired": {}, "quantiles": {}, "routes": {}, "keyed": {}, "first_candidate": None,
                 "cohort_traces": {}}
    for row in rows:
        cohort, kind = row["cohort"], row["kind"]
        if kind == "keyed":
            out["keyed"] = {"baseline": row["keyed_b"], "candidate": row["keyed_c"]}
        elif kind == "paired":
            out["paired"][(None, cohort)] = row["pairs"]
            for col in moment_cols:
                d = {k: row.get(f"{col}|{k}") or 0 for k in ("n", "sb", "sc", "sbb", "scc", "sbc")}
                if f"{col}|sbb" not in row:      # a 0/1 measure: Σb² = Σb
                    d["sbb"], d["scc"] = d["sb"], d["sc"]
                out["paired"][(col, cohort)] = d
        else:
            route = row["route"]
            side = "b" if route == "baseline" else "c"
            out["cohort_traces"][cohort] = out["cohort_traces"].get(cohort, 0) + (row["traces"] or 0)
            if cohort == ALL:
                out["routes"][route] = row["traces"]
                if route == "candidate":
                    out["first_candidate"] = row["first_start"]
            for col in moment_cols:
                d = out["unpaired"].setdefault((col, cohort), dict.fromkeys(("nb", "nc", "sb", "sc", "sbb", "scc"), 0))
                d["n" + side], d["s" + side], d["s" + side * 2] = (row[f"{col}|n"] or 0, row[f"{col}|s"] or 0,
                                                                   row[f"{col}|ss"] or 0)
            for col in quantile_cols:
                out["quantiles"].setdefault((col, cohort), {})[route] = (row[f"{col}|qn"] or 0, row[f"{col}|qs"])
    if labels:       # all traffic = the sum over the first label's cohorts (see stats_sql)
        prefix = f"{labels[0]}="
        first = [(key, v) for key, v in out["paired"].items() if key[1].startswith(prefix)]
        for (col, _), v in first:
            if col is None:
                out["paired"][(None, ALL)] = out["paired"].get((None, ALL), 0) + v
            else:
                acc = out["paired"].setdefault((col, ALL), dict.fromkeys(v, 0))
                for k, x in v.items():
                    acc[k] += x
    return out


def statistics(run_sql, settings: GateSettings, labels, source: str = "t") -> dict:
    """Run stats_sql through ``run_sql(sql) -> pyarrow.Table`` (a store cursor, the query socket, or a
    connection with the frame registered as ``t``)."""
    return sufficient_stats(run_sql(stats_sql(settings, labels, source)).to_pylist(), settings, tuple(labels))


def frame_statistics(frame, settings: GateSettings, labels) -> dict:
    """The same statistics for an in-memory trace frame (a polars DataFrame or Arrow table; simulations, tests)."""
    con = getattr(_frame_connection, "con", None)
    if con is None:
        # one in-memory connection per thread, kept: simulations judge thousands of frames and
        # opening a connection costs as much as judging a small frame
        import duckdb
        con = _frame_connection.con = duckdb.connect(config={"threads": 1})   # small frames: one thread is faster
    con.register("t", frame.to_arrow() if hasattr(frame, "to_arrow") else frame)
    try:
        return statistics(lambda sql: con.sql(sql).to_arrow_table(), settings, labels)
    finally:
        con.unregister("t")


_frame_connection = threading.local()


# ---------------------------------------------------------------- judging

def _cohorts(stats: dict) -> list[str]:
    names = {c for (_, c) in stats["unpaired"]} | {c for (_, c) in stats["quantiles"]}
    return [ALL] + sorted(n for n in names if n != ALL)


def _judge(rule: Rule, cohort: str, stats: dict, alpha: float):
    """→ (_Estimate or None, n_baseline, n_candidate, paired, why-insufficient)."""
    col = measure_column(rule)
    need = rule.min_samples
    if rule.quantile is not None:
        sides = stats["quantiles"].get((col, cohort), {})
        (nb, gb), (nc, gc) = sides.get("baseline", (0, None)), sides.get("candidate", (0, None))
        if min(nb, nc) < need:
            return None, nb, nc, False, f"needs {need} traces per route for p{rule.quantile * 100:g}"
        return _judge_quantile(rule, (nb, gb), (nc, gc), alpha), nb, nc, False, ""
    p = stats["paired"].get((col, cohort))
    if p and p["n"] >= need:
        return _judge_moments(rule, p, True, alpha), p["n"], p["n"], True, ""
    u = stats["unpaired"].get((col, cohort), {})
    nb, nc = u.get("nb", 0), u.get("nc", 0)
    if min(nb, nc) >= need:
        return _judge_moments(rule, u, False, alpha), nb, nc, False, ""
    return None, nb, nc, False, f"needs {need} traces per route"


def compare(frame, settings: GateSettings, labels, now: float) -> Verdict:
    """The gate over an in-memory trace frame (simulations and tests; the store path is judge())."""
    return judge(frame_statistics(frame, settings, labels), settings, now)


def judge(stats: dict, settings: GateSettings, now: float) -> Verdict:
    """Sufficient statistics → every rule on every cohort → the gate's Verdict."""
    cohorts = _cohorts(stats)
    judged = []
    for rule in settings.rules:
        for cohort in cohorts:
            judged.append((rule, cohort, *_judge(rule, cohort, stats, settings.alpha)))
    selected, family = _selection(judged, settings)

    results = []
    for j in judged:
        rule, cohort, est, nb, nc, paired, why = j
        if est is None:
            traces = stats["cohort_traces"].get(cohort, 0)
            missing = nb == 0 and nc == 0 and traces > 0
            reason = (no_input_reason(rule, cohort, traces, settings.window_s) if missing
                      else f"{why}; has {nb} baseline / {nc} candidate")
            results.append(Comparison(rule.name, cohort, "insufficient_data", None, None, None, nb, nc, rule.margin,
                                      reason, paired, None, rule.critical, rule.kind, no_input=missing))
            continue
        state, reason = _state(rule, est, selected.get(id(j), False), family, settings)
        results.append(Comparison(rule.name, cohort, state, est.effect, est.lower, est.upper, nb, nc, rule.margin,
                                  reason + f" ({'paired' if paired else 'unpaired'}, n={est.n})", paired, est.p_past,
                                  rule.critical, rule.kind, past_margin=est.past))
    verdict, reasons = _gate(results, settings, now, stats["first_candidate"])
    matched = stats["paired"].get((None, ALL), 0)
    pairs = {"matched": matched, **{f"unmatched_{r}": stats["keyed"].get(r, 0) - matched
                                    for r in ("baseline", "candidate")}}
    return Verdict(verdict, tuple(results), tuple(reasons), now, settings.window_s, dict(stats["routes"]), pairs)


def _selection(judged: list, settings: GateSettings) -> tuple[dict[int, bool], int]:
    """Which results are shown worse than their margin, after the correction for looking at them all.

    One weighted e-BH (sequential.ebh) at ``gate.fdr`` over every rule x cohort result that has input:
    the all-traffic results share half the weight, the cohort results the other half, so adding cohorts
    does not dilute the all-traffic tests and fifty cohorts do not turn noise into a blocked release.
    A result whose confidence sequence is not wholly past its margin takes part with an e-value of 0
    (it is never selected, and still counts in the family). Returns ({id(result): selected}, family size).
    """
    family = [j for j in judged if j[2] is not None or not _no_input(j)]
    m = len(family)
    if not m:
        return {}, 0
    overall = sum(1 for j in family if j[1] == ALL)
    cohorts = m - overall
    share = (m / 2 if cohorts and overall else m)
    weights = [(share / overall if j[1] == ALL else share / cohorts) for j in family]
    pvalues = [j[2].p_past if j[2] is not None and j[2].past else math.inf for j in family]
    return {id(j): s for j, s in zip(family, ebh(pvalues, settings.fdr, weights))}, m


def _no_input(j) -> bool:
    """A result without a single value of its measure on either route (see judge)."""
    _, _, est, nb, nc, _, _ = j
    return est is None and nb == 0 and nc == 0


def _state(rule: Rule, est: _Estimate, selected: bool, family: int, settings: GateSettings) -> tuple[str, str]:
    ci, margin = describe(rule, est, settings.alpha)
    correction = f"e-BH over {family} results at {settings.fdr * 100:g}%"
    if est.past and selected:
        return "fail", (f"{ci} is past the margin {margin} (p={est.p_past:.2g} that it is within the margin;"
                        f" {correction})")
    if est.past:
        return "inconclusive", (f"{ci} is past the margin {margin}, but not yet after the correction for looking"
                                f" at every result (p={est.p_past:.2g} that it is within the margin; {correction})")
    if est.within:
        return "pass", f"{ci}: within the margin {margin}"
    if not est.tests:
        return "inconclusive", f"no estimate yet (a quantile of 0 on a route); the margin is {margin}"
    return "inconclusive", f"{ci}: cannot yet tell it from the margin {margin}"


def readable_duration(seconds: float) -> str:
    """A duration as a person writes it, in the largest unit that reads as a whole number or as at
    least two of it: "10 s", "90 s", "30 min", "1 h", "2.5 h", "7 d" (never "0.166667 min").

    >>> [readable_duration(x) for x in (10, 90, 1800, 3600, 5400, 9000, 7 * 86400, 0.5)]
    ['10 s', '90 s', '30 min', '1 h', '90 min', '2.5 h', '7 d', '0.5 s']
    """
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        n = seconds / size
        if n >= 1 and (float(n).is_integer() or n >= 2):
            return f"{n:.3g} {unit}"
    return f"{seconds:.3g} s"


# Where an eval result comes from (CONTRACT §4 "eval result"), for a rule that has received none.
EVAL_HOWTO = ("send one per trace: span attributes `eval.name`={name} with `eval.passed` (or `eval.label` /"
              " `eval.score`), or a `gen_ai.evaluation.result` span event or log record with"
              " `gen_ai.evaluation.name`={name} and `gen_ai.evaluation.score.label` or `gen_ai.evaluation.score.value`")
MEASURE_HOWTO = {
    "cost": "price the agent's models (`prices:` in the config) or report `llm.cost.total` on its LLM spans",
    "tokens": "report token counts on the LLM spans (`gen_ai.usage.input_tokens` / `output_tokens`)",
}


def no_input_reason(rule: Rule, cohort: str, traces: int, window_s: float) -> str:
    where = "in the window" if cohort == ALL else f"in {cohort}"
    drop = f"or drop the rule `{rule.name}` from `gate.rules`"
    if rule.eval:
        head = (f"no input: neither route sent a `{rule.eval}` eval result {where} ({traces} traces in the last"
                f" {readable_duration(window_s)}); that is a missing input, not a regression")
        return f"{head}. To judge it, {EVAL_HOWTO.format(name=rule.eval)}; {drop}" if cohort == ALL else head
    head = f"no input: no trace {where} has a {rule.measure} value on either route ({traces} traces)"
    if cohort != ALL:
        return head
    howto = MEASURE_HOWTO.get(rule.measure)
    return f"{head}. {howto[0].upper() + howto[1:]}, {drop}" if howto else f"{head}; {drop}"


def _gate(results: list[Comparison], settings: GateSettings, now: float, first_candidate_s) -> tuple[str, list[str]]:
    fails = [r for r in results if r.state == "fail"]
    overall = [r for r in results if r.cohort == ALL]
    # A rule nobody sends input for is said from the first evaluation, and never turns into a block:
    # waiting cannot decide it, only sending the input (or dropping the rule) can.
    missing = [f"{r.rule}{' (critical)' if r.critical else ''} cannot be judged: {r.reason}"
               for r in overall if r.no_input]
    overdue = []
    if first_candidate_s is not None and now - first_candidate_s >= settings.budget_s:
        overdue = [r for r in overall if r.critical and not r.no_input
                   and r.state in ("inconclusive", "insufficient_data")]
    if fails or overdue:
        reasons = [f"{r.rule} fails for {r.cohort}: {r.reason}" for r in fails]
        reasons += [f"{r.rule} (critical) is still {r.state} for all traffic after the budget of"
                    f" {readable_duration(settings.budget_s)}: {r.reason}. A critical rule still undecided"
                    f" `gate.budget` after the first candidate trace blocks" for r in overdue]
        return "block", reasons + missing
    # past its margin at the confidence sequence's level but not yet after the correction: not a
    # fail, and no reason to promote either
    holding = [f"{r.rule} for {r.cohort} is not yet a fail: {r.reason}" for r in results
               if r.state == "inconclusive" and r.past_margin]
    if overall and all(r.state == "pass" for r in overall) and not holding:
        return "promote", [f"every rule passes on all traffic and no cohort fails ({len(results)} results)"]
    waiting = [f"{r.rule} is {r.state} for all traffic: {r.reason}" for r in overall
               if r.state != "pass" and not r.no_input and not r.past_margin]
    return "inconclusive", (missing + holding + waiting) or ["no baseline and candidate traces in the window"]


def route_summary_sql(labels, eval_names=(), source: str = "t") -> str:
    """Per cohort (all, then each label value) and route over relation ``t``: traces and each measure's
    mean (p99 for duration), for the report's side-by-side charts."""
    labels = tuple(labels)
    cohort = " ".join(f"WHEN GROUPING({_q(lab)}) = 0 THEN {_lit(lab + '=')} || coalesce({_q(lab)}, 'unknown')"
                      for lab in labels)
    cohort = f"CASE {cohort} ELSE 'all' END" if labels else "'all'"
    sets = ", ".join(["(route)", *[f"(route, {_q(lab)})" for lab in labels]])
    evals = "".join(f", avg({_q('eval_pass:' + n)}) AS {_q(n + '_pass_rate')}" for n in eval_names)
    return (f"SELECT {cohort} AS cohort, route, count(*) AS traces,"
            " quantile_cont(duration, 0.99) AS p99_duration_s, avg(cost) AS cost_per_trace_usd,"
            " avg(steps) AS steps_mean, avg(refused) AS refusal_rate, avg(escalated) AS escalation_rate"
            f"{evals} FROM {source} WHERE route IN ('baseline', 'candidate') GROUP BY GROUPING SETS ({sets})"
            " ORDER BY cohort <> 'all', cohort, route")
