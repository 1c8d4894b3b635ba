"""Trace relation -> sufficient statistics, in one DuckDB statement (and the report's per-route summary).

The relation ``t`` has the trace-frame columns (analyzers/compare.py): the store's traces table in
analyzers/gate.py, or a polars frame registered as ``t``. The statement pools small cohorts, pairs
baseline and candidate traces by request id, and aggregates with GROUPING SETS (all traffic and each
label); only a few hundred rows come back. 1M traces take well under a second.
"""
from __future__ import annotations

import threading

from .effects import quantile_grid
from .rules import GateSettings, Rule

ALL = "all"
OTHER = "__other__"


def measure_column(rule: Rule) -> str:
    """The trace-frame column a rule reads."""
    if rule.eval:
        return f"{rule.column}:{rule.eval}"
    return rule.column


def sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_literal(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


_q, _lit = sql_ident, sql_literal   # short forms for the SQL builders below


def _cohort_expr(labels: tuple, coalesce: bool = False) -> str:
    """The cohort a GROUPING SETS row is about: "label=value", or 'all'."""
    value = (lambda lab: f"coalesce({_q(lab)}, 'unknown')") if coalesce else _q
    cohort = " ".join(f"WHEN GROUPING({_q(lab)}) = 0 THEN {_lit(lab + '=')} || {value(lab)}" for lab in labels)
    return f"CASE {cohort} ELSE 'all' END" if labels else "'all'"


def stats_sql(settings: GateSettings, labels, source: str = "t") -> str:
    """The statement computing every rule's sufficient statistics from ``source`` (a relation or a subquery)."""
    labels = tuple(labels)
    moment_cols = sorted({measure_column(r) for r in settings.rules if r.quantile is None})
    quantile_rules = {measure_column(r): r for r in settings.rules if r.quantile is not None}
    # only the columns the rules read: tp is materialized, and narrower is cheaper
    needed = [_q(c) for c in dict.fromkeys(["route", "request_id", "start_s", *moment_cols, *quantile_rules])]
    ctes = _pooled_ctes(labels, needed, settings.min_samples, source)
    ctes += _pair_ctes(labels, moment_cols, settings.pairing_window_s)
    binary = {measure_column(r) for r in settings.rules if r.binary}
    cohort = _cohort_expr(labels)
    # every pair has exactly one value of the first label, so all traffic is the sum of its cohorts:
    # one grouping set fewer over the pairs (sufficient_stats adds them up)
    sets = ", ".join([f"({_q(lab)})" for lab in labels] or ["()"])
    route_sets = ", ".join(["(route)", *[f"(route, {_q(lab)})" for lab in labels]])
    selects = [f"SELECT 'paired' AS kind, NULL AS route, {cohort} AS cohort, count(*) AS pairs"
               f"{''.join(', ' + x for x in _paired_sums(moment_cols, binary))} FROM p GROUP BY GROUPING SETS ({sets})",
               f"SELECT 'route' AS kind, route, {cohort} AS cohort, {', '.join(_route_sums(moment_cols, quantile_rules))}"
               f" FROM tp GROUP BY GROUPING SETS ({route_sets})",
               "SELECT 'keyed' AS kind, NULL AS route, 'all' AS cohort, count(*) FILTER (WHERE nb > 0) AS keyed_b,"
               " count(*) FILTER (WHERE nc > 0) AS keyed_c FROM k"]
    return "WITH " + ", ".join(ctes) + " " + " UNION ALL BY NAME ".join(selects)


def _pooled_ctes(labels: tuple, needed: list[str], n: int, source: str) -> list[str]:
    """t0: the columns the rules read, from both routes; tp: the same with each label's values of fewer
    than ``n`` traces on either route pooled into ``OTHER``."""
    fill = ", ".join(f"coalesce({_q(lab)}, 'unknown') AS {_q(lab)}" for lab in labels)
    ctes = [f"t0 AS (SELECT {', '.join(needed + ([fill] if labels else []))}"
            f" FROM {source} WHERE route IN ('baseline', 'candidate'))"]
    if labels:
        ctes.append(", ".join(
            f"{_q('small_' + lab)} AS (SELECT {_q(lab)} AS v FROM t0 GROUP BY {_q(lab)} HAVING least("
            f"count(*) FILTER (WHERE route = 'baseline'), count(*) FILTER (WHERE route = 'candidate')) < {n})"
            for lab in labels))
    pooled = ", ".join(
        f"CASE WHEN {_q(lab)} IN (SELECT v FROM {_q('small_' + lab)}) THEN '{OTHER}' ELSE {_q(lab)} END AS {_q(lab)}"
        for lab in labels)
    ctes.append(f"tp AS MATERIALIZED (SELECT * {'REPLACE (' + pooled + ')' if labels else ''} FROM t0)")
    return ctes


def _pair_ctes(labels: tuple, moment_cols: list[str], pairing_window_s: float) -> list[str]:
    """k: one row per request id with each route's values; p: the pairs, started within the pairing window."""
    # pairing as one hash aggregate by request id (cheaper than two de-duplications and a join); a request
    # id seen twice on one route keeps one of its traces
    keep = [*labels, "start_s", *moment_cols]
    per_route = ", ".join(f"any_value({_q(col)}) FILTER (WHERE route = '{route}') AS {_q(col + suffix)}"
                          for route, suffix in (("baseline", ""), ("candidate", "_c")) for col in keep)
    # grouping on hash(request_id) (64 bits; a collision among a million ids has odds ~1e-8) is much
    # cheaper than grouping on the text
    k = ("k AS (SELECT hash(request_id) AS rid, count(*) FILTER (WHERE route = 'baseline') AS nb,"
         f" count(*) FILTER (WHERE route = 'candidate') AS nc, {per_route}"
         " FROM tp WHERE request_id IS NOT NULL GROUP BY rid)")
    # pairs, each measure masked to NULL unless both routes know it (so n and the sums agree)
    masked = ", ".join(
        f"CASE WHEN {_q(col)} IS NOT NULL AND {_q(col + '_c')} IS NOT NULL THEN {_q(col + side)} END AS {_q(col + side)}"
        for col in moment_cols for side in ("", "_c"))
    p = (f"p AS (SELECT {', '.join([*map(_q, labels), masked]) if (labels or masked) else '1 AS one'}"
         f" FROM k WHERE nb > 0 AND nc > 0 AND abs(start_s - start_s_c) <= {float(pairing_window_s)!r})")
    return [k, p]


def _paired_sums(moment_cols: list[str], binary: set[str]) -> list[str]:
    """Per measure over the pairs: n, Σb, Σc, Σbc, and Σb², Σc² unless the measure is 0/1."""
    sums = []
    for col in moment_cols:
        b, c = _q(col), _q(col + "_c")
        sums += [f"count({b}) AS {_q(col + '|n')}", f"sum({b}) AS {_q(col + '|sb')}", f"sum({c}) AS {_q(col + '|sc')}",
                 f"sum({b} * {c}) AS {_q(col + '|sbc')}"]
        if col not in binary:       # for 0/1 values x*x = x: Σb² = Σb, no need to sum it again
            sums += [f"sum({b} * {b}) AS {_q(col + '|sbb')}", f"sum({c} * {c}) AS {_q(col + '|scc')}"]
    return sums


def _route_sums(moment_cols: list[str], quantile_rules: dict[str, Rule]) -> list[str]:
    """Per route: traces, the first start, each measure's n, Σ and Σ², and each quantile rule's grid."""
    sums = ["count(*) AS traces", "min(start_s) AS first_start"]
    for col in moment_cols:
        sums += [f"count({_q(col)}) AS {_q(col + '|n')}", f"sum({_q(col)}) AS {_q(col + '|s')}",
                 f"sum({_q(col)} * {_q(col)}) AS {_q(col + '|ss')}"]
    for col, rule in quantile_rules.items():
        grid = ", ".join(repr(x) for x in quantile_grid(rule))
        sums += [f"count({_q(col)}) FILTER (WHERE {_q(col)} > 0) AS {_q(col + '|qn')}",
                 f"quantile_cont({_q(col)}, [{grid}]) FILTER (WHERE {_q(col)} > 0) AS {_q(col + '|qs')}"]
    return sums


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


def route_summary_sql(labels, eval_names=(), source: str = "t") -> str:
    """Per cohort (all, then each label value) and route over relation ``t``: traces and each measure's
    mean (p99 for duration), for the report's side-by-side charts."""
    labels = tuple(labels)
    cohort = _cohort_expr(labels, coalesce=True)
    sets = ", ".join(["(route)", *[f"(route, {_q(lab)})" for lab in labels]])
    evals = "".join(f", avg({_q('eval_pass:' + n)}) AS {_q(n + '_pass_rate')}" for n in eval_names)
    return (f"SELECT {cohort} AS cohort, route, count(*) AS traces,"
            " quantile_cont(duration, 0.99) AS p99_duration_s, avg(cost) AS cost_per_trace_usd,"
            " avg(steps) AS steps_mean, avg(refused) AS refusal_rate, avg(escalated) AS escalation_rate"
            f"{evals} FROM {source} WHERE route IN ('baseline', 'candidate') GROUP BY GROUPING SETS ({sets})"
            " ORDER BY cohort <> 'all', cohort, route")
