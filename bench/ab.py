#!/usr/bin/env python3
"""Before/after: the ingest bench (closed loop and paced) and the gate bench on two source trees, alternating.

    git worktree add /tmp/before 8f10d7c
    python bench/ab.py /tmp/before . --label-a before --label-b after --rounds 3 --json bench/results/ab.json
    python bench/ab.py /tmp/before . --rounds 1 --duration 3 --gate-traces 20000 --gate-repeat 1   # a quick check

Each round runs every bench once on A, then once on B (A, B, A, B, ...), so a slow spell of the machine
falls on both; the medians over the rounds and B / A go into one JSON document (stdout or --json FILE),
which bench/figures.py renders into docs/performance.md.

A tree is run with its own code: its server through a wrapper that puts the tree first on PYTHONPATH
(`python -m collector.cli` for the pre-redesign layout whose packages are top-level `collector`,
`analyzers`; `python -m shadowlens.cli` for the current one, whose layers a sitecustomize shim maps to the
tree's `collector/`, `analyzers/`, `exporters/` instead of the editable install's). `--build` builds a
tree's C scanner in place first (`python setup.py build_ext --inplace`) when it has none: without it the
server falls back to the much slower pure-Python scanner. Each tree's own bench/ingest.py and
bench/gate.py measure it (`--client b` drives both servers with B's ingest client instead).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import add_json_arg, emit, read_document, say

PYTHON = sys.executable

# (bench, figure key, name, unit, digits) read from each run; the gate's comes from its own output.
INGEST_FIGURES = (
    ("acked_per_s", "acknowledged spans/s", "spans/s", 0),
    ("committed_per_s", "reached DuckDB", "spans/s", 0),
    ("p99_ms", "Export p99", "ms", 1),
    ("server_cores", "server CPU", "cores", 2),
    ("server_us_per_span", "server CPU per acknowledged span", "µs", 1),
    ("peak_rss_mb", "peak RSS, summed", "MB", 0),
)
PACED_ONLY = (("backlog_growth_per_s", "backlog growth", "spans/s", 0),)

SHIM = '''"""Written by bench/ab.py: shadowlens.<layer> from {tree!r}, not from the editable install."""
import importlib.util
import sys

_LAYERS = {{"shadowlens." + n: {tree!r} + "/" + n for n in ("collector", "analyzers", "exporters")}}


class _TreeLayers:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        where = _LAYERS.get(fullname)
        if where is None:
            return None
        return importlib.util.spec_from_file_location(fullname, where + "/__init__.py",
                                                      submodule_search_locations=[where])


sys.meta_path.insert(0, _TreeLayers)
'''


@dataclass(frozen=True)
class Tree:
    label: str
    path: Path
    exe: Path            # the wrapper that runs this tree's `shadowlens`
    pythonpath: str

    @property
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_")}
        env["PYTHONPATH"] = self.pythonpath
        return env


def prepare(label: str, path: Path, work: Path, build: bool) -> Tree:
    """A wrapper executable and PYTHONPATH that run ``path``'s code; builds its C scanner if asked."""
    path = path.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if (path / "shadowlens" / "cli.py").exists():
        cli, shim = "shadowlens.cli", work / f"shim-{label}"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "sitecustomize.py").write_text(SHIM.format(tree=str(path)))
        pythonpath = f"{shim}:{path}"
    elif (path / "collector" / "cli.py").exists():
        cli, pythonpath = "collector.cli", str(path)
    else:
        raise SystemExit(f"{path}: neither shadowlens/cli.py nor collector/cli.py; give a shadowlens source tree")
    if not list((path / "collector" / "decode").glob("_wirescan*.so")):
        if not build:
            say(f"warning: {path} has no built C scanner (collector/decode/_wirescan*.so): its server uses the "
                "pure-Python one; give --build to build it in place")
        else:
            say(f"building the C scanner in {path}")
            subprocess.run([PYTHON, "setup.py", "-q", "build_ext", "--inplace"], cwd=path, check=True)
    exe = work / f"shadowlens-{label}"
    exe.write_text(f'#!/bin/sh\nPYTHONPATH="{pythonpath}" exec "{PYTHON}" -m {cli} "$@"\n')
    exe.chmod(0o755)
    return Tree(label, path, exe, pythonpath)


