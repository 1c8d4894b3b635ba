"""Trace assembly and per-cohort metrics, end to end through a real `serve`.

The traces come from the traffic model (shadowlens/traffic.py); every expected value is computed here from
the generated spans, never by calling the code under test.
"""
from __future__ import annotations

import random
import time
from collections import defaultdict

import numpy as np
import pytest
from harness import wait_for
from otlp_builders import span_request
from prometheus_client.parser import text_string_to_metric_families
from test_receivers import grpc_export

from shadowlens.traffic import SCENARIOS, RequestPlan, TracePlan, sample_request

NS = 1_000_000_000
T0 = int(time.time()) * NS - 3600 * NS          # an hour ago: inside the default retention
FAST = {"SHADOWLENS_TRACES__IDLE_SECONDS": "1", "SHADOWLENS_ANALYZERS__WINDOW_REFRESH": "0.5s",
        "SHADOWLENS_COHORTS__MAX_SERIES": "150"}       # every route x cohort of the traffic model (2 x 75)
PRICE_CONFIG = """
prices:
  - {match: "test-model-a", input: 1.0, output: 2.0, cache_read: 0.5}
  - {match: "test-model-b", input: 3.0, output: 15.0}
"""
PRICES = {"test-model-a": (1.0, 2.0, 0.5), "test-model-b": (3.0, 15.0, 3.0)}


def make_traces(rng: random.Random, n: int) -> list[tuple[list[dict], dict]]:
    """``n`` agent traces of the traffic model's ``healthy`` requests (shadowlens/traffic.py: baseline then
    candidate, one cohort and request id each), as span dicts, each with what it must count as."""
    out: list[tuple[list[dict], dict]] = []
    i = 0
    while len(out) < n:
        plan = sample_request(np.random.default_rng(rng.getrandbits(64)), SCENARIOS["healthy"])
        out += [_trace(rng, plan, tp, T0 + (2 * i + k) * 10 * NS) for k, tp in enumerate(plan.traces)]
        i += 1
    return out[:n]


def _trace(rng: random.Random, plan: RequestPlan, tp: TracePlan, start: int) -> tuple[list[dict], dict]:
    """One trace of ``plan``. On top of the model, to exercise pricing and step counting: each LLM call uses
    one of two models priced by PRICE_CONFIG (model a may read from the cache), one call in five reports
    its own cost, and three traces in ten carry no step numbers (steps then count LLM and tool spans)."""
    tid, root = rng.randbytes(16), rng.randbytes(8)
    cohort = tuple(plan.cohort[label] for label in ("intent", "language", "tier"))
    dur_ns = int(tp.duration_s * NS)
    use_steps = rng.random() < 0.7
    root_attrs = {"shadow.route": tp.route, "shadow.request_id": plan.request_id,
                  **{f"cohort.{k}": v for k, v in plan.cohort.items()},
                  "eval.name": "task_completion", "eval.passed": tp.passed}
    if tp.refused:
        root_attrs["agent.refused"] = True
    if tp.escalated:
        root_attrs["agent.escalated"] = True
    spans = [{"trace_id": tid, "span_id": root, "name": "agent.run", "start": start, "end": start + dur_ns,
              "attrs": root_attrs}]
    slot = dur_ns // (2 * len(tp.steps) + 1)
    cost, n_tool = 0.0, 0
    for step, call in enumerate(tp.steps, start=1):
        model = rng.choice(["test-model-a", "test-model-b"])
        cache = rng.randint(0, call.input_tokens // 2) if model == "test-model-a" else 0
        attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": model, "gen_ai.response.model": model,
                 "gen_ai.usage.input_tokens": call.input_tokens, "gen_ai.usage.output_tokens": call.output_tokens}
        if cache:
            attrs["gen_ai.usage.cache_read.input_tokens"] = cache
        if rng.random() < 0.2:                  # a reported cost is used as is
            attrs["llm.cost.total"] = round(rng.random() / 100, 6)
            cost += attrs["llm.cost.total"]
        else:
            pin, pout, pcache = PRICES[model]
            cost += ((call.input_tokens - cache) * pin + cache * pcache + call.output_tokens * pout) / 1e6
        s0 = start + (2 * step - 1) * slot
        spans.append({"trace_id": tid, "span_id": rng.randbytes(8), "parent": root, "name": "chat", "start": s0,
                      "end": s0 + slot, "attrs": attrs | ({"agent.trajectory.step": step} if use_steps else {})})
        if call.tool:
            n_tool += 1
            attrs = {"openinference.span.kind": "TOOL", "tool.name": "lookup"}
            spans.append({"trace_id": tid, "span_id": rng.randbytes(8), "parent": root, "name": "tool",
                          "start": s0 + slot, "end": s0 + 2 * slot,
                          "attrs": attrs | ({"agent.trajectory.step": step} if use_steps else {})})
    expect = {
        "trace_id": tid.hex(), "route": tp.route, "cohort": cohort, "duration": dur_ns / NS,
        "steps": len(tp.steps) if use_steps else len(tp.steps) + n_tool, "cost": cost,
        "refused": tp.refused, "escalated": tp.escalated, "eval_fail": not tp.passed,
        "tokens_in": sum(c.input_tokens for c in tp.steps), "tokens_out": sum(c.output_tokens for c in tp.steps),
    }
    return spans, expect


