"""LiteLLM's spans through the normalizer, built from what LiteLLM 1.110.2's ``otel`` callback emitted on this
machine (docs/litellm.md; tests/realinst/test_litellm.py runs the real library end to end).

Each case is one request under LiteLLM's scope (or the application's, for the mixed case) and the columns
the store must get.
"""
from __future__ import annotations

import pytest

from shadowlens.collector.decode.litellm import MixedSpansWarning
from shadowlens.collector.decode.normalize import Normalizer
from shadowlens.collector.decode.pricing import PriceTable
from shadowlens.config import default_config
from shadowlens.otlp import span, trace_request

PRICES = [{"match": "gpt-4o-mini.*", "input": 0.15, "output": 0.6},
          {"match": "my-rlaif-.*", "input": 0.3, "output": 1.2}]


def litellm_attrs(model: str, op: str = "acompletion", cost: float | None = 3.1575e-05, silent: bool = False) -> dict:
    """The keys LiteLLM 1.110.2 writes on ``litellm_request`` (no content capture keys; metadata.* shortened)."""
    attrs = {
        "gen_ai.operation.name": op, "llm.request.type": op, "gen_ai.system": "openai",
        "gen_ai.request.model": model, "gen_ai.response.model": model + "-2024-07-18",
        "gen_ai.usage.input_tokens": 113, "gen_ai.usage.output_tokens": 29, "gen_ai.usage.total_tokens": 142,
        "litellm.call_id": "22901969-531e-45ac-a954-0188fc8606c2", "litellm.model_group": model,
        "llm.is_streaming": "False", "metadata.applied_guardrails": "[]", "metadata.user_api_key_hash": "",
    }
    if cost is not None:
        attrs.update({"gen_ai.cost.total_cost": cost, "gen_ai.cost.input_cost": cost / 2,
                      "gen_ai.cost.output_cost": cost / 2, "gen_ai.cost.original_cost": cost})
    if silent:
        attrs["metadata.is_silent_experiment"] = True
    return attrs


@pytest.fixture(scope="module")
def normalizer() -> Normalizer:
    cfg = default_config()
    return Normalizer(cfg.cohort_labels, cfg.evals, PriceTable.load(PRICES))


def rows(normalizer: Normalizer, spans: list[dict], scope: str = "litellm", resource: dict | None = None):
    req = trace_request([span(**s) for s in spans], resource or {"service.name": "litellm"}, scope=scope)
    batch = normalizer.normalize_traces(req.SerializeToString())
    return batch.spans.to_pylist(), batch


ROOT = {"trace_id": b"\x01" * 16, "span_id": b"\x02" * 8, "name": "litellm_request"}
CHILD = {"trace_id": b"\x01" * 16, "span_id": b"\x03" * 8, "parent": b"\x09" * 8, "name": "litellm_request"}


@pytest.mark.parametrize("op, span_kind", [
    ("acompletion", "LLM"), ("chat", "LLM"), ("completion", "LLM"), ("atext_completion", "LLM"),
    ("text_completion", "LLM"), ("aresponses", "LLM"), ("anthropic_messages", "LLM"),
    ("embedding", "EMBEDDING"), ("aembedding", "EMBEDDING"),
])
def test_litellm_operation_names_are_span_kinds(normalizer, op, span_kind):
    [row], _ = rows(normalizer, [{**ROOT, "attrs": litellm_attrs("gpt-4o-mini", op)}])
    assert row["span_kind"] == span_kind


def test_litellm_call_type_alone_gives_the_span_kind(normalizer):
    # without content capture LiteLLM writes no gen_ai.operation.name: llm.request.type still says it
    attrs = litellm_attrs("gpt-4o-mini")
    del attrs["gen_ai.operation.name"]
    [row], _ = rows(normalizer, [{**ROOT, "attrs": attrs}])
    assert row["span_kind"] == "LLM"


def test_litellm_primary_call_is_a_priced_llm_call_without_a_route(normalizer):
    [row], batch = rows(normalizer, [{**ROOT, "attrs": litellm_attrs("gpt-4o-mini")}])
    assert (row["model"], row["request_model"]) == ("gpt-4o-mini-2024-07-18", "gpt-4o-mini")
    assert (row["input_tokens"], row["output_tokens"]) == (113, 29)
    assert row["reported_cost_usd"] == row["cost_usd"] == pytest.approx(3.1575e-05)   # LiteLLM's own cost
    assert row["route"] is None      # nothing on the primary names its twin: routes config or pairing
    assert not batch.mixed


