"""Malformed OTLP/JSON bodies and /gate requests against a real ``serve``, many more than the suite sends.

    .venv/bin/python bench/fuzz_json.py --inputs 20000 --gate 5000 --seed 1

Every OTLP/JSON body must get 200 or a 400 with a google.rpc.Status message, every /gate request an answer
(no 500, no connection closed in silence). tests/json_fuzz.py has the mutations and the oracle;
tests/test_json_fuzz.py runs a few hundred in the suite. Prints the counts as one JSON document (stdout, or
--json FILE); failing inputs go to --out. Exit status 1 when any input failed.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import json_fuzz  # noqa: E402
from common import add_json_arg, emit, say  # noqa: E402
from harness import Server, free_port, server_env  # noqa: E402


def _otlp(port: int, seed: int) -> tuple[int | None, str | None, bytes]:
    path, body = json_fuzz.random_body(random.Random(seed))
    status, _, out = json_fuzz.post_json(port, path, body)
    return status, json_fuzz.judge_otlp(status, out), body


def _gate(port: int, seed: int) -> tuple[int | None, str | None, bytes]:
    raw = json_fuzz.random_gate_request(random.Random(seed))
    status, _, _ = json_fuzz.exchange(port, raw, timeout=40)
    return status, json_fuzz.judge_gate(status), raw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=20_000, help="OTLP/JSON bodies")
    ap.add_argument("--gate", type=int, default=5_000, help="/gate requests")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--out", default="fuzz_json_failures", help="directory for failing inputs")
    add_json_arg(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        g, h, m = free_port(), free_port(), free_port()
        srv = Server(data_dir=Path(tmp) / "data", grpc_port=g, http_port=h, metrics_port=m, env=server_env(g, h, m))
        srv.start()
        report: dict = {}
        failures = []
        try:
            for name, n, fn, port in (("otlp_json", args.inputs, _otlp, h), ("gate", args.gate, _gate, m)):
                statuses, problems = Counter(), Counter()
                t0 = time.perf_counter()
                seeds = range(args.seed * 10_000_000, args.seed * 10_000_000 + n)
                with ThreadPoolExecutor(args.clients) as pool:
                    for seed, (status, problem, data) in zip(seeds, pool.map(lambda s: fn(port, s), seeds)):
                        statuses["no answer" if status is None else str(status)] += 1
                        if problem:
                            problems[problem.split(":")[0][:60]] += 1
                            failures.append((name, seed, data))
                took = time.perf_counter() - t0
                report[name] = {"inputs": n, "statuses": dict(sorted(statuses.items())),
                                "failures": sum(problems.values()), "failure_kinds": dict(problems),
                                "seconds": round(took, 1), "per_second": round(n / took, 1)}
        finally:
            rc = srv.stop(timeout=60)
        report["serve_exit_status"] = rc
    if failures:
        out = Path(args.out)
        out.mkdir(exist_ok=True)
        for name, seed, data in failures[:200]:
            (out / f"{name}-{seed}.bin").write_bytes(data)
        report["failures_written_to"] = str(out)
    for name in ("otlp_json", "gate"):
        r = report.get(name, {})
        say(f"{name}: {r.get('inputs', 0):,} inputs, {r.get('failures', 0)} failures, {r.get('per_second', 0):,.0f}/s")
    emit("fuzz_json", args, report, args.json)
    return 1 if failures or rc != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
