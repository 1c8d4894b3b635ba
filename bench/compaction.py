#!/usr/bin/env python3
"""Compaction bench: how fast closed payload segments compress, how small, and what that costs the
acknowledgement path (issue 18, part 4).

1. Builds (seeded) bench/pool.py's 512-span agent requests and writes them as one plain segment.
2. ``compress``: compact_segment at each ``--levels`` on a copy of it: MB/s of one core, spans/s, ratio,
   compressed bytes per span. Blocks hold one 1.3 MB request each, so no block sees a repeated request.
3. ``ack``: the frontend's acknowledgement path alone (4 threads appending a request each to a SegmentLog
   and waiting for its group fdatasync, as intake.py does), alternating with the same while another process
   compacts segments in a loop on a thread niced by +10 (as serve's compactor, ``compaction.lower_priority``),
   and on one at SCHED_IDLE (the alternative). Acknowledged spans/s, medians over ``--rounds`` alternations.

Usage: python bench/compaction.py [--seconds 5] [--rounds 3] [--json FILE]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import threading
import time

from common import add_json_arg, emit, say
from pool import SPANS_PER_REQUEST, build_pool

from shadowlens.collector.store import compaction
from shadowlens.collector.store.segments import SegmentLog, segment_path


def plain_segment(directory: str, seg: int, payloads: list[bytes], total: int) -> int:
    log = SegmentLog(directory, seg, segment_bytes=1 << 40)
    n = 0
    for i in range(total):
        log.append(payloads[i % len(payloads)])
        n += 1
    log.sync()
    log.close()
    return n


def _compact_copy(src: str, work: str, level: int) -> tuple[compaction.Compacted, float]:
    """compact_segment on a copy of ``src``'s plain segment 1 in the fresh directory ``work`` (removed after);
    returns what it did and the CPU seconds it took in this process."""
    os.makedirs(work)
    shutil.copy(segment_path(src, 1), segment_path(work, 1))
    t0 = time.process_time()
    c = compaction.compact_segment(work, 1, level)
    cpu = time.process_time() - t0
    shutil.rmtree(work)
    return c, cpu


def compress_figures(payloads: list[bytes], levels: list[int], tmp: str) -> list[dict]:
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    records = len(payloads)
    plain_segment(src, 1, payloads, records)
    size = os.path.getsize(segment_path(src, 1))
    out = []
    for level in levels:
        c, _ = _compact_copy(src, os.path.join(tmp, f"level{level}"), level)
        spans = records * SPANS_PER_REQUEST
        out.append({"level": level, "input_bytes": size, "output_bytes": c.output_bytes,
                    "ratio": round(size / c.output_bytes, 2), "bytes_per_span": round(c.output_bytes / spans, 1),
                    "mb_per_s": round(size / c.seconds / 1e6, 1), "spans_per_s": round(spans / c.seconds)})
        say(f"  level {level}: {size / c.output_bytes:.2f}x, {c.output_bytes / spans:,.0f} B/span compressed, "
            f"{size / c.seconds / 1e6:,.0f} MB/s ({spans / c.seconds:,.0f} spans/s) incl. fsync and read-back")
    return out


def cpu_per_byte(payloads: list[bytes], level: int, tmp: str, repeats: int = 3) -> float:
    """CPU seconds serve's compactor spends per byte of payload log (compact_segment: compress, fsync, read
    back and check), median of ``repeats`` runs in this process on one plain segment of ``payloads``.
    bench/footprint.py charges it to its paced phases, whose payload stays in the live segment."""
    src = os.path.join(tmp, "cpu-src")
    os.makedirs(src)
    plain_segment(src, 1, payloads, len(payloads))
    size = os.path.getsize(segment_path(src, 1))
    costs = [_compact_copy(src, os.path.join(tmp, f"cpu-{i}"), level)[1] / size for i in range(repeats)]
    shutil.rmtree(src)
    return statistics.median(costs)


def _compact_forever(src: str, work: str, stop, level: int, idle: bool) -> None:
    if idle:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    else:
        compaction.lower_priority()     # as serve's compactor thread
    n = 0
    while not stop.is_set():
        n += 1
        shutil.copy(segment_path(src, 1), segment_path(work, n))
        try:
            compaction.compact_segment(work, n, level, stop=stop)
        except compaction.Stopped:
            return
        os.remove(compaction.compressed_path(work, n))


def ack_rate(payloads: list[bytes], directory: str, seconds: float, threads: int = 4) -> float:
    log = SegmentLog(directory, len(os.listdir(directory)) + 1)
    count = [0] * threads
    end = time.monotonic() + seconds

    def worker(i: int) -> None:
        k = i
        while time.monotonic() < end:
            _, _, ticket = log.append(payloads[k % len(payloads)])
            log.wait_durable(ticket)
            count[i] += 1
            k += threads

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    took = time.monotonic() - t0
    log.close()
    for name in os.listdir(directory):
        os.remove(os.path.join(directory, name))
    return sum(count) * SPANS_PER_REQUEST / took


def ack_figures(payloads: list[bytes], seconds: float, rounds: int, level: int, tmp: str) -> dict:
    src, work, acks = (os.path.join(tmp, n) for n in ("csrc", "cwork", "acks"))
    for d in (src, work, acks):
        os.makedirs(d)
    plain_segment(src, 1, payloads, 64)       # ~85 MB: one compaction ~0.3 s, then again
    rates: dict[str, list[float]] = {"alone": [], "nice": [], "idle": []}
    ctx = mp.get_context("spawn")
    for r in range(rounds):
        for mode in rates:
            if mode == "alone":
                rates[mode].append(ack_rate(payloads, acks, seconds))
                continue
            stop = ctx.Event()
            p = ctx.Process(target=_compact_forever, args=(src, work, stop, level, mode == "idle"))
            p.start()
            time.sleep(0.5)
            rates[mode].append(ack_rate(payloads, acks, seconds))
            stop.set()
            p.join(30)
        say(f"  round {r + 1}: acknowledged spans/s alone {rates['alone'][-1]:,.0f}, beside a compactor niced +"
            f"{compaction.NICE} {rates['nice'][-1]:,.0f}, beside one at SCHED_IDLE {rates['idle'][-1]:,.0f}")
    med = {mode: statistics.median(xs) for mode, xs in rates.items()}
    return {**{f"{mode}_spans_per_s": [round(x) for x in xs] for mode, xs in rates.items()},
            **{f"median_{mode}": round(v) for mode, v in med.items()},
            "ratio_nice": round(med["nice"] / med["alone"], 3), "ratio_idle": round(med["idle"] / med["alone"], 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=24, help="distinct pool requests (default 24, ~32 MB)")
    ap.add_argument("--levels", default="1,3,6", help="zstd levels to measure (default 1,3,6)")
    ap.add_argument("--seconds", type=float, default=5.0, help="each ack phase (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the ack phases (default 3)")
    ap.add_argument("--level", type=int, default=compaction.DEFAULT_LEVEL, help="level compacting beside acks")
    ap.add_argument("--seed", type=int, default=1)
    add_json_arg(ap)
    a = ap.parse_args(argv)
    templates, stats, _ = build_pool(a.requests, a.seed)
    payloads = [t.data for t in templates]
    say(stats.lines()[0])
    tmp = tempfile.mkdtemp(prefix="shadowlens-compaction-")
    try:
        say("compression (one core, one request per block):")
        comp = compress_figures(payloads, [int(x) for x in a.levels.split(",")], tmp)
        say(f"acknowledgement path, alone vs beside a compactor process (level {a.level}):")
        acks = ack_figures(payloads, a.seconds, a.rounds, a.level, tmp)
        say(f"  medians: alone {acks['median_alone']:,}, nice {acks['median_nice']:,} ({acks['ratio_nice']:.3f}x), "
            f"SCHED_IDLE {acks['median_idle']:,} ({acks['ratio_idle']:.3f}x) spans/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit("compaction", vars(a), {"generator": stats.as_dict(), "compress": comp, "ack": acks,
                                 "load_avg": os.getloadavg()}, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
