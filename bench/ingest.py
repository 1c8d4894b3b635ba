#!/usr/bin/env python3
"""Ingest benchmark for `shadowlens serve`: sustained acknowledged spans/s under realistic agent traffic.

What it does (one "run"):
  1. Builds (once, seeded) a pool of realistic OTLP trace requests of exactly 512 spans each: paired
     baseline/candidate agent traces (root agent span, 3-12 LLM steps, tool spans, ~15-20 attributes per
     span, prompt/response text of 200-2000 bytes), mixing the OpenInference and OTel GenAI conventions,
     and serializes them to bytes.
  2. Starts `shadowlens serve` on free ports with a fresh data dir (or targets `--endpoint`).
  3. Forks `--clients` processes, each keeping `--concurrency` Exports in flight on one gRPC channel (or
     one keep-alive HTTP connection per in-flight slot with `--http`) for `--duration` seconds. Every send
     reuses a pool template but rewrites the 8 id bytes that make each trace id (and `shadow.request_id`)
     unique per (run, worker, pass over the pool), so every sent span has a unique (trace_id, span_id) and
     the per-send cost is two memcpys plus ~530 small slice writes.
  4. Measures acknowledged spans/s, Export latency, server CPU (utime+stime of the server process tree over
     the timed phase) and peak RSS (VmRSS of the tree sampled every 100 ms, PSS every second, and VmHWM), then
     stops the server with SIGTERM and counts the stored spans with `shadowlens query`: stored must equal acknowledged.

Usage:
  python bench/ingest.py                       # 1 run, 20 s, 4 clients x 4 in flight, gRPC
  python bench/ingest.py --runs 3              # 3 runs on fresh data dirs + medians
  python bench/ingest.py --http                # OTLP/HTTP protobuf instead of gRPC
  python bench/ingest.py --server-env SHADOWLENS_X__Y=z   # extra server env (repeatable)
  python bench/ingest.py --endpoint 127.0.0.1:4317        # existing server (no CPU/RSS/stored figures)
  python bench/ingest.py --json                # also print one machine-readable JSON line at the end

Bar (issue): >= 50,000 acknowledged spans/s over gRPC, Export p99 <= 250 ms, server peak RSS <= 500 MB,
stored == acknowledged. Exit status: 0 ok, 1 stored != acknowledged or the server misbehaved
(crash, non-zero exit, no readiness), 2 usage error. Bar misses are reported, not turned into exit 1,
unless `--check` is given.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
SPANS_PER_REQUEST = 512
CLK_TCK = os.sysconf("SC_CLK_TCK")

BAR_SPANS_PER_S = 50_000
BAR_P99_MS = 250.0
BAR_RSS_MB = 500.0

# --------------------------------------------------------------------------------------------------
# Traffic generation
# --------------------------------------------------------------------------------------------------

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


@dataclass
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

    def lines(self):
        return [
            f"generator: {self.requests} pre-serialized requests x {SPANS_PER_REQUEST} spans = {self.spans:,} spans, "
            f"{self.traces:,} traces ({self.pairs:,} baseline/candidate pairs), built in {self.gen_seconds:.1f} s",
            f"  mean attributes/span {self.span_attrs / self.spans:.1f} (+{self.resource_attrs_per_rs:.0f} resource attrs), "
            f"mean bytes/span {self.bytes / self.spans:,.0f} (text {self.text_bytes / self.spans:,.0f}), "
            f"mean request {self.bytes / self.requests / 1e6:.2f} MB, spans/trace {self.spans / self.traces:.1f}",
            "  span mix: " + ", ".join(f"{k} {v / self.spans:.0%}" for k, v in sorted(self.kinds.items())),
        ]

    def as_dict(self):
        return {"requests": self.requests, "spans": self.spans, "traces": self.traces, "pairs": self.pairs,
                "mean_attrs_per_span": round(self.span_attrs / self.spans, 2),
                "mean_bytes_per_span": round(self.bytes / self.spans, 1),
                "mean_request_bytes": round(self.bytes / self.requests)}


def build_pool(n_requests: int, seed: int) -> tuple[list[Template], PoolStats, bytes]:
    """Generate n_requests requests of exactly 512 spans. Returns templates, stats and the id marker."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

    t_gen = time.perf_counter()
    rng = random.Random(seed)
    text = _Text(rng)
    marker = rng.getrandbits(64).to_bytes(8, "big")
    marker_hex = marker.hex()
    stats = PoolStats()
    used_ids: set = set()

    def new_id(nbytes):
        while True:
            v = rng.getrandbits(nbytes * 8).to_bytes(nbytes, "big")
            if v not in used_ids and any(v):
                used_ids.add(v)
                return v

    def av(v):
        if isinstance(v, bool):
            return AnyValue(bool_value=v)
        if isinstance(v, int):
            return AnyValue(int_value=v)
        if isinstance(v, float):
            return AnyValue(double_value=v)
        if isinstance(v, (list, tuple)):
            return AnyValue(array_value=ArrayValue(values=[av(x) for x in v]))
        return AnyValue(string_value=v)

    def attrs(d):
        return [KeyValue(key=k, value=av(v)) for k, v in d.items()]

    resources = {}
    for route, (_, _, version, *_rest) in ROUTES.items():
        resources[route] = Resource(attributes=attrs({
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
    stats.resource_attrs_per_rs = len(resources["baseline"].attributes)
    scopes = {
        "app": InstrumentationScope(name="support_agent.workflow", version="2.14"),
        "oi": InstrumentationScope(name="openinference.instrumentation.openai", version="0.1.66"),
        "genai": InstrumentationScope(name="opentelemetry.instrumentation.openai_v2", version=""),
    }
    SK_SERVER, SK_INTERNAL, SK_CLIENT = Span.SPAN_KIND_SERVER, Span.SPAN_KIND_INTERNAL, Span.SPAN_KIND_CLIENT
    ST_OK, ST_ERR = Status.STATUS_CODE_OK, Status.STATUS_CODE_ERROR

    now_ns = time.time_ns()
    clock = [now_ns - 120 * 10**9]   # traces start over the last couple of minutes

    def make_trace(route, pair_id, cohort, conv, session_id, user_id):
        """One agent trace -> list of (scope key, Span, kind label) in export order (children first, root last)."""
        req_model, resp_model, _ver, extra_steps, lat, pass_rate, refusal_rate = ROUTES[route]
        trace_id = new_id(8) + marker
        root_id = new_id(8)
        t0 = clock[0] + rng.randrange(0, 2 * 10**9)
        t = t0 + rng.randrange(2, 30) * 10**6
        out = []
        n_steps = min(12, rng.randint(3, 11) + (extra_steps if rng.random() < 0.35 else 0))
        prompt_tokens = rng.randint(600, 1800)
        for step in range(1, n_steps + 1):
            dur = int(rng.uniform(0.35, 4.5) * lat * 1e9)
            completion = rng.randint(40, 650)
            cached = (prompt_tokens // 128) * 128 if step > 1 and rng.random() < 0.6 else 0
            use_tool = step < n_steps and rng.random() < 0.55
            finish = "tool_calls" if use_tool else "stop"
            if conv == "oi":
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
                    "session.id": session_id,
                    "user.id": user_id,
                }
                if cached:
                    a["llm.token_count.prompt_details.cache_read"] = cached
                name = "ChatCompletion"
                kind = SK_INTERNAL
            else:
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
                    "server.address": "api.openai.com" if route == "baseline" else "rlaif-serving.models.svc",
                    "server.port": 443,
                    "agent.trajectory.step": step,
                    "session.id": session_id,
                }
                if cached:
                    a["gen_ai.usage.cache_read.input_tokens"] = cached
                name = f"chat {req_model}"
                kind = SK_CLIENT
            sp = Span(trace_id=trace_id, span_id=new_id(8), parent_span_id=root_id, name=name, kind=kind,
                      start_time_unix_nano=t, end_time_unix_nano=t + dur, attributes=attrs(a),
                      status=Status(code=ST_OK if conv == "oi" else Status.STATUS_CODE_UNSET))
            out.append((conv, sp, "LLM"))
            t += dur + rng.randrange(1, 20) * 10**6
            prompt_tokens += completion + rng.randint(50, 400)
            if use_tool:
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
                    "session.id": session_id,
                    "user.id": user_id,
                }
                if conv == "genai":
                    a.update({"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
                              "gen_ai.tool.call.id": call_id})
                else:
                    a.update({"tool.json_schema_version": "2020-12", "metadata": json.dumps({"route": route})})
                sp = Span(trace_id=trace_id, span_id=new_id(8), parent_span_id=root_id, name=f"tool {tool}",
                          kind=SK_INTERNAL, start_time_unix_nano=t, end_time_unix_nano=t + tdur,
                          attributes=attrs(a), status=Status(code=ST_ERR if failed else ST_OK,
                                                             message="tool error" if failed else ""))
                if failed:
                    sp.events.add(time_unix_nano=t + tdur, name="exception", attributes=attrs({
                        "exception.type": "TimeoutError", "exception.message": "upstream timed out"}))
                out.append(("app", sp, "TOOL"))
                t += tdur + rng.randrange(1, 20) * 10**6
        refused = rng.random() < refusal_rate
        a = {
            "openinference.span.kind": "AGENT",
            "shadow.request_id": f"req-{pair_id:016x}-{marker_hex}",
            "shadow.route": route,
            "cohort.intent": cohort[0],
            "cohort.language": cohort[1],
            "cohort.tier": cohort[2],
            "session.id": session_id,
            "user.id": user_id,
            "agent.name": "support-agent",
            "agent.version": ROUTES[route][2],
            "input.value": text(200, 2000),
            "input.mime_type": "text/plain",
            "output.value": text(200, 2000),
            "output.mime_type": "text/plain",
            "http.route": "/v1/assist",
            "metadata": json.dumps({"tenant": f"t{rng.randrange(500)}", "experiment": "rlaif-v3-shadow"}),
        }
        if conv == "genai":
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
        root = Span(trace_id=trace_id, span_id=root_id, name="agent.run", kind=SK_SERVER,
                    start_time_unix_nano=t0, end_time_unix_nano=t + rng.randrange(1, 10) * 10**6,
                    attributes=attrs(a), status=Status(code=ST_OK))
        out.append(("app", root, "AGENT"))
        return route, out

    # Generate traces until the pool is full; trim the last trace (never its root) to land on exactly 512*n.
    target = n_requests * SPANS_PER_REQUEST
    traces, total = [], 0
    while total < target:
        pair_id = rng.getrandbits(64)
        cohort = (rng.choices(INTENTS, INTENT_W)[0], rng.choices(LANGS, LANG_W)[0], rng.choices(TIERS, TIER_W)[0])
        conv = "oi" if rng.random() < 0.5 else "genai"
        session_id = f"sess-{rng.getrandbits(64):016x}"
        user_id = f"user-{rng.randrange(200_000)}"
        stats.pairs += 1
        for route in ("baseline", "candidate"):
            tr = make_trace(route, pair_id, cohort, conv, session_id, user_id)
            traces.append(tr)
            total += len(tr[1])
            stats.traces += 1
            if total >= target:
                break
        clock[0] += rng.randrange(5, 60) * 10**6
    excess = total - target
    if excess:
        route, spans = traces[-1]
        traces[-1] = (route, spans[:len(spans) - 1 - excess] + spans[-1:])   # keep the root (last)

    flat = [(route, scope, sp, kl) for route, spans in traces for scope, sp, kl in spans]
    assert len(flat) == target
    templates = []
    for r in range(n_requests):
        chunk = flat[r * SPANS_PER_REQUEST:(r + 1) * SPANS_PER_REQUEST]
        groups: dict = {}
        for route, scope, sp, kl in chunk:
            groups.setdefault(route, {}).setdefault(scope, []).append(sp)
            stats.kinds[kl] += 1
            stats.span_attrs += len(sp.attributes)
            for kv in sp.attributes:
                if kv.key in ("input.value", "output.value"):
                    stats.text_bytes += len(kv.value.string_value)
        req = ExportTraceServiceRequest(resource_spans=[
            ResourceSpans(resource=resources[route], schema_url="https://opentelemetry.io/schemas/1.27.0",
                          scope_spans=[ScopeSpans(scope=scopes[sk], spans=sps) for sk, sps in by_scope.items()])
            for route, by_scope in groups.items()])
        data = req.SerializeToString()
        trace_offs = _find_all(data, marker)
        rid_offs = _find_all(data, marker_hex.encode())
        n_roots = sum(1 for _, _, _, kl in chunk if kl == "AGENT")
        if len(trace_offs) != SPANS_PER_REQUEST or len(rid_offs) != n_roots:
            raise RuntimeError(f"id marker found {len(trace_offs)}/{len(rid_offs)} times in request {r}, "
                               f"expected {SPANS_PER_REQUEST}/{n_roots}: pick another --seed")
        templates.append(Template(data, tuple(trace_offs), tuple(rid_offs), SPANS_PER_REQUEST))
        stats.bytes += len(data)
    stats.requests = n_requests
    stats.spans = target
    stats.gen_seconds = time.perf_counter() - t_gen
    return templates, stats, marker


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


# --------------------------------------------------------------------------------------------------
# Client processes
# --------------------------------------------------------------------------------------------------

_POOL: list = []   # set in the parent before forking; children read it copy-on-write


@dataclass
class WorkerStats:
    exports_ok: int = 0
    spans_sent: int = 0          # distinct spans offered (a retried request counts once)
    attempts: int = 0
    acked: int = 0
    rejected: int = 0
    unavailable: int = 0         # UNAVAILABLE / RESOURCE_EXHAUSTED / HTTP 429/503 responses (each retried)
    dropped_spans: int = 0       # spans given up on (still refused when the time ran out)
    errors: Counter = field(default_factory=Counter)
    error_samples: dict = field(default_factory=dict)   # first detail message per error code
    error_spans: int = 0
    partial_messages: Counter = field(default_factory=Counter)
    latencies: list = field(default_factory=list)   # seconds, OK exports only
    buckets: Counter = field(default_factory=Counter)  # acked spans by completion second
    last_done: float = 0.0

    def merge(self, o: "WorkerStats"):
        for k in ("exports_ok", "spans_sent", "attempts", "acked", "rejected", "unavailable", "dropped_spans",
                  "error_spans"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        self.errors.update(o.errors)
        for k, v in o.error_samples.items():
            self.error_samples.setdefault(k, v)
        self.partial_messages.update(o.partial_messages)
        self.latencies.extend(o.latencies)
        self.buckets.update(o.buckets)
        self.last_done = max(self.last_done, o.last_done)


def _retry_delay_grpc(err) -> float | None:
    try:
        from google.rpc import error_details_pb2, status_pb2
        for k, v in err.trailing_metadata() or ():
            if k == "grpc-status-details-bin":
                st = status_pb2.Status.FromString(v)
                for d in st.details:
                    if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                        ri = error_details_pb2.RetryInfo()
                        d.Unpack(ri)
                        return ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9
    except Exception:
        pass
    return None


def _grpc_sender(channel, timeout):
    import grpc
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
    call = channel.unary_unary(GRPC_METHOD, request_serializer=None,
                               response_deserializer=ExportTraceServiceResponse.FromString)
    retryable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

    def send(data):
        """-> ("ok", response) | ("retry", delay or None) | ("error", name)"""
        try:
            return "ok", call(data, timeout=timeout)
        except grpc.RpcError as e:
            code = e.code()
            if code in retryable:
                return "retry", _retry_delay_grpc(e)
            return "error", (code.name if code else "UNKNOWN", e.details() or "")
    return send


def _http_sender(host, port, timeout):
    import http.client

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
    headers = {"Content-Type": "application/x-protobuf"}
    conn = [None]

    def send(data):
        try:
            if conn[0] is None:
                conn[0] = http.client.HTTPConnection(host, port, timeout=timeout)
            c = conn[0]
            c.request("POST", "/v1/traces", body=data, headers=headers)
            r = c.getresponse()
            body = r.read()
            if r.will_close:
                c.close()
                conn[0] = None
        except (OSError, http.client.HTTPException) as e:
            if conn[0] is not None:
                conn[0].close()
                conn[0] = None
            return "error", ("http:" + type(e).__name__, str(e))
        if r.status == 200:
            ctype = r.getheader("Content-Type", "")
            if body and "json" in ctype:
                from google.protobuf import json_format
                return "ok", json_format.Parse(body, ExportTraceServiceResponse())
            return "ok", ExportTraceServiceResponse.FromString(body)
        if r.status in (429, 503):
            ra = r.getheader("Retry-After")
            try:
                return "retry", float(ra) if ra else None
            except ValueError:
                return "retry", None
        return "error", (f"HTTP_{r.status}", body[:200].decode("utf-8", "replace"))
    return send


def _worker_loop(send, wid, nonce, start, deadline, st: WorkerStats, interval=None, phase=0.0):
    """Closed loop (the next Export as soon as the last is answered), or with ``interval`` one Export
    every ``interval`` seconds from ``start + phase``. Paced latency counts from the scheduled send
    time, so a slow answer that delays the next send is charged to it (no coordinated omission)."""
    pool = _POOL
    n = len(pool)
    i = 0
    mono = time.monotonic
    perf = time.perf_counter
    while mono() < deadline:
        t = pool[i % n]
        data = materialize(t, id_suffix(nonce, wid, i // n))
        scheduled = None
        if interval is not None:
            due = start + phase + i * interval
            if due >= deadline:
                break
            wait = due - mono()
            if wait > 0:
                time.sleep(wait)
            scheduled = perf() - max(0.0, mono() - due)
        st.spans_sent += t.n_spans
        backoff = 0.02
        while True:
            st.attempts += 1
            t0 = perf() if scheduled is None else scheduled
            kind, val = send(data)
            lat = perf() - t0
            if kind == "ok":
                ps = val.partial_success
                rej = ps.rejected_spans
                st.exports_ok += 1
                st.rejected += rej
                st.acked += t.n_spans - rej
                if ps.error_message:
                    st.partial_messages[ps.error_message[:120]] += 1
                st.latencies.append(lat)
                now = mono()
                st.buckets[int(now - start)] += t.n_spans - rej
                st.last_done = max(st.last_done, now)
                break
            if kind == "retry":
                st.unavailable += 1
                delay = val if val is not None else backoff
                backoff = min(backoff * 2, 1.0)
                if mono() + delay >= deadline:
                    st.dropped_spans += t.n_spans
                    st.last_done = max(st.last_done, mono())
                    break
                time.sleep(delay)
                continue
            name, detail = val
            st.errors[name] += 1
            st.error_samples.setdefault(name, detail[:200])
            st.error_spans += t.n_spans
            st.last_done = max(st.last_done, mono())
            if name.startswith("http:"):
                time.sleep(0.05)
            break
        i += 1


def client_main(idx, args, nonce, ready_q, go, start_v, out_q):
    """One client process: `concurrency` worker threads sharing one gRPC channel (or own HTTP connections)."""
    host, port = args.target.rsplit(":", 1)
    timeout = args.timeout
    senders = []
    if args.http:
        senders = [_http_sender(host, int(port), timeout) for _ in range(args.concurrency)]
    else:
        import grpc
        channel = grpc.insecure_channel(args.target, options=[
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.use_local_subchannel_pool", 1),   # own TCP connection per client process
        ])
        grpc.channel_ready_future(channel).result(timeout=30)
        send = _grpc_sender(channel, timeout)
        senders = [send] * args.concurrency
    ready_q.put(idx)
    go.wait()
    start = start_v.value
    deadline = start + args.duration
    while time.monotonic() < start:
        time.sleep(0.001)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    stats = [WorkerStats() for _ in range(args.concurrency)]
    workers = args.clients * args.concurrency
    interval = workers * SPANS_PER_REQUEST / args.rate if args.rate else None
    threads = [threading.Thread(target=_worker_loop,
                                args=(senders[k], idx * args.concurrency + k, nonce, start, deadline, stats[k],
                                      interval, (interval or 0) * (idx * args.concurrency + k) / workers))
               for k in range(args.concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    total = WorkerStats()
    for s in stats:
        total.merge(s)
    cpu = (ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime)
    out_q.put((idx, total, cpu))


# --------------------------------------------------------------------------------------------------
# Server management and /proc sampling
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_tree(pid: int) -> list:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return pids


def _cpu_seconds(pid: int) -> float:
    """utime+stime of the process tree (live descendants, plus reaped children via cutime/cstime)."""
    total = 0
    for i, p in enumerate(_proc_tree(pid)):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])           # utime, stime
        if i == 0:
            total += int(fields[13]) + int(fields[14])       # cutime, cstime
    return total / CLK_TCK


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (the libraries every server process maps) split among
    the processes that map them, so a sum over the tree counts each page once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    # PSS needs smaps_rollup, which walks every page table of the tree: every 100 ms that was ~5 % of
    # the machine's CPU (perf, a saturated run), taken from the server it measures. VmRSS is cheap.
    PSS_EVERY = 10

    def __init__(self, pid, interval=0.1):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_tree_kb = 0
        self.peak_pss_kb = 0
        self.peak_hwm_kb = 0
        self.samples = []
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            tree = _proc_tree(self.pid)
            kb = sum(_status_kb(p, "VmRSS:") for p in tree)
            hwm = _status_kb(self.pid, "VmHWM:")
            if kb == 0 and hwm == 0:
                break
            self.peak_tree_kb = max(self.peak_tree_kb, kb)
            if len(self.samples) % self.PSS_EVERY == 0:
                self.peak_pss_kb = max(self.peak_pss_kb, sum(_pss_kb(p) for p in tree))
            self.peak_hwm_kb = max(self.peak_hwm_kb, hwm)
            self.samples.append((time.monotonic(), kb))
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join(2)

    @property
    def peak_mb(self):
        return max(self.peak_tree_kb, self.peak_hwm_kb) / 1024


class BacklogSampler(threading.Thread):
    """A paced run's question is whether the pipeline keeps up, and the spans queued for DuckDB at
    the end cannot answer it alone: a steady pipeline always holds about one commit group in flight
    (16-32k spans). So the queue is read every 2 s, and the slope of a line through the second
    half's samples is the backlog's growth: about zero when the store keeps up, the offered rate
    minus the sustained one when it does not. (Every 2 s: /metrics costs the store process tens of
    ms with the analyzers' series in it.)"""

    def __init__(self, server, start, duration, interval=2.0):
        super().__init__(daemon=True)
        self.server, self.start_t, self.duration, self.interval = server, start, duration, interval
        self.samples: list[tuple[float, int]] = []
        self.start()

    def run(self):
        t = self.interval
        while t < self.duration:
            time.sleep(max(0.0, self.start_t + t - time.monotonic()))
            queued = self.server.scrape().get("shadowlens_ingest_queue_spans")
            if queued is not None:
                self.samples.append((round(time.monotonic() - self.start_t, 2), int(queued)))
            t += self.interval

    def growth_per_s(self):
        pts = [(t, q) for t, q in self.samples if t >= self.duration / 2]
        if len(pts) < 3:
            return None
        mt = sum(t for t, _ in pts) / len(pts)
        mq = sum(q for _, q in pts) / len(pts)
        return sum((t - mt) * (q - mq) for t, q in pts) / sum((t - mt) ** 2 for t, _ in pts)


class Server:
    def __init__(self, exe, data_dir, extra_env, verbose=False):
        self.exe, self.data_dir = exe, data_dir
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        env = dict(os.environ)
        env.update({
            "SHADOWLENS_RECEIVERS__GRPC__ENDPOINT": f"127.0.0.1:{self.grpc_port}",
            "SHADOWLENS_RECEIVERS__HTTP__ENDPOINT": f"127.0.0.1:{self.http_port}",
            "SHADOWLENS_METRICS__ENDPOINT": f"127.0.0.1:{self.metrics_port}",
        })
        env.update(extra_env)
        self.log_path = os.path.join(os.path.dirname(data_dir.rstrip("/")), os.path.basename(data_dir) + ".log")
        os.makedirs(data_dir, exist_ok=True)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([exe, "serve", "--data-dir", data_dir], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.sampler = RssSampler(self.proc.pid)
        self.sampler.start()
        self.exit_code = None
        self.stop_seconds = None
        self.lifetime_cpu = None
        self.lifetime_maxrss_mb = None

    def wait_ready(self, timeout=90.0):
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout:.0f} s ({url}):\n{self.log_tail()}")

    def cpu(self):
        return _cpu_seconds(self.proc.pid)

    def scrape(self) -> dict:
        """shadowlens_* self metrics worth printing (summed over label sets)."""
        want = ("shadowlens_spans_received_total", "shadowlens_spans_rejected_total",
                "shadowlens_spans_duplicate_total", "shadowlens_ingest_queue_spans", "shadowlens_open_traces",
                "shadowlens_late_spans_total", "shadowlens_traces_total", "shadowlens_store_bytes",
                "shadowlens_pairs_total")
        out = {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
                text = r.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError) as e:
            return {"error": str(e)}
        for line in text.splitlines():
            if not line or line[0] == "#":
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in want:
                try:
                    out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
                except ValueError:
                    pass
        return out

    def stop(self, timeout=180.0):
        """SIGTERM, wait (wait4, to get the lifetime rusage), SIGKILL after `timeout`."""
        t0 = time.monotonic()
        pid = self.proc.pid
        killed = False
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            while True:
                wpid, status, ru = os.wait4(pid, os.WNOHANG)
                if wpid:
                    break
                if not killed and time.monotonic() - t0 > timeout:
                    self.proc.kill()
                    killed = True
                time.sleep(0.05)
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.lifetime_cpu = round(ru.ru_utime + ru.ru_stime, 2)
            self.lifetime_maxrss_mb = round(ru.ru_maxrss / 1024, 1)
        self.exit_code = self.proc.returncode if not killed else f"SIGKILLed after {timeout:.0f} s SIGTERM timeout"
        self.stop_seconds = time.monotonic() - t0
        self.sampler.stop()
        self.log.close()

    def log_tail(self, n=25):
        try:
            self.log.flush()
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join("    | " + ln for ln in lines[-n:])
        except OSError:
            return ""

    def log_problems(self):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return []
        keys = ("Traceback", "ERROR", "Error", "exception", "Exception", "CRITICAL", "WARNING")
        return [ln for ln in lines if any(k in ln for k in keys)]


def count_stored(exe, data_dir):
    cmd = [exe, "query", "--data-dir", data_dir, "--format", "json", "select count(*) as n from spans"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {r.returncode}: {r.stderr.strip()[-500:]}")
    rows = json.loads(r.stdout)
    return int(rows[0]["n"])


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------

def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def one_run(run_no, args, exe, extra_env):
    ctx = mp.get_context("fork")
    server = None
    data_dir = None
    res = {"run": run_no, "transport": "http" if args.http else "grpc", "clients": args.clients,
           "concurrency": args.concurrency, "rate": args.rate, "problems": []}
    if args.endpoint:
        args.target = args.endpoint
    else:
        data_dir = tempfile.mkdtemp(prefix=f"shadowlens-bench-{run_no}-", dir=args.tmp_dir)
        server = Server(exe, os.path.join(data_dir, "data"), extra_env)
        try:
            server.wait_ready()
        except RuntimeError as e:
            server.stop(30)
            res["problems"].append(str(e))
            res["fatal"] = True
            return res, data_dir
        port = server.http_port if args.http else server.grpc_port
        args.target = f"127.0.0.1:{port}"
    nonce = int.from_bytes(os.urandom(3), "big")   # keeps ids unique across runs against one --endpoint
    ready_q, out_q = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    start_v = ctx.Value("d", 0.0, lock=False)
    procs = [ctx.Process(target=client_main, args=(i, args, nonce, ready_q, go, start_v, out_q), daemon=True)
             for i in range(args.clients)]
    for p in procs:
        p.start()
    for _ in procs:
        ready_q.get(timeout=60)
    cpu0 = server.cpu() if server else None
    start = time.monotonic() + 0.05
    start_v.value = start
    go.set()
    backlog = BacklogSampler(server, start, args.duration) if server and args.rate else None
    results = {}
    t_wait = start + args.duration + args.timeout + 60
    while len(results) < len(procs):
        try:
            idx, st, ccpu = out_q.get(timeout=max(1.0, t_wait - time.monotonic()))
        except Exception:
            res["problems"].append("client processes did not finish in time")
            break
        results[idx] = (st, ccpu)
    end = time.monotonic()
    for p in procs:
        p.join(5)
    total = WorkerStats()
    client_user = client_sys = 0.0
    for st, (cu, cs) in results.values():
        total.merge(st)
        client_user += cu
        client_sys += cs
    client_cpu = client_user + client_sys
    elapsed = max(total.last_done, start + 1e-9) - start
    res.update({
        "duration_s": round(elapsed, 2),
        "spans_sent": total.spans_sent,
        "export_attempts": total.attempts,
        "exports_ok": total.exports_ok,
        "acked": total.acked,
        "rejected": total.rejected,
        "unavailable": total.unavailable,
        "dropped_spans": total.dropped_spans,
        "errors": dict(total.errors),
        "error_spans": total.error_spans,
        "acked_per_s": round(total.acked / elapsed, 1),
        "p50_ms": round(pct(total.latencies, 50) * 1000, 1),
        "p99_ms": round(pct(total.latencies, 99) * 1000, 1),
        "max_ms": round(max(total.latencies, default=float("nan")) * 1000, 1),
        "client_cpu_s": round(client_cpu, 2),
        "client_cores": round(client_cpu / elapsed, 2),
        "client_user_s": round(client_user, 2),
        "client_sys_s": round(client_sys, 2),
    })
    full = [total.buckets.get(s, 0) for s in range(int(args.duration))]
    res["per_second"] = full
    if full:
        res["per_second_min"], res["per_second_median"], res["per_second_max"] = \
            min(full), statistics.median(full), max(full)
    if total.partial_messages:
        res["partial_success_messages"] = dict(total.partial_messages.most_common(5))
    if total.errors:
        res["problems"].append(f"Export errors: {dict(total.errors)} ({total.error_spans:,} spans, outcome unknown); "
                               f"first details: {total.error_samples}")
    if server:
        cpu1 = server.cpu()
        res["server_cpu_s"] = round(cpu1 - cpu0, 2)
        res["server_cores"] = round((cpu1 - cpu0) / (end - start), 2)
        res["server_metrics"] = server.scrape()
        queued = res["server_metrics"].get("shadowlens_ingest_queue_spans")
        if queued is not None:     # acknowledged (durable in the segment log) but not yet in DuckDB
            res["queued_at_end"] = int(queued)
            res["committed_per_s"] = round((total.acked - queued) / elapsed, 1)
        if backlog is not None:
            backlog.join()
            growth = backlog.growth_per_s()
            if growth is not None:
                res["backlog_growth_per_s"] = round(growth, 1)
                res["backlog_samples"] = backlog.samples
        server.stop()
        res["server_cpu_lifetime_s"] = server.lifetime_cpu
        res["server_maxrss_mb"] = server.lifetime_maxrss_mb
        res["server_stop_s"] = round(server.stop_seconds, 2)
        res["server_exit"] = server.exit_code
        res["peak_rss_mb"] = round(server.sampler.peak_mb, 1)
        res["peak_pss_mb"] = round(server.sampler.peak_pss_kb / 1024, 1)
        rss_s: dict = {}
        for ts_, kb in server.sampler.samples:
            sec = int(ts_ - start)
            if 0 <= sec < int(args.duration):
                rss_s[sec] = max(rss_s.get(sec, 0), kb)
        res["rss_mb_per_second"] = [round(rss_s.get(k, 0) / 1024) for k in range(int(args.duration))]
        if server.exit_code != 0:
            res["problems"].append(f"server exit code after SIGTERM: {server.exit_code}\n{server.log_tail()}")
        problems = server.log_problems()
        if problems:
            res["server_log_problem_lines"] = len(problems)
            res["problems"].append("server log has %d error/warning lines, first ones:\n%s" % (
                len(problems), "\n".join("    | " + ln[:240] for ln in problems[:8])))
        try:
            res["stored"] = count_stored(exe, server.data_dir)
        except Exception as e:  # report whatever went wrong
            res["stored"] = None
            res["problems"].append(f"could not count stored spans: {e}")
        res["stored_ok"] = res["stored"] == total.acked
        if args.keep_data:
            res["server_log"] = server.log_path
    return res, data_dir


def print_run(res, bar_grpc, timeline=False):
    p = print
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
    print(label + ": " + "; ".join(f"{name}: {'PASS' if ok else 'MISS'}" for name, ok in checks))
    return all(ok for _, ok in checks)


MEDIAN_KEYS = ("duration_s", "spans_sent", "acked", "rejected", "unavailable", "acked_per_s", "p50_ms", "p99_ms",
               "client_cpu_s", "client_cores", "server_cpu_s", "server_cores", "peak_rss_mb", "peak_pss_mb",
               "per_second_median", "stored", "committed_per_s",
               "backlog_growth_per_s")


def median_of(runs):
    med = {}
    for k in MEDIAN_KEYS:
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            med[k] = round(statistics.median(vals), 2)
    if all("stored_ok" in r for r in runs):
        med["stored_ok"] = all(r["stored_ok"] for r in runs)
    return med


# --------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0, help="timed phase per run, seconds (default 20)")
    ap.add_argument("--runs", type=int, default=1, help="runs, each against a fresh server and data dir (default 1)")
    ap.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    ap.add_argument("--concurrency", type=int, default=4, help="in-flight Exports per client process (default 4)")
    ap.add_argument("--rate", type=float, metavar="SPANS_PER_S",
                    help="offer this many spans/s (paced sends, latency from each scheduled send time) instead of "
                         "a closed loop at saturation; the Export p99 bar is meant at 50000. A paced run kept up when it "
                         "acknowledged >= 98 %% of the rate and the DuckDB backlog (read every 2 s) grew by <= 2 %% of it "
                         "a second over the run's second half")
    ap.add_argument("--http", action="store_true", help="OTLP/HTTP protobuf POST /v1/traces instead of gRPC")
    ap.add_argument("--endpoint", metavar="HOST:PORT", help="target a running server (no CPU/RSS/stored figures)")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for the started server (repeatable)")
    ap.add_argument("--shadowlens", default=os.path.join(REPO, ".venv", "bin", "shadowlens"),
                    help="shadowlens executable (default <repo>/.venv/bin/shadowlens)")
    ap.add_argument("--pool-requests", type=int, default=64,
                    help="distinct pre-serialized 512-span requests; sends cycle through them with fresh ids (64)")
    ap.add_argument("--seed", type=int, default=1, help="traffic generator seed (default 1)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per-Export deadline, seconds (default 30)")
    ap.add_argument("--tmp-dir", default=None, help="where the fresh data dirs go (default: system temp)")
    ap.add_argument("--keep-data", action="store_true", help="keep the data dirs and server logs")
    ap.add_argument("--json", action="store_true", help="print one machine-readable JSON line at the end")
    ap.add_argument("--timeline", action="store_true", help="print acknowledged spans for every second of a run")
    ap.add_argument("--check", action="store_true", help="exit 1 when the median misses the bar")
    ap.add_argument("--compare-analyzers", action="store_true",
                    help="alternate runs with the analyzers off and on; print both and their ratio")
    a = ap.parse_args(argv)
    if a.runs < 1 or a.clients < 1 or a.concurrency < 1 or a.duration <= 0 or a.pool_requests < 1:
        ap.error("--runs, --clients, --concurrency, --pool-requests and --duration must be positive")
    extra = {}
    for kv in a.server_env:
        if "=" not in kv:
            ap.error(f"--server-env expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        extra[k] = v
    a.extra_env = extra
    if not a.endpoint and not os.access(a.shadowlens, os.X_OK):
        ap.error(f"{a.shadowlens} is not executable (install the project into .venv, or use --shadowlens/--endpoint)")
    return a


def main(argv=None):
    args = parse_args(argv)
    templates, gstats, _ = build_pool(args.pool_requests, args.seed)
    _POOL[:] = templates
    for line in gstats.lines():
        print(line)
    print(f"load: {args.clients} client processes x {args.concurrency} in-flight Exports over "
          f"{'HTTP/1.1 keep-alive' if args.http else 'gRPC (one channel per process)'}, {args.duration:g} s per run, "
          f"{args.runs} run(s); server: {args.endpoint or args.shadowlens}"
          + (f" env {args.extra_env}" if args.extra_env else ""), flush=True)
    if args.compare_analyzers:
        return compare_analyzers(args)
    runs, bad = [], False
    for n in range(1, args.runs + 1):
        res, data_dir = one_run(n, args, args.shadowlens, args.extra_env)
        print_run(res, bar_grpc=True, timeline=args.timeline)
        sys.stdout.flush()
        runs.append(res)
        if res.get("fatal") or res.get("stored_ok") is False or (res.get("server_exit") not in (None, 0)):
            bad = True
        if data_dir and not args.keep_data:
            shutil.rmtree(data_dir, ignore_errors=True)
        elif data_dir:
            print(f"  data dir kept: {data_dir}")
    good = [r for r in runs if not r.get("fatal")]
    med = median_of(good) if good else {}
    if args.runs > 1 and good:
        print(f"=== median of {len(good)} runs ===")
        print(f"  acked spans/s {med.get('acked_per_s', 0):,.0f}; Export p50 {med.get('p50_ms', 0):.1f} ms, "
              f"p99 {med.get('p99_ms', 0):.1f} ms; acked {med.get('acked', 0):,.0f} / sent "
              f"{med.get('spans_sent', 0):,.0f}; client CPU {med.get('client_cores', 0):.2f} cores"
              + (f"; server CPU {med['server_cpu_s']:.1f} s ({med['server_cores']:.2f} cores), "
                 f"peak RSS {med['peak_rss_mb']:.0f} MB, PSS {med.get('peak_pss_mb', 0):.0f} MB; per-second median "
                 f"{med.get('per_second_median', 0):,.0f} spans/s; in DuckDB {med.get('committed_per_s', 0):,.0f} spans/s"
                 if "server_cpu_s" in med else "")
              + (f"; stored == acked in every run: {med['stored_ok']}" if "stored_ok" in med else ""))
    bar_ok = print_bar(med, label="bar (median)", rate=args.rate) if med else False
    if args.http:
        print("note: the 50k spans/s bar is defined for gRPC; --http figures are for comparison")
    if bad:
        print("!!! FAIL: see PROBLEM lines above (stored != acknowledged, server exit, or startup) !!!")
    if args.json:
        print(json.dumps({"generator": gstats.as_dict(), "runs": runs, "median": med,
                          "bar_ok": bar_ok, "failed": bad}, default=str))
    if bad:
        return 1
    if args.check and not bar_ok:
        return 1
    return 0


def compare_analyzers(args) -> int:
    """Alternating runs with the analyzers off and on (same traffic, fresh data dirs): the issue's
    "with analyzers on, >= 80 % of the ingest-only throughput", both reported in one run."""
    modes = {"ingest only": {**args.extra_env, "SHADOWLENS_ANALYZERS__ENABLED": "false"},
             "analyzers on": {**args.extra_env, "SHADOWLENS_ANALYZERS__ENABLED": "true"}}
    results = {m: [] for m in modes}
    bad = False
    for n in range(1, args.runs + 1):
        for mode, env in modes.items():
            print(f"--- {mode} ---")
            res, data_dir = one_run(n, args, args.shadowlens, env)
            print_run(res, bar_grpc=True, timeline=args.timeline)
            sys.stdout.flush()
            results[mode].append(res)
            bad |= bool(res.get("fatal") or res.get("stored_ok") is False or res.get("server_exit") not in (None, 0))
            if data_dir and not args.keep_data:
                shutil.rmtree(data_dir, ignore_errors=True)
    meds = {m: median_of([r for r in rs if not r.get("fatal")]) for m, rs in results.items()}
    print(f"=== median of {args.runs} run(s) per mode ===")
    for m, med in meds.items():
        print(f"  {m:13s} acked spans/s {med.get('acked_per_s', 0):,.0f}; p99 {med.get('p99_ms', 0):.0f} ms; "
              f"server {med.get('server_cores', 0):.2f} cores, peak RSS {med.get('peak_rss_mb', 0):.0f} MB "
              f"(PSS {med.get('peak_pss_mb', 0):.0f} MB), per-second median {med.get('per_second_median', 0):,.0f}, "
              f"in DuckDB {med.get('committed_per_s', 0):,.0f} spans/s")
    base = meds["ingest only"].get("acked_per_s") or 0
    ratio = (meds["analyzers on"].get("acked_per_s") or 0) / base if base else 0
    print(f"  analyzers on / ingest only = {ratio:.0%}  (bar >= 80 %: {'PASS' if ratio >= 0.8 else 'MISS'})")
    if args.json:
        print(json.dumps({"runs": results, "median": meds, "ratio": ratio}, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
