"""Spans of completed traces -> one ``traces`` row each.

Per-trace measures (CONTRACT §4–5): duration is first start -> last end; steps are the distinct
``agent.trajectory.step`` values, else the number of LLM and TOOL spans; tokens and cost are
summed over LLM spans only (NULL when no LLM span knows them); trace-level concepts come from the
root span, else any span; a missing cohort value is ``unknown``.

A round reads the due traces' spans once (``spans_sql``: one join, only the columns used) and
computes the rows (``rollup``) and the per-(trace, model) table (``models_of``) from them in polars.
Computed by DuckDB (the SQL tests/test_rollup.py keeps as the reference definition) the ~40 filtered
aggregates and the second join cost 17-19 ms of CPU per round of 450 traces, most of the assembler's CPU at
1,000 spans/s; the one read and polars cost 10-11 ms.

The eval and model columns come from the two small per-(trace, eval) and per-(trace, model)
tables the metrics need anyway (``EVALS_SQL``, ``models_of``), joined in by ``trace_rows``.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Mapping

import polars as pl

from shadowlens.collector.schema import with_trace_id_ints

_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")


# One row per (trace, eval name, outcome): the evals of the traces in ``done`` (by log, they may
# come after the spans: $evals_hi is the last ingest_seq that carried one of them).
EVALS_SQL = ("SELECT trace_id, name, passed, count(*)::BIGINT AS n FROM evals SEMI JOIN done USING (trace_id) "
             "WHERE ingest_seq BETWEEN $lo AND $evals_hi GROUP BY ALL")
NO_EVALS = pl.DataFrame(schema={"trace_id": pl.Utf8, "name": pl.Utf8, "passed": pl.Boolean, "n": pl.Int64})

# the spans_core columns ``rollup`` and ``models_of`` read
_SPAN_COLUMNS = ("route", "request_id", "start_time", "end_time", "step", "span_kind", "input_tokens", "output_tokens",
                 "cache_read_tokens", "cache_write_tokens", "reasoning_tokens", "cost_usd", "refused", "escalated",
                 "session_id", "service_name", "name", "ingest_seq", "request_model", "model")
_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


def spans_sql(cohort_labels) -> str:
    """SELECT of the spans of the trace ids in relation ``done(trace_id, evicted)``, with ``is_root``:
    the input of ``rollup`` and ``models_of``. Parameters $lo and $hi: the lowest and highest ingest_seq of
    the spans involved (zonemaps skip the row groups outside)."""
    cols = ", ".join(f'sc."{c}"' for c in (*_SPAN_COLUMNS, *cohort_labels))
    return (f"SELECT d.trace_id, d.evicted, sc.parent_span_id_int IS NULL AS is_root, {cols} "
            f"FROM spans_core sc JOIN {with_trace_id_ints('done')} d USING (trace_id_hi, trace_id_lo) "
            "WHERE sc.ingest_seq BETWEEN $lo AND $hi")


def _sum_or_null(col: str, when: pl.Expr) -> pl.Expr:
    """SQL's sum(col) FILTER (WHERE when): NULL, not 0, when no such row has a value."""
    kept = pl.col(col).filter(when)
    return pl.when(kept.count() > 0).then(kept.sum())


