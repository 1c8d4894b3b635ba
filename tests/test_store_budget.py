"""store.max_bytes: over its disk budget the store loses its oldest data first and ends under the budget; records
not yet in DuckDB are never deleted; DuckDB counts by its used blocks; the key's values; the metrics."""
from __future__ import annotations

import logging
import os
import random
import subprocess

import duckdb
import pytest
import yaml
from harness import REPO, SHADOWLENS, wait_for
from otlp_builders import random_spans, span_request
from pipeline import Handover
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.errors import ConfigError
from shadowlens.collector.store import database
from shadowlens.collector.store.database import DB_FILE, SEGMENTS_DIR
from shadowlens.collector.store.retention import Retention
from shadowlens.collector.store.segments import list_segments, read_frames, segment_sizes
from shadowlens.collector.store.writer import StoreWriter
from shadowlens.config import default_config, load
from shadowlens.exporters.prometheus import StoreBudgetCollector

SEGMENT = 512 << 10         # small segments, so that a test store has many
SPANS = 64                  # per request
# Small row groups, so that deleting a few segments' rows empties whole row groups and frees DuckDB blocks, as
# the default row group does for a 256 MiB segment's ~100k spans in production
ROW_GROUP_ROWS = 2048
T0_NS = 1_700_000_000 * 10**9


def _request(i: int) -> bytes:
    """Request ``i``: SPANS spans starting at second ``i``, with 200-2000 bytes of text each (the bulk goes to
    the segments)."""
    spans = random_spans(SPANS, random.Random(i))
    for k, d in enumerate(spans):
        d["start"] = T0_NS + i * 10**9 + k
        d["end"] = d["start"] + 10**6
    return span_request(spans).SerializeToString()


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(database, "ROW_GROUP_ROWS", ROW_GROUP_ROWS)
    s = StoreWriter(tmp_path, default_config().cohort_labels, IngestCounters())
    s.start()
    h = Handover(s)
    h.log.segment_bytes = SEGMENT
    yield s, h
    h.close()
    s.shutdown()


def _fill(h: Handover, n: int) -> None:
    for f in [h.submit(_request(i)) for i in range(n)]:
        f.result(30)


def _pragma_used(con) -> int:
    [(used, block)] = con.execute("SELECT used_blocks, block_size FROM pragma_database_size() "
                                  "WHERE database_name = current_database()").fetchall()
    return used * block


def _budget(s: StoreWriter, tmp_path, max_bytes: int) -> Retention:
    return Retention(tmp_path, s.write, retention_s=10 * 365 * 86400, interval_s=3600,
                     current_segment=s.current_segment, now=lambda: T0_NS / 1e9, max_bytes=max_bytes, cursor=s.cursor)


