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

Where each step lives: the SQL that reduces the relation to sufficient statistics in sufficient.py,
one result's estimate and its wording in effects.py; this module judges every rule x cohort and
makes the gate's Verdict.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .effects import Estimate, describe, judge_moments, judge_quantile, quantile_grid
from .rules import GateSettings, Rule
from .sequential import ebh
from .sufficient import (
    ALL,
    OTHER,
    frame_statistics,
    measure_column,
    route_summary_sql,
    sql_ident,
    sql_literal,
    statistics,
    stats_sql,
    sufficient_stats,
)

# The gate's API: the statistics' names are imported from here too (gate.py, evidence.py, exporters).
__all__ = ["ALL", "ANY_VALUE", "GATE_STATES", "OTHER", "PAIR_STATUSES", "STATES", "Comparison", "Verdict",
           "cohort_label_values", "compare", "frame_statistics", "judge", "measure_column", "no_input_reason",
           "readable_duration", "route_summary_sql", "sql_ident", "sql_literal", "statistics", "stats_sql",
           "sufficient_stats"]

ANY_VALUE = "__all__"      # a cohort label's value in metrics when the result is not about that label
STATES = ("pass", "fail", "inconclusive", "insufficient_data")
GATE_STATES = ("promote", "block", "inconclusive")
PAIR_STATUSES = ("matched", "unmatched_baseline", "unmatched_candidate")


def cohort_label_values(cohort: str, labels) -> tuple[str, ...]:
    """"language=de" -> ("__all__", "de", "__all__") for labels (intent, language, tier); "all" -> all "__all__"."""
    label, _, value = cohort.partition("=")
    return tuple(value if lab == label else ANY_VALUE for lab in labels)


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


class _LazyReason:
    """Comparison.reason of a result judge() estimated, written on its first read.

    A refresh judges ~1,000 results and writing their reasons (the effect, its confidence sequence and the
    margin with matching decimals) cost ~10 ms of serve's refresh at 8M traces, while the metrics read only
    states and numbers: the text is needed by /gate's JSON, the report and the CLI, which read it later if
    at all. judge() leaves ``reason`` out of such a result's __dict__ and puts what writes it under
    ``_why``; this non-data descriptor then answers the read and stores the text in __dict__, where later
    reads (and every Comparison made by __init__) find it without coming here. Two threads reading at once
    both write the same text."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        d = obj.__dict__
        why = d.get("_why")
        if why is None:               # another thread has just written it
            return d["reason"]
        d["reason"] = text = _reason(*why)
        d.pop("_why", None)           # the Estimate and settings are no longer needed
        return text


Comparison.reason = _LazyReason()
_new_object = object.__new__


def _comparison(fields: dict) -> Comparison:
    """A Comparison from its fields (in declaration order), without the frozen dataclass's __init__: that
    sets each of the 16 fields through object.__setattr__, ~4 ms of a refresh's 1,000 results."""
    c = _new_object(Comparison)
    c.__dict__.update(fields)
    return c


@dataclass(frozen=True)
class Verdict:
    verdict: str                             # promote | block | inconclusive
    results: tuple[Comparison, ...]
    reasons: tuple[str, ...]                 # why the verdict (blocking results first)
    as_of: float
    window_s: float
    traces: dict = field(default_factory=dict)   # route -> traces in the window
    pairs: dict = field(default_factory=dict)    # PAIR_STATUSES -> count in the window


# ---------------------------------------------------------------- judging

def _cohorts(stats: dict) -> list[str]:
    names = {c for (_, c) in stats["unpaired"]} | {c for (_, c) in stats["quantiles"]}
    return [ALL] + sorted(n for n in names if n != ALL)