def test_litellm_silent_root_call_is_the_candidate(normalizer):
    [row], _ = rows(normalizer, [{**ROOT, "attrs": litellm_attrs("my-rlaif-1", cost=0.0, silent=True)}])
    assert row["route"] == "candidate"
    # LiteLLM reports 0.0 for a model it has no price for: not a price; the table prices the tokens
    assert row["reported_cost_usd"] is None
    assert row["cost_usd"] == pytest.approx((113 * 0.3 + 29 * 1.2) / 1e6)


def test_litellm_silent_call_keeps_a_route_its_span_names(normalizer):
    attrs = {**litellm_attrs("my-rlaif-1", silent=True), "shadow.route": "baseline"}
    [row], _ = rows(normalizer, [{**ROOT, "attrs": attrs}])
    assert row["route"] == "baseline"


def test_litellm_silent_flag_beats_the_resources_route(normalizer):
    [row], _ = rows(normalizer, [{**ROOT, "attrs": litellm_attrs("my-rlaif-1", silent=True)}],
                    resource={"service.name": "litellm", "shadow.route": "baseline"})
    assert row["route"] == "candidate"


def test_litellm_silent_child_call_is_the_candidate_call(normalizer):
    # the per-call route: under an application span the silent call is still the candidate; the analyzers
    # compare the calls one by one (analyzers/units.py), so the trace itself is not made the candidate
    [row], batch = rows(normalizer, [{**CHILD, "attrs": litellm_attrs("my-rlaif-1", silent=True)}])
    assert row["route"] == "candidate" and row["span_kind"] == "LLM"
    assert not batch.mixed


def test_litellm_zero_cost_without_tokens_stays_zero(normalizer):
    attrs = {**litellm_attrs("my-rlaif-1", cost=0.0), "gen_ai.usage.input_tokens": 0, "gen_ai.usage.output_tokens": 0}
    [row], _ = rows(normalizer, [{**ROOT, "attrs": attrs}])
    assert row["reported_cost_usd"] == 0.0 and row["cost_usd"] == 0.0


def test_zero_reported_cost_of_other_libraries_is_kept(normalizer):
    attrs = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 5,
             "llm.cost.total": 0.0}
    [row], _ = rows(normalizer, [{**ROOT, "attrs": attrs}], scope="openinference.instrumentation.openai")
    assert row["reported_cost_usd"] == 0.0 and row["cost_usd"] == 0.0


def test_silent_flag_on_an_application_span_is_mixed_and_counted(normalizer):
    # LiteLLM's default inside an ambient span: both calls' attributes on the app's span, last writer wins
    attrs = {**litellm_attrs("my-rlaif-1", cost=0.0, silent=True), "shadow.route": "baseline", "cohort.language": "en"}
    spans = [{**ROOT, "name": "agent.run", "attrs": attrs},
             {"trace_id": ROOT["trace_id"], "span_id": b"\x04" * 8, "parent": ROOT["span_id"], "name": "tool",
              "attrs": {"gen_ai.operation.name": "execute_tool"}}]
    out, batch = rows(normalizer, spans, scope="app")
    assert out[0]["route"] == "mixed"          # stored, never compared: the span's numbers belong to either call
    assert out[0]["language"] == "en"          # cohorts still come from the application's attributes
    assert out[1]["route"] is None
    assert batch.mixed == {"litellm": 1}
    # LiteLLM's zero-cost rule is for its own spans only
    assert out[0]["reported_cost_usd"] == 0.0


def test_mixed_spans_warning_logs_once_per_interval():
    lines: list[str] = []
    clock = iter([0.0, 1.0, 59.0, 60.0, 61.0, 200.0])
    w = MixedSpansWarning(interval_s=60, now=clock.__next__, emit=lines.append)
    for n in (1, 5, 5, 2, 0, 1, 3):        # the 0 costs nothing and reads no clock
        w.note(n)
    assert [line.split(":")[0] for line in lines] == ["1 spans", "12 spans", "4 spans"]
    assert all("USE_OTEL_LITELLM_REQUEST_SPAN" in line for line in lines)
