"""Realistic agent spans in bulk: pools of encoded OTLP requests of paired baseline/candidate agent traces.

``shadowlens generate`` (traffic.py) sends few, small spans with planted effects through the OpenTelemetry
SDK; a load test needs the opposite: many spans shaped like a real agent's, built once and sent as bytes.
A trace here is a root agent span, 3-12 LLM steps and tool spans, ~15-20 attributes a span and
prompt/response text of 200-2000 bytes, in the OpenInference or the OTel GenAI conventions (half each),
~2.45 KB a span once encoded. ``agent_pool`` is the entry point (the ingest bench uses it).

Every trace id ends in one 8-byte ``marker`` and every ``shadow.request_id`` in the marker's hex, so that a
sender can make the ids of each pass over the pool unique by rewriting those bytes in place. The order of the
random draws defines the bytes: a change here changes every benchmark figure.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from .otlp import key_values

_WORDS = (
    "the a to of and in is it you that for on with as this be are your can order refund account "
    "shipping invoice please help customer payment card charged twice delivery tracking number "
    "package arrived damaged replace return policy days within eligible subscription plan upgrade "
    "downgrade cancel renewal billing cycle password reset login email verify address update "
    "warehouse carrier estimate business working issue ticket escalate agent support thanks sorry "
    "understand frustrating let me check system shows status pending processed approved denied "
    "credit balance statement tax receipt discount code promotion expired valid region currency "
    "error message app crash version device android ios browser cache clear settings notification "
    "we will I have been able to confirm that your request has completed successfully here are next "
    "steps documentation article knowledge base according summary result found no matching records"
).split()

INTENTS = ["billing", "refund", "shipping", "tech_support", "account", "product_question", "cancellation", "complaint"]
INTENT_W = [18, 14, 16, 15, 12, 12, 7, 6]
LANGS = ["en", "es", "de", "fr", "ja", "pt"]
LANG_W = [58, 14, 9, 8, 6, 5]
TIERS = ["free", "pro", "enterprise"]
TIER_W = [55, 33, 12]
TOOLS = [
    ("search_kb", "Search the support knowledge base"),
    ("get_order", "Fetch an order by id"),
    ("lookup_account", "Fetch the customer's account"),
    ("issue_refund", "Issue a refund for an order"),
    ("track_shipment", "Carrier tracking lookup"),
    ("web_search", "Search the public web"),
    ("send_email", "Send an email to the customer"),
]


class Route(NamedTuple):
    request_model: str
    response_model: str
    version: str
    extra_steps: int        # added to a trace's step count with probability 0.35
    latency: float          # factor on every LLM call's duration
    pass_rate: float        # task_completion
    refusal_rate: float


ROUTES = {
    "baseline": Route("gpt-4o", "gpt-4o-2024-08-06", "2.14.3", 0, 1.00, 0.86, 0.015),
    "candidate": Route("my-rlaif-8b-v3", "my-rlaif-8b-v3-2025-10-01", "2.15.0-rlaif", 1, 1.12, 0.84, 0.025),
}
SCOPES = {
    "app": InstrumentationScope(name="support_agent.workflow", version="2.14"),
    "oi": InstrumentationScope(name="openinference.instrumentation.openai", version="0.1.66"),
    "genai": InstrumentationScope(name="opentelemetry.instrumentation.openai_v2", version=""),
}
SCHEMA_URL = "https://opentelemetry.io/schemas/1.27.0"


class _Text:
    """Cheap pseudo-natural text: random slices of one seeded corpus string."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        parts, n = [], 0
        while n < 400_000:
            w = rng.choice(_WORDS)
            parts.append(w)
            n += len(w) + 1
        self.corpus = " ".join(parts)

    def __call__(self, lo: int, hi: int) -> str:
        n = self.rng.randint(lo, hi)
        i = self.rng.randrange(0, len(self.corpus) - n)
        return self.corpus[i:i + n]


@dataclass(frozen=True)
class _Trace:
    """What every span of one trace shares."""
    route: str
    conv: str               # oi (OpenInference) | genai (OTel GenAI)
    session_id: str
    user_id: str
    trace_id: bytes
    root_id: bytes


# (scope key, span, kind label) in export order: children first, the root last.
Planned = tuple[str, Span, str]


