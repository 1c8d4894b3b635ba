"""Recompute stored costs after a price change (``shadowlens reprice``).

Spans keep a reported cost as is; every other LLM span is priced again from its tokens with the
current table, and the cost of each affected trace is summed again. Cumulative Prometheus
counters are not rewritten (they only grow); window gauges pick the new costs up on refresh.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from shadowlens.collector.decode.pricing import PriceTable


@dataclass(frozen=True)
class RepriceResult:
    spans: int
    traces: int
    unpriced: dict


def reprice(con: duckdb.DuckDBPyConnection, prices: PriceTable, since_s: float | None = None,
            now: float | None = None) -> RepriceResult:
    now = time.time() if now is None else now
    cutoff_ns = int((now - since_s) * 1e9) if since_s is not None else 0
    rows = con.sql(
        "SELECT rowid AS rid, trace_id, model, epoch_ns(start_time) AS start_ns, input_tokens, output_tokens, "
        "cache_read_tokens, cache_write_tokens, reported_cost_usd FROM spans_core "
        "WHERE span_kind = 'LLM' AND start_time >= make_timestamp_ns($cutoff::BIGINT)",
        params={"cutoff": cutoff_ns}).to_arrow_table()
    if rows.num_rows == 0:
        return RepriceResult(0, 0, {})
    col = {name: rows.column(name).to_pylist() for name in rows.column_names}
    costs, unpriced = prices.price_columns(col["model"], col["start_ns"], col["input_tokens"], col["output_tokens"],
                                           col["cache_read_tokens"], col["cache_write_tokens"],
                                           col["reported_cost_usd"])
    new_costs = pa.table({"rid": rows.column("rid"), "trace_id": rows.column("trace_id"),
                          "cost": pa.array(costs, pa.float64())})
    con.begin()
    try:
        con.register("new_costs", new_costs)
        con.execute("UPDATE spans_core SET cost_usd = n.cost FROM new_costs n WHERE spans_core.rowid = n.rid")
        traces = con.execute("""
            UPDATE traces SET cost_usd = x.cost FROM (
                SELECT s.trace_id, coalesce(sum(s.cost_usd) FILTER (WHERE s.span_kind = 'LLM'),
                                            max(s.cost_usd) FILTER (WHERE s.parent_span_id IS NULL)) AS cost
                FROM spans_core s SEMI JOIN (SELECT DISTINCT trace_id FROM new_costs) a USING (trace_id)
                GROUP BY s.trace_id) x
            WHERE traces.trace_id = x.trace_id""").fetchone()[0]
        con.commit()
    except BaseException:
        con.rollback()
        raise
    finally:
        con.unregister("new_costs")
    return RepriceResult(rows.num_rows, int(traces), dict(unpriced))
