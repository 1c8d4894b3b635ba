"""Every bench runs at tiny sizes and prints one JSON document with its figures (bench/common.emit).

The benches start together (each mostly waits: a server's start, a subprocess), so the module takes about
as long as the slowest of them. Figures at these sizes mean nothing; the test checks that each bench runs
end to end and reports what it measured.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

RUNS = {
    "ingest": ["ingest.py", "--duration", "1", "--runs", "1", "--pool-requests", "2", "--clients", "1",
               "--concurrency", "2"],
    "gate": ["gate.py", "speed", "--traces", "2000", "--values", "5", "3", "2", "--repeat", "1"],
    "analyzers": ["analyzers.py", "--spans", "2000", "--series", "10", "--repeat", "1"],
    "dedup": ["dedup.py", "--spans", "1024", "--max-keys", "40000", "--repeat", "1"],
    "fuzz": ["fuzz.py", "--inputs", "60", "--workers", "1"],
    "fuzz_json": ["fuzz_json.py", "--inputs", "20", "--gate", "5", "--clients", "2"],
    "export": ["export.py", "--spans", "1024", "--poll", "1"],
}


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory):
    """All benches started at once; {name: (exit status, the JSON document or None, stderr)}."""
    work = tmp_path_factory.mktemp("bench")
    procs = {name: subprocess.Popen([sys.executable, str(BENCH / argv[0]), *argv[1:]], cwd=work, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, argv in RUNS.items()}
    out = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        try:
            doc = json.loads(stdout)
        except json.JSONDecodeError:
            doc = None
        out[name] = (proc.returncode, doc, stderr)
    return out


def _doc(bench_runs, name: str) -> dict:
    rc, doc, stderr = bench_runs[name]
    assert rc == 0 and doc is not None, f"bench/{RUNS[name][0]} exited {rc}; stderr:\n{stderr[-3000:]}"
    assert doc["env"]["commit"] and doc["params"] and "json" not in doc["params"]
    return doc


def test_ingest_bench_reports_acknowledged_and_stored_spans(bench_runs):
    doc = _doc(bench_runs, "ingest")
    run = doc["results"]["runs"][0]
    assert doc["bench"] == "ingest" and run["acked"] > 0 and run["stored"] == run["acked"]
    assert doc["results"]["median"]["acked_per_s"] > 0 and doc["results"]["generator"]["spans"] == 1024


def test_gate_bench_reports_the_gate_commands_time(bench_runs):
    r = _doc(bench_runs, "gate")["results"]
    assert r["traces"] == 2000 and r["gate_cli_s"]["n"] == 1 and r["gate_cli_s"]["median"] > 0
    assert r["gate_first_line"] and not r["failed"]


def test_analyzers_bench_reports_window_refresh_and_scrape_times(bench_runs):
    r = _doc(bench_runs, "analyzers")["results"]
    assert r["window_refresh_s"]["median"] > 0 and r["metrics_get_s"]["text/plain"]["median"] > 0
    assert r["metrics_lines"] > 0


def test_dedup_bench_reports_memory_and_insert_cost(bench_runs):
    r = _doc(bench_runs, "dedup")["results"]
    assert r["memory"]["bytes_per_key"] > 0
    assert set(r["insert_us_per_stored_span"]) == {"dedup off", "dedup on, no retries",
                                                   "dedup on, 10% of requests retried"}


def test_fuzz_bench_reports_no_disagreement(bench_runs):
    r = _doc(bench_runs, "fuzz")["results"]
    assert r["inputs"] == 60 and r["disagreements"] == 0


def test_fuzz_json_bench_reports_every_answer(bench_runs):
    r = _doc(bench_runs, "fuzz_json")["results"]
    assert r["otlp_json"]["inputs"] == 20 and r["gate"]["inputs"] == 5 and r["serve_exit_status"] == 0


def test_export_bench_reports_rows_per_second_and_bytes_per_span(bench_runs):
    r = _doc(bench_runs, "export")["results"]
    assert r["spans"] == 1024 and r["export_rows_per_s"]["stopped_spans"] > 0 and r["bytes_per_span"]["lake_spans_table"] > 0
