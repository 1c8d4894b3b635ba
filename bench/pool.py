"""The ingest bench's traffic pool: pre-serialized 512-span OTLP requests with rewritable ids.

``build_pool`` generates (seeded) paired baseline/candidate agent traces: a root agent span, 3-12 LLM
steps, tool spans, ~15-20 attributes a span, prompt/response text of 200-2000 bytes, the OpenInference
and OTel GenAI conventions mixed. Every trace id ends in one 8-byte marker and every
``shadow.request_id`` in its hex, so a send reuses a template and rewrites only those bytes
(``materialize``): two memcpys and ~530 small slice writes, cheap enough that the client measures
the server. The bench's figures depend on these exact bytes: a change here changes every figure.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

SPANS_PER_REQUEST = 512

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
ROUTES = {
    # route: (request model, response model, service version, extra steps, latency factor, pass rate, refusal rate)
    "baseline": ("gpt-4o", "gpt-4o-2024-08-06", "2.14.3", 0, 1.00, 0.86, 0.015),
    "candidate": ("my-rlaif-8b-v3", "my-rlaif-8b-v3-2025-10-01", "2.15.0-rlaif", 1, 1.12, 0.84, 0.025),
}


@dataclass(frozen=True)
class Template:
    data: bytes            # serialized ExportTraceServiceRequest
    trace_offs: tuple      # offsets of the 8-byte marker inside every trace_id
    rid_offs: tuple        # offsets of the 16-char hex marker inside every shadow.request_id
    n_spans: int


@dataclass
class PoolStats:
    requests: int = 0
    spans: int = 0
    traces: int = 0
    pairs: int = 0
    bytes: int = 0
    span_attrs: int = 0
    resource_attrs_per_rs: float = 0.0
    kinds: Counter = field(default_factory=Counter)
    text_bytes: int = 0
    gen_seconds: float = 0.0

    def lines(self) -> list[str]:
        return [
            f"generator: {self.requests} pre-serialized requests x {SPANS_PER_REQUEST} spans = {self.spans:,} spans, "
            f"{self.traces:,} traces ({self.pairs:,} baseline/candidate pairs), built in {self.gen_seconds:.1f} s",
            f"  mean attributes/span {self.span_attrs / self.spans:.1f} (+{self.resource_attrs_per_rs:.0f} resource attrs), "
            f"mean bytes/span {self.bytes / self.spans:,.0f} (text {self.text_bytes / self.spans:,.0f}), "
            f"mean request {self.bytes / self.requests / 1e6:.2f} MB, spans/trace {self.spans / self.traces:.1f}",
            "  span mix: " + ", ".join(f"{k} {v / self.spans:.0%}" for k, v in sorted(self.kinds.items())),
        ]

    def as_dict(self) -> dict:
        return {"requests": self.requests, "spans": self.spans, "traces": self.traces, "pairs": self.pairs,
                "mean_attrs_per_span": round(self.span_attrs / self.spans, 2),
                "mean_bytes_per_span": round(self.bytes / self.spans, 1),
                "mean_request_bytes": round(self.bytes / self.requests)}


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


class _Synth:
    """One seeded generator of agent traces as protobuf spans. The order of its random draws defines the
    pool's bytes, so every method draws in a fixed order."""

    def __init__(self, seed: int):
        from opentelemetry.proto.common.v1 import common_pb2
        from opentelemetry.proto.trace.v1 import trace_pb2
        self.pb, self.tpb = common_pb2, trace_pb2
        self.rng = rng = random.Random(seed)
        self.text = _Text(rng)
        self.marker = rng.getrandbits(64).to_bytes(8, "big")
        self.marker_hex = self.marker.hex()
        self.used_ids: set = set()
        self.resources = {route: self._resource(route, version) for route, (_, _, version, *_) in ROUTES.items()}
        self.scopes = {
            "app": common_pb2.InstrumentationScope(name="support_agent.workflow", version="2.14"),
            "oi": common_pb2.InstrumentationScope(name="openinference.instrumentation.openai", version="0.1.66"),
            "genai": common_pb2.InstrumentationScope(name="opentelemetry.instrumentation.openai_v2", version=""),
        }
        self.clock = time.time_ns() - 120 * 10**9   # traces start over the last couple of minutes

    def new_id(self, nbytes: int) -> bytes:
        while True:
            v = self.rng.getrandbits(nbytes * 8).to_bytes(nbytes, "big")
            if v not in self.used_ids and any(v):
                self.used_ids.add(v)
                return v

    def av(self, v):
        pb = self.pb
        if isinstance(v, bool):
            return pb.AnyValue(bool_value=v)
        if isinstance(v, int):
            return pb.AnyValue(int_value=v)
        if isinstance(v, float):
            return pb.AnyValue(double_value=v)
        if isinstance(v, (list, tuple)):
            return pb.AnyValue(array_value=pb.ArrayValue(values=[self.av(x) for x in v]))
        return pb.AnyValue(string_value=v)

    def attrs(self, d: dict) -> list:
        return [self.pb.KeyValue(key=k, value=self.av(v)) for k, v in d.items()]

    def _resource(self, route: str, version: str):
        from opentelemetry.proto.resource.v1.resource_pb2 import Resource
        rng = self.rng
        return Resource(attributes=self.attrs({
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

    def trace(self, route, pair_id, cohort, conv, session_id, user_id) -> tuple[str, list]:
        """One agent trace -> (route, [(scope key, Span, kind label)]) in export order (children first, root last)."""
        rng = self.rng
        extra_steps, lat = ROUTES[route][3], ROUTES[route][4]
        ctx = {"route": route, "conv": conv, "session_id": session_id, "user_id": user_id,
               "trace_id": self.new_id(8) + self.marker, "root_id": self.new_id(8)}
        t0 = self.clock + rng.randrange(0, 2 * 10**9)
        t = t0 + rng.randrange(2, 30) * 10**6
        out = []
        n_steps = min(12, rng.randint(3, 11) + (extra_steps if rng.random() < 0.35 else 0))
        prompt_tokens = rng.randint(600, 1800)
        for step in range(1, n_steps + 1):
            dur = int(rng.uniform(0.35, 4.5) * lat * 1e9)
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
        return route, out

    def _llm_attrs(self, ctx, step, prompt_tokens, completion, cached, finish) -> dict:
        rng, text = self.rng, self.text
        req_model, resp_model = ROUTES[ctx["route"]][:2]
        if ctx["conv"] == "oi":
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
                "session.id": ctx["session_id"],
                "user.id": ctx["user_id"],
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
            "server.address": "api.openai.com" if ctx["route"] == "baseline" else "rlaif-serving.models.svc",
            "server.port": 443,
            "agent.trajectory.step": step,
            "session.id": ctx["session_id"],
        }
        if cached:
            a["gen_ai.usage.cache_read.input_tokens"] = cached
        return a

    def _llm_span(self, ctx, a, t, dur):
        Span, Status = self.tpb.Span, self.tpb.Status
        oi = ctx["conv"] == "oi"
        name = "ChatCompletion" if oi else f"chat {ROUTES[ctx['route']][0]}"
        sp = Span(trace_id=ctx["trace_id"], span_id=self.new_id(8), parent_span_id=ctx["root_id"], name=name,
                  kind=Span.SPAN_KIND_INTERNAL if oi else Span.SPAN_KIND_CLIENT,
                  start_time_unix_nano=t, end_time_unix_nano=t + dur, attributes=self.attrs(a),
                  status=Status(code=Status.STATUS_CODE_OK if oi else Status.STATUS_CODE_UNSET))
        return ctx["conv"], sp, "LLM"

    def _tool_span(self, ctx, step, t):
        rng, text = self.rng, self.text
        Span, Status = self.tpb.Span, self.tpb.Status
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
            "session.id": ctx["session_id"],
            "user.id": ctx["user_id"],
        }
        if ctx["conv"] == "genai":
            a.update({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool, "gen_ai.tool.call.id": call_id})
        else:
            a.update({"tool.json_schema_version": "2020-12", "metadata": json.dumps({"route": ctx["route"]})})
        sp = Span(trace_id=ctx["trace_id"], span_id=self.new_id(8), parent_span_id=ctx["root_id"], name=f"tool {tool}",
                  kind=Span.SPAN_KIND_INTERNAL, start_time_unix_nano=t, end_time_unix_nano=t + tdur,
                  attributes=self.attrs(a), status=Status(code=Status.STATUS_CODE_ERROR if failed else Status.STATUS_CODE_OK,
                                                          message="tool error" if failed else ""))
        if failed:
            sp.events.add(time_unix_nano=t + tdur, name="exception", attributes=self.attrs({
                "exception.type": "TimeoutError", "exception.message": "upstream timed out"}))
        return ("app", sp, "TOOL"), tdur

    def _root_span(self, ctx, pair_id, cohort, t0, t):
        rng, text = self.rng, self.text
        Span, Status = self.tpb.Span, self.tpb.Status
        route = ctx["route"]
        pass_rate, refusal_rate = ROUTES[route][5:7]
        refused = rng.random() < refusal_rate
        a = {
            "openinference.span.kind": "AGENT",
            "shadow.request_id": f"req-{pair_id:016x}-{self.marker_hex}",
            "shadow.route": route,
            "cohort.intent": cohort[0],
            "cohort.language": cohort[1],
            "cohort.tier": cohort[2],
            "session.id": ctx["session_id"],
            "user.id": ctx["user_id"],
            "agent.name": "support-agent",
            "agent.version": ROUTES[route][2],
            "input.value": text(200, 2000),
            "input.mime_type": "text/plain",
            "output.value": text(200, 2000),
            "output.mime_type": "text/plain",
            "http.route": "/v1/assist",
            "metadata": json.dumps({"tenant": f"t{rng.randrange(500)}", "experiment": "rlaif-v3-shadow"}),
        }
        if ctx["conv"] == "genai":
            a["gen_ai.operation.name"] = "invoke_agent"
            a["gen_ai.agent.name"] = "support-agent"
        if rng.random() < 0.8:
            a["eval.name"] = "task_completion"
            a["eval.passed"] = (not refused) and rng.random() < pass_rate
            a["eval.score"] = round(rng.uniform(0.6, 1.0) if a["eval.passed"] else rng.uniform(0.0, 0.5), 3)
        if refused:
            a["agent.refused"] = True
        if rng.random() < 0.03:
            a["agent.escalated"] = True
        root = Span(trace_id=ctx["trace_id"], span_id=ctx["root_id"], name="agent.run", kind=Span.SPAN_KIND_SERVER,
                    start_time_unix_nano=t0, end_time_unix_nano=t + rng.randrange(1, 10) * 10**6,
                    attributes=self.attrs(a), status=Status(code=Status.STATUS_CODE_OK))
        return "app", root, "AGENT"


def _traces(synth: _Synth, target: int, stats: PoolStats) -> list:
    """Traces until ``target`` spans; the last one trimmed (never its root) to land on exactly ``target``."""
    rng = synth.rng
    traces, total = [], 0
    while total < target:
        pair_id = rng.getrandbits(64)
        cohort = (rng.choices(INTENTS, INTENT_W)[0], rng.choices(LANGS, LANG_W)[0], rng.choices(TIERS, TIER_W)[0])
        conv = "oi" if rng.random() < 0.5 else "genai"
        session_id = f"sess-{rng.getrandbits(64):016x}"
        user_id = f"user-{rng.randrange(200_000)}"
        stats.pairs += 1
        for route in ("baseline", "candidate"):
            tr = synth.trace(route, pair_id, cohort, conv, session_id, user_id)
            traces.append(tr)
            total += len(tr[1])
            stats.traces += 1
            if total >= target:
                break
        synth.clock += rng.randrange(5, 60) * 10**6
    excess = total - target
    if excess:
        route, spans = traces[-1]
        traces[-1] = (route, spans[:len(spans) - 1 - excess] + spans[-1:])   # keep the root (last)
    return traces


def _request(synth: _Synth, chunk: list, stats: PoolStats):
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans
    groups: dict = {}
    for route, scope, sp, kl in chunk:
        groups.setdefault(route, {}).setdefault(scope, []).append(sp)
        stats.kinds[kl] += 1
        stats.span_attrs += len(sp.attributes)
        for kv in sp.attributes:
            if kv.key in ("input.value", "output.value"):
                stats.text_bytes += len(kv.value.string_value)
    return ExportTraceServiceRequest(resource_spans=[
        ResourceSpans(resource=synth.resources[route], schema_url="https://opentelemetry.io/schemas/1.27.0",
                      scope_spans=[ScopeSpans(scope=synth.scopes[sk], spans=sps) for sk, sps in by_scope.items()])
        for route, by_scope in groups.items()])


def build_pool(n_requests: int, seed: int) -> tuple[list[Template], PoolStats, bytes]:
    """Generate n_requests requests of exactly 512 spans. Returns templates, stats and the id marker."""
    t_gen = time.perf_counter()
    synth = _Synth(seed)
    stats = PoolStats(resource_attrs_per_rs=len(synth.resources["baseline"].attributes))
    target = n_requests * SPANS_PER_REQUEST
    flat = [(route, scope, sp, kl) for route, spans in _traces(synth, target, stats) for scope, sp, kl in spans]
    assert len(flat) == target
    templates = []
    for r in range(n_requests):
        chunk = flat[r * SPANS_PER_REQUEST:(r + 1) * SPANS_PER_REQUEST]
        data = _request(synth, chunk, stats).SerializeToString()
        trace_offs = _find_all(data, synth.marker)
        rid_offs = _find_all(data, synth.marker_hex.encode())
        n_roots = sum(1 for _, _, _, kl in chunk if kl == "AGENT")
        if len(trace_offs) != SPANS_PER_REQUEST or len(rid_offs) != n_roots:
            raise RuntimeError(f"id marker found {len(trace_offs)}/{len(rid_offs)} times in request {r}, "
                               f"expected {SPANS_PER_REQUEST}/{n_roots}: pick another --seed")
        templates.append(Template(data, tuple(trace_offs), tuple(rid_offs), SPANS_PER_REQUEST))
        stats.bytes += len(data)
    stats.requests = n_requests
    stats.spans = target
    stats.gen_seconds = time.perf_counter() - t_gen
    return templates, stats, synth.marker


def _find_all(data: bytes, needle: bytes) -> list:
    offs, i = [], data.find(needle)
    while i >= 0:
        offs.append(i)
        i = data.find(needle, i + len(needle))
    return offs


def id_suffix(nonce: int, worker: int, cycle: int) -> bytes:
    """The 8 bytes that replace the marker: unique per (run nonce, worker, pass over the pool)."""
    if worker > 0xFFFF or cycle > 0xFFFFFF:
        raise ValueError("worker id or pool pass out of range for the 8-byte id suffix")
    return ((nonce & 0xFFFFFF) << 40 | worker << 24 | cycle).to_bytes(8, "big")


def materialize(t: Template, suffix: bytes) -> bytes:
    buf = bytearray(t.data)
    for o in t.trace_offs:
        buf[o:o + 8] = suffix
    hx = suffix.hex().encode()
    for o in t.rid_offs:
        buf[o:o + 16] = hx
    return bytes(buf)
