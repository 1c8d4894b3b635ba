#!/usr/bin/env python3
"""Render the benches' JSON results (bench/results/*.json) into the docs' figure tables.

    python bench/figures.py            # rewrite every <!-- figures:NAME --> ... <!-- /figures:NAME --> block
                                       # (docs/performance.md, and the README's footprint table)
    python bench/figures.py --check    # exit 1 (and show the difference) when the doc is not what the JSON renders

Each block holds exactly what its renderer makes of the committed results, so a figure in the doc is
never copied by hand: to change it, run the bench with ``--json bench/results/<file>.json`` and rerun
this script. A bare ``<!-- figures -->`` line is where the blocks go the first time: it expands into
every block. A block whose results file is missing says which command writes it.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "performance.md"
README = REPO / "README.md"
RESULTS = REPO / "bench" / "results"


def _n(x, digits: int = 0) -> str:
    """A number with thousands separators; an en dash for a missing one."""
    if x is None:
        return "–"
    return f"{x:,.{digits}f}".replace("-", "−")


def _k(x) -> str:
    return "–" if x is None else f"{x / 1000:.1f}k"


def _caption(doc: dict, command: str) -> str:
    env = doc.get("env", {})
    load = f", load average {env['loadavg_1m']:.1f} at the end" if env.get("loadavg_1m") is not None else ""
    return (f"_`{command}`, {env.get('date', '?')}, commit {env.get('commit', '?')}, "
            f"{env.get('cpus', '?')} cores{load}, Python {env.get('python', '?')}._")


def _load(results: Path, name: str) -> dict | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _missing(*commands: str) -> str:
    return "_No results yet: run " + " and ".join(f"`{c}`" for c in commands) + ", then `python bench/figures.py`._"


# ---- ingest ------------------------------------------------------------------------------------

INGEST_FILES = (("ingest-closed", "closed loop"), ("ingest-paced", "paced"))


def _ingest_command(params: dict) -> str:
    cmd = f"bench/ingest.py --duration {params['duration']:g} --runs {params['runs']}"
    if params.get("rate"):
        cmd += f" --rate {params['rate']:.0f}"
    if params.get("http"):
        cmd += " --http"
    return cmd + "".join(f" --server-env {kv}" for kv in params.get("server_env", []))


def _runs_range(runs: list[dict], key: str) -> str:
    vals = [r[key] for r in runs if r.get(key) is not None]
    return f" (runs {_k(min(vals))}–{_k(max(vals))})" if len(vals) > 1 else ""


def _ingest_column(doc: dict) -> list[str]:
    params, res = doc["params"], doc["results"]
    med, runs = res.get("median", {}), [r for r in res.get("runs", []) if not r.get("fatal")]
    rate = params.get("rate")
    acked = _n(med.get("acked_per_s")) + (f" of {_n(rate)} offered" if rate else _runs_range(runs, "acked_per_s"))
    growth = med.get("backlog_growth_per_s")
    kept = None if growth is None or not rate else growth <= 0.02 * rate and med.get("acked_per_s", 0) >= 0.98 * rate
    backlog = "–" if growth is None else f"{_n(growth)} spans/s" + ("" if kept is None else
                                                                     ": kept up" if kept else ": fell behind")
    stored = "yes, every run" if med.get("stored_ok") else "**no**" if "stored_ok" in med else "–"
    return [acked, _n(med.get("committed_per_s")), backlog,
            f"{_n(med.get('p50_ms'))} / {_n(med.get('p99_ms'))} ms", f"{_n(med.get('server_cores'), 2)} cores",
            f"{_n(med.get('peak_rss_mb'))} MB ({_n(med.get('peak_pss_mb'))} MB)", stored]


def render_ingest(results: Path) -> str:
    docs = [(label, _load(results, name)) for name, label in INGEST_FILES]
    docs = [(label, d) for label, d in docs if d]
    if not docs:
        return _missing("python bench/ingest.py --json bench/results/ingest-closed.json",
                        "python bench/ingest.py --rate 50000 --json bench/results/ingest-paced.json")
    rows = ["acknowledged (durable) spans/s", "reached DuckDB spans/s (acknowledged minus still queued at the end)",
            "backlog for DuckDB, growth over the run's second half", "Export p50 / p99", "server CPU",
            "peak RSS, the server's processes summed (their PSS)", "stored = acknowledged"]
    bars = ["≥ 50,000", "", "kept up: ≤ 2 % of the offered rate", "p99 ≤ 250 ms", "", "≤ 500 MB", "yes"]
    heads = [label + (f" at {_n(d['params']['rate'])} spans/s" if d["params"].get("rate") else "") for label, d in docs]
    cols = [_ingest_column(d) for _, d in docs]
    out = ["| figure | " + " | ".join(heads) + " | bar |", "|---" * (len(heads) + 2) + "|"]
    out += [f"| {row} | " + " | ".join(c[i] for c in cols) + f" | {bars[i]} |" for i, row in enumerate(rows)]
    out.append("")
    for _, d in docs:
        p = d["params"]
        out.append(_caption(d, _ingest_command(p)) + f" {p['clients']} clients × {p['concurrency']} in flight, "
                   f"{'HTTP' if p.get('http') else 'gRPC'}; {p['runs']} run(s) of {p['duration']:g} s"
                   + (" (shorter than the 3 runs of 20 s of record: a quick reading)" if p["duration"] < 20 or p["runs"] < 3
                      else "") + ".")
    return "\n".join(out)


# ---- gate --------------------------------------------------------------------------------------

def render_gate(results: Path) -> str:
    d = _load(results, "gate-speed")
    if not d:
        return _missing("python bench/gate.py speed --json bench/results/gate-speed.json")
    r, p = d["results"], d["params"]
    cli = r["gate_cli_s"]
    values = "/".join(str(v) for v in p["values"])
    return "\n".join([
        "| speed | measured | bar |",
        "|---|---|---|",
        f"| `shadowlens gate --data-dir` over {_n(r['traces'])} stored traces, {r['cohort_values']} cohort values "
        f"({values}), median of {cli['n']} | **{cli['median']:.2f} s** (min {cli['min']:.2f}, max {cli['max']:.2f}; "
        f"{r['evaluate_in_process_s']:.2f} s of it in `evaluate`) | ≤ 2 s |",
        "",
        _caption(d, f"bench/gate.py speed --traces {p['traces']} --repeat {p['repeat']}"),
    ])


# ---- analyzers ---------------------------------------------------------------------------------

def render_analyzers(results: Path) -> str:
    d = _load(results, "analyzers")
    if not d:
        return _missing("python bench/analyzers.py --json bench/results/analyzers.json")
    r, p = d["results"], d["params"]
    w, m = r["window_refresh_s"], r["metrics_get_s"]

    def ms(s: dict) -> str:
        return f"{s['median'] * 1000:.0f} ms median (min {s['min'] * 1000:.0f}, max {s['max'] * 1000:.0f})"
    rows = [f"| window refresh, {_n(r['spans'])} spans / {_n(r['traces'])} traces / {_n(r['series'])} series "
            f"in the window | {ms(w)} | ≤ 1 s |"]
    size = f"{_n(r['metrics_lines'])} lines, {r['metrics_bytes'] / 1e6:.1f} MB"
    for accept, label in (("text/plain", "text format, urllib"), ("curl text/plain", "text format, curl"),
                          ("application/openmetrics-text", "OpenMetrics with exemplars, urllib")):
        if accept in m:
            rows.append(f"| `GET /metrics`, {_n(r['series'])} cohort series ({size}), {label} | {ms(m[accept])} | "
                        + ("≤ 100 ms" if accept.endswith("text/plain") else "") + " |")
    return "\n".join(["| figure (`bench/analyzers.py`) | measured | bar |", "|---|---|---|", *rows, "",
                      _caption(d, f"bench/analyzers.py --spans {p['spans']} --series {p['series']} --repeat {p['repeat']}")])


# ---- before / after (bench/ab.py) -----------------------------------------------------------------

def render_ab(results: Path) -> str:
    d = _load(results, "ab")
    if not d:
        return _missing("python bench/ab.py A_TREE B_TREE --json bench/results/ab.json")
    r = d["results"]
    out = [f"| figure | A: {r['a']['label']} | B: {r['b']['label']} | B / A |", "|---|---|---|---|"]
    for fig in r["figures"]:
        digits = fig.get("digits", 0)

        def cell(side: dict) -> str:
            return f"{_n(side['median'], digits)} ({', '.join(_n(v, digits) for v in side['values'])})"
        ratio = "–" if fig["ratio"] is None else f"{fig['ratio']:.3f}"
        out.append(f"| {fig['name']} ({fig['unit']}) | {cell(fig['a'])} | {cell(fig['b'])} | {ratio} |")
    p = d["params"]
    out += ["", _caption(d, f"bench/ab.py A B --rounds {p['rounds']} --duration {p['duration']:g} --rate {p['rate']:.0f}"
                            f" --gate-traces {p['gate_traces']} --client {p['client']}")
            + f" A is {r['a']['tree']} at {r['a']['commit']}, B {r['b']['tree']} at {r['b']['commit']}. Each round runs"
            f" every bench on A, then on B; medians over {p['rounds']} round(s), each round's value in brackets."]
    return "\n".join(out)


# ---- footprint (bench/footprint.py) -----------------------------------------------------------------

def _mb(x) -> str:
    return "–" if x is None else f"{x:,.0f} MB"


def _met(value, goal) -> str:
    return "–" if value is None else "met" if value <= goal else "**missed**"


def render_footprint(results: Path) -> str:
    d = _load(results, "footprint")
    if not d:
        return _missing("python bench/footprint.py --json bench/results/footprint.json")
    s, ph, p = d["results"]["summary"], d["results"]["phases"], d["params"]
    g = s["goals"]

    def procs(phase: str) -> str:
        by = ph.get(phase, {}).get("by_process", {})
        return ", ".join(f"{name} {v.get('alone', v['pss']):.0f}" for name, v in by.items())

    def cores(x) -> str:
        return "–" if x is None else f"{x:.3f} cores"

    def steady(s: dict, key: str) -> str:
        """The steady CPU: the phase's, plus compressing the payload it wrote (bench/footprint.py says why)."""
        if s.get(f"{key}_steady_cores") is None:     # results from before the bench charged compression
            return cores(s.get(f"{key}_cores"))
        return (f"{cores(s[f'{key}_steady_cores'])}: {s[f'{key}_cores']:.3f} over the phase"
                f" + {s[f'{key}_compression_cores']:.3f} compressing its payload")

    def goal_of(s: dict, g: dict, key: str) -> tuple[str, str]:
        name = f"{key}_steady_cores" if f"{key}_steady_cores" in g else f"{key}_cores"
        return f"≤ {g[name]} cores", _met(s.get(name), g[name])
    disk = ph.get("disk_compacted", ph.get("disk_at_rest", {}))
    per = disk.get("bytes_per_span", {})
    rows = [
        ("memory idle (summed PSS, median)", _mb(s["pss_idle_mb"]) + f" ({procs('idle')})", f"≤ {g['pss_idle_mb']} MB",
         _met(s["pss_idle_mb"], g["pss_idle_mb"])),
        (f"memory at {_n(p['rate'])} spans/s (median)", _mb(s["pss_paced_mb"]) + f" ({procs('paced')})",
         f"≤ {g['pss_paced_mb']} MB", _met(s["pss_paced_mb"], g["pss_paced_mb"])),
        (f"memory at saturation (peak; median), {_n(s.get('saturation_acked_per_s'))} spans/s acknowledged",
         f"{_mb(s['pss_saturation_mb'])}; {_mb(s.get('pss_saturation_median_mb'))} ({procs('saturation')})",
         f"≤ {g['pss_saturation_mb']} MB", _met(s["pss_saturation_mb"], g["pss_saturation_mb"])),
        ("CPU idle", cores(s["cpu_idle_cores"]), f"≤ {g['cpu_idle_cores']} cores",
         _met(s["cpu_idle_cores"], g["cpu_idle_cores"])),
        (f"CPU at {_n(p['rate'])} spans/s", steady(s, "cpu_paced")
         + (f" ({ph['paced']['us_per_span']:.0f} µs per span over the phase)" if ph.get("paced", {}).get("us_per_span") else ""),
         *goal_of(s, g, "cpu_paced")),
    ]
    if s.get("cpu_paced_full_cores") is not None:     # results from before the phase existed have none
        gen = d["results"].get("generator", {})
        traces, per_trace = ph["paced_full"].get("window_traces"), gen.get("spans", 0) / max(gen.get("traces", 0), 1)
        # serve's default window (window: 15m): the saturation's traces fill it as this many spans/s would
        full = "" if not traces or not per_trace else (
            f" ({_n(traces)} traces: the 15-minute window of {_n(traces * per_trace / 900)} spans/s)")
        rows += [
            (f"memory at {_n(p['rate'])} spans/s, the window full (median)",
             _mb(s["pss_paced_full_mb"]) + f" ({procs('paced_full')})",
             f"≤ {g['pss_paced_full_mb']} MB", _met(s["pss_paced_full_mb"], g["pss_paced_full_mb"])),
            (f"CPU at {_n(p['rate'])} spans/s, the window full{full}", steady(s, "cpu_paced_full"),
             *goal_of(s, g, "cpu_paced_full")),
        ]
    rows += [
        (f"disk at rest, bytes per stored span ({_n(disk.get('stored_spans'))} spans"
         + (", the last payload segment compressed by a restart" if "disk_compacted" in ph else "") + ")",
         f"{_n(per.get('total'))} (payload log {_n(per.get('segments'))}, DuckDB {_n(per.get('duckdb'))})",
         f"≤ {g['bytes_per_span']}", _met(s["bytes_per_span"], g["bytes_per_span"])),
    ]
    for traces, key in (("1M", "gate_refresh_1m_s"), ("8M", "gate_refresh_8m_s")):
        v, cli = s.get(key), s.get(key.replace("refresh", "cli"))
        text = "–" if v is None else f"{v * 1000:,.0f} ms"
        if cli is not None:
            text += f" (`shadowlens gate --data-dir`: {cli:.2f} s)"
        goal = f"≤ {g['gate_refresh_8m_s'] * 1000:.0f} ms" if traces == "8M" else ""
        rows.append((f"the gate's refresh, {traces} traces in the window", text, goal,
                     _met(v, g["gate_refresh_8m_s"]) if traces == "8M" else ""))
    out = ["| figure | measured | goal | |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows]
    cmd = (f"bench/footprint.py --idle {p['idle']:g} --paced {p['paced']:g} --saturation {p['saturation']:g}"
           f" --gate {p['gate']}")
    gate_src = ", ".join(f"{x['file']} ({x['commit']})" for x in (d["results"].get("gate") or {}).get("sources", []))
    out += ["", _caption(d, cmd) + " Memory is the summed PSS of serve's process tree in MB (each process's share in"
            " brackets)" + (", as it is alone in its container: the tree's distinct resident pages, since on the shared"
                            " bench machine the kernel's PSS also splits library pages with other processes of the"
                            f" venv (it read {_mb(s.get('machine_pss_idle_mb'))} idle)"
                            if s.get("memory_basis") == "alone" else "")
            + "; CPU is utime+stime of the tree over the phase"
            + (", plus the compression of the payload the phase wrote, which stays in the live segment of the payload"
               " log until it is closed (the bench runs the compactor's code on the same payloads for its cost per MB)"
               if s.get("cpu_paced_steady_cores") is not None else "")
            + "; bytes after the queue drained and the server stopped."
            + (f" The gate's figures are read from {gate_src}." if gate_src else "")]
    return "\n".join(out)


RENDERERS: dict[str, Callable[[Path], str]] = {
    "ingest": render_ingest, "gate": render_gate, "analyzers": render_analyzers, "ab": render_ab,
    "footprint": render_footprint}

BLOCK = re.compile(r"<!-- figures:(?P<name>[\w-]+) -->\n.*?<!-- /figures:(?P=name) -->", re.S)


def render_doc(text: str, results: Path) -> str:
    """The doc with every figures block (and a bare <!-- figures --> line) rendered from ``results``."""
    def block(name: str) -> str:
        return f"<!-- figures:{name} -->\n{RENDERERS[name](results)}\n<!-- /figures:{name} -->"

    def one(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise SystemExit(f"figures block {name!r} has no renderer; known: {', '.join(RENDERERS)}")
        return block(name)
    text = BLOCK.sub(one, text)
    return re.sub(r"^<!-- figures -->$", lambda _: "\n\n".join(block(n) for n in RENDERERS), text, flags=re.M)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc", type=Path, default=None,
                    help="the doc holding the figures blocks (default: docs/performance.md, and the README's blocks)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the JSON results (bench/results)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when the doc differs from the render")
    args = ap.parse_args(argv)
    # The README carries only named blocks (its footprint table); performance.md must have some.
    docs = [(args.doc, True)] if args.doc else [(DOC, True), (README, False)]
    worst = 0
    for doc, required in docs:
        worst = max(worst, _one_doc(doc, required, args))
    return worst


def _one_doc(doc: Path, required: bool, args) -> int:
    if not doc.exists():
        print(f"{doc} does not exist: give the doc with the figures blocks with --doc", file=sys.stderr)
        return 2
    text = doc.read_text()
    if not BLOCK.search(text) and not re.search(r"^<!-- figures -->$", text, re.M):
        if not required:
            return 0
        print(f"{doc} has no <!-- figures:NAME --> block and no <!-- figures --> line", file=sys.stderr)
        return 2
    new = render_doc(text, args.results)
    if args.check:
        if new == text:
            return 0
        sys.stderr.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(doc),
                                                   "rendered from " + str(args.results)))
        print(f"\n{doc} differs from what {args.results} renders: run `python bench/figures.py`", file=sys.stderr)
        return 1
    if new != text:
        doc.write_text(new)
        print(f"updated {doc}", file=sys.stderr)
    return 0

if __name__ == "__main__":
    sys.exit(main())