def send_shuffled(server, spans: list[dict], rng: random.Random, per_request: int = 200) -> None:
    """Children and roots in random order across many requests: assembly must not care."""
    spans = list(spans)
    rng.shuffle(spans)
    for i in range(0, len(spans), per_request):
        resp = grpc_export(server.grpc_endpoint, span_request(spans[i:i + per_request]).SerializeToString())
        assert resp.partial_success.rejected_spans == 0


def scrape(server) -> dict:
    """{(sample name, frozenset(labels)): value} from /metrics."""
    out = {}
    for fam in text_string_to_metric_families(server.metrics_text()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


def series_labels(route, cohort):
    return {"route": route, "intent": cohort[0], "language": cohort[1], "tier": cohort[2]}


@pytest.fixture
def priced_server(serve_factory, tmp_path):
    cfg = tmp_path / "prices.yaml"
    cfg.write_text(PRICE_CONFIG)
    return serve_factory(env=FAST, args=["--config", str(cfg)])


def test_streaming_and_window_metrics_match_the_generated_workload(priced_server):
    server = priced_server
    rng = random.Random(42)
    traces = make_traces(rng, 400)
    send_shuffled(server, [s for spans, _ in traces for s in spans], rng)
    expected = [e for _, e in traces]
    wait_for(lambda: total(scrape(server), "shadowlens_traces_total") == len(expected))
    wait_for(lambda: total(scrape(server), "shadowlens_window_traces") == len(expected))
    m = scrape(server)

    by_series = defaultdict(list)
    for e in expected:
        by_series[(e["route"], e["cohort"])].append(e)
    for (route, cohort), es in by_series.items():
        lab = series_labels(route, cohort)
        assert total(m, "shadowlens_traces_total", **lab) == len(es)
        assert total(m, "shadowlens_trajectory_steps_sum", **lab) == sum(e["steps"] for e in es)
        assert total(m, "shadowlens_trace_cost_usd_sum", **lab) == pytest.approx(
            sum(e["cost"] for e in es if e["cost"] is not None), rel=1e-9)
        assert total(m, "shadowlens_refusals_total", **lab) == sum(e["refused"] for e in es)
        assert total(m, "shadowlens_escalations_total", **lab) == sum(e["escalated"] for e in es)
        assert total(m, "shadowlens_evals_total", **lab, eval="task_completion", result="fail") == \
            sum(e["eval_fail"] for e in es)
        assert total(m, "shadowlens_trace_duration_seconds_count", **lab) == len(es)
        # windowed, exact
        durations = np.array([e["duration"] for e in es])
        assert total(m, "shadowlens_window_traces", **lab) == len(es)
        assert total(m, "shadowlens_window_trace_duration_seconds", **lab, quantile="0.99") == pytest.approx(
            float(np.percentile(durations, 99)), rel=1e-6)
        assert total(m, "shadowlens_window_trace_duration_seconds", **lab, quantile="0.5") == pytest.approx(
            float(np.percentile(durations, 50)), rel=1e-6)
        assert total(m, "shadowlens_window_trajectory_steps_mean", **lab) == pytest.approx(
            np.mean([e["steps"] for e in es]))
        assert total(m, "shadowlens_window_refusal_ratio", **lab) == pytest.approx(
            np.mean([e["refused"] for e in es]))
        assert total(m, "shadowlens_window_eval_fail_ratio", **lab, eval="task_completion") == pytest.approx(
            np.mean([e["eval_fail"] for e in es]))
    for route in ("baseline", "candidate"):
        es = [e for e in expected if e["route"] == route]
        assert total(m, "shadowlens_tokens_total", route=route, type="prompt") == sum(e["tokens_in"] for e in es)
        assert total(m, "shadowlens_tokens_total", route=route, type="completion") == sum(e["tokens_out"] for e in es)
    # the store agrees, one row per trace
    rows = server.query("select trace_id, steps, cost_usd, refused, duration_seconds, incomplete from traces")
    assert len(rows) == len(expected) == len({r["trace_id"] for r in rows})
    want = {e["trace_id"]: e for e in expected}
    for r in rows:
        e = want[r["trace_id"]]
        assert r["steps"] == e["steps"] and r["refused"] == e["refused"] and r["incomplete"] is False
        assert r["cost_usd"] == pytest.approx(e["cost"], rel=1e-9)
        assert r["duration_seconds"] == pytest.approx(e["duration"], abs=1e-6)
    # exemplars carry trace ids on the duration histogram (OpenMetrics)
    import urllib.request
    req = urllib.request.Request(server.metrics_url + "/metrics", headers={"Accept": "application/openmetrics-text"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    assert '# {trace_id="' in text and text.rstrip().endswith("# EOF")


def test_late_span_updates_the_row_and_counts_once(serve_factory):
    server = serve_factory(env=FAST)
    rng = random.Random(7)
    [(spans, e)] = make_traces(rng, 1)
    send_shuffled(server, spans, rng)
    wait_for(lambda: total(scrape(server), "shadowlens_traces_total") == 1)
    late = {"trace_id": bytes.fromhex(e["trace_id"]), "span_id": rng.randbytes(8), "parent": spans[0]["span_id"],
            "name": "chat", "start": T0, "end": T0 + NS,
            "attrs": {"gen_ai.operation.name": "chat", "gen_ai.usage.input_tokens": 5, "agent.trajectory.step": 99}}
    grpc_export(server.grpc_endpoint, span_request([late]).SerializeToString())
    wait_for(lambda: total(scrape(server), "shadowlens_late_spans_total") == 1)
    m = scrape(server)
    assert total(m, "shadowlens_traces_total") == 1          # not counted twice
    (row,) = server.query(f"select span_count, revision, llm_calls from traces where trace_id = '{e['trace_id']}'")
    assert row["span_count"] == len(spans) + 1 and row["revision"] == 1


def test_late_span_after_a_restart_revises_the_row_of_a_trace_completed_before_it(serve_factory, tmp_path):
    data = tmp_path / "d"
    rng = random.Random(8)
    [(spans, e)] = make_traces(rng, 1)
    first = serve_factory(data_dir=data, env=FAST)
    send_shuffled(first, spans, rng)
    wait_for(lambda: total(scrape(first), "shadowlens_traces_total") == 1)
    assert first.stop() == 0
    second = serve_factory(data_dir=data, env=FAST)
    late = {"trace_id": bytes.fromhex(e["trace_id"]), "span_id": rng.randbytes(8), "parent": spans[0]["span_id"],
            "name": "tool", "start": T0, "end": T0 + NS, "attrs": {"openinference.span.kind": "TOOL"}}
    grpc_export(second.grpc_endpoint, span_request([late]).SerializeToString())
    wait_for(lambda: total(scrape(second), "shadowlens_late_spans_total") == 1)
    assert total(scrape(second), "shadowlens_traces_total") == 0        # counted by the first server only
    (row,) = second.query(f"select span_count, revision, incomplete from traces where trace_id = '{e['trace_id']}'")
    assert (row["span_count"], row["revision"], row["incomplete"]) == (len(spans) + 1, 1, False)


def test_cardinality_is_bounded_with_10000_cohort_values(serve_factory):
    server = serve_factory(env=FAST)
    rng = random.Random(3)
    spans = []
    for i in range(10_000):
        tid = rng.randbytes(16)
        spans.append({"trace_id": tid, "span_id": rng.randbytes(8), "name": "agent.run", "start": T0, "end": T0 + NS,
                      "attrs": {"shadow.route": "baseline", "cohort.intent": f"intent-{i}"}})
    for i in range(0, len(spans), 1000):
        grpc_export(server.grpc_endpoint, span_request(spans[i:i + 1000]).SerializeToString())
    wait_for(lambda: total(scrape(server), "shadowlens_traces_total") == 10_000, timeout=90)
    m = scrape(server)
    intents = {dict(lab)["intent"] for (n, lab) in m if n == "shadowlens_traces_total"}
    assert len(intents) == 51 and "__overflow__" in intents      # cohorts.max_values = 50 (+ overflow)
    assert total(m, "shadowlens_traces_total", intent="__overflow__") == 10_000 - 50
    assert total(m, "shadowlens_cohort_overflow_total", label="intent") == 10_000 - 50
    assert len([k for k in m if k[0] == "shadowlens_trace_duration_seconds_bucket"]) <= 51 * 24


def test_restart_mid_stream_counts_every_trace_once(serve_factory, tmp_path):
    data = tmp_path / "d"
    rng = random.Random(11)
    traces = make_traces(rng, 120)
    first = serve_factory(data_dir=data, env=FAST)
    # all of the first 60 traces, and the children (no root) of the next 60: those stay open
    send_shuffled(first, [s for spans, _ in traces[:60] for s in spans], rng)
    send_shuffled(first, [s for spans, _ in traces[60:] for s in spans[1:]], rng)
    wait_for(lambda: total(scrape(first), "shadowlens_traces_total") == 60)
    counted_before = total(scrape(first), "shadowlens_traces_total")
    assert first.stop() == 0
    second = serve_factory(data_dir=data, env=FAST)
    send_shuffled(second, [spans[0] for spans, _ in traces[60:]], rng)        # the roots arrive now
    wait_for(lambda: total(scrape(second), "shadowlens_traces_total") == 60)
    time.sleep(2)                                                            # nothing more may complete
    assert counted_before + total(scrape(second), "shadowlens_traces_total") == 120
    rows = second.query("select trace_id, span_count, incomplete from traces")
    assert len(rows) == 120 == len({r["trace_id"] for r in rows})
    want = {e["trace_id"]: len(spans) for spans, e in traces}
    assert {r["trace_id"]: r["span_count"] for r in rows} == want
    assert not any(r["incomplete"] for r in rows)


def test_open_traces_beyond_the_cap_are_finalized_as_incomplete(serve_factory):
    server = serve_factory(env={**FAST, "SHADOWLENS_TRACES__MAX_OPEN": "5"})
    rng = random.Random(5)
    spans = [{"trace_id": rng.randbytes(16), "span_id": rng.randbytes(8), "parent": rng.randbytes(8), "name": "chat",
              "start": T0, "end": T0 + NS, "attrs": {"gen_ai.operation.name": "chat"}} for _ in range(12)]
    grpc_export(server.grpc_endpoint, span_request(spans).SerializeToString())
    wait_for(lambda: total(scrape(server), "shadowlens_traces_evicted_total") >= 7)
    rows = server.query("select incomplete from traces")
    assert len(rows) >= 7 and all(r["incomplete"] for r in rows)
    assert total(scrape(server), "shadowlens_open_traces") <= 5


def test_route_from_request_model_and_unpriced_models(serve_factory, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text('routes: {baseline: ["gpt-4o"], candidate: ["my-rlaif-.*"]}\n')
    server = serve_factory(env=FAST, args=["--config", str(cfg)])
    rng = random.Random(9)
    spans = []
    for model in ("gpt-4o", "my-rlaif-7b", "gpt-4o"):
        tid, root = rng.randbytes(16), rng.randbytes(8)
        spans += [{"trace_id": tid, "span_id": root, "name": "agent.run", "start": T0, "end": T0 + NS},
                  {"trace_id": tid, "span_id": rng.randbytes(8), "parent": root, "name": "chat", "start": T0,
                   "end": T0 + NS, "attrs": {"gen_ai.operation.name": "chat", "gen_ai.request.model": model,
                                             "gen_ai.response.model": model + "-2024-08-06",
                                             "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 5}}]
    grpc_export(server.grpc_endpoint, span_request(spans).SerializeToString())
    wait_for(lambda: total(scrape(server), "shadowlens_traces_total") == 3)
    m = scrape(server)
    assert total(m, "shadowlens_traces_total", route="baseline") == 2
    assert total(m, "shadowlens_traces_total", route="candidate") == 1
    assert total(m, "shadowlens_unpriced_spans_total", model="my-rlaif-7b-2024-08-06") == 1
    assert total(m, "shadowlens_unpriced_spans_total", model="gpt-4o-2024-08-06") == 0   # the shipped table prices it


def test_trace_model_is_the_most_frequent_with_ties_to_the_first_and_steps_are_distinct(serve_factory):
    """``model``: the LLM model most spans used, a tie going to the first in sort order; ``models``: every
    distinct LLM model, sorted, comma-joined; ``steps``: distinct ``agent.trajectory.step`` values."""
    server = serve_factory(env=FAST)
    rng = random.Random(11)
    cases = {   # trace -> (model, step) of each LLM span
        "tie": [("zeta-1", 1), ("alpha-1", 2)],
        "majority": [("alpha-1", 1), ("zeta-1", 2), ("zeta-1", 2), ("mid-1", 3)],
        "one": [("mid-1", 4), ("mid-1", 4), ("mid-1", 4)],
    }
    spans, ids = [], {}
    for name, calls in cases.items():
        tid, root = rng.randbytes(16), rng.randbytes(8)
        ids[tid.hex()] = name
        spans.append({"trace_id": tid, "span_id": root, "name": "agent.run", "start": T0, "end": T0 + NS})
        for model, step in calls:
            spans.append({"trace_id": tid, "span_id": rng.randbytes(8), "parent": root, "name": "chat", "start": T0,
                          "end": T0 + NS, "attrs": {"gen_ai.operation.name": "chat", "gen_ai.response.model": model,
                                                    "agent.trajectory.step": step}})
    rng.shuffle(spans)
    grpc_export(server.grpc_endpoint, span_request(spans).SerializeToString())
    wait_for(lambda: total(scrape(server), "shadowlens_traces_total") == len(cases))
    rows = {ids[r["trace_id"]]: r for r in server.query("select trace_id, model, models, steps, llm_calls from traces")}
    for name, calls in cases.items():
        counts = {m: sum(1 for c, _ in calls if c == m) for m, _ in calls}
        top = max(counts.values())
        assert rows[name]["model"] == min(m for m, n in counts.items() if n == top), name
        assert rows[name]["models"] == ",".join(sorted(counts)), name
        assert rows[name]["steps"] == len({st for _, st in calls}), name
        assert rows[name]["llm_calls"] == len(calls), name


def test_reprice_recomputes_span_and_trace_costs(priced_server, tmp_path):
    import subprocess

    from harness import REPO, SHADOWLENS
    server = priced_server
    rng = random.Random(21)
    traces = make_traces(rng, 30)
    send_shuffled(server, [s for spans, _ in traces for s in spans], rng)
    wait_for(lambda: total(scrape(server), "shadowlens_traces_total") == 30)
    new_prices = {"test-model-a": (2.0, 4.0, 1.0), "test-model-b": (6.0, 30.0, 6.0)}   # everything doubles
    cfg = tmp_path / "new.yaml"
    cfg.write_text("prices:\n" + "".join(
        f"  - {{match: '{m}', input: {p[0]}, output: {p[1]}, cache_read: {p[2]}}}\n" for m, p in new_prices.items()))

    def expected_costs():
        out = {}
        for spans, e in traces:
            cost = 0.0
            for s in spans[1:]:
                a = s["attrs"]
                if "gen_ai.usage.input_tokens" not in a:
                    continue
                if "llm.cost.total" in a:
                    cost += a["llm.cost.total"]
                    continue
                pin, pout, pcache = new_prices[a["gen_ai.request.model"]]
                cache = a.get("gen_ai.usage.cache_read.input_tokens", 0)
                cost += ((a["gen_ai.usage.input_tokens"] - cache) * pin + cache * pcache
                         + a["gen_ai.usage.output_tokens"] * pout) / 1e6
            out[e["trace_id"]] = cost
        return out

    def run(*args):
        return subprocess.run(SHADOWLENS + ["reprice", "--data-dir", str(server.data_dir), "--config", str(cfg), *args],
                              capture_output=True, text=True, cwd=REPO, env=server.env, timeout=120)

    out = run()                                     # through the running server
    assert out.returncode == 0, out.stderr
    n_llm = sum(1 for spans, _ in traces for s in spans[1:] if "gen_ai.usage.input_tokens" in s["attrs"])
    assert f"repriced {n_llm} LLM spans in 30 traces" in out.stdout
    got = {r["trace_id"]: r["cost_usd"] for r in server.query("select trace_id, cost_usd from traces")}
    want = expected_costs()
    assert got.keys() == want.keys()
    assert {t: round(got[t], 12) for t in want} == {t: round(want[t], 12) for t in want}
    assert server.stop() == 0
    out = run("--since", "30d")                     # and straight from the file
    assert out.returncode == 0 and f"repriced {n_llm} LLM spans" in out.stdout, out.stderr
    assert run("--since", "soon").returncode == 2


def test_histograms_of_many_series_at_once_equal_one_value_at_a_time():
    from shadowlens.analyzers.aggregates import bucket_by_group
    rng = random.Random(7)
    bounds = (0.5, 1, 2, 5)
    values = np.array([rng.choice([0.5, 0.7, 1.0, 3.0, 9.0, rng.random() * 10]) for _ in range(300)])
    gid = np.array([rng.randrange(6) for _ in range(300)])
    ids = [f"t{i}" for i in range(300)]
    counts, totals, exemplars = bucket_by_group(bounds, gid, 7, values, ids, 42.0)
    for g in range(7):
        want = [0] * (len(bounds) + 1)
        last = {}
        for i in range(300):
            if gid[i] == g:
                b = next((k for k, bound in enumerate(bounds) if values[i] <= bound), len(bounds))   # "le" buckets
                want[b] += 1
                last[b] = (ids[i], float(values[i]), 42.0)
        assert counts[g].tolist() == want
        assert totals[g] == pytest.approx(values[gid == g].sum())
        assert exemplars.get(g, {}) == last


def test_the_traces_of_a_commit_are_its_distinct_trace_ids_with_their_root_counts():
    import pyarrow as pa

    from shadowlens.analyzers.assembly import traces_of
    rng = random.Random(9)
    tids = [rng.randbytes(16) for _ in range(40)] + [bytes(8) + rng.randbytes(8), rng.randbytes(8) + bytes(8)]
    rows = [(rng.choice(tids), rng.random() < 0.2) for _ in range(500)]       # (trace id, is a root)
    table = pa.table({
        "trace_id_hi": pa.array([int.from_bytes(t[:8], "big") for t, _ in rows], pa.uint64()),
        "trace_id_lo": pa.array([int.from_bytes(t[8:], "big") for t, _ in rows], pa.uint64()),
        "parent_span_id_int": pa.array([None if root else rng.getrandbits(64) for _, root in rows], pa.uint64())})
    want: dict[str, int] = defaultdict(int)
    for t, root in rows:
        want[t.hex()] += root
    ids, roots = traces_of(table)
    assert dict(zip(ids, roots)) == want and len(ids) == len(want)
    assert traces_of(table.slice(0, 0)) == ([], [])


def test_a_round_that_keeps_failing_logs_one_traceback_then_a_line_a_minute_then_its_recovery(caplog, monkeypatch):
    """A full DuckDB disk fails every assembly round for as long as it lasts: the log gets the first
    traceback, a reminder a minute (FAILURE_LOG_S), and one line when rounds succeed again."""
    import threading

    from shadowlens.analyzers import assembly

    clock = [1000.0]
    monkeypatch.setattr(assembly.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(assembly.time, "sleep", lambda s: None)

    class Store:                     # announces no commits; the round itself is what fails
        def wait_for_commit(self, seq, timeout):
            return seq

    asm = assembly.TraceAssembler(Store(), ("intent",), idle_s=4.0, max_s=60.0, routes={}, poll_s=0.0)
    failures = iter([True] * 5 + [False])
    done = threading.Event()

    def complete_due():
        clock[0] += 20.0             # each round 20 s later
        if next(failures, False):
            raise OSError(28, "No space left on device")
        asm._stop.set()
        done.set()

    asm.complete_due = complete_due
    with caplog.at_level("INFO", logger=assembly.log.name):
        asm._run()
    assert done.is_set()
    records = [r for r in caplog.records if r.name == assembly.log.name]
    assert [r.exc_info is not None for r in records] == [True, False, False]
    assert "still fail after 60 s" in records[1].getMessage() and "No space left" in records[1].getMessage()
    assert "succeed again after 100 s" in records[2].getMessage()