class AgentTraffic:
    """One seeded source of agent traces as protobuf spans; ``now_ns`` (default: the clock) sets the time
    the traces start from (two minutes before it)."""

    def __init__(self, seed: int, now_ns: int | None = None):
        self.rng = rng = random.Random(seed)
        self.text = _Text(rng)
        self.marker = rng.getrandbits(64).to_bytes(8, "big")
        self.marker_hex = self.marker.hex()
        self.used_ids: set = set()
        self.resources = {route: self._resource(route, r.version) for route, r in ROUTES.items()}
        self.clock = (time.time_ns() if now_ns is None else now_ns) - 120 * 10**9

    def new_id(self, nbytes: int) -> bytes:
        while True:
            v = self.rng.getrandbits(nbytes * 8).to_bytes(nbytes, "big")
            if v not in self.used_ids and any(v):
                self.used_ids.add(v)
                return v

    def _resource(self, route: str, version: str) -> Resource:
        rng = self.rng
        return Resource(attributes=key_values({
            "service.name": "support-agent",
            "service.version": version,
            "service.instance.id": f"support-agent-{route}-7c9f{rng.randrange(16**4):04x}",
            "deployment.environment.name": "production",
            "host.name": f"ip-10-0-{rng.randrange(256)}-{rng.randrange(256)}",
            "k8s.pod.name": f"support-agent-{route}-{rng.randrange(16**6):06x}",
            "k8s.namespace.name": "agents",
            "telemetry.sdk.name": "opentelemetry",
            "telemetry.sdk.language": "python",
            "telemetry.sdk.version": "1.45.2",
        }))

    def traces(self, target_spans: int) -> list[tuple[str, list[Planned]]]:
        """(route, spans) of baseline/candidate pairs until ``target_spans`` spans; the last trace is cut
        (never its root) to land on exactly ``target_spans``."""
        rng = self.rng
        traces, total = [], 0
        while total < target_spans:
            pair_id = rng.getrandbits(64)
            cohort = (rng.choices(INTENTS, INTENT_W)[0], rng.choices(LANGS, LANG_W)[0], rng.choices(TIERS, TIER_W)[0])
            conv = "oi" if rng.random() < 0.5 else "genai"
            session_id = f"sess-{rng.getrandbits(64):016x}"
            user_id = f"user-{rng.randrange(200_000)}"
            for route in ROUTES:
                tr = self.trace(route, pair_id, cohort, conv, session_id, user_id)
                traces.append((route, tr))
                total += len(tr)
                if total >= target_spans:
                    break
            self.clock += rng.randrange(5, 60) * 10**6
        excess = total - target_spans
        if excess:
            route, spans = traces[-1]
            traces[-1] = (route, spans[:len(spans) - 1 - excess] + spans[-1:])
        return traces

    def trace(self, route: str, pair_id: int, cohort: tuple[str, str, str], conv: str, session_id: str,
              user_id: str) -> list[Planned]:
        """One agent trace: its LLM and tool spans, then its root."""
        rng = self.rng
        ctx = _Trace(route, conv, session_id, user_id, self.new_id(8) + self.marker, self.new_id(8))
        t0 = self.clock + rng.randrange(0, 2 * 10**9)
        t = t0 + rng.randrange(2, 30) * 10**6
        out = []
        n_steps = min(12, rng.randint(3, 11) + (ROUTES[route].extra_steps if rng.random() < 0.35 else 0))
        prompt_tokens = rng.randint(600, 1800)
        for step in range(1, n_steps + 1):
            dur = int(rng.uniform(0.35, 4.5) * ROUTES[route].latency * 1e9)
            completion = rng.randint(40, 650)
            cached = (prompt_tokens // 128) * 128 if step > 1 and rng.random() < 0.6 else 0
            use_tool = step < n_steps and rng.random() < 0.55
            llm = self._llm_attrs(ctx, step, prompt_tokens, completion, cached, "tool_calls" if use_tool else "stop")
            out.append(self._llm_span(ctx, llm, t, dur))
            t += dur + rng.randrange(1, 20) * 10**6
            prompt_tokens += completion + rng.randint(50, 400)
            if use_tool:
                span, tdur = self._tool_span(ctx, step, t)
                out.append(span)
                t += tdur + rng.randrange(1, 20) * 10**6
        out.append(self._root_span(ctx, pair_id, cohort, t0, t))
        return out

    def _llm_attrs(self, ctx: _Trace, step: int, prompt_tokens: int, completion: int, cached: int,
                   finish: str) -> dict:
        rng, text = self.rng, self.text
        req_model, resp_model = ROUTES[ctx.route][:2]
        if ctx.conv == "oi":
            a = {
                "openinference.span.kind": "LLM",
                "llm.system": "openai",
                "llm.provider": "openai",
                "llm.model_name": resp_model,
                "llm.invocation_parameters": json.dumps({"model": req_model, "temperature": 0.2,
                                                         "max_tokens": 1024, "stream": False}),
                "llm.token_count.prompt": prompt_tokens,
                "llm.token_count.completion": completion,
                "llm.token_count.total": prompt_tokens + completion,
                "input.value": text(200, 2000),
                "input.mime_type": "application/json",
                "output.value": text(200, 2000),
                "output.mime_type": "application/json",
                "llm.finish_reason": finish,
                "agent.trajectory.step": step,
                "session.id": ctx.session_id,
                "user.id": ctx.user_id,
            }
            if cached:
                a["llm.token_count.prompt_details.cache_read"] = cached
            return a
        a = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": "openai",
            "gen_ai.request.model": req_model,
            "gen_ai.response.model": resp_model,
            "gen_ai.response.id": f"chatcmpl-{rng.getrandbits(96):024x}",
            "gen_ai.request.temperature": 0.2,
            "gen_ai.request.max_tokens": 1024,
            "gen_ai.usage.input_tokens": prompt_tokens,
            "gen_ai.usage.output_tokens": completion,
            "gen_ai.response.finish_reasons": [finish],
            "input.value": text(200, 2000),
            "output.value": text(200, 2000),
            "server.address": "api.openai.com" if ctx.route == "baseline" else "rlaif-serving.models.svc",
            "server.port": 443,
            "agent.trajectory.step": step,
            "session.id": ctx.session_id,
        }
        if cached:
            a["gen_ai.usage.cache_read.input_tokens"] = cached
        return a

    def _llm_span(self, ctx: _Trace, a: dict, t: int, dur: int) -> Planned:
        oi = ctx.conv == "oi"
        name = "ChatCompletion" if oi else f"chat {ROUTES[ctx.route].request_model}"
        sp = Span(trace_id=ctx.trace_id, span_id=self.new_id(8), parent_span_id=ctx.root_id, name=name,
                  kind=Span.SPAN_KIND_INTERNAL if oi else Span.SPAN_KIND_CLIENT,
                  start_time_unix_nano=t, end_time_unix_nano=t + dur, attributes=key_values(a),
                  status=Status(code=Status.STATUS_CODE_OK if oi else Status.STATUS_CODE_UNSET))
        return ctx.conv, sp, "LLM"

    def _tool_span(self, ctx: _Trace, step: int, t: int) -> tuple[Planned, int]:
        rng, text = self.rng, self.text
        tool, desc = rng.choice(TOOLS)
        tdur = int(rng.uniform(0.02, 1.5) * 1e9)
        failed = rng.random() < 0.03
        call_id = f"call_{rng.getrandbits(96):024x}"
        a = {
            "openinference.span.kind": "TOOL",
            "tool.name": tool,
            "tool.description": desc,
            "tool.parameters": json.dumps({"type": "object", "properties": {"query": {"type": "string"}}}),
            "tool.call.id": call_id,
            "input.value": json.dumps({"query": text(20, 160)}),
            "input.mime_type": "application/json",
            "output.value": text(200, 2000),
            "output.mime_type": "text/plain",
            "agent.trajectory.step": step,
            "session.id": ctx.session_id,
            "user.id": ctx.user_id,
        }
        if ctx.conv == "genai":
            a.update({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool, "gen_ai.tool.call.id": call_id})
        else:
            a.update({"tool.json_schema_version": "2020-12", "metadata": json.dumps({"route": ctx.route})})
        status = Status(code=Status.STATUS_CODE_ERROR if failed else Status.STATUS_CODE_OK,
                        message="tool error" if failed else "")
        sp = Span(trace_id=ctx.trace_id, span_id=self.new_id(8), parent_span_id=ctx.root_id, name=f"tool {tool}",
                  kind=Span.SPAN_KIND_INTERNAL, start_time_unix_nano=t, end_time_unix_nano=t + tdur,
                  attributes=key_values(a), status=status)
        if failed:
            sp.events.add(time_unix_nano=t + tdur, name="exception", attributes=key_values({
                "exception.type": "TimeoutError", "exception.message": "upstream timed out"}))
        return ("app", sp, "TOOL"), tdur

    def _root_span(self, ctx: _Trace, pair_id: int, cohort: tuple[str, str, str], t0: int, t: int) -> Planned:
        rng, text, route = self.rng, self.text, ROUTES[ctx.route]
        refused = rng.random() < route.refusal_rate
        a = {
            "openinference.span.kind": "AGENT",
            "shadow.request_id": f"req-{pair_id:016x}-{self.marker_hex}",
            "shadow.route": ctx.route,
            "cohort.intent": cohort[0],
            "cohort.language": cohort[1],
            "cohort.tier": cohort[2],
            "session.id": ctx.session_id,
            "user.id": ctx.user_id,
            "agent.name": "support-agent",
            "agent.version": route.version,
            "input.value": text(200, 2000),
            "input.mime_type": "text/plain",
            "output.value": text(200, 2000),
            "output.mime_type": "text/plain",
            "http.route": "/v1/assist",
            "metadata": json.dumps({"tenant": f"t{rng.randrange(500)}", "experiment": "rlaif-v3-shadow"}),
        }
        if ctx.conv == "genai":
            a["gen_ai.operation.name"] = "invoke_agent"
            a["gen_ai.agent.name"] = "support-agent"
        if rng.random() < 0.8:
            a["eval.name"] = "task_completion"
            a["eval.passed"] = (not refused) and rng.random() < route.pass_rate
            a["eval.score"] = round(rng.uniform(0.6, 1.0) if a["eval.passed"] else rng.uniform(0.0, 0.5), 3)
        if refused:
            a["agent.refused"] = True
        if rng.random() < 0.03:
            a["agent.escalated"] = True
        root = Span(trace_id=ctx.trace_id, span_id=ctx.root_id, name="agent.run", kind=Span.SPAN_KIND_SERVER,
                    start_time_unix_nano=t0, end_time_unix_nano=t + rng.randrange(1, 10) * 10**6,
                    attributes=key_values(a), status=Status(code=Status.STATUS_CODE_OK))
        return "app", root, "AGENT"

    def request(self, spans: list[tuple[str, Planned]]) -> ExportTraceServiceRequest:
        """(route, planned span) pairs as one request: a resource per route, a scope per instrumentation."""
        groups: dict = {}
        for route, (scope, sp, _) in spans:
            groups.setdefault(route, {}).setdefault(scope, []).append(sp)
        return ExportTraceServiceRequest(resource_spans=[
            ResourceSpans(resource=self.resources[route], schema_url=SCHEMA_URL,
                          scope_spans=[ScopeSpans(scope=SCOPES[sk], spans=sps) for sk, sps in by_scope.items()])
            for route, by_scope in groups.items()])


