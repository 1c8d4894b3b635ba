"""Recompute stored costs after a price change (``shadowlens reprice``).

Spans keep a reported cost as is; every other LLM span is priced again from its tokens with the
current table, and the cost of each affected trace is summed again. Cumulative Prometheus
counters are not rewritten (they only grow); window gauges pick the new costs up on refresh.

The whole reprice is one derived write (``reprice_write``): the store's writer runs the read, the
pricing and the updates in one transaction, so the rows priced are the rows updated.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import duckdb
import pyarrow as pa

from shadowlens.collector.decode.pricing import PriceTable
from shadowlens.collector.store.derived import DerivedWrite, update_costs


@dataclass(frozen=True)
class RepriceResult:
    spans: int
    traces: int
    unpriced: dict

    def as_table(self) -> pa.Table:
        """One row, as ``shadowlens reprice`` prints it (the answer through the query socket, too)."""
        return pa.table({"spans": [self.spans], "traces": [self.traces],
                         "unpriced_spans": [sum(self.unpriced.values())]})


def reprice_write(prices: PriceTable, since_s: float | None = None, now: float | None = None) -> DerivedWrite:
    """The reprice of LLM spans started within ``since_s`` (None: all) as a write for the store's writer."""
    return DerivedWrite("reprice", partial(_reprice, prices=prices, since_s=since_s, now=now))


def _reprice(con: duckdb.DuckDBPyConnection, prices: PriceTable, since_s: float | None,
             now: float | None) -> RepriceResult:
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
    traces = update_costs(con, new_costs)
    return RepriceResult(rows.num_rows, traces, dict(unpriced))