def _judge(rule: Rule, cohort: str, stats: dict, alpha: float, col: str | None = None, grid=None):
    """→ (Estimate or None, n_baseline, n_candidate, paired, why-insufficient). ``col`` and ``grid`` (the
    rule's measure column and quantile grid) when judge() has them already."""
    col = measure_column(rule) if col is None else col
    need = rule.min_samples
    if rule.quantile is not None:
        sides = stats["quantiles"].get((col, cohort), {})
        (nb, gb), (nc, gc) = sides.get("baseline", (0, None)), sides.get("candidate", (0, None))
        if min(nb, nc) < need:
            return None, nb, nc, False, f"needs {need} traces per route for p{rule.quantile * 100:g}"
        return judge_quantile(rule, (nb, gb), (nc, gc), alpha, grid), nb, nc, False, ""
    p = stats["paired"].get((col, cohort))
    if p and p["n"] >= need:
        return judge_moments(rule, p, True, alpha), p["n"], p["n"], True, ""
    u = stats["unpaired"].get((col, cohort), {})
    nb, nc = u.get("nb", 0), u.get("nc", 0)
    if min(nb, nc) >= need:
        return judge_moments(rule, u, False, alpha), nb, nc, False, ""
    return None, nb, nc, False, f"needs {need} traces per route"


def compare(frame, settings: GateSettings, labels, now: float) -> Verdict:
    """The gate over an in-memory trace frame (simulations and tests; the store path is judge())."""
    return judge(frame_statistics(frame, settings, labels), settings, now)


def judge(stats: dict, settings: GateSettings, now: float) -> Verdict:
    """Sufficient statistics → every rule on every cohort → the gate's Verdict."""
    cohorts = _cohorts(stats)
    judged = []
    for rule in settings.rules:
        # per rule, not per cohort: a refresh judges ~1,000 results of a handful of rules
        col = measure_column(rule)
        grid = quantile_grid(rule) if rule.quantile is not None else None
        for cohort in cohorts:
            judged.append((rule, cohort, *_judge(rule, cohort, stats, settings.alpha, col, grid)))
    selected_ids, family = _selection(judged, settings)
    correction = f"e-BH over {family} results at {settings.fdr * 100:g}%"

    results = []
    for j in judged:
        rule, cohort, est, nb, nc, paired, why = j
        if est is None:
            traces = stats["cohort_traces"].get(cohort, 0)
            missing = nb == 0 and nc == 0 and traces > 0
            reason = (no_input_reason(rule, cohort, traces, settings.window_s) if missing
                      else f"{why}; has {nb} baseline / {nc} candidate")
            results.append(_comparison({
                "rule": rule.name, "cohort": cohort, "state": "insufficient_data", "effect": None, "lower": None,
                "upper": None, "n_baseline": nb, "n_candidate": nc, "margin": rule.margin, "reason": reason,
                "paired": paired, "p_value": None, "critical": rule.critical, "kind": rule.kind, "no_input": missing,
                "past_margin": False}))
            continue
        selected = selected_ids.get(id(j), False)
        state = ("fail" if selected else "inconclusive") if est.past else "pass" if est.within else "inconclusive"
        # the reason is written when it is first read (see _LazyReason): {"reason": ...} is left out
        results.append(_comparison({
            "rule": rule.name, "cohort": cohort, "state": state, "effect": est.effect, "lower": est.lower,
            "upper": est.upper, "n_baseline": nb, "n_candidate": nc, "margin": rule.margin,
            "_why": (rule, est, selected, family, settings, correction, paired), "paired": paired,
            "p_value": est.p_past, "critical": rule.critical, "kind": rule.kind, "no_input": False,
            "past_margin": est.past}))
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


def _reason(rule: Rule, est: Estimate, selected: bool, family: int, settings: GateSettings, correction: str | None,
            paired: bool) -> str:
    """An estimated result's Comparison.reason."""
    return (_state_text(rule, est, selected, family, settings, correction)
            + f" ({'paired' if paired else 'unpaired'}, n={est.n})")


def _state_text(rule: Rule, est: Estimate, selected: bool, family: int, settings: GateSettings,
                correction: str | None = None) -> str:
    ci, margin = describe(rule, est, settings.alpha)
    if correction is None:
        correction = f"e-BH over {family} results at {settings.fdr * 100:g}%"
    if est.past and selected:
        return (f"{ci} is past the margin {margin} (p={est.p_past:.2g} that it is within the margin;"
                f" {correction})")
    if est.past:
        return (f"{ci} is past the margin {margin}, but not yet after the correction for looking"
                f" at every result (p={est.p_past:.2g} that it is within the margin; {correction})")
    if est.within:
        return f"{ci}: within the margin {margin}"
    if not est.tests:
        return f"no estimate yet (a quantile of 0 on a route); the margin is {margin}"
    return f"{ci}: cannot yet tell it from the margin {margin}"


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