@dataclass(frozen=True)
class AgentPool:
    """``payloads``: encoded ``ExportTraceServiceRequest``s of exactly ``spans_per_request`` spans each.
    Every trace id ends in ``marker`` and every ``shadow.request_id`` in ``marker.hex()``."""
    payloads: tuple[bytes, ...]
    marker: bytes
    roots: tuple[int, ...]          # root (agent) spans in each payload
    spans_per_request: int
    pairs: int                      # baseline/candidate pairs begun (the last may lack its candidate)
    traces: int
    kinds: dict[str, int]           # spans by kind: AGENT, LLM, TOOL
    span_attrs: int                 # attributes over all spans (resource attributes not included)
    text_bytes: int                 # bytes of input.value / output.value over all spans
    resource_attrs: int             # attributes of each resource


def agent_pool(n_requests: int, seed: int, spans_per_request: int = 512, now_ns: int | None = None) -> AgentPool:
    """A pool of ``n_requests`` encoded ExportTraceServiceRequest payloads of realistic agent spans (~2.45 KB
    each), the same bytes for the same ``seed`` and ``now_ns`` (traces start two minutes before it;
    default: now)."""
    traffic = AgentTraffic(seed, now_ns)
    traces = traffic.traces(n_requests * spans_per_request)
    flat = [(route, planned) for route, spans in traces for planned in spans]
    kinds: Counter = Counter()
    span_attrs = text_bytes = 0
    for _, (_, sp, kind) in flat:
        kinds[kind] += 1
        span_attrs += len(sp.attributes)
        text_bytes += sum(len(kv.value.string_value) for kv in sp.attributes if kv.key in ("input.value", "output.value"))
    chunks = [flat[r * spans_per_request:(r + 1) * spans_per_request] for r in range(n_requests)]
    return AgentPool(
        payloads=tuple(traffic.request(chunk).SerializeToString() for chunk in chunks),
        marker=traffic.marker, roots=tuple(sum(1 for _, (_, _, k) in c if k == "AGENT") for c in chunks),
        spans_per_request=spans_per_request, pairs=(len(traces) + 1) // 2, traces=len(traces), kinds=dict(kinds),
        span_attrs=span_attrs, text_bytes=text_bytes, resource_attrs=len(traffic.resources["baseline"].attributes))
