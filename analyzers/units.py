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

**Pairing by request content** (``ContentPairer``): without an application span each LiteLLM call is the root
of its own trace and nothing links the two. A gateway's root call that has no ``shadow.request_id`` is keyed by
its ``gen_ai.input.messages`` (a hash; the text is read back from the payload for these calls only): a
candidate call and a non-candidate call with the same content whose starts are at most
``traces.content_pairing_seconds`` apart get one request id (``content:<trace id of the first>``), so the
trace-level pairing judges them as any shadow pair. Never two calls of one route; a call with more than one
possible twin (the same prompt sent twice at once) is counted ``ambiguous`` and keeps an id of its own.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import polars as pl

from shadowlens.collector.decode.aliases import LITELLM_SCOPES
from shadowlens.collector.schema import with_trace_id_ints

# Instrumentation scopes of gateways that mark their mirrored call (a span route) under the caller's span.
GATEWAY_SCOPES = tuple(sorted(LITELLM_SCOPES))
CALLS = "calls"        # the route of a trace whose calls are compared instead (not baseline/candidate)

_SCOPES_SQL = ", ".join(f"'{s}'" for s in GATEWAY_SCOPES)

# The due traces' gateway LLM calls under a parent that has a candidate call among its children.
# Parameters $lo / $hi as rollup.spans_sql's; relation ``done(trace_id, evicted)``.
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

# The due traces' gateway calls that are the root of their trace, with a hash of their input messages (NULL
# without content capture). The messages are in the span's attributes, read back from the payload log.
ROOT_CALLS_SQL = f"""
SELECT trace_id, start_ns, route, hash(content) AS content FROM (
    SELECT d.trace_id, epoch_ns(sc.start_time) AS start_ns, sc.route,
        json_extract_string(CAST(shadowlens_span_json(p.segment, p.byte_offset, p.length, sc.rs_idx, sc.ss_idx,
            sc.sp_idx, 'attributes') AS JSON), '$."gen_ai.input.messages"') AS content
    FROM spans_core sc JOIN {with_trace_id_ints("done")} d USING (trace_id_hi, trace_id_lo)
        LEFT JOIN payloads p USING (payload_id)
    WHERE sc.ingest_seq BETWEEN $lo AND $hi AND sc.span_kind = 'LLM' AND sc.parent_span_id_int IS NULL
      AND sc.scope_name IN ({_SCOPES_SQL})
) WHERE content IS NOT NULL
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


@dataclass(slots=True)
class _Waiting:
    start_ns: int
    candidate: bool
    request_id: str
    open: bool = True


class ContentPairer:
    """Request ids for a gateway's root calls by identical content within ``window_s`` (see the module doc).

    State across rounds: the calls still waiting for their twin, by content hash, forgotten ``horizon_s``
    after their start (by the newest start seen) or beyond ``max_waiting``. Used by the assembler's thread only.

    >>> p = ContentPairer(window_s=1.0, horizon_s=60.0)
    >>> rows = pl.DataFrame({"trace_id": ["a", "b", "c"], "request_id": [None, None, None]})
    >>> roots = pl.DataFrame({"trace_id": ["a", "b", "c"], "start_ns": [0, 200_000_000, 5_000_000_000],
    ...                       "route": [None, "candidate", "candidate"], "content": [7, 7, 7]})
    >>> out, ambiguous = p.assign(rows, roots)
    >>> out["request_id"].to_list(), ambiguous
    (['content:a', 'content:a', 'content:c'], 0)
    """

    def __init__(self, window_s: float, horizon_s: float, max_waiting: int = 100_000):
        self.window_ns = int(window_s * 1e9)
        self.horizon_ns = int(horizon_s * 1e9)
        self.max_waiting = max_waiting
        self._by_content: dict[int, list[_Waiting]] = {}
        self._order: deque[tuple[int, int, _Waiting]] = deque()    # (start_ns, content, call), by arrival
        self._newest = 0

    def assign(self, rows: pl.DataFrame, roots: pl.DataFrame) -> tuple[pl.DataFrame, int]:
        """``rows`` with request ids for the calls of ``roots`` (ROOT_CALLS_SQL's rows) that have none;
        returns them and the number of calls with more than one possible twin."""
        if self.window_ns <= 0 or roots.height == 0:
            return rows, 0
        keyed = set(rows.filter(pl.col("request_id").is_not_null())["trace_id"].to_list())
        ids: dict[str, str] = {}
        ambiguous = 0
        for tid, start, route, content in roots.sort("start_ns").iter_rows():
            if tid in keyed:
                continue
            candidate = route == "candidate"
            waiting = self._by_content.setdefault(content, [])
            twins = [w for w in waiting if w.open and w.candidate != candidate
                     and abs(w.start_ns - start) <= self.window_ns]
            if len(twins) == 1:
                twins[0].open = False
                ids[tid] = twins[0].request_id
                continue
            ids[tid] = f"content:{tid}"
            if twins:          # the same prompt twice at once: which call mirrors which is unknown
                ambiguous += 1
                continue
            call = _Waiting(start, candidate, ids[tid])
            waiting.append(call)
            self._order.append((start, content, call))
            self._newest = max(self._newest, start)
        self._forget()
        if not ids:
            return rows, ambiguous
        given = pl.DataFrame({"trace_id": list(ids), "_rid": list(ids.values())}, schema={"trace_id": pl.Utf8, "_rid": pl.Utf8})
        rows = rows.join(given, on="trace_id", how="left").with_columns(
            pl.coalesce("request_id", "_rid").alias("request_id")).drop("_rid")
        return rows, ambiguous

    def _forget(self) -> None:
        order, by_content = self._order, self._by_content
        while order and (order[0][0] < self._newest - self.horizon_ns or len(order) > self.max_waiting
                         or not order[0][2].open):
            _, content, call = order.popleft()
            waiting = by_content.get(content)
            if waiting is not None:
                waiting[:] = [w for w in waiting if w is not call and w.open]
                if not waiting:
                    del by_content[content]
