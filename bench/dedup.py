#!/usr/bin/env python3
"""Deduplication benchmark: what remembering span identities costs the store.

Prints figures (medians) as one JSON document (stdout, or --json FILE), its lines on stderr; it is not a
test. Three measures:
- the memory of recent keys at its default size: keys remembered, bytes per key;
- the pre-filter alone: ns per key to look up and remember 32k-key groups, with the memory full;
- the store's insert rate with deduplication on and off: in-process StoreWriter commits of
  pre-decoded 512-span requests (random ids), us per stored span, and with a share of retries.

  python bench/dedup.py
  python bench/dedup.py --spans 1000000 --repeat 5
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
from common import add_json_arg, emit, say  # noqa: E402
from otlp_builders import random_spans, span_request  # noqa: E402

from shadowlens.collector.counters import IngestCounters  # noqa: E402
from shadowlens.collector.decode.normalize import Normalizer  # noqa: E402
from shadowlens.collector.store.writer import RecentKeys, StoreWriter  # noqa: E402
from shadowlens.config import default_config  # noqa: E402

GROUP = 32768


def memory_figures(max_keys: int) -> dict:
    rng = np.random.default_rng(0)
    keys = RecentKeys(max_keys)
    seq = 0
    while keys.size() < max_keys - GROUP:     # fill it
        seq += 1
        batch = rng.integers(0, 2**64 - 1, size=GROUP, dtype=np.uint64)
        keys.remember(batch[~keys.lookup(batch)[0]], seq)
    n, nbytes = keys.size(), keys.nbytes()
    say(f"memory: {n:,} keys remembered (dedup_max_keys {max_keys:,}), {nbytes / n:.2f} bytes/key, {nbytes / 1e6:.1f} MB")
    times = []
    for _ in range(30):
        seq += 1
        batch = rng.integers(0, 2**64 - 1, size=GROUP, dtype=np.uint64)
        t0 = time.perf_counter()
        seen, _range, _repeated = keys.lookup(batch)
        keys.remember(batch[~seen], seq)
        times.append((time.perf_counter() - t0) / GROUP * 1e9)
    say(f"pre-filter with the memory full: lookup + remember {statistics.median(times):.0f} ns/key (median of 30 groups)")
    return {"max_keys": max_keys, "keys": n, "bytes_per_key": round(nbytes / n, 2), "bytes": nbytes,
            "prefilter_ns_per_key": round(statistics.median(times), 1)}


def insert_rate(spans: int, dedup_keys: int, retry_share: float, repeat: int) -> float:
    cfg = default_config()
    norm = Normalizer(cfg.cohort_labels, cfg.evals)
    rng = random.Random(1)
    payloads = [span_request(random_spans(512, rng)).SerializeToString() for _ in range(spans // 512)]
    retries = int(len(payloads) * retry_share)
    payloads += [payloads[rng.randrange(len(payloads))] for _ in range(retries)]
    rng.shuffle(payloads)
    batches = [norm.normalize_traces(p) for p in payloads]
    results = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            store = StoreWriter(Path(tmp), cfg.cohort_labels, IngestCounters(), dedup_max_keys=dedup_keys)
            store.start()
            t0 = time.perf_counter()
            for b in batches:
                store.submit(b, (0, 0, len(b.payload)))   # as the frontend hands them over: synced already
            store.flush(600)
            took = time.perf_counter() - t0
            con = store.cursor()
            stored = con.execute("select count(*) from spans_core").fetchone()[0]
            con.close()
            store.shutdown()
        results.append(took / stored * 1e6)
    return statistics.median(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spans", type=int, default=262144, help="distinct spans per insert run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-keys", type=int, default=4_000_000, help="store.dedup_max_keys")
    add_json_arg(ap)
    args = ap.parse_args()
    out = {"memory": memory_figures(args.max_keys), "insert_us_per_stored_span": {}}
    for keys, share, what in ((0, 0.0, "dedup off"), (args.max_keys, 0.0, "dedup on, no retries"),
                              (args.max_keys, 0.1, "dedup on, 10% of requests retried")):
        us = insert_rate(args.spans, keys, share, args.repeat)
        out["insert_us_per_stored_span"][what] = round(us, 3)
        say(f"insert rate, {what}: {us:.2f} us/stored span (median of {args.repeat}, {args.spans:,} spans)")
    emit("dedup", args, out, args.json)


if __name__ == "__main__":
    main()
