"""Evidence for the gate's failing results: example pairs, and the cohort that explains a failure.

The verdict says *that* the candidate is worse; this module says *where to look*:

* **Example pairs.** For each failing result, up to five matched pairs (one ``shadow.request_id``,
  a baseline and a candidate trace) that show the regression most clearly: for a rate, discordant
  pairs in the worse direction (baseline answered, candidate refused); for a mean, the largest
  candidate/baseline ratios; for a quantile, the candidate traces past the baseline's quantile with
  the largest ratios. One bounded statement for all failing results (a top-k per result).
* **Attribution.** Cohorts overlap (every request has an intent, a language and a tier), so one real
  regression fails many cohorts. A failing result is *explained by* a failing cohort B of another label
  when the gate's own judging (``compare.judge``) over the window without B's traces no longer fails it
  and puts its estimate back inside the margin. Failing results explained by no other cohort are the
  *root causes*; the verdict's reasons list them first, each followed by the results it explains.

Only failing results are examined and the number of cohorts re-judged without their traces is capped
(``MAX_EXCLUSIONS``, strongest first), so a refresh costs at most a few more gate statements.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from typing import Callable
from urllib.parse import quote

import pyarrow as pa

from .compare import ALL, OTHER, Comparison, Verdict, judge, measure_column, statistics
from .compare import sql_ident as _q
from .compare import sql_literal as _lit
from .rules import GateSettings, Rule

EXAMPLES = 5               # example pairs per failing result in /gate, gate --format json and report
MAX_EXCLUSIONS = 8         # cohorts re-judged without their traces per evaluation (each is one gate statement)
NO_TRACE_DATA = ("no trace data: example pairs are read from the store's traces (serve's /gate,"
                 " `shadowlens gate --data-dir`, `shadowlens report`); this verdict was judged without them")
NO_PAIRS = ("no example pairs: no baseline and candidate trace of one shadow.request_id differ this way"
            " (without request ids the gate compares unpaired)")

# per-trace value words for pass/fail measures: (when the measure is 1, when it is 0)
_WORDS = {"refusal_rate": ("refused", "answered"), "escalation_rate": ("escalated", "not escalated"),
          "eval_pass_rate": ("passed", "failed"), "eval_fail_rate": ("failed", "passed")}
_UNITS = {"cost": "usd", "duration": "s", "steps": "steps", "tokens": "tokens"}


@dataclass(frozen=True)
class ExplainedVerdict(Verdict):
    """A Verdict with its evidence; keyed by (rule, cohort) of the results it is about."""
    examples: dict = field(default_factory=dict)        # -> tuple of example dicts (see example_pairs)
    explained_by: dict = field(default_factory=dict)    # failing results -> "label=value" or None (root cause)
    trace_url: str | None = None                        # links.trace_url: "...{trace_id}..."
    examples_note: str | None = None                    # why there are no examples, when there cannot be any


def trace_link(template: str | None, trace_id: str | None) -> str | None:
    """links.trace_url with the trace id in place of ``{trace_id}`` (replace, not str.format: trace UIs'
    URLs, such as Grafana's explore state, are full of other braces)."""
    if not template or not trace_id:
        return None
    return template.replace("{trace_id}", quote(str(trace_id), safe=""))


# ---------------------------------------------------------------- cohorts as SQL conditions

def listed_values(verdict: Verdict) -> dict[str, list[str]]:
    """label -> the values judged as cohorts of their own; every other value was pooled into __other__."""
    out: dict[str, list[str]] = {}
    for r in verdict.results:
        label, _, value = r.cohort.partition("=")
        if r.cohort != ALL and value != OTHER:
            out.setdefault(label, [])
            if value not in out[label]:
                out[label].append(value)
    return out


def cohort_condition(cohort: str, listed: dict[str, list[str]], column=None) -> str:
    """A SQL condition true for the traces (or pairs) of ``cohort``, the way the gate forms cohorts:
    a missing value is 'unknown', small values are pooled into __other__."""
    if cohort == ALL:
        return "TRUE"
    label, _, value = cohort.partition("=")
    col = f"coalesce({column or _q(label)}, 'unknown')"
    if value != OTHER:
        return f"{col} = {_lit(value)}"
    values = listed.get(label, [])
    return f"{col} NOT IN ({', '.join(map(_lit, values))})" if values else "TRUE"


# ---------------------------------------------------------------- example pairs

def _order(rule: Rule, b: str, c: str, pairs: str, where: str) -> tuple[str, str]:
    """(condition, ORDER BY) picking the pairs that show a regression on ``rule`` most clearly."""
    if rule.binary:     # discordant pairs in the worse direction, the latest first
        worse, better = ("1", "0") if rule.worse > 0 else ("0", "1")
        return f"{b} = {better} AND {c} = {worse}", "start_s DESC"
    toward = f"({c} - {b}) * {rule.worse}"
    if rule.kind == "difference":
        return f"{toward} > 0", f"{toward} DESC, start_s DESC"
    ratio = f"{c} / {b}"
    if rule.quantile is None:
        return f"{b} > 0 AND {c} > {b}", f"{ratio} DESC, {c} - {b} DESC, start_s DESC"
    # a quantile: the candidate's tail, i.e. candidate traces past the baseline's quantile in this cohort
    tail = f"(SELECT quantile_cont({b}, {rule.quantile!r}) FROM {pairs} WHERE {where})"
    return f"{b} > 0 AND {c} > {b}", f"{c} >= {tail} DESC, {ratio} DESC, start_s DESC"


def example_sql(settings: GateSettings, labels, frame_sql: str, targets: list[tuple[Rule, str]],
                listed: dict[str, list[str]], limit: int) -> str:
    """One statement: the window's pairs (as the gate pairs them), then the top ``limit`` pairs of each target."""
    labels = tuple(labels)
    cols = list(dict.fromkeys(measure_column(rule) for rule, _ in targets))
    keep = ["trace_id", "request_id", "start_s", *labels, *cols]
    row = "{" + ", ".join(f"{_lit(k)}: {_q(k)}" for k in keep) + "}"
    names = {c: f"m{i}" for i, c in enumerate(cols)}      # measure columns as plain identifiers
    pick = ", ".join([*(f"b.{_q(lab)} AS {_q(lab)}" for lab in labels),
                      *(f"b.{_q(c)} AS {names[c]}_b, c.{_q(c)} AS {names[c]}_c" for c in cols)])
    # only the traces of the failing cohorts (both routes of a request share its cohort), grouped on the
    # id's hash as the gate's statistics do: a third of the time of grouping on the text
    cohorts = " OR ".join(dict.fromkeys(cohort_condition(cohort, listed) for _, cohort in targets))
    ctes = [f"w AS ({frame_sql})",
            f"k AS (SELECT any_value({row}) FILTER (WHERE route = 'baseline') AS b,"
            f" any_value({row}) FILTER (WHERE route = 'candidate') AS c"
            f" FROM w WHERE request_id IS NOT NULL AND ({cohorts}) GROUP BY hash(request_id))",
            # the cohort of a pair is its baseline trace's, as in the gate's statistics
            "p AS MATERIALIZED (SELECT b.request_id AS request_id, b.trace_id AS b_trace, c.trace_id AS c_trace,"
            f" b.start_s AS start_s, {pick} FROM k WHERE b IS NOT NULL AND c IS NOT NULL"
            f" AND abs(b.start_s - c.start_s) <= {float(settings.pairing_window_s)!r})"]
    selects = []
    for i, (rule, cohort) in enumerate(targets):
        b, c = f"{names[measure_column(rule)]}_b", f"{names[measure_column(rule)]}_c"
        where = f"{cohort_condition(cohort, listed)} AND {b} IS NOT NULL AND {c} IS NOT NULL"
        cond, order = _order(rule, b, c, "p", where)
        selects.append(f"(SELECT {i} AS target, row_number() OVER (ORDER BY {order}, request_id) AS rank, request_id,"
                       f" b_trace, c_trace, {b}::DOUBLE AS b_value, {c}::DOUBLE AS c_value FROM p"
                       f" WHERE {where} AND {cond} ORDER BY rank LIMIT {int(limit)})")
    return "WITH " + ", ".join(ctes) + " " + " UNION ALL ".join(selects) + " ORDER BY target, rank"


def describe_pair(rule: Rule, b: float | bool | None, c: float | bool | None) -> str:
    """'baseline answered, candidate refused' or 'cost $0.012 → $0.031 (x2.58)'."""
    if rule.binary:
        yes, no = _WORDS[rule.measure]
        word = lambda v: "-" if v is None else (yes if v else no)
        what = f"{rule.eval} " if rule.eval else ""
        return f"{what}baseline {word(b)}, candidate {word(c)}"
    if b is None or c is None:
        return f"{rule.measure} {b} → {c}"
    fmt = {"cost": lambda v: f"${v:.3g}", "duration": lambda v: f"{v:.3g} s"}.get(rule.measure, lambda v: f"{v:,.4g}")
    ratio = f" (x{c / b:.3g})" if b > 0 else ""
    return f"{rule.measure} {fmt(b)} → {fmt(c)}{ratio}"


def example_pairs(run_sql: Callable[[str], pa.Table], settings: GateSettings, labels, frame_sql: str,
                  verdict: Verdict, targets: list[tuple[str, str]], limit: int = EXAMPLES,
                  trace_url: str | None = None) -> dict[tuple[str, str], tuple[dict, ...]]:
    """(rule, cohort) -> up to ``limit`` example pairs, each {request_id, baseline_trace_id,
    candidate_trace_id, baseline_value, candidate_value, unit, display} (+ the two trace links when
    ``trace_url`` is set). Pass/fail values are booleans (true: refused, passed, ... as the measure says)."""
    rules = {r.name: r for r in settings.rules}
    wanted = [(rules[name], cohort) for name, cohort in targets if name in rules]
    if not wanted:
        return {}
    rows = run_sql(example_sql(settings, labels, frame_sql, wanted, listed_values(verdict), limit)).to_pylist()
    out: dict[tuple[str, str], list[dict]] = {(rule.name, cohort): [] for rule, cohort in wanted}
    for row in rows:
        rule, cohort = wanted[row["target"]]
        b, c = row["b_value"], row["c_value"]
        if rule.binary:
            b, c = (None if b is None else bool(b)), (None if c is None else bool(c))
        example = {"request_id": row["request_id"], "baseline_trace_id": row["b_trace"],
                   "candidate_trace_id": row["c_trace"], "baseline_value": _plain(b), "candidate_value": _plain(c),
                   "unit": "bool" if rule.binary else _UNITS.get(rule.measure, ""),
                   "display": describe_pair(rule, b, c)}
        if trace_url:
            example["baseline_trace_url"] = trace_link(trace_url, row["b_trace"])
            example["candidate_trace_url"] = trace_link(trace_url, row["c_trace"])
        out[(rule.name, cohort)].append(example)
    return {key: tuple(v) for key, v in out.items()}


def _plain(v):
    if isinstance(v, float):
        return float(f"{v:.9g}") if math.isfinite(v) else None      # significant digits: costs are small
    return v


# ---------------------------------------------------------------- attribution

def _strength(r: Comparison) -> tuple:
    """Stronger failures first: smaller p-value, then the effect further from no change."""
    far = abs(math.log(r.effect)) if r.kind == "ratio" and r.effect and r.effect > 0 else abs(r.effect or 0.0)
    return (r.p_value if r.p_value is not None else 1.0, -far, r.rule, r.cohort)


def _back_inside(rule: Rule, again: Comparison | None) -> bool:
    """Is the re-judged result back inside its margin? Judged by compare.judge (its state), and its
    estimate not past the margin: a result that only lost the power to fail is not explained."""
    if again is None or again.state in ("fail", "insufficient_data"):
        return False
    return again.state == "pass" or (again.effect is not None and not rule.beyond(again.effect))


def attribute(run_sql: Callable[[str], pa.Table], settings: GateSettings, labels, frame_sql: str,
              verdict: Verdict) -> dict[tuple[str, str], str | None]:
    """Failing (rule, cohort) -> the cohort "label=value" that explains it, or None for a root cause.

    A failing result R is explained by a failing cohort B (same rule, another label) when the gate,
    judging the window without B's traces, puts R back inside its margin. Explanations point at root
    causes: when failures explain each other, the strongest becomes the root cause."""
    rules = {r.name: r for r in settings.rules}
    fails = sorted((r for r in verdict.results if r.state == "fail" and r.rule in rules), key=_strength)
    if not fails:
        return {}
    label_of = lambda cohort: cohort.partition("=")[0]
    candidates = {(r.rule, r.cohort): [b.cohort for b in fails if b.rule == r.rule and b.cohort != ALL
                                       and label_of(b.cohort) != label_of(r.cohort)] for r in fails}
    listed = listed_values(verdict)
    explains: dict[tuple[str, str], list[str]] = {key: [] for key in candidates}
    # cohorts in the order of their strongest failure; a cohort whose own failures are all explained
    # already is not a root cause, so excluding it is skipped (the demo: 3 statements, not 20)
    tried = 0
    for b in dict.fromkeys(r.cohort for r in fails if r.cohort != ALL):
        names = {name for (name, _), cands in candidates.items() if b in cands and not explains.get((name, b))}
        if not names or tried == MAX_EXCLUSIONS:
            continue
        tried += 1
        concerned = replace(settings, rules=tuple(rule for rule in settings.rules if rule.name in names))
        source = f"(SELECT * FROM ({frame_sql}) AS w WHERE NOT ({cohort_condition(b, listed)})) AS t"
        again = judge(statistics(run_sql, concerned, labels, source), concerned, verdict.as_of)
        by_key = {(x.rule, x.cohort): x for x in again.results}
        for key, cands in candidates.items():
            if b in cands and key[0] in names and _back_inside(rules[key[0]], by_key.get(key)):
                explains[key].append(b)
    # roots: explained by nothing. A result is explained by the strongest root among its explainers;
    # one explained only by non-roots (failures that explain each other) waits, and if nothing moves,
    # the strongest waiting result becomes a root.
    out: dict[tuple[str, str], str | None] = {}
    roots = {key for key, e in explains.items() if not e}
    out.update({key: None for key in roots})
    waiting = [(r.rule, r.cohort) for r in fails if (r.rule, r.cohort) not in roots]
    while waiting:
        moved = False
        for key in list(waiting):
            by = next((b for b in explains[key] if (key[0], b) in roots), None)
            if by is not None:
                out[key] = by
                waiting.remove(key)
                moved = True
        if not moved:
            key = waiting.pop(0)
            roots.add(key)
            out[key] = None
    return out


def ordered_reasons(verdict: Verdict, explained_by: dict[tuple[str, str], str | None]) -> tuple[str, ...]:
    """Root causes first, each followed by the failing results it explains; the other reasons after."""
    if not explained_by:
        return verdict.reasons
    reasons = list(verdict.reasons)

    def take(rule: str, cohort: str) -> str | None:
        # compare.py writes a failing result's reason as "<rule> fails for <cohort>: ..."
        for i, text in enumerate(reasons):
            if text.startswith(f"{rule} fails for {cohort}:") or text.startswith(f"{rule} fails for {cohort} "):
                return reasons.pop(i)
        return None

    fails = [r for r in verdict.results if (r.rule, r.cohort) in explained_by]
    texts = {(r.rule, r.cohort): take(r.rule, r.cohort) or f"{r.rule} fails for {r.cohort}: {r.reason}"
             for r in fails}
    head = []
    for r in fails:
        key = (r.rule, r.cohort)
        if explained_by[key] is not None:
            continue
        head.append(f"root cause: {texts[key]}")
        head += [f"explained by {r.cohort}: {texts[other]}" for other, by in explained_by.items()
                 if by == r.cohort and other[0] == r.rule]
    return tuple(head + reasons)


# ---------------------------------------------------------------- together

def with_evidence(verdict: Verdict, run_sql: Callable[[str], pa.Table], settings: GateSettings, labels,
                  frame_sql: str, trace_url: str | None = None, limit: int = EXAMPLES) -> ExplainedVerdict:
    """The verdict with example pairs and attribution for its failing results (nothing to do without one).
    ``frame_sql`` is the window's trace frame with ``trace_id`` (analyzers/gate.py's trace_frame_sql)."""
    base = {f.name: getattr(verdict, f.name) for f in dataclasses.fields(Verdict)}
    fails = [(r.rule, r.cohort) for r in verdict.results if r.state == "fail"]
    if not fails:
        return ExplainedVerdict(**base, trace_url=trace_url)
    examples = example_pairs(run_sql, settings, labels, frame_sql, verdict, fails, limit, trace_url)
    explained = attribute(run_sql, settings, labels, frame_sql, verdict)
    base["reasons"] = ordered_reasons(verdict, explained)
    return ExplainedVerdict(**base, examples=examples, explained_by=explained, trace_url=trace_url)


def select(verdict: Verdict, run_sql: Callable[[str], pa.Table], settings: GateSettings, labels, frame_sql: str,
           rule: str | None = None, cohort: str | None = None, trace_url: str | None = None,
           limit: int = 20) -> ExplainedVerdict:
    """`shadowlens report --rule R --cohort C`: only those results, each with up to ``limit`` example pairs
    (chosen as for a failing result, whatever its state). The verdict and its reasons stay the gate's."""
    chosen = tuple(r for r in verdict.results if (rule is None or r.rule == rule) and (cohort is None or r.cohort == cohort))
    keys = [(r.rule, r.cohort) for r in chosen]
    examples = example_pairs(run_sql, settings, labels, frame_sql, verdict, keys, limit, trace_url)
    base = {f.name: getattr(verdict, f.name) for f in dataclasses.fields(ExplainedVerdict)}
    return ExplainedVerdict(**{**base, "results": chosen, "examples": examples, "trace_url": trace_url})
