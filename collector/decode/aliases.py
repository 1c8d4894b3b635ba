"""The one alias table: concept -> attribute keys, first key wins (CONTRACT §4).

Checked against spans captured from traceAI, OpenInference, the official OpenTelemetry
GenAI instrumentation (-v2, both semconv modes), OpenLLMetry and LiteLLM's ``otel`` callback; see
``tests/realinst``, ``../shared/INSTRUMENTATIONS.md`` and ``docs/litellm.md``. Bump ``ALIAS_VERSION`` on
any change.
"""
from __future__ import annotations

ALIAS_VERSION = 2     # 2: LiteLLM (operation names, gen_ai.cost.total_cost, its silent flag)

# concept -> ordered keys. The value type of each concept is given in CONCEPT_TYPES.
SPAN_ALIASES: dict[str, tuple[str, ...]] = {
    "span_kind": ("openinference.span.kind", "gen_ai.span.kind", "fi.span.kind", "traceloop.span.kind",
                  "gen_ai.operation.name", "llm.request.type"),
    "step": ("agent.trajectory.step",),
    "model": ("llm.model_name", "gen_ai.response.model", "llm.response.model_name", "gen_ai.request.model",
              "llm.request.model_name"),
    "request_model": ("gen_ai.request.model", "llm.request.model_name"),
    "input_tokens": ("llm.token_count.prompt", "gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens",
                     "llm.usage.prompt_tokens"),
    "output_tokens": ("llm.token_count.completion", "gen_ai.usage.output_tokens",
                      "gen_ai.usage.completion_tokens", "llm.usage.completion_tokens"),
    "cache_read_tokens": ("llm.token_count.prompt_details.cache_read", "gen_ai.usage.cache_read.input_tokens",
                          "gen_ai.usage.input_tokens.cache_read", "gen_ai.usage.cache_read_input_tokens"),
    "cache_write_tokens": ("llm.token_count.prompt_details.cache_write", "gen_ai.usage.cache_creation.input_tokens",
                           "gen_ai.usage.input_tokens.cache_write", "gen_ai.usage.cache_creation_input_tokens"),
    "reasoning_tokens": ("llm.token_count.completion_details.reasoning", "gen_ai.usage.reasoning.output_tokens",
                         "gen_ai.usage.output_tokens.reasoning", "gen_ai.usage.reasoning_tokens"),
    "reported_cost_usd": ("llm.cost.total", "gen_ai.cost.total", "gen_ai.cost.total_cost"),
    "finish_reason": ("gen_ai.response.finish_reasons", "llm.finish_reason"),
    "refused": ("agent.refused",),
    "escalated": ("agent.escalated",),
    # LiteLLM marks the mirrored call of a deployment's ``silent_model`` (litellm.py reads it)
    "silent_experiment": ("metadata.is_silent_experiment",),
    "route": ("shadow.route",),
    "request_id": ("shadow.request_id",),
    "session_id": ("session.id", "gen_ai.conversation.id"),
    "service_name": ("service.name",),
    "eval_name": ("eval.name",),
    "eval_passed": ("eval.passed",),
    "eval_label": ("eval.label",),
    "eval_score": ("eval.score",),
    "eval_explanation": ("eval.explanation",),
    # JSON-in-a-string attributes read as a fallback (quirk 2)
    "json_metadata": ("metadata",),
    "json_params": ("llm.invocation_parameters", "gen_ai.request.parameters"),
}

INT, FLOAT, STR, BOOL, STRS, RAW = "int", "float", "str", "bool", "strs", "raw"
CONCEPT_TYPES: dict[str, str] = {
    "span_kind": STR, "step": INT, "model": STR, "request_model": STR,
    "input_tokens": INT, "output_tokens": INT, "cache_read_tokens": INT, "cache_write_tokens": INT,
    "reasoning_tokens": INT, "reported_cost_usd": FLOAT, "finish_reason": STRS, "refused": BOOL,
    "escalated": BOOL, "silent_experiment": BOOL, "route": STR, "request_id": STR, "session_id": STR, "service_name": STR,
    "eval_name": STR, "eval_passed": BOOL, "eval_label": STR, "eval_score": FLOAT, "eval_explanation": STR,
    "json_metadata": STR, "json_params": STR,
}

# Concepts that describe the whole trace: taken from the span, else its resource, else metadata JSON.
TRACE_CONCEPTS = ("route", "request_id", "session_id")

# Values of the span-kind keys -> our span_kind vocabulary.
SPAN_KIND_VALUES: dict[str, str] = {
    "llm": "LLM", "tool": "TOOL", "agent": "AGENT", "chain": "CHAIN", "retriever": "RETRIEVER",
    "embedding": "EMBEDDING", "reranker": "RERANKER", "guardrail": "GUARDRAIL", "evaluator": "EVALUATOR",
    # gen_ai.operation.name
    "chat": "LLM", "text_completion": "LLM", "generate_content": "LLM", "completion": "LLM",
    "execute_tool": "TOOL", "invoke_agent": "AGENT", "create_agent": "AGENT", "embeddings": "EMBEDDING",
    # traceloop.span.kind
    "workflow": "CHAIN", "task": "CHAIN",
    # LiteLLM: gen_ai.operation.name and llm.request.type carry its call type (``completion`` is written
    # as ``chat``, the async and other call types as they are; docs/litellm.md)
    "acompletion": "LLM", "atext_completion": "LLM", "responses": "LLM", "aresponses": "LLM",
    "anthropic_messages": "LLM", "aanthropic_messages": "LLM", "aembedding": "EMBEDDING",
}

# LiteLLM's instrumentation scope (its tracer name; ``OTEL_TRACER_NAME`` changes it). A span of another scope
# that carries LiteLLM's silent flag is an application span LiteLLM wrote two calls onto (docs/litellm.md).
LITELLM_SCOPES = frozenset({"litellm"})

REFUSAL_FINISH_REASONS = frozenset({"content_filter"})
EVAL_EVENT_NAME = "gen_ai.evaluation.result"
EVAL_EVENT_KEYS = {
    "name": "gen_ai.evaluation.name",
    "label": "gen_ai.evaluation.score.label",
    "score": "gen_ai.evaluation.score.value",
    "explanation": "gen_ai.evaluation.explanation",
}
OPENINFERENCE_EVAL_PREFIX = "evaluations."


def key_index(extra: dict[str, tuple[str, ...]] | None = None) -> dict[str, tuple[tuple[str, int], ...]]:
    """attribute key -> ((concept, priority), ...); lower priority wins. ``extra`` adds concepts (cohorts).

    One key may feed several concepts (``gen_ai.request.model`` is both a model and the request model).
    """
    index: dict[str, list[tuple[str, int]]] = {}
    for table in (SPAN_ALIASES, extra or {}):
        for concept, keys in table.items():
            for prio, key in enumerate(keys):
                index.setdefault(key, []).append((concept, prio))
    return {k: tuple(v) for k, v in index.items()}
