"""A span's identity is its whole (trace_id, span_id): distinct spans are never dropped as duplicates.

Ids are not always random. Zipkin/B3 (64-bit trace ids, root span id = the trace id's low half),
sequential ids from test harnesses, and replayed captures with a counter mixed into both ids all
give distinct spans that a cheap fold of the ids (span_id ^ trace_hi ^ trace_lo) maps to one value.
"""
from __future__ import annotations

import random

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from otlp_builders import span_request
from pipeline import Handover, Pipeline
from test_receivers import grpc_export

from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.store.writer import RecentKeys, StoreWriter
from shadowlens.config import default_config


def zipkin_b3_spans(n: int, rng: random.Random) -> list[dict]:
    """64-bit trace ids (high half zero); the root span id equals the trace id's low half."""
    out = []
    for _ in range(n):
        lo = rng.randbytes(8)
        out.append({"trace_id": bytes(8) + lo, "span_id": lo, "name": "zipkin.root"})
    return out


def sequential_spans(n: int, first: int = 1) -> list[dict]:
    """Trace id ...0001 with span id ...0001, and so on."""
    return [{"trace_id": i.to_bytes(16, "big"), "span_id": i.to_bytes(8, "big"), "name": "seq"}
            for i in range(first, first + n)]


def replayed_spans(n: int, rng: random.Random) -> list[dict]:
    """One captured span replayed with a counter XORed into both ids' low 64 bits."""
    t, s = rng.randbytes(16), rng.randbytes(8)
    t_lo, s_int = int.from_bytes(t[8:], "big"), int.from_bytes(s, "big")
    return [{"trace_id": t[:8] + (t_lo ^ c).to_bytes(8, "big"), "span_id": (s_int ^ c).to_bytes(8, "big"),
             "name": "replayed"} for c in range(1, n + 1)]


def _identities(spans: list[dict]) -> set[tuple[str, str]]:
    return {(d["trace_id"].hex(), d["span_id"].hex()) for d in spans}


def test_distinct_spans_with_colliding_folds_are_all_stored_through_serve(serve_factory):
    """The issue's measurement: 600 acknowledged spans, 200 of each scheme; 2 of 600 were stored."""
    rng = random.Random(14)
    batches = [zipkin_b3_spans(200, rng), sequential_spans(200), replayed_spans(200, rng)]
    sent = [d for b in batches for d in b]
    assert len(_identities(sent)) == 600
    srv = serve_factory()
    for batch in batches:
        for i in range(0, len(batch), 50):       # several requests, so several commits may be involved
            resp = grpc_export(srv.grpc_endpoint, span_request(batch[i:i + 50]).SerializeToString())
            assert resp.partial_success.rejected_spans == 0
    rows = srv.query("select trace_id, span_id from spans")
    assert {(r["trace_id"], r["span_id"]) for r in rows} == _identities(sent)
    assert len(rows) == 600
    # the same requests again (a client's retry) are stored once and counted as duplicates
    for batch in batches:
        grpc_export(srv.grpc_endpoint, span_request(batch).SerializeToString())
    assert srv.query("select count(*) as n from spans") == [{"n": 600}]
    assert "shadowlens_spans_duplicate_total 600.0" in srv.metrics_text()


def _store(tmp_path, **kw) -> tuple[StoreWriter, Handover]:
    cfg = default_config()
    store = StoreWriter(tmp_path, cfg.cohort_labels, IngestCounters(), **kw)
    store.start()
    return store, Handover(store)


def _stored(store: StoreWriter) -> list[tuple[str, str]]:
    con = store.cursor()
    try:
        return con.execute("select trace_id, span_id from spans_core").fetchall()
    finally:
        con.close()


def test_identity_survives_a_restart(tmp_path):
    """Keys reloaded from the store after a restart decide nothing alone either."""
    rng = random.Random(5)
    first = zipkin_b3_spans(100, rng) + sequential_spans(100)
    with Pipeline(tmp_path) as p:
        p.export(span_request(first).SerializeToString())
    with Pipeline(tmp_path) as p:
        later = zipkin_b3_spans(100, rng) + sequential_spans(100, first=1000) + replayed_spans(100, rng)
        # a retry of the first request after the restart, mixed with new spans in one request
        p.export(span_request(first[:50] + later).SerializeToString())
        p.sync()
        assert p.stats.spans_duplicate == 50
        stored = _stored(p.store)
    assert len(stored) == 500 and set(stored) == _identities(first + later)


_ID = st.tuples(st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(_ID, min_size=1, max_size=60), retried=st.data())
def test_property_stored_is_received_minus_rejected_and_a_retry_is_stored_once(tmp_path_factory, ids, retried):
    """For any set of ids (hypothesis favours zeros, repeats and small values), what is stored is
    every distinct valid identity exactly once, whatever requests it came in and in what order."""
    tmp = tmp_path_factory.mktemp("prop")
    store, handover = _store(tmp)
    try:
        valid = [(t, s) for t, s in ids if any(t) and any(s)]      # all-zero ids are rejected (OTLP)
        spans = [{"trace_id": t, "span_id": s} for t, s in ids]
        cut = retried.draw(st.integers(0, len(spans)))
        resend = retried.draw(st.lists(st.sampled_from(spans), max_size=10))
        received = rejected = 0
        for part in (spans[:cut], spans[cut:], resend):
            if part:
                batch = handover.normalizer.normalize_traces(span_request(part).SerializeToString())
                received, rejected = received + batch.received, rejected + batch.rejected
                handover.commit(batch)
        stored = _stored(store)
        want = {(t.hex(), s.hex()) for t, s in valid}
        assert sorted(stored) == sorted(want)          # each distinct identity once
        assert received - rejected == len(stored) + store.stats.spans_duplicate
    finally:
        store.shutdown()
        handover.close()


def test_recent_keys_only_nominate_and_say_which_commits_to_compare_with():
    """The memory is a pre-filter: a hit is a candidate for the full comparison, never a verdict."""
    keys = RecentKeys(2 * RecentKeys.GENERATION)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2**63, size=1000, dtype=np.uint64)
    assert keys.lookup(a)[1] is None
    keys.remember(a[:500], seq=7)
    hit, commits, repeated = keys.lookup(a)
    assert hit[:500].all() and not hit[500:].any() and commits == (7, 7) and not repeated
    keys.remember(a[500:], seq=9)          # a small run merges into the last one: the range widens
    assert keys.lookup(a[600:700]) [1] == (7, 9)
    assert keys.lookup(rng.integers(2**63, 2**64 - 1, size=10, dtype=np.uint64))[1] is None
    assert keys.lookup(np.concatenate([a[:3], a[1:2]]))[2]          # a key repeated within the batch
    assert RecentKeys(RecentKeys.GENERATION).lookup(np.array([5, 5], dtype=np.uint64))[2]