def _owned(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with strings of its own. A string that polars takes from another frame (a group key, a max)
    can stay a view into that frame's buffers, and these rows live on in the window and the gate for the
    window's length: each kept a round's span strings alive (glibc's heap +3.4 KB per trace, 281 MB after
    81k traces; tests/test_rollup.py). Through Arrow the strings are copied into a buffer of their own."""
    return pl.from_arrow(frame.to_arrow())


def rollup(spans: pl.DataFrame, cohort_labels, now_us: int) -> pl.DataFrame:
    """One row per trace of ``spans_sql``'s rows, completed at ``now_us``; the eval and model columns are
    added by ``trace_rows``."""
    root = pl.col("is_root")
    llm = pl.col("span_kind") == "LLM"
    # NULL-safe as the SQL's: max() skips nulls, and an empty filtered max is null
    prefer_root = lambda c, when=root: pl.coalesce(pl.col(c).filter(when).max(), pl.col(c).max()).alias(c)
    steps = pl.col("step").drop_nulls()
    decimal = pl.Decimal(38, 0)     # DuckDB's sum of BIGINT (HUGEINT), as the rows had it
    out = spans.group_by("trace_id").agg(
        prefer_root("route"), prefer_root("request_id"),
        *(pl.coalesce(prefer_root(c), pl.lit("unknown")).alias(c) for c in cohort_labels),
        pl.col("start_time").min(), pl.col("end_time").max(),
        pl.when(steps.len() > 0).then(steps.n_unique())
        .otherwise(pl.col("span_kind").is_in(["LLM", "TOOL"]).sum()).cast(pl.Int64).alias("steps"),
        llm.sum().cast(pl.Int64).alias("llm_calls"),
        (pl.col("span_kind") == "TOOL").sum().cast(pl.Int64).alias("tool_calls"),
        *(_sum_or_null(c, llm).cast(decimal).alias(c) for c in _TOKENS),
        pl.coalesce(_sum_or_null("cost_usd", llm), pl.col("cost_usd").filter(root).max()).alias("cost_usd"),
        pl.col("refused").any(), pl.col("escalated").any(),
        (~root.any() | pl.col("evicted").any()).alias("incomplete"),
        pl.len().cast(pl.Int64).alias("span_count"),
        prefer_root("session_id"), prefer_root("service_name"),
        pl.col("name").filter(root).max().alias("root_name"),
        pl.col("ingest_seq").min().alias("min_ingest_seq"), pl.col("ingest_seq").max().alias("max_ingest_seq"),
        prefer_root("request_model", llm).alias("_request_model"),
    )
    start_ns, end_ns = pl.col("start_time").dt.epoch("ns"), pl.col("end_time").dt.epoch("ns")
    return _owned(out).with_columns(
        ((end_ns - start_ns) / 1e9).alias("duration_seconds"),
        pl.lit(now_us, dtype=pl.Int64).cast(pl.Datetime("us")).alias("completed_at"),
    ).select("trace_id", "route", "request_id", *cohort_labels, "start_time", "end_time", "duration_seconds", "steps",
             "llm_calls", "tool_calls", *_TOKENS, "cost_usd", "refused", "escalated", "incomplete", "span_count",
             "session_id", "service_name", "root_name", "min_ingest_seq", "max_ingest_seq", "completed_at",
             "_request_model")


def models_of(spans: pl.DataFrame) -> pl.DataFrame:
    """One row per (trace, model) over the LLM spans of ``spans_sql``'s rows, as the token and cost counters
    are labelled."""
    return _owned(spans.filter(pl.col("span_kind") == "LLM").group_by("trace_id", "model").agg(
        pl.len().cast(pl.Int64).alias("calls"),
        *(_sum_or_null(c, pl.lit(True)).cast(pl.Int64).alias(c) for c in ("input_tokens", "output_tokens")),
        _sum_or_null("cost_usd", pl.lit(True)).alias("cost_usd")))


def trace_rows(rollup: pl.DataFrame, evals: pl.DataFrame, models: pl.DataFrame) -> pl.DataFrame:
    """``rollup``'s rows with the eval columns (``refused`` also when a ``refusal`` eval failed)
    and ``model`` (the most frequent over LLM spans, ties to the first in sort order) / ``models``
    (the distinct ones, sorted, comma-separated; NULL when no LLM span names one)."""
    failed = pl.col("passed") == False  # noqa: E712 (a polars expression, not a Python comparison)
    named = pl.col("name").is_not_null()
    ev = evals.group_by("trace_id").agg(
        pl.col("n").sum().alias("evals_total"),
        pl.col("n").filter(failed).sum().alias("evals_failed"),
        ((pl.col("name") == "refusal") & failed).any().alias("_refusal_failed"),
        pl.col("name").filter(named & pl.col("passed").is_not_null()).unique().sort().alias("eval_names"),
        pl.col("name").filter(named & failed).unique().sort().alias("failed_evals"))
    mo = (models.filter(pl.col("model").is_not_null())
          .sort(["trace_id", "calls", "model"], descending=[False, True, False])
          .group_by("trace_id", maintain_order=True)
          .agg(pl.col("model").first(), pl.col("model").sort().str.join(",").alias("models")))
    no_names = pl.lit([], dtype=pl.List(pl.Utf8))
    return rollup.join(ev, on="trace_id", how="left").join(mo, on="trace_id", how="left").with_columns(
        pl.col("evals_total").fill_null(0), pl.col("evals_failed").fill_null(0),
        pl.col("eval_names").fill_null(no_names), pl.col("failed_evals").fill_null(no_names),
        pl.col("refused") | pl.col("_refusal_failed").fill_null(False),
    ).drop("_refusal_failed")


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
