"""A round's trace rows computed in polars from one read of the spans (``spans_sql`` -> ``rollup``,
``models_of``) equal what the reference SQL below (``rollup_sql``, ``MODELS_SQL``: the assembler's statements
until the polars rollup replaced them) computes in DuckDB.

The traces are random over what the definitions branch on: a root or none, concepts on the root, on a
child or nowhere, LLM / TOOL / other spans, steps repeated or absent, tokens and costs known or not, an
evicted trace. They go through the store writer (the real decoder and DDL), so the column types are the
store's.
"""
from __future__ import annotations

import ctypes
import gc
import random

import polars as pl
import pytest
from otlp_builders import T0, span_request
from pipeline import Handover
from polars.testing import assert_frame_equal

from shadowlens.analyzers.rollup import NO_EVALS, models_of, rollup, spans_sql, trace_rows
from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.schema import with_trace_id_ints
from shadowlens.collector.store.database import frame
from shadowlens.collector.store.writer import StoreWriter
from shadowlens.config import default_config

LABELS = default_config().cohort_labels
NOW_US = 1_700_000_000_123_456


# -- the reference definitions, in DuckDB ---------------------------------------------------------------

def rollup_sql(cohort_labels) -> str:
    """SELECT producing trace rows for the trace ids in relation ``done(trace_id, evicted)``.

    Parameters: $lo and $hi (the lowest and highest ingest_seq of the spans involved: zonemaps
    skip the row groups outside), $now (completion time, TIMESTAMP). The eval and model columns
    are added by ``trace_rows``.
    """
    cohort_cols = "".join(
        f""", coalesce(max(s."{c}") FILTER (WHERE s.is_root), max(s."{c}"), 'unknown') AS "{c}\""""
        for c in cohort_labels)
    return f"""
WITH s AS (
    SELECT d.trace_id, d.evicted, sc.* EXCLUDE (trace_id, span_id, parent_span_id), sc.parent_span_id_int IS NULL AS is_root
    FROM spans_core sc JOIN {with_trace_id_ints("done")} d USING (trace_id_hi, trace_id_lo)
    WHERE sc.ingest_seq BETWEEN $lo AND $hi
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
    coalesce(bool_or(s.refused), false) AS refused,
    coalesce(bool_or(s.escalated), false) AS escalated,
    NOT bool_or(s.is_root) OR bool_or(s.evicted) AS incomplete,
    count(*) AS span_count,
    coalesce(max(s.session_id) FILTER (WHERE s.is_root), max(s.session_id)) AS session_id,
    coalesce(max(s.service_name) FILTER (WHERE s.is_root), max(s.service_name)) AS service_name,
    max(s.name) FILTER (WHERE s.is_root) AS root_name,
    min(s.ingest_seq) AS min_ingest_seq,
    max(s.ingest_seq) AS max_ingest_seq,
    $now::TIMESTAMP AS completed_at,
    coalesce(max(s.request_model) FILTER (WHERE s.span_kind = 'LLM'), max(s.request_model)) AS _request_model
FROM s
GROUP BY s.trace_id
"""




# One row per (trace, model) over LLM spans, as the token and cost counters are labelled.
MODELS_SQL = (
    "SELECT d.trace_id, model, count(*)::BIGINT AS calls, sum(input_tokens)::BIGINT AS input_tokens, "
    "sum(output_tokens)::BIGINT AS output_tokens, sum(cost_usd) AS cost_usd "
    f"FROM spans_core JOIN {with_trace_id_ints('done')} d USING (trace_id_hi, trace_id_lo) "
    "WHERE ingest_seq BETWEEN $lo AND $hi AND span_kind = 'LLM' GROUP BY ALL")


def _maybe(rng: random.Random, p: float, value):
    return value if rng.random() < p else None


