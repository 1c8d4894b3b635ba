"""docs/performance.md's figure tables are what bench/figures.py renders from the committed bench/results/*.json."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = [sys.executable, str(REPO / "bench" / "figures.py")]


def _figures(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(FIGURES + list(args), capture_output=True, text=True, cwd=REPO, timeout=60)


def _ingest_doc(acked_per_s: float, rate: float | None) -> dict:
    median = {"acked_per_s": acked_per_s, "committed_per_s": 48_080.0, "p50_ms": 16.0, "p99_ms": 43.0,
              "server_cores": 1.52, "peak_rss_mb": 426.0, "peak_pss_mb": 352.0, "stored_ok": True}
    if rate:
        median["backlog_growth_per_s"] = -3968.0
    return {"bench": "ingest", "params": {"duration": 20.0, "runs": 3, "rate": rate, "clients": 4, "concurrency": 4},
            "results": {"runs": [{"acked_per_s": acked_per_s}], "median": median},
            "env": {"commit": "abc1234", "date": "2026-11-29", "cpus": 2, "python": "3.11.7"}}


def test_performance_doc_figures_match_the_committed_results():
    r = _figures("--check")
    assert r.returncode == 0, r.stderr


def test_figures_check_fails_on_a_hand_edited_figure_and_the_render_restores_it(tmp_path):
    doc = tmp_path / "performance.md"
    results = tmp_path / "results"
    results.mkdir()
    (results / "ingest-closed.json").write_text(json.dumps(_ingest_doc(58_616.4, None)))
    (results / "ingest-paced.json").write_text(json.dumps(_ingest_doc(49_972.0, 50_000.0)))
    doc.write_text("# Performance\n\n<!-- figures -->\n\nprose after\n")
    assert _figures("--check", "--doc", str(doc), "--results", str(results)).returncode == 1   # not rendered yet
    assert _figures("--doc", str(doc), "--results", str(results)).returncode == 0
    text = doc.read_text()
    assert "<!-- figures:ingest -->" in text and "<!-- /figures:ingest -->" in text and text.endswith("prose after\n")
    assert "| acknowledged (durable) spans/s | 58,616 | 49,972 of 50,000 offered | ≥ 50,000 |" in text
    assert "−3,968 spans/s: kept up" in text
    assert _figures("--check", "--doc", str(doc), "--results", str(results)).returncode == 0

    doc.write_text(text.replace("58,616", "59,000"))
    r = _figures("--check", "--doc", str(doc), "--results", str(results))
    assert r.returncode == 1 and "-| acknowledged (durable) spans/s | 59,000" in r.stderr
    assert _figures("--doc", str(doc), "--results", str(results)).returncode == 0
    assert doc.read_text() == text


def test_figures_block_without_results_names_the_command(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("<!-- figures:gate -->\nold\n<!-- /figures:gate -->\n")
    assert _figures("--doc", str(doc), "--results", str(tmp_path)).returncode == 0
    assert "python bench/gate.py speed --json bench/results/gate-speed.json" in doc.read_text()


def test_figures_refuses_a_doc_without_blocks(tmp_path):
    doc = tmp_path / "performance.md"
    doc.write_text("# nothing to render\n")
    r = _figures("--check", "--doc", str(doc))
    assert r.returncode == 2 and "no <!-- figures:NAME --> block" in r.stderr