def test_over_budget_the_oldest_data_goes_first_and_the_store_ends_under_it(store, tmp_path):
    s, h = store
    _fill(h, 100)
    con = s.cursor()
    con.execute("CHECKPOINT")      # the rows in DuckDB's blocks, as in a store that has run a while
    by_request = dict(con.execute("SELECT min(start_time), min(p.segment) FROM spans_core JOIN payloads p "
                                  "USING (payload_id) GROUP BY payload_id").fetchall())
    segs = segment_sizes(tmp_path / SEGMENTS_DIR)
    assert len(segs) >= 8, segs
    # what the budget counts, measured here apart from the code under test
    full = sum(os.path.getsize(p) for p in (tmp_path / SEGMENTS_DIR).iterdir()) + _pragma_used(con)
    wal = tmp_path / (DB_FILE + ".wal")
    full += os.path.getsize(wal) if wal.exists() else 0
    max_bytes = full - sum(sorted(segs.values())[:3]) - 1       # at least three segments must go
    budget = _budget(s, tmp_path, max_bytes)
    assert budget.measure().total == full
    for _ in range(5):
        if not budget.check_budget().segments:
            break
    usage = budget.measure()
    assert usage.total <= max_bytes
    left = dict(con.execute("SELECT min(start_time), min(p.segment) FROM spans_core JOIN payloads p "
                            "USING (payload_id) GROUP BY payload_id").fetchall())
    gone = set(by_request) - set(left)
    assert gone and left
    assert max(gone) < min(left), "a newer request went before an older one"
    kept_segments = set(list_segments(tmp_path / SEGMENTS_DIR))
    assert {by_request[t] for t in gone}.isdisjoint(kept_segments)
    assert {by_request[t] for t in left} <= kept_segments
    spans_gone = SPANS * len(gone)
    assert budget.budget.spans == spans_gone == SPANS * 100 - con.execute("SELECT count(*) FROM spans_core").fetchone()[0]
    assert budget.budget.segments == len(segs) - len(kept_segments)
    assert budget.budget.bytes == sum(v for k, v in segs.items() if k not in kept_segments)
    # the spans left still read their payloads; no eval, log or trace row points into a deleted segment
    assert con.execute("SELECT count(*) FROM spans WHERE attributes IS NULL").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM payloads WHERE segment < ?", [min(kept_segments)]).fetchone()[0] == 0
    # DuckDB counts by its used blocks: its file did not shrink (a file-size budget would still be over and
    # delete everything), yet the next check deletes nothing
    assert usage.duckdb == _pragma_used(con) < os.path.getsize(tmp_path / DB_FILE)
    on_disk = sum(os.path.getsize(p) for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk > max_bytes
    assert budget.check_budget().segments == 0
    con.close()


def test_records_not_yet_in_duckdb_are_never_deleted(store, tmp_path, caplog):
    s, h = store
    _fill(h, 20)
    low = s.current_segment()
    # acknowledged records the writer has not got yet: appended (durable) but never submitted
    pending = [h.log.append(_request(1000 + i))[:2] for i in range(20)]
    h.log.sync()
    assert h.log.segment > low + 1, "the pending records span several segments"
    budget = _budget(s, tmp_path, max_bytes=1)      # smaller than the backlog: deletes what it may, then logs
    with caplog.at_level(logging.ERROR, "shadowlens.retention"):
        for _ in range(5):
            budget.check_budget()
    assert "store.max_bytes 1 is too small" in caplog.text
    assert min(list_segments(tmp_path / SEGMENTS_DIR)) == low
    found = {(seg, off) for seg in range(low, h.log.segment + 1) for off, _, _ in read_frames(tmp_path / SEGMENTS_DIR, seg)}
    assert set(pending) <= found
    assert s.current_segment() == low


def test_the_metrics_show_the_budget_and_what_it_deleted(store, tmp_path):
    s, h = store
    _fill(h, 30)
    budget = _budget(s, tmp_path, max_bytes=0)
    budget.max_bytes = max_bytes = int(budget.measure().total * 0.8)
    budget.check_budget()
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreBudgetCollector(budget.snapshot))
    text = generate_latest(reg).decode()
    lines = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
    assert float(lines["shadowlens_store_max_bytes"]) == max_bytes
    assert float(lines["shadowlens_store_used_bytes"]) == budget.measure().total
    assert float(lines["shadowlens_store_retention_seconds"]) == 10 * 365 * 86400
    assert float(lines["shadowlens_store_budget_deleted_spans_total"]) == budget.budget.spans > 0
    assert float(lines["shadowlens_store_budget_deleted_segments_total"]) >= 1
    assert float(lines["shadowlens_store_budget_deleted_bytes_total"]) == budget.budget.bytes > SEGMENT // 2
    # the clock stands at T0: the oldest span kept was received ... now, by the store's own clock (time.time)
    assert "shadowlens_store_oldest_age_seconds" in lines


def test_the_running_component_enforces_the_budget_on_its_own(store, tmp_path):
    s, h = store
    _fill(h, 30)
    s.cursor().execute("CHECKPOINT")      # the rows in DuckDB's blocks, as in a store that has run a while
    budget = Retention(tmp_path, s.write, retention_s=10 * 365 * 86400, interval_s=0.2,
                       current_segment=s.current_segment, max_bytes=0, cursor=s.cursor)
    before = budget.measure()
    budget.max_bytes = before.total - 1
    budget.start()
    try:
        wait_for(lambda: budget.snapshot()["budget"].segments, 20, 0.1, what="a budget pass of the component's own")
    finally:
        budget.shutdown()
    assert budget.measure().segments == before.segments - budget.budget.bytes


