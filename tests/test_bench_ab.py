"""bench/ab.py runs each source tree's own code, and reports medians and B / A over alternating rounds."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import ab  # noqa: E402


def _tree(root: Path, *packages: str) -> Path:
    for pkg in packages:
        d = root / pkg
        d.mkdir(parents=True, exist_ok=True)
        (d / "__init__.py").write_text(f"WHERE = {str(root)!r}\n")
    return root


def _where(tree: ab.Tree, module: str) -> str:
    out = subprocess.run([sys.executable, "-c", f"import {module} as m; print(m.WHERE)"], env=tree.env,
                         capture_output=True, text=True, cwd="/", timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_ab_runs_a_current_tree_s_layers_from_that_tree_not_the_editable_install(tmp_path):
    other = _tree(tmp_path / "other", "shadowlens", "collector", "collector/decode", "analyzers", "exporters")
    (other / "shadowlens" / "cli.py").write_text("")
    tree = ab.prepare("b", other, tmp_path / "work", build=False)
    assert _where(tree, "shadowlens.collector.decode") == str(other)
    assert _where(tree, "shadowlens.analyzers") == str(other)
    assert tree.exe.read_text().count("-m shadowlens.cli") == 1


def test_ab_runs_a_pre_redesign_tree_as_top_level_packages(tmp_path):
    old = _tree(tmp_path / "old", "collector", "collector/decode", "analyzers")
    (old / "collector" / "cli.py").write_text("")
    tree = ab.prepare("a", old, tmp_path / "work", build=False)
    assert _where(tree, "collector.decode") == str(old)
    assert "-m collector.cli" in tree.exe.read_text()


def test_ab_refuses_a_directory_that_is_no_source_tree(tmp_path):
    with pytest.raises(SystemExit, match="neither shadowlens/cli.py nor collector/cli.py"):
        ab.prepare("a", tmp_path, tmp_path / "work", build=False)


def test_ab_summary_gives_medians_per_side_and_b_over_a():
    runs = [{"bench": "gate", "side": side, "figures": {"gate_cli_s": v, "evaluate_s": None}}
            for side, v in (("a", 2.0), ("b", 1.0), ("a", 4.0), ("b", 3.0), ("a", 3.0), ("b", 2.0))]
    (cli, evaluate) = ab.summarize(runs)
    assert cli["a"] == {"values": [2.0, 4.0, 3.0], "median": 3.0} and cli["b"]["median"] == 2.0
    assert cli["ratio"] == pytest.approx(2 / 3, abs=1e-4)
    assert evaluate["ratio"] is None and evaluate["a"]["values"] == []
