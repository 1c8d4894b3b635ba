"""The receiver's check against the decoder on millions of mutated requests (issue 14 part 3).

    .venv/bin/python bench/fuzz.py --inputs 1000000 --workers 2

Every input either is refused whole by the check (INVALID_ARGUMENT: nothing acknowledged) or decodes to
exactly the spans the check acknowledged, goes into DuckDB's real tables, and reads back through the
``spans`` view's decoding; anything else is a disagreement (an acknowledged span that would be lost).
tests/decode_fuzz.py has the seeds, the mutations and the oracle; tests/test_decode_agreement.py runs a
few thousand inputs of it in the suite. Disagreeing inputs are written to --out for a reproduction.
The counts print as one JSON document (stdout, or --json FILE), the human-readable lines on stderr.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from common import add_json_arg, emit, say  # noqa: E402


def _worker(args) -> dict:
    n, seed, python_every, scanner, deadline, group = args
    import decode_fuzz

    def progress(t, elapsed):
        print(f"  worker {seed}: {t.inputs:,} inputs, {t.accepted:,} acknowledged, {t.spans_accepted:,} spans,"
              f" {t.disagreements} disagreements, {t.inputs / elapsed:,.0f}/s", file=sys.stderr, flush=True)
    t = decode_fuzz.run(n, seed=seed, scanner=scanner, python_every=python_every, progress=progress,
                        deadline=deadline, group_size=group)
    return t.__dict__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000, help="mutated requests in all (default 1,000,000)")
    ap.add_argument("--workers", type=int, default=2, help="processes, each with its own seed (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scanner", default="auto", choices=("auto", "c", "python"),
                    help="the scanner under test (receivers.scanner; default auto: C when built)")
    ap.add_argument("--python-every", type=int, default=20,
                    help="every Nth acknowledged input also through the pure-Python check, for its verdict (0: never)")
    ap.add_argument("--out", type=Path, default=Path("fuzz-disagreements"),
                    help="directory for the inputs that disagreed (written only if any)")
    ap.add_argument("--group", type=int, default=32,
                    help="acknowledged inputs decoded together, as one request of their joined bytes (sums of"
                         " their counts compared; every 8th input alone, in full; any difference re-run input by"
                         " input). 1: each alone (default 32)")
    add_json_arg(ap)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop each worker after this long and report what was run (default: run every input)")
    args = ap.parse_args(argv)
    per = [args.inputs // args.workers + (i < args.inputs % args.workers) for i in range(args.workers)]
    # time.monotonic() is system-wide on Linux, so the parent's clock bounds the workers
    deadline = time.monotonic() + args.max_seconds if args.max_seconds else None
    jobs = [(n, args.seed + i, args.python_every, args.scanner, deadline, args.group) for i, n in enumerate(per)]
    t0 = time.monotonic()
    if args.workers == 1:
        results = [_worker(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(_worker, jobs)
    elapsed = time.monotonic() - t0
    total = Counter()
    reasons = Counter()
    samples = []
    for r in results:
        for k in ("inputs", "rejected_whole", "accepted", "spans_accepted", "spans_rejected", "disagreements",
                  "python_checked", "python_verdict_differs"):
            total[k] += r[k]
        reasons.update(r["reasons"])
        samples.extend(r["samples"])
    say(f"inputs {total['inputs']:,} in {elapsed:,.0f} s ({total['inputs'] / elapsed:,.0f}/s, {args.workers} workers,"
          f" scanner {args.scanner}, group {args.group})")
    say(f"  refused whole (INVALID_ARGUMENT): {total['rejected_whole']:,}")
    say(f"  acknowledged: {total['accepted']:,} requests, {total['spans_accepted']:,} spans stored,"
          f" {total['spans_rejected']:,} spans rejected in partial_success ("
          + ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items())) + ")")
    say(f"  disagreements (acknowledged but not stored, or not readable): {total['disagreements']:,}")
    if total["python_checked"]:
        say(f"  pure-Python check (receivers.scanner: python) on {total['python_checked']:,} of the acknowledged:"
              f" refuses {total['python_verdict_differs']:,} whole (what the protobuf library refuses; never acknowledged"
              " there, so never lost)")
    if samples:
        args.out.mkdir(parents=True, exist_ok=True)
        for i, (what, data) in enumerate(samples):
            (args.out / f"{i:03d}.bin").write_bytes(data)
            say(f"  {args.out / f'{i:03d}.bin'}: {what}")
    emit("fuzz", args, {**total, "seconds": round(elapsed, 1), "inputs_per_s": round(total["inputs"] / elapsed, 1),
                        "rejected_reasons": dict(reasons), "disagreement_files": len(samples)}, args.json)
    return 1 if total["disagreements"] else 0


if __name__ == "__main__":
    sys.exit(main())
