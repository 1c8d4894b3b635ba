"""A rule nobody sends input for (an agent with no evaluator) is a missing input, not a regression:
said from the first evaluation, never a block, never a promote; the budget is written as people write it."""
from __future__ import annotations

from dataclasses import replace

import polars as pl
import pytest
from gate_sim import Effect, simulate

from shadowlens.analyzers.compare import compare
from shadowlens.analyzers.rules import parse_gate

SETTINGS = parse_gate({})
EVAL_COLS = ("eval_pass:task_completion", "eval_fail:task_completion")
# how an eval result reaches shadowlens (CONTRACT §4), which the reason must spell out
HOWTO = ("`eval.name`", "`eval.passed`", "`gen_ai.evaluation.result`", "`gen_ai.evaluation.name`",
         "`gen_ai.evaluation.score.label`", "`gen_ai.evaluation.score.value`", "`gate.rules`")


def without_evals(frame: pl.DataFrame, routes=("baseline", "candidate")) -> pl.DataFrame:
    return frame.with_columns([pl.when(pl.col("route").is_in(list(routes))).then(None).otherwise(pl.col(c)).alias(c)
                               for c in EVAL_COLS])


def at(frame, seconds_after_first: float, settings=SETTINGS):
    return compare(frame, settings, ("intent",), now=float(frame["start_s"].min()) + seconds_after_first)


def overall(verdict, rule):
    return next(r for r in verdict.results if r.rule == rule and r.cohort == "all")


def test_no_eval_from_either_route_is_said_at_once_and_never_blocks_after_the_budget():
    frame = without_evals(simulate(3000, seed=3))          # healthy: every other rule has plenty of data
    for seconds in (60, 3 * 3600):                          # the first minute, and long past the 30 min budget
        v = at(frame, seconds)
        t = overall(v, "task_completion")
        assert v.verdict == "inconclusive", v.reasons
        assert t.state == "insufficient_data" and t.no_input, t
        assert all(h in t.reason for h in HOWTO), t.reason
        assert "cannot be judged" in v.reasons[0] and "task_completion" in v.reasons[0], v.reasons
        assert "budget" not in " ".join(v.reasons)
    cohort_results = [r for r in v.results if r.rule == "task_completion" and r.cohort != "all"]
    assert cohort_results and all(r.no_input for r in cohort_results)


def test_a_failing_rule_still_blocks_while_another_has_no_input():
    frame = without_evals(simulate(3000, seed=4, effect=Effect(cost_x=1.5)))
    v = at(frame, 60)
    assert v.verdict == "block"
    assert v.reasons[0].startswith("cost_per_trace fails")
    assert any("task_completion (critical) cannot be judged" in r for r in v.reasons)


def test_a_candidate_that_stops_sending_evals_still_blocks_after_the_budget():
    # the baseline still sends them: the candidate lost its evaluator, a different case (kept as it was)
    frame = without_evals(simulate(3000, seed=5), routes=("candidate",))
    settings = replace(SETTINGS, budget_s=10.0)
    early, late = at(frame, 5, settings), at(frame, 60, settings)
    assert not overall(late, "task_completion").no_input
    assert early.verdict == "inconclusive" and late.verdict == "block"
    reason = next(r for r in late.reasons if r.startswith("task_completion (critical)"))
    assert "after the budget of 10 s:" in reason, reason


@pytest.mark.parametrize("budget,text", [("30m", "30 min"), ("10s", "10 s"), ("2h", "2 h"), ("90s", "90 s")])
def test_budget_reads_in_whole_units(budget, text):
    frame = simulate(150, seed=2)      # enough for means, too few for any verdict: the budget decides
    settings = parse_gate({"budget": budget})
    v = at(frame, settings.budget_s + 60, settings)
    assert v.verdict == "block"
    assert any(f"after the budget of {text}:" in r for r in v.reasons), v.reasons


def test_gate_says_it_from_the_first_evaluation_for_an_agent_instrumented_as_the_readme_shows(serve_factory):
    """Spans exactly as "Point an agent at it" shows (route, request id, cohorts; no eval): /gate and
    `shadowlens gate --url` name the missing eval and how to send it, exit 3 (inconclusive)."""
    import json
    import subprocess
    import urllib.request

    from harness import REPO, SHADOWLENS, wait_for
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    server = serve_factory(env={"SHADOWLENS_TRACES__IDLE_SECONDS": "1", "SHADOWLENS_GATE__REFRESH": "1s"})
    provider = TracerProvider(resource=Resource.create({"service.name": "support-agent"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=server.grpc_endpoint, insecure=True)))
    tracer = provider.get_tracer("support-agent")
    for i in range(5):
        for route in ("baseline", "candidate"):
            with tracer.start_as_current_span("agent.run", attributes={
                    "shadow.route": route, "shadow.request_id": f"req-{i}",
                    "cohort.intent": "billing", "cohort.language": "de", "cohort.tier": "enterprise"}):
                pass
    provider.shutdown()

    def gate_with_every_trace() -> dict | None:
        try:
            with urllib.request.urlopen(server.metrics_url + "/gate", timeout=5) as r:
                doc = json.loads(r.read())
        except OSError:
            return None
        return doc if sum((doc.get("traces") or {}).values()) >= 10 else None
    doc = wait_for(gate_with_every_trace, 60, 0.5, what="the gate covering 10 traces")
    assert doc.get("verdict") == "inconclusive", doc
    t = next(r for r in doc["rules"] if r["rule"] == "task_completion" and r["cohort"] == "all")
    assert t["state"] == "insufficient_data" and t["no_input"] is True
    assert "task_completion (critical) cannot be judged" in doc["reasons"][0]
    out = subprocess.run(SHADOWLENS + ["gate", "--url", server.metrics_url], env=server.env, cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "cannot be judged" in out.stdout and "`eval.name`=task_completion" in out.stdout, out.stdout
