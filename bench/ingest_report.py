"""The ingest bench's human-readable lines (stderr), the issue's bar, and the medians over runs."""
from __future__ import annotations

import statistics

from common import say

BAR_SPANS_PER_S = 50_000
BAR_P99_MS = 250.0
BAR_RSS_MB = 500.0


def print_run(res, bar_grpc, timeline=False):
    """One run's figures as lines on stderr (its JSON is in the result document)."""
    p = say
    load = f"offered {res['rate']:,.0f} spans/s, paced" if res.get("rate") else "closed loop"
    p(f"--- run {res['run']} ({res['transport']}, {res['clients']} clients x {res['concurrency']} in flight, {load}) ---")
    if res.get("fatal"):
        p("  FATAL: " + "\n".join(res["problems"]))
        return
    p(f"  duration            {res['duration_s']:.2f} s")
    p(f"  spans sent          {res['spans_sent']:,}  ({res['export_attempts']:,} Export attempts, "
      f"{res['exports_ok']:,} OK)")
    p(f"  acknowledged        {res['acked']:,}")
    p(f"  rejected (partial)  {res['rejected']:,}")
    p(f"  unavailable/retried {res['unavailable']:,} responses; dropped at deadline {res['dropped_spans']:,} spans")
    if res["errors"]:
        p(f"  other errors        {res['errors']} ({res['error_spans']:,} spans)")
    p(f"  acked spans/s       {res['acked_per_s']:,.0f}   (per-second min/median/max "
      f"{res.get('per_second_min', 0):,}/{res.get('per_second_median', 0):,.0f}/{res.get('per_second_max', 0):,})")
    if timeline:
        p("  acked per second    " + " ".join(f"{v / 1000:.1f}k" for v in res.get("per_second", [])))
    if "committed_per_s" in res:
        p(f"  in DuckDB spans/s   {res['committed_per_s']:,.0f}   (acknowledged minus the {res['queued_at_end']:,} "
          "still queued for DuckDB when the load ended: the sustained rate of the whole pipeline)")
    if "backlog_growth_per_s" in res:
        p(f"  backlog growth      {res['backlog_growth_per_s']:+,.0f} spans/s over the second half (queue for DuckDB every 2 s: "
          f"{', '.join(f'{q:,}' for _, q in res['backlog_samples'])}); about 0 when the pipeline keeps up")
    p(f"  Export latency      p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, max {res['max_ms']:.1f} ms")
    p(f"  client CPU          {res['client_cpu_s']:.1f} s ({res['client_cores']:.2f} cores; user "
      f"{res['client_user_s']:.1f} s, sys {res['client_sys_s']:.1f} s)")
    if "server_cpu_s" in res:
        p(f"  server CPU          {res['server_cpu_s']:.1f} s during load ({res['server_cores']:.2f} cores); "
          f"{res['server_cpu_lifetime_s']} s over its lifetime; SIGTERM->exit {res['server_stop_s']:.1f} s, "
          f"exit {res['server_exit']}")
        if timeline:
            p("  server RSS MB/s     " + " ".join(str(v) for v in res.get("rss_mb_per_second", [])))
        p(f"  server peak RSS     {res['peak_rss_mb']:.0f} MB (sampled tree/VmHWM; wait4 maxrss "
          f"{res['server_maxrss_mb']} MB); peak PSS of the tree {res.get('peak_pss_mb', 0):.0f} MB "
          "(shared library pages counted once)")
        stored = res.get("stored")
        tag = "OK" if res["stored_ok"] else "!!! FAIL: stored != acknowledged !!!"
        p(f"  stored              {stored if stored is None else format(stored, ',')} vs acknowledged "
          f"{res['acked']:,}  {tag}")
        sm = res.get("server_metrics") or {}
        if sm:
            p("  server /metrics     " + ", ".join(f"{k.replace('shadowlens_', '')}={v:,.0f}" if isinstance(v, float)
                                                  else f"{k}={v}" for k, v in sm.items()))
    if res.get("partial_success_messages"):
        p(f"  partial_success     {res['partial_success_messages']}")
    for prob in res["problems"]:
        p("  PROBLEM: " + prob)
    if bar_grpc:
        print_bar(res)


def print_bar(r, label="  bar", rate=None):
    """The issue's bar. Paced (``rate``): the throughput check is that the server kept up with an
    offered rate of at least 50,000: it acknowledged >= 98 % of it, and the backlog queued for DuckDB
    grew by at most 2 % of it a second over the run's second half (BacklogSampler)."""
    rate = rate or r.get("rate")
    if rate:
        growth = r.get("backlog_growth_per_s")
        if growth is None:     # no queue samples (--endpoint): what reached DuckDB by the end
            kept_up = min(r.get("acked_per_s", 0), r.get("committed_per_s", r.get("acked_per_s", 0))) >= 0.98 * rate
        else:
            kept_up = r.get("acked_per_s", 0) >= 0.98 * rate and growth <= 0.02 * rate
        checks = [(f"kept up with {rate:,.0f} spans/s offered (>= 50,000)", kept_up and rate >= BAR_SPANS_PER_S)]
    else:
        checks = [("acked spans/s >= 50,000", r.get("acked_per_s", 0) >= BAR_SPANS_PER_S)]
    checks.append(("Export p99 <= 250 ms", r.get("p99_ms", 1e9) <= BAR_P99_MS))
    if r.get("peak_rss_mb") is not None:
        checks.append(("peak RSS <= 500 MB", r["peak_rss_mb"] <= BAR_RSS_MB))
    if "stored_ok" in r:
        checks.append(("stored == acknowledged", bool(r["stored_ok"])))
    say(label + ": " + "; ".join(f"{name}: {'PASS' if ok else 'MISS'}" for name, ok in checks))
    return all(ok for _, ok in checks)


MEDIAN_KEYS = ("duration_s", "spans_sent", "acked", "rejected", "unavailable", "acked_per_s", "p50_ms", "p99_ms",
               "client_cpu_s", "client_cores", "server_cpu_s", "server_cores", "peak_rss_mb", "peak_pss_mb",
               "per_second_median", "stored", "committed_per_s",
               "backlog_growth_per_s")


def median_of(runs):
    """The median of each figure over the runs; stored_ok only when every run stored what it acknowledged."""
    med = {}
    for k in MEDIAN_KEYS:
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            med[k] = round(statistics.median(vals), 2)
    if all("stored_ok" in r for r in runs):
        med["stored_ok"] = all(r["stored_ok"] for r in runs)
    return med