def run_ingest(tree: Tree, client_tree: Tree, args, rate: float | None) -> dict:
    cmd = [PYTHON, str(client_tree.path / "bench" / "ingest.py"), "--shadowlens", str(tree.exe), "--runs", "1",
           "--duration", str(args.duration), "--json"]
    if rate:
        cmd += ["--rate", str(rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=client_tree.path, env=client_tree.env)
    if out.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    doc = read_document(out.stdout)
    res = doc.get("results", doc)        # the pre-redesign bench prints its results at the top level
    run = res["runs"][0]
    if res.get("failed") or run.get("fatal"):
        say(f"  PROBLEM in {tree.label}'s run: " + "; ".join(p[:300] for p in run.get("problems", [])))
    figures = {key: run.get(key) for key, *_ in INGEST_FIGURES + PACED_ONLY}
    if run.get("server_cpu_s") is not None and run.get("acked"):
        figures["server_us_per_span"] = run["server_cpu_s"] * 1e6 / run["acked"]
    return {"figures": figures, "failed": bool(res.get("failed") or run.get("fatal")), "problems": run.get("problems", [])}


def run_gate(tree: Tree, args) -> dict:
    cmd = [PYTHON, str(tree.path / "bench" / "gate.py"), "speed", "--traces", str(args.gate_traces),
           "--repeat", str(args.gate_repeat)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tree.path, env=tree.env)
    text = out.stdout + out.stderr
    m = re.search(r"median ([0-9.]+) s over", text)          # both versions print this line
    if not m:
        raise SystemExit(f"{' '.join(cmd)} printed no timing (exit {out.returncode}):\n{text[-3000:]}")
    ev = re.search(r"in process: evaluate ([0-9.]+) s", text)
    return {"figures": {"gate_cli_s": float(m.group(1)), "evaluate_s": float(ev.group(1)) if ev else None},
            "failed": out.returncode not in (0, 1)}


def _summary(name: str, unit: str, digits: int, a_vals: list, b_vals: list) -> dict:
    a_vals = [v for v in a_vals if v is not None]
    b_vals = [v for v in b_vals if v is not None]
    ma = statistics.median(a_vals) if a_vals else None
    mb = statistics.median(b_vals) if b_vals else None
    return {"name": name, "unit": unit, "digits": digits,
            "a": {"values": [round(v, digits) for v in a_vals], "median": None if ma is None else round(ma, digits)},
            "b": {"values": [round(v, digits) for v in b_vals], "median": None if mb is None else round(mb, digits)},
            "ratio": round(mb / ma, 4) if ma and mb is not None else None}


def summarize(runs: list[dict]) -> list[dict]:
    """One entry per (bench, figure): A's and B's values over the rounds, their medians and B / A."""
    out = []
    for bench, figures in (("closed loop", INGEST_FIGURES), ("paced", INGEST_FIGURES + PACED_ONLY),
                           ("gate", (("gate_cli_s", "`shadowlens gate --data-dir`", "s", 2),
                                     ("evaluate_s", "gate evaluate in process", "s", 2)))):
        mine = [r for r in runs if r["bench"] == bench]
        if not mine:
            continue
        for key, name, unit, digits in figures:
            vals = {side: [r["figures"].get(key) for r in mine if r["side"] == side] for side in "ab"}
            out.append(_summary(f"{bench}: {name}", unit, digits, vals["a"], vals["b"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path, help="tree A (e.g. a git worktree of the version before)")
    ap.add_argument("b", type=Path, help="tree B (e.g. this checkout)")
    ap.add_argument("--label-a", default="before")
    ap.add_argument("--label-b", default="after")
    ap.add_argument("--rounds", type=int, default=3, help="A, B rounds (default 3)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per ingest run (default 20)")
    ap.add_argument("--rate", type=float, default=50_000, help="the paced runs' offered spans/s (default 50000)")
    ap.add_argument("--benches", default="closed,paced,gate", help="which of closed,paced,gate (default all)")
    ap.add_argument("--gate-traces", type=int, default=1_000_000, help="stored traces for the gate bench (1M)")
    ap.add_argument("--gate-repeat", type=int, default=3, help="gate commands timed per gate run (default 3)")
    ap.add_argument("--client", choices=("own", "b"), default="own",
                    help="own: each tree's bench/ingest.py drives its server; b: B's drives both")
    ap.add_argument("--build", action="store_true", help="build a tree's C scanner in place when it has none")
    add_json_arg(ap)
    args = ap.parse_args(argv)
    benches = [b.strip() for b in args.benches.split(",") if b.strip()]
    if unknown := set(benches) - {"closed", "paced", "gate"}:
        ap.error(f"--benches: unknown {', '.join(sorted(unknown))}; choose from closed, paced, gate")
    with tempfile.TemporaryDirectory(prefix="shadowlens-ab-") as work:
        trees = {"a": prepare("a", args.a, Path(work), args.build), "b": prepare("b", args.b, Path(work), args.build)}
        runs = []
        for rnd in range(1, args.rounds + 1):
            for bench in benches:
                for side, tree in trees.items():
                    say(f"round {rnd}/{args.rounds}: {bench} on {side.upper()} ({tree.path})")
                    if bench == "gate":
                        r = run_gate(tree, args)
                    else:
                        client = tree if args.client == "own" else trees["b"]
                        r = run_ingest(tree, client, args, args.rate if bench == "paced" else None)
                    name = {"closed": "closed loop"}.get(bench, bench)
                    runs.append({"round": rnd, "bench": name, "side": side, **r})
                    say("  " + ", ".join(f"{k} {v:,.2f}" for k, v in r["figures"].items() if v is not None))
    figures = summarize(runs)
    for f in figures:
        say(f"{f['name']:55s} A {f['a']['median']}  B {f['b']['median']}  B/A {f['ratio']}")
    sides = {s: {"label": getattr(args, f"label_{s}"), "tree": str(t.path), "commit": _commit(t.path)}
             for s, t in trees.items()}
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    emit("ab", params, {**sides, "figures": figures, "runs": runs}, args.json)
    return 1 if any(r["failed"] for r in runs) else 0


def _commit(path: Path) -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True)
    return out.stdout.strip() or None


if __name__ == "__main__":
    sys.exit(main())
