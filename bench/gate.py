#!/usr/bin/env python3
"""Gate benchmark and statistical figures. Prints numbers (medians); it is not a test.

  python bench/gate.py speed              # `shadowlens gate --data-dir` over 1M stored traces, 200 cohorts
  python bench/gate.py aa --seeds 300     # A/A false-block rate, 50 cohorts, 6 looks per seed
  python bench/gate.py power --seeds 200  # share of seeds in which each planted regression is blocked

Bar (issue 4): the gate over 1M stored traces and 200 cohorts answers in <= 2 s (median of 3).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import duckdb  # noqa: E402
import polars as pl  # noqa: E402

from analyzers.compare import compare  # noqa: E402
from analyzers.rules import parse_gate  # noqa: E402
from collector.store.database import PayloadDecoder, db_path, migrate, register_functions  # noqa: E402

LABELS = ("intent", "language", "tier")


def build_store(data_dir: Path, traces: int, values: tuple[int, int, int]) -> None:
    """A store holding `traces` completed traces (half per route, paired by request id) and their evals."""
    data_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db_path(data_dir)))
    register_functions(con, PayloadDecoder(data_dir))     # the spans view needs it to be created
    migrate(con, LABELS)
    n = traces // 2
    vi, vl, vt = values
    con.execute(f"""
        INSERT INTO traces (trace_id, route, request_id, intent, language, tier, start_time, end_time,
                            duration_seconds, steps, llm_calls, tool_calls, input_tokens, output_tokens, cost_usd,
                            evals_total, evals_failed, refused, escalated, model, incomplete, revision,
                            eval_names, failed_evals)
        SELECT md5(r.route || i::VARCHAR), r.route, 'req-' || i::VARCHAR,
               'intent-' || (hash(i) % {vi})::VARCHAR, 'lang-' || (hash(i + 1) % {vl})::VARCHAR,
               'tier-' || (hash(i + 2) % {vt})::VARCHAR,
               now()::TIMESTAMP - INTERVAL 50 MINUTE + to_microseconds((i * 2400000000 // {n})::BIGINT),
               now()::TIMESTAMP - INTERVAL 49 MINUTE + to_microseconds((i * 2400000000 // {n})::BIGINT),
               exp(1.4 + 0.5 * sqrt(-2 * ln(random())) * cos(6.283185 * random())), 1 + (random() * 5)::INT,
               3, 1, 2400, 450, 0.01 * (0.5 + random()), 1, 0, random() < 0.02, false,
               'm', false, 1, ['task_completion'], []
        FROM range({n}) t(i), (VALUES ('baseline'), ('candidate')) r(route)
    """)
    con.execute("""
        UPDATE traces SET evals_failed = (random() < 0.12)::INT;
        UPDATE traces SET failed_evals = CASE WHEN evals_failed > 0 THEN ['task_completion'] ELSE [] END;
        INSERT INTO evals (trace_id, span_id, name, score, label, passed, explanation, source)
        SELECT trace_id, '00', 'task_completion', NULL, NULL, evals_failed = 0, NULL, 'bench' FROM traces
    """)
    con.execute("CHECKPOINT")
    con.close()


def speed(args) -> None:
    with tempfile.TemporaryDirectory(prefix="shadowlens-gate-bench-") as tmp:
        data = Path(tmp) / "data"
        started = time.perf_counter()
        build_store(data, args.traces, tuple(args.values))
        print(f"built a store with {args.traces:,} traces and {sum(args.values)} cohort values"
              f" ({'/'.join(map(str, args.values))} for {', '.join(LABELS)}) in {time.perf_counter() - started:.1f} s")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_")}
        times, rc = [], None
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "collector.cli", "gate", "--data-dir", str(data)],
                                 capture_output=True, text=True, cwd=REPO, env=env)
            times.append(time.perf_counter() - t)
            rc = out.returncode
        print(f"shadowlens gate --data-dir: median {statistics.median(times):.2f} s over {args.repeat} runs"
              f" (min {min(times):.2f}, max {max(times):.2f}); exit {rc}; first line: {out.stdout.splitlines()[0]}")
        # where the time goes, in process
        from analyzers.gate import evaluate
        from collector.store.reader import query
        settings = parse_gate({})
        t = time.perf_counter()
        v = evaluate(lambda sql: query(data, sql), settings, LABELS)
        print(f"  in process: evaluate {time.perf_counter() - t:.2f} s, {len(v.results)} rule results;"
              f" verdict {v.verdict}; traces {v.traces}")


def aa(args) -> None:
    from gate_sim import simulate
    settings = parse_gate({})
    looks = (1000, 2000, 4000, 6000, 8000, 10000)
    blocked = 0
    t = time.perf_counter()
    for seed in range(args.seeds):
        frame = simulate(max(looks), seed=10_000 + seed, n_values=args.values)
        b, c = frame.filter(pl.col("route") == "baseline"), frame.filter(pl.col("route") == "candidate")
        for n in looks:
            g = pl.concat([b.head(n), c.head(n)])
            if compare(g, settings, ("intent",), now=float(g["start_s"].max())).verdict == "block":
                blocked += 1
                break
    print(f"A/A: {blocked}/{args.seeds} seeds falsely blocked ({100 * blocked / args.seeds:.2f} %);"
          f" {args.values} cohorts x 5 rules, {len(looks)} looks per seed (1k..10k requests);"
          f" {time.perf_counter() - t:.0f} s")


def power(args) -> None:
    from gate_sim import Effect, simulate
    settings = parse_gate({})
    cases = (("task completion -4 points (10 % discordance), 2,000 pairs", Effect(pass_drop=0.04), "task_completion"),
             ("refusal x3 from 2 %, 2,000 pairs", Effect(refusal_x=3.0), "refusal_rate"),
             ("p99 x1.5, 2,000 traces per route", Effect(latency_x=1.5), "p99_latency"),
             ("cost x1.25, 2,000 pairs", Effect(cost_x=1.25), "cost_per_trace"),
             ("steps x1.4, 2,000 pairs", Effect(steps_x=1.4), "steps"))
    for name, effect, rule in cases:
        hit = 0
        for seed in range(args.seeds):
            frame = simulate(2000, seed=20_000 + seed, effect=effect)
            v = compare(frame, settings, ("intent",), now=float(frame["start_s"].max()))
            hit += v.verdict == "block" and any(r.rule == rule and r.cohort == "all" and r.state == "fail"
                                                 for r in v.results)
        print(f"power: {name}: blocked in {hit}/{args.seeds} seeds ({100 * hit / args.seeds:.1f} %)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--traces", type=int, default=1_000_000)
    s.add_argument("--values", type=int, nargs=3, default=(100, 60, 40), help="cohort values per label")
    s.add_argument("--repeat", type=int, default=3)
    a = sub.add_parser("aa")
    a.add_argument("--seeds", type=int, default=300)
    a.add_argument("--values", type=int, default=50, help="cohorts (values of one label)")
    p = sub.add_parser("power")
    p.add_argument("--seeds", type=int, default=200)
    args = ap.parse_args()
    {"speed": speed, "aa": aa, "power": power}[args.what](args)


if __name__ == "__main__":
    main()