def _trace(rng: random.Random, start: int) -> list[dict]:
    tid = rng.randbytes(16)
    root_id = rng.randbytes(8)
    spans = []
    has_root = rng.random() < 0.8
    for i in range(rng.randint(1, 7)):
        is_root = i == 0 and has_root
        attrs = {k: v for k, v in {
            "openinference.span.kind": rng.choice(["LLM", "LLM", "TOOL", "CHAIN", None]) if not is_root else
            rng.choice(["AGENT", None, "LLM"]),
            "agent.trajectory.step": _maybe(rng, 0.4, rng.randint(0, 3)),
            "llm.model_name": _maybe(rng, 0.7, rng.choice(["gpt-4o", "gpt-4o-mini", "claude"])),
            "gen_ai.request.model": _maybe(rng, 0.5, rng.choice(["gpt-4o", "claude"])),
            "llm.token_count.prompt": _maybe(rng, 0.7, rng.randint(0, 5000)),
            "llm.token_count.completion": _maybe(rng, 0.6, rng.randint(0, 900)),
            "llm.token_count.prompt_details.cache_read": _maybe(rng, 0.3, rng.randint(0, 900)),
            "llm.token_count.prompt_details.cache_write": _maybe(rng, 0.2, rng.randint(0, 900)),
            "llm.token_count.completion_details.reasoning": _maybe(rng, 0.2, rng.randint(0, 900)),
            "llm.cost.total": _maybe(rng, 0.3, round(rng.random(), 6)),
            "agent.refused": _maybe(rng, 0.2, rng.random() < 0.5),
            "agent.escalated": _maybe(rng, 0.2, rng.random() < 0.5),
            "shadow.route": _maybe(rng, 0.6 if is_root else 0.2, rng.choice(["baseline", "candidate"])),
            "shadow.request_id": _maybe(rng, 0.5, f"r{rng.randint(0, 50)}"),
            "session.id": _maybe(rng, 0.3, f"s{rng.randint(0, 5)}"),
            **{f"cohort.{c}": _maybe(rng, 0.5, rng.choice(["a", "b"])) for c in LABELS},
        }.items() if v is not None}
        t = start + rng.randint(0, 10**9)
        spans.append({"trace_id": tid, "span_id": root_id if is_root else rng.randbytes(8),
                      "parent": None if is_root else (root_id if has_root else rng.randbytes(8)),
                      "name": rng.choice(["agent.run", "chat", "tool"]), "start": t, "end": t + rng.randint(0, 10**9),
                      "attrs": attrs})
    return spans


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = StoreWriter(tmp_path_factory.mktemp("rollup"), LABELS, IngestCounters())
    store.start()
    handover = Handover(store)
    rng = random.Random(7)
    spans = [s for i in range(400) for s in _trace(rng, T0 + i * 10**9)]
    # a trace's spans in several requests, as they arrive over time
    rng.shuffle(spans)
    for k in range(0, len(spans), 300):
        handover.commit(span_request(spans[k:k + 300]).SerializeToString())
    yield store
    store.shutdown()
    handover.close()


def test_the_polars_rollup_equals_the_reference_sql(store):
    con = store.cursor()
    try:
        ids = [r[0] for r in con.execute("SELECT DISTINCT trace_id FROM spans_core ORDER BY 1").fetchall()]
        assert len(ids) == 400
        rng = random.Random(3)
        due = ids[::2]         # a round's traces among others: the others' spans are not read
        con.register("done", pl.DataFrame({"trace_id": due, "evicted": [rng.random() < 0.1 for _ in due]}).to_arrow())
        params = {"lo": 0, "hi": 2**62}
        expected = frame(con, rollup_sql(LABELS), {**params, "now": "2023-11-14 22:13:20.123456"})
        expected_models = frame(con, MODELS_SQL, params)
        spans = frame(con, spans_sql(LABELS), params)
    finally:
        con.close()
    got = rollup(spans, LABELS, NOW_US)
    assert got.height == len(due)
    # the random traces reach every branch the definitions have
    assert expected["incomplete"].sum() > 0 and (~expected["incomplete"]).sum() > 0
    assert expected["input_tokens"].null_count() > 0 and expected["cost_usd"].null_count() > 0
    assert expected["route"].null_count() > 0 and expected["refused"].sum() > 0
    assert_frame_equal(got.sort("trace_id"), expected.sort("trace_id"), check_dtypes=True)
    key = ["trace_id", "model"]
    assert_frame_equal(models_of(spans).sort(key, nulls_last=True), expected_models.sort(key, nulls_last=True))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use() -> int:
    """Bytes glibc's malloc has handed out and not had back (where DuckDB's Arrow results live)."""
    try:
        info = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc 2.33+ (no mallinfo2)")
    info.restype = _MallInfo2
    got = info()
    return got.uordblks + got.hblkhd


def test_kept_rows_do_not_keep_their_rounds_spans_alive(store):
    # the window and the gate keep a round's rows for the window's length; polars may hand out a group key or
    # a max as a view into the spans' string buffers, and then the rows kept every round's spans alive (in
    # serve, 281 MB of heap after 81k traces, 3.4 KB a trace). 200 rounds of 200 traces kept here grew the
    # heap by 45 MB then, 4 MB now.
    con = store.cursor()
    try:
        ids = [r[0] for r in con.execute("SELECT DISTINCT trace_id FROM spans_core ORDER BY 1").fetchall()][::2]
        con.register("done", pl.DataFrame({"trace_id": ids, "evicted": [False] * len(ids)}).to_arrow())
        sql, params = spans_sql(LABELS), {"lo": 0, "hi": 2**62}
        kept = [rollup(frame(con, sql, params), LABELS, NOW_US)]     # first allocations (polars' pools) aside
        gc.collect()
        before = _heap_in_use()
        for _ in range(200):
            spans = frame(con, sql, params)
            kept.append(trace_rows(rollup(spans, LABELS, NOW_US), NO_EVALS, models_of(spans)))
            del spans
        gc.collect()
        grown = _heap_in_use() - before
    finally:
        con.close()
    assert grown < 20 * 2**20, f"the heap grew by {grown / 2**20:.1f} MB for 200 kept rounds of rows"
