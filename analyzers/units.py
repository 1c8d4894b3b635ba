"""Per-call units: where one trace holds both routes' calls, the unit compared is the LLM call, not the trace.

A gateway that mirrors a request to a second model (LiteLLM's ``silent_model``) puts both calls in the
application's trace when the application has a span of its own around the call
(``USE_OTEL_LITELLM_REQUEST_SPAN=true``): the two calls are children of one parent span. Compared as a
trace, that trace is neither baseline nor candidate. So the calls are compared instead:

* decode gives a gateway's marked call its own route (``candidate``: collector/decode/litellm.py);
* here, the LLM spans of a gateway scope (``GATEWAY_SCOPES``) that share a parent span with a candidate call
  form one **pair unit**: the candidate call and the other call (the baseline), keyed by
  ``<trace_id>:<parent_span_id>``;
* each call of a pair unit becomes a row of ``traces`` shaped like a trace row (route, request_id = that
  key, the trace's cohort values, the call's duration, tokens, cost, refusal; ``call_span_id`` = the call's
  span), so the gate, the window and the pair counters judge calls with the statistics they use for traces;
* the trace's own row is routed ``calls`` (stored, never compared): its totals mix both routes.

A parent with a candidate call and more than one other call (or several candidate calls) cannot be
paired for sure: it is counted ``ambiguous`` (``shadowlens_pairs_total{status="ambiguous"}``) and gives no
units. A candidate call with no sibling is a unit alone (counted unmatched_candidate by the pair counters).
Any gateway whose decode step marks its mirrored call with a route reuses this by adding its scope below.
"""
from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from shadowlens.collector.decode.aliases import LITELLM_SCOPES
from shadowlens.collector.schema import with_trace_id_ints

# Instrumentation scopes of gateways that mark their mirrored call (a span route) under the caller's span.
GATEWAY_SCOPES = tuple(sorted(LITELLM_SCOPES))
CALLS = "calls"        # the route of a trace whose calls are compared instead (not baseline/candidate)

_SCOPES_SQL = ", ".join(f"'{s}'" for s in GATEWAY_SCOPES)

# The due traces' gateway LLM calls under a parent that has a candidate call among its children.
# Parameters $lo / $hi as rollup_sql's; relation ``done(trace_id, evicted)``.
CALLS_SQL = f"""
WITH c AS (
    SELECT d.trace_id, printf('%016x', sc.span_id_int) AS span_id,
        printf('%016x', sc.parent_span_id_int) AS parent_span_id, sc.route, sc.name, sc.start_time, sc.end_time,
        sc.duration_seconds, sc.model, sc.input_tokens, sc.output_tokens, sc.cache_read_tokens,
        sc.cache_write_tokens, sc.reasoning_tokens, sc.cost_usd, sc.refused, sc.escalated,
        bool_or(sc.route = 'candidate') OVER (PARTITION BY d.trace_id, sc.parent_span_id_int) AS _has_candidate
    FROM spans_core sc JOIN {with_trace_id_ints("done")} d USING (trace_id_hi, trace_id_lo)
    WHERE sc.ingest_seq BETWEEN $lo AND $hi AND sc.span_kind = 'LLM' AND sc.parent_span_id_int IS NOT NULL
      AND sc.scope_name IN ({_SCOPES_SQL})
)
SELECT * EXCLUDE (_has_candidate) FROM c WHERE _has_candidate
"""

# Columns a unit row copies from its trace's row (the rest describe the call).
_FROM_TRACE = ("incomplete", "span_count", "session_id", "service_name", "min_ingest_seq", "max_ingest_seq",
               "completed_at", "revision")


@dataclass(frozen=True)
class CallUnits:
    """``rows``: the trace rows (routed ``calls`` where their calls are compared); ``units``: one row per call
    of a pair unit, with the traces table's columns and ``call_span_id``; ``ambiguous``: parents not paired."""
    rows: pl.DataFrame
    units: pl.DataFrame | None
    ambiguous: int


def call_units(rows: pl.DataFrame, calls: pl.DataFrame, cohort_labels) -> CallUnits:
    """Pair units from ``CALLS_SQL``'s rows; ``rows``: the same round's trace rows (routes and revisions set).

    >>> import datetime as dt
    >>> t0 = dt.datetime(2026, 1, 1)
    >>> rows = pl.DataFrame({"trace_id": ["t1"], "route": ["candidate"], "language": ["de"], "incomplete": [False],
    ...     "span_count": [5], "session_id": [None], "service_name": ["app"], "min_ingest_seq": [1],
    ...     "max_ingest_seq": [1], "completed_at": [t0], "revision": [0]})
    >>> calls = pl.DataFrame({"trace_id": ["t1", "t1"], "span_id": ["a", "b"], "parent_span_id": ["p", "p"],
    ...     "route": [None, "candidate"], "name": ["litellm_request"] * 2, "start_time": [t0, t0],
    ...     "end_time": [t0, t0], "duration_seconds": [0.2, 0.5], "model": ["gpt", "rlaif"],
    ...     "input_tokens": [10, 10], "output_tokens": [5, 7], "cache_read_tokens": [None, None],
    ...     "cache_write_tokens": [None, None], "reasoning_tokens": [None, None], "cost_usd": [1e-5, 2e-5],
    ...     "refused": [None, True], "escalated": [None, None]})
    >>> out = call_units(rows, calls, ["language"])
    >>> out.rows["route"].to_list(), out.units.select("route", "request_id", "language", "refused").rows()
    (['calls'], [('baseline', 't1:p', 'de', False), ('candidate', 't1:p', 'de', True)])
    """
    if calls.height == 0:
        return CallUnits(rows, None, 0)
    key = ["trace_id", "parent_span_id"]
    is_cand = pl.col("route") == "candidate"
    groups = calls.group_by(key).agg(is_cand.sum().alias("_cands"), pl.len().alias("_calls"))
    ok = groups.filter((pl.col("_cands") == 1) & (pl.col("_calls") <= 2)).select(key)
    ambiguous = groups.height - ok.height
    routed = rows.with_columns(pl.when(pl.col("trace_id").is_in(groups["trace_id"].unique().implode()))
                               .then(pl.lit(CALLS)).otherwise(pl.col("route")).alias("route"))
    if ok.height == 0:
        return CallUnits(routed, None, ambiguous)
    trace_part = rows.select("trace_id", *[c for c in (*cohort_labels, *_FROM_TRACE) if c in rows.columns])
    no_names = pl.lit([], dtype=pl.List(pl.Utf8))
    units = (calls.join(ok, on=key, how="inner").join(trace_part, on="trace_id", how="inner")
             .sort(["trace_id", "parent_span_id", "start_time"])
             .with_columns(
                 pl.when(is_cand).then(pl.lit("candidate")).otherwise(pl.lit("baseline")).alias("route"),
                 (pl.col("trace_id") + ":" + pl.col("parent_span_id")).alias("request_id"),
                 pl.lit(1, pl.Int64).alias("steps"), pl.lit(1, pl.Int64).alias("llm_calls"),
                 pl.lit(0, pl.Int64).alias("tool_calls"), pl.lit(0, pl.Int64).alias("evals_total"),
                 pl.lit(0, pl.Int64).alias("evals_failed"),
                 pl.col("refused").fill_null(False), pl.col("escalated").fill_null(False),
                 pl.col("model").alias("models"), pl.col("name").alias("root_name"),
                 no_names.alias("eval_names"), no_names.alias("failed_evals"),
                 pl.col("span_id").alias("call_span_id"))
             .drop("span_id", "parent_span_id", "name"))
    return CallUnits(routed, units, ambiguous)
