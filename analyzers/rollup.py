"""Spans of completed traces -> one ``traces`` row each, computed by DuckDB in one statement.

Per-trace measures (CONTRACT §4–5): duration is first start -> last end; steps are the distinct
``agent.trajectory.step`` values, else the number of LLM and TOOL spans; tokens and cost are
summed over LLM spans only (NULL when no LLM span knows them); trace-level concepts come from the
root span, else any span; a missing cohort value is ``unknown``.

Distinct values are taken with ``list_distinct(list(...))``, not ``DISTINCT`` aggregates: DuckDB
plans each DISTINCT aggregate as its own group-by over a materialized copy of the spans, which
made a round's rollup ~2x slower (measured on 1,300 traces / 37k spans: see the README).
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Mapping

from collector.schema import with_trace_id_ints

_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def rollup_sql(cohort_labels) -> str:
    """SELECT producing trace rows for the trace ids in relation ``done(trace_id, evicted)``.

    Parameters: $lo and $hi (the lowest and highest ingest_seq of the spans involved: zonemaps
    skip the row groups outside), $evals_hi (the highest ingest_seq of their evals, which may
    arrive later by log), $now (completion time, TIMESTAMP).
    """
    cohort_cols = "".join(
        f""", coalesce(max(s."{c}") FILTER (WHERE s.is_root), max(s."{c}"), 'unknown') AS "{c}\""""
        for c in cohort_labels)
    return f"""
WITH s AS (
    SELECT d.trace_id, d.evicted, sc.* EXCLUDE (trace_id, span_id, parent_span_id), sc.parent_span_id_int IS NULL AS is_root
    FROM spans_core sc JOIN {with_trace_id_ints("done")} d USING (trace_id_hi, trace_id_lo)
    WHERE sc.ingest_seq BETWEEN $lo AND $hi
), e AS (
    SELECT ev.trace_id, count(*) AS total, count(*) FILTER (WHERE ev.passed = false) AS failed,
           bool_or(ev.name = 'refusal' AND ev.passed = false) AS refusal_failed,
           list_sort(list_distinct(list(ev.name) FILTER (WHERE ev.passed IS NOT NULL))) AS eval_names,
           list_sort(list_distinct(list(ev.name) FILTER (WHERE ev.passed = false))) AS failed_evals
    FROM evals ev SEMI JOIN done USING (trace_id) WHERE ev.ingest_seq BETWEEN $lo AND $evals_hi GROUP BY ev.trace_id
)
SELECT s.trace_id,
    coalesce(max(s.route) FILTER (WHERE s.is_root), max(s.route)) AS route,
    coalesce(max(s.request_id) FILTER (WHERE s.is_root), max(s.request_id)) AS request_id
    {cohort_cols},
    min(s.start_time) AS start_time, max(s.end_time) AS end_time,
    (epoch_ns(max(s.end_time)) - epoch_ns(min(s.start_time))) / 1e9 AS duration_seconds,
    CASE WHEN count(s.step) > 0 THEN len(list_distinct(list(s.step)))
         ELSE count(*) FILTER (WHERE s.span_kind IN ('LLM', 'TOOL')) END AS steps,
    count(*) FILTER (WHERE s.span_kind = 'LLM') AS llm_calls,
    count(*) FILTER (WHERE s.span_kind = 'TOOL') AS tool_calls,
    sum(s.input_tokens) FILTER (WHERE s.span_kind = 'LLM') AS input_tokens,
    sum(s.output_tokens) FILTER (WHERE s.span_kind = 'LLM') AS output_tokens,
    sum(s.cache_read_tokens) FILTER (WHERE s.span_kind = 'LLM') AS cache_read_tokens,
    sum(s.cache_write_tokens) FILTER (WHERE s.span_kind = 'LLM') AS cache_write_tokens,
    sum(s.reasoning_tokens) FILTER (WHERE s.span_kind = 'LLM') AS reasoning_tokens,
    coalesce(sum(s.cost_usd) FILTER (WHERE s.span_kind = 'LLM'),
             max(s.cost_usd) FILTER (WHERE s.is_root)) AS cost_usd,
    coalesce(any_value(e.total), 0) AS evals_total,
    coalesce(any_value(e.failed), 0) AS evals_failed,
    coalesce(any_value(e.eval_names), []) AS eval_names,
    coalesce(any_value(e.failed_evals), []) AS failed_evals,
    coalesce(bool_or(s.refused), false) OR coalesce(any_value(e.refusal_failed), false) AS refused,
    coalesce(bool_or(s.escalated), false) AS escalated,
    list_aggregate(list_sort(list(s.model) FILTER (WHERE s.span_kind = 'LLM')), 'mode') AS model,
    nullif(array_to_string(list_sort(list_distinct(list(s.model) FILTER (WHERE s.span_kind = 'LLM'))), ','), '') AS models,
    NOT bool_or(s.is_root) OR bool_or(s.evicted) AS incomplete,
    count(*) AS span_count,
    coalesce(max(s.session_id) FILTER (WHERE s.is_root), max(s.session_id)) AS session_id,
    coalesce(max(s.service_name) FILTER (WHERE s.is_root), max(s.service_name)) AS service_name,
    max(s.name) FILTER (WHERE s.is_root) AS root_name,
    min(s.ingest_seq) AS min_ingest_seq,
    max(s.ingest_seq) AS max_ingest_seq,
    $now::TIMESTAMP AS completed_at,
    coalesce(max(s.request_model) FILTER (WHERE s.span_kind = 'LLM'), max(s.request_model)) AS _request_model
FROM s LEFT JOIN e USING (trace_id)
GROUP BY s.trace_id
"""


class RouteResolver:
    """Where spans carry no ``shadow.route``, the ``routes`` config maps the request model to a route.

    Patterns are anchored (full match). A response model's ``-YYYY-MM-DD`` suffix is stripped as a
    fallback, since the API answers ``gpt-4o-mini`` with ``gpt-4o-mini-2024-07-18``.
    """

    def __init__(self, routes: Mapping[str, tuple[str, ...]]):
        self._rules = [(name, [re.compile(p) for p in pats]) for name, pats in routes.items()]
        self.route = lru_cache(maxsize=4096)(self._route)

    def _route(self, model: str | None) -> str | None:
        if not model or not self._rules:
            return None
        for candidate in (model, _DATED.sub("", model)):
            for name, pats in self._rules:
                if any(p.fullmatch(candidate) for p in pats):
                    return name
        return None