def test_an_empty_or_unbudgeted_store_deletes_nothing(store, tmp_path):
    s, h = store
    _fill(h, 10)
    before = s.cursor().execute("SELECT count(*) FROM spans_core").fetchone()[0]
    off = _budget(s, tmp_path, max_bytes=0)
    assert off.check_budget().spans == 0 and off.snapshot()["max_bytes"] == 0
    assert s.cursor().execute("SELECT count(*) FROM spans_core").fetchone()[0] == before == 10 * SPANS


@pytest.mark.parametrize("value, expected", [("50GiB", 50 * 1024**3), ("500MB", 500 * 1000**2), (123456, 123456),
                                             ("0", 0), ("1.5KiB", 1536)])
def test_max_bytes_takes_bytes_and_sizes(value, expected):
    assert load(None, env={}, overrides={("store", "max_bytes"): value}).store.max_bytes == expected
    assert default_config().store.max_bytes == 0


@pytest.mark.parametrize("value", ["lots", "-5", "5 parsecs", "true"])
def test_a_bad_max_bytes_is_a_one_line_error_naming_the_key(value):
    with pytest.raises(ConfigError, match="store.max_bytes"):
        load(None, env={"SHADOWLENS_STORE__MAX_BYTES": value})
    env = {**os.environ, "SHADOWLENS_STORE__MAX_BYTES": value}
    out = subprocess.run(SHADOWLENS + ["serve", "--print-config"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=60)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "store.max_bytes" in out.stderr, out.stderr


def test_print_config_shows_max_bytes():
    env = {**os.environ, "SHADOWLENS_STORE__MAX_BYTES": "40GiB"}
    out = subprocess.run(SHADOWLENS + ["serve", "--print-config"], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=60)
    assert out.returncode == 0 and "max_bytes: 40GiB" in out.stdout


def test_duckdb_used_bytes_is_what_pragma_reports(tmp_path):
    from shadowlens.collector.store.retention import duckdb_used_bytes
    con = duckdb.connect(str(tmp_path / "x.duckdb"))
    con.execute("CREATE TABLE t AS SELECT range AS i, md5(range::VARCHAR) AS v FROM range(300000)")
    con.execute("CHECKPOINT")
    full = duckdb_used_bytes(con)
    con.execute("DELETE FROM t WHERE i < 250000")
    con.execute("CHECKPOINT")
    assert duckdb_used_bytes(con) == _pragma_used(con) < full
    assert os.path.getsize(tmp_path / "x.duckdb") >= full    # the file keeps its size
    con.close()


def test_the_kubernetes_budget_is_80_to_90_percent_of_its_volume():
    docs = {}
    for path in ("configmap.yaml", "pvc.yaml"):
        for doc in yaml.safe_load_all((REPO / "deploy" / "kubernetes" / path).read_text()):
            docs[doc["kind"]] = doc
    cfg = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    budget = load(None, env={}, overrides={("store", "max_bytes"): cfg["store"]["max_bytes"]}).store.max_bytes
    request = docs["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"]
    assert request.endswith("Gi")
    volume = int(request[:-2]) * 1024**3
    assert 0.8 <= budget / volume <= 0.9, (budget, volume)


def test_a_running_serve_shows_the_budget_on_metrics(serve_factory):
    import urllib.request
    srv = serve_factory(env={"SHADOWLENS_STORE__MAX_BYTES": "3GiB"})
    with urllib.request.urlopen(srv.metrics_url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    lines = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
    assert float(lines["shadowlens_store_max_bytes"]) == 3 * 1024**3
    assert float(lines["shadowlens_store_retention_seconds"]) == 7 * 86400
    assert float(lines["shadowlens_store_used_bytes"]) > 0          # measured at start: DuckDB's first blocks
    for name in ("spans", "segments", "bytes"):
        assert float(lines[f"shadowlens_store_budget_deleted_{name}_total"]) == 0
