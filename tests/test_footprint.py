"""The sidecar's footprint: serve runs as two processes at rest, three at most; bench/footprint.py's accounting."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import footprint  # noqa: E402
from harness import child_pids  # noqa: E402


def _child_cmdlines(srv) -> dict[int, str]:
    return {k: Path(f"/proc/{k}/cmdline").read_bytes().replace(b"\0", b" ").decode() for k in child_pids(srv.proc.pid)}


def test_serve_is_two_processes_at_rest_and_the_decoder_process_has_only_what_it_needs(serve_factory):
    """At the default (receivers.decoder_process: auto) serve decodes in its own process until decoding
    needs more than a small share of a core: a sidecar at rest or at a typical rate is two processes,
    not three (the decoder's interpreter was ~50 MB). No multiprocessing resource tracker beside them
    (~8 MB for nothing: they share no semaphores or shared memory), and the children do not import the
    CLI (click), nor polars or DuckDB, to start."""
    cmdlines = _child_cmdlines(serve_factory())
    assert [c.split("_child_main()")[1].split()[0] for c in cmdlines.values()] == ["frontend"], cmdlines
    cmdlines = _child_cmdlines(serve_factory(env={"SHADOWLENS_RECEIVERS__DECODER_PROCESS": "always"}))
    kids = list(cmdlines)
    assert len(kids) == 2, cmdlines
    assert not any("resource_tracker" in c or "multiprocessing" in c for c in cmdlines.values()), cmdlines
    roles = sorted(c.split("_child_main()")[1].split()[0] for c in cmdlines.values())
    assert roles == ["decoder", "frontend"]
    for k in kids:
        maps = Path(f"/proc/{k}/maps").read_text()
        assert "/click/" not in maps and "_polars" not in maps and "_duckdb" not in maps


def test_disk_bytes_counts_the_payload_log_and_duckdb_apart(tmp_path):
    (tmp_path / "segments").mkdir()
    (tmp_path / "segments" / "00000001.seg").write_bytes(b"x" * 10_000)
    (tmp_path / "shadowlens.duckdb").write_bytes(b"y" * 20_000)
    (tmp_path / "shadowlens.duckdb.wal").write_bytes(b"z" * 5_000)
    (tmp_path / "serve.sock.lock").write_bytes(b"")
    parts = footprint.disk_bytes(str(tmp_path))
    block = os.statvfs(tmp_path).f_frsize
    def rounded(n):
        return -(-n // block) * block
    assert parts["segments"] >= 10_000 and parts["segments"] <= rounded(10_000) + block
    assert rounded(25_000) - 2 * block <= parts["duckdb"] <= rounded(20_000) + rounded(5_000) + 2 * block
    assert parts["total"] == parts["segments"] + parts["duckdb"] + parts["other"]
    assert footprint.per_span({"total": 1000}, 4) == {"total": 250.0}


def test_the_tree_alone_counts_a_page_two_processes_map_once():
    """The goals are read on the tree's distinct pages: a page two processes map counts once, split between them."""
    pages = footprint.resident_pages(os.getpid())
    if pages is None:       # page numbers need root
        return
    assert len(pages) * 4096 <= int(footprint.smaps_rollup(os.getpid())["Rss"]) * 1024 * 1.05 + 4096 * 64
    assert len(set(pages.tolist())) == len(pages)


def test_gate_figures_read_the_shapes_bench_gate_writes():
    found = {"refresh_s": {}, "cli_s": {}}
    footprint._collect_gate({"traces": 1_000_000, "gate_cli_s": {"median": 0.76}}, found)
    footprint._collect_gate({"refresh_s": {"1000000": {"median": 0.004}, "8000000": 0.03}}, found)
    footprint._collect_gate({"windows": [{"traces": 8_000_000, "refresh_s": {"median": 0.02}}]}, found)
    footprint._collect_gate({"traces": 2_000_000, "serve_refresh": {"refresh_s": {"median": 0.011, "n": 7}}}, found)
    assert found == {"cli_s": {"1000000": 0.76}, "refresh_s": {"1000000": 0.004, "8000000": 0.02, "2000000": 0.011}}


def test_a_paced_phase_is_charged_the_compression_of_the_payload_it_wrote(monkeypatch):
    """A paced phase's payload stays in the live segment, compressed only once it is closed: the bench adds
    the compactor's cost per MB for the bytes the phase acknowledged (2 requests of 512 spans, 1,000 and
    3,000 bytes: 3.90625 bytes per span)."""
    import clients
    from pool import Template
    pool = [Template(b"x" * 1000, (), (), 512), Template(b"y" * 3000, (), (), 512)]
    monkeypatch.setattr(clients, "POOL", pool)
    out = {"paced": {"acked": 1_024_000, "seconds": 40.0, "cores": 0.05},
           "paced_full": {"acked": 0, "seconds": 40.0, "cores": 0.07}}
    footprint.charge_compression(out, {"level": 3, "cpu_s_per_mb": 0.01})
    bytes_per_s = 1_024_000 * (4000 / 1024) / 40.0                 # 100,000 bytes/s
    assert out["paced"]["payload_bytes_per_s"] == 100_000 == round(bytes_per_s)
    assert out["paced"]["compression_cores"] == 0.001               # 0.1 MB/s x 0.01 s/MB
    assert out["paced"]["steady_cores"] == 0.051
    assert "steady_cores" not in out["paced_full"]                  # nothing acknowledged: nothing to charge
    s = footprint.summary(out, None)
    assert s["cpu_paced_steady_cores"] == 0.051 and s["met"]["cpu_paced_steady_cores"] is False


def test_compressing_the_payload_log_costs_cpu_per_byte_of_the_real_compactor(tmp_path):
    """bench/compaction.py's cpu_per_byte runs the product's compact_segment on copies it removes after: the
    cost is a positive CPU time per byte, far below a second per MB; no compression (level 0) costs nothing."""
    import compaction as bench_compaction
    payloads = [bytes(range(256)) * 4000 for _ in range(4)]          # 4 x 1 MB, compressible
    per_byte = bench_compaction.cpu_per_byte(payloads, 3, str(tmp_path), repeats=1)
    assert 0 < per_byte * 1e6 < 1.0
    assert list(tmp_path.iterdir()) == []                            # its segments are gone
    assert footprint.compression_level({"SHADOWLENS_STORE__COMPRESSION_LEVEL": "0"}) == 0
    assert footprint.compression_cost(0, str(tmp_path)) == {"level": 0, "cpu_s_per_mb": 0.0}
