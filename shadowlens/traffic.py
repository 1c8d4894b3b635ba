"""``shadowlens generate``: synthetic shadow traffic through the official OpenTelemetry SDK OTLP exporter.

Each simulated request yields two traces, one per route (``baseline`` and ``candidate``), with the same
``shadow.request_id`` and cohort. A per-request latent difficulty ``z`` is shared by both traces, so the pair
is correlated the way real shadow traffic is; a scenario (``SCENARIOS``) plants candidate effects in
chosen cohorts. Sampling (``sample_request``) is pure numpy and needs no network; ``run_generate`` turns the
samples into spans with explicit past timestamps and sends them paced by a monotonic clock.

Imports only the standard library, numpy and the OpenTelemetry SDK/exporters.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TextIO

import numpy as np

ROUTES = ("baseline", "candidate")
MODELS = {"baseline": "gpt-4o-2024-08-06", "candidate": "my-rlaif-7b"}
# USD per token (input, output). The candidate is priced at the baseline's rate so that ``healthy`` compares
# like for like; every LLM span carries its cost as ``llm.cost.total`` so stored cost ignores the price table.
PRICE_PER_TOKEN = {"gpt-4o-2024-08-06": (2.5e-6, 10e-6), "my-rlaif-7b": (2.5e-6, 10e-6)}

# Cohort values and their fixed sampling weights. The cohorts that carry planted effects are 15-20 % of
# traffic, so a planted effect shows in its own cohort far more than in all traffic or in overlapping cohorts.
COHORTS: dict[str, tuple[tuple[str, ...], tuple[float, ...]]] = {
    "intent": (("billing", "support", "search", "booking", "smalltalk"), (0.15, 0.35, 0.20, 0.15, 0.15)),
    "language": (("en", "de", "fr", "es", "ja"), (0.45, 0.20, 0.12, 0.13, 0.10)),
    "tier": (("free", "pro", "enterprise"), (0.55, 0.30, 0.15)),
}


@dataclass(frozen=True)
class Model:
    """The statistical model shared by every scenario (per request: z ~ N(0,1); per trace: eps ~ N(0,1))."""
    steps_lambda: float = 2.0          # steps = 1 + Poisson(steps_lambda * exp(steps_z * z))
    steps_z: float = 0.25
    duration_median_s: float = 4.0     # seconds = exp(ln(median) + dur_z * z + dur_eps * eps)
    dur_z: float = 0.30
    pass_intercept: float = 2.2        # task_completion passes with p = sigmoid(intercept - pass_z * z)
    pass_z: float = 0.6
    refusal_rate: float = 0.03
    escalation_rate: float = 0.02
    redraw: float = 0.03               # chance a trace draws its own uniform instead of the request's shared one
    tool_prob: float = 0.5             # chance a step calls a tool after its LLM call
    input_tokens: tuple[float, float] = (800.0, 200.0)   # mean, sd per LLM call
    output_tokens: tuple[float, float] = (150.0, 50.0)


MODEL = Model()


@dataclass(frozen=True)
class Effect:
    """A planted candidate effect: in cohort ``label=value`` multiply ``quantity`` by ``factor``."""
    label: str
    value: str
    quantity: str      # refusal_rate | duration | steps
    factor: float
    rule: str          # the gate rule (CONTRACT §7) expected to catch it


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    dur_eps: float = 0.35              # per-trace lognormal sigma of duration (total sigma with dur_z: ~0.46)
    effects: tuple[Effect, ...] = ()
    drop_candidate: float = 0.0        # share of candidate traces never sent (crashed candidate)
    drop_request_id: float = 0.0       # share of requests without shadow.request_id

    def factor(self, quantity: str, cohort: dict[str, str]) -> float:
        f = 1.0
        for e in self.effects:
            if e.quantity == quantity and cohort.get(e.label) == e.value:
                f *= e.factor
        return f


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("healthy", "the candidate draws from exactly the baseline's distributions"),
    Scenario("regression", "planted candidate regressions in three cohorts; everything else like healthy", effects=(
        Effect("language", "de", "refusal_rate", 3.0, "refusal_rate"),
        Effect("tier", "enterprise", "duration", 1.5, "p99_latency"),
        Effect("intent", "billing", "steps", 1.4, "trajectory_steps (and cost_per_trace)"),
    )),
    Scenario("noisy", "no true regression: heavier latency tail, crashed candidate traces, missing request ids",
             dur_eps=math.sqrt(0.7 ** 2 - MODEL.dur_z ** 2), drop_candidate=0.03, drop_request_id=0.05),
)}


@dataclass
class LLMCall:
    input_tokens: int
    output_tokens: int
    cost_usd: float
    tool: bool


@dataclass
class TracePlan:
    route: str
    duration_s: float
    steps: list[LLMCall]
    passed: bool
    refused: bool
    escalated: bool

    @property
    def model(self) -> str:
        return MODELS[self.route]


@dataclass
class RequestPlan:
    request_id: str | None
    cohort: dict[str, str]
    z: float
    traces: list[TracePlan]      # baseline first; the candidate is missing when it "crashed"


_CUMULATIVE = {label: np.cumsum(w) / np.sum(w) for label, (_, w) in COHORTS.items()}


def _cohort(rng: np.random.Generator) -> dict[str, str]:
    u = rng.random(len(COHORTS))
    return {label: values[min(int(np.searchsorted(_CUMULATIVE[label], x, side="right")), len(values) - 1)]
            for (label, (values, _)), x in zip(COHORTS.items(), u)}


def _shared(rng: np.random.Generator, u: float, m: Model) -> float:
    """The request's shared uniform, or (with probability ``m.redraw``) an independent one."""
    return float(rng.random()) if rng.random() < m.redraw else u


def sample_request(rng: np.random.Generator, scenario: Scenario, m: Model = MODEL) -> RequestPlan:
    """Draw one request: its cohort, latent difficulty and one trace plan per route."""
    cohort = _cohort(rng)
    z = float(rng.standard_normal())
    u_pass, u_refuse, u_escalate = rng.random(3).tolist()
    p_pass = 1.0 / (1.0 + math.exp(-(m.pass_intercept - m.pass_z * z)))
    request_id = None if rng.random() < scenario.drop_request_id else uuid.UUID(bytes=rng.bytes(16), version=4).hex
    traces = []
    for route in ROUTES:
        f = (lambda q: scenario.factor(q, cohort)) if route == "candidate" else (lambda q: 1.0)
        fs = f("steps")
        # 1 + Poisson(fs*lam*e^(bz) + fs - 1) has mean exactly fs × (1 + lam*e^(bz)).
        n_steps = 1 + int(rng.poisson(fs * m.steps_lambda * math.exp(m.steps_z * z) + fs - 1.0))
        eps = float(rng.standard_normal())
        # Duration does not scale with the step count: latency and trajectory length stay separate effects.
        duration = math.exp(math.log(m.duration_median_s) + m.dur_z * z + scenario.dur_eps * eps) * f("duration")
        price_in, price_out = PRICE_PER_TOKEN[MODELS[route]]
        tin = np.maximum(50, np.rint(rng.normal(*m.input_tokens, size=n_steps))).astype(int).tolist()
        tout = np.maximum(10, np.rint(rng.normal(*m.output_tokens, size=n_steps))).astype(int).tolist()
        tools = (rng.random(n_steps) < m.tool_prob).tolist()
        calls = [LLMCall(i, o, i * price_in + o * price_out, t) for i, o, t in zip(tin, tout, tools)]
        traces.append(TracePlan(
            route=route, duration_s=duration, steps=calls,
            passed=bool(_shared(rng, u_pass, m) < p_pass),
            refused=bool(_shared(rng, u_refuse, m) < m.refusal_rate * f("refusal_rate")),
            escalated=bool(_shared(rng, u_escalate, m) < m.escalation_rate * f("escalation_rate")),
        ))
    if rng.random() < scenario.drop_candidate:
        traces.pop()
    return RequestPlan(request_id, cohort, z, traces)


# --------------------------------------------------------------------------------------------- sending

@dataclass
class GenerateOptions:
    endpoint: str = "127.0.0.1:4317"
    protocol: str = "grpc"             # grpc | http
    rate: float = 20.0                 # requests per second (each request = up to 2 traces)
    duration: float = 60.0             # seconds; 0 = until stopped
    requests: int | None = None        # send exactly this many requests (at --rate), however long it takes
    scenario: str = "healthy"
    seed: int = 1
    service_name: str = "shadowlens-generate"
    progress_every: float = 5.0        # seconds between progress lines when ``out`` is not a TTY
    max_queue_size: int = 65536


@dataclass
class GenerateResult:
    requests: int = 0                  # requests simulated
    traces: int = 0                    # traces whose root span the receiver acknowledged
    spans: int = 0                     # spans the receiver acknowledged
    failed_spans: int = 0              # spans whose export failed
    traces_created: int = 0
    seconds: float = 0.0

    def summary(self, scenario: str) -> str:
        rate = self.traces / self.seconds if self.seconds > 0 else 0.0
        return (f"generate: done, {self.traces} traces sent ({self.requests} requests), {self.spans} spans,"
                f" {self.failed_spans} failed, {rate:.1f} traces/s over {self.seconds:.1f}s, scenario {scenario}")


class _CountingExporter:
    """Delegates to the OTLP exporter and counts what the receiver acknowledged."""

    def __init__(self, inner):
        self.inner = inner
        self.lock = threading.Lock()
        self.spans = self.roots = self.failed = 0

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult
        result = self.inner.export(spans)
        roots = sum(1 for s in spans if s.parent is None)
        with self.lock:
            if result == SpanExportResult.SUCCESS:
                self.spans += len(spans)
                self.roots += roots
            else:
                self.failed += len(spans)
        return result

    def shutdown(self):
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return getattr(self.inner, "force_flush", lambda *_: True)(timeout_millis)


def _exporter(opts: GenerateOptions):
    host, sep, port = opts.endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--endpoint: {opts.endpoint!r} is not HOST:PORT")
    if opts.protocol == "http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=f"http://{host}:{port}/v1/traces", timeout=10)
    if opts.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=f"{host}:{port}", insecure=True, timeout=10)
    raise ValueError(f"--protocol: {opts.protocol!r} is not grpc or http")


def emit_trace(tracer, plan: TracePlan, request_id: str | None, cohort: dict[str, str], end_ns: int) -> int:
    """Emit one trace with synthetic timestamps ending at ``end_ns``; returns its span count."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    dur_ns = max(1, int(plan.duration_s * 1e9))
    start_ns = end_ns - dur_ns
    attrs = {"shadow.route": plan.route, "openinference.span.kind": "AGENT",
             "eval.name": "task_completion", "eval.passed": plan.passed}
    if request_id is not None:
        attrs["shadow.request_id"] = request_id
    attrs.update({f"cohort.{k}": v for k, v in cohort.items()})
    if plan.refused:
        attrs["agent.refused"] = True
    if plan.escalated:
        attrs["agent.escalated"] = True
    root = tracer.start_span("agent.run", kind=SpanKind.SERVER, attributes=attrs, start_time=start_ns)
    ctx = trace.set_span_in_context(root)
    slot = dur_ns // len(plan.steps)
    n = 1
    for i, call in enumerate(plan.steps, start=1):
        s0 = start_ns + (i - 1) * slot
        llm_end = s0 + (slot * 7 // 10 if call.tool else slot * 19 // 20)
        span = tracer.start_span(f"chat {plan.model}", context=ctx, kind=SpanKind.CLIENT, start_time=s0, attributes={
            "openinference.span.kind": "LLM", "gen_ai.operation.name": "chat", "gen_ai.system": "openai",
            "gen_ai.request.model": plan.model, "gen_ai.response.model": plan.model,
            "gen_ai.usage.input_tokens": call.input_tokens, "gen_ai.usage.output_tokens": call.output_tokens,
            "llm.cost.total": call.cost_usd, "agent.trajectory.step": i})
        span.end(end_time=llm_end)
        n += 1
        if call.tool:
            span = tracer.start_span("execute_tool lookup", context=ctx, kind=SpanKind.INTERNAL, start_time=llm_end,
                                     attributes={"openinference.span.kind": "TOOL", "gen_ai.operation.name": "execute_tool",
                                                 "gen_ai.tool.name": "lookup", "agent.trajectory.step": i})
            span.end(end_time=s0 + slot * 19 // 20)
            n += 1
    root.end(end_time=end_ns)
    return n


class _Progress:
    def __init__(self, out: TextIO | None, scenario: str, every: float):
        self.out, self.scenario, self.every = out, scenario, every
        self.tty = bool(out is not None and getattr(out, "isatty", lambda: False)())
        self.last = 0.0

    def line(self, traces: int, requests: int, elapsed: float) -> str:
        rate = traces / elapsed if elapsed > 0 else 0.0
        return f"generate: {traces} traces sent ({requests} requests), {rate:.1f} traces/s, scenario {self.scenario}"

    def tick(self, traces: int, requests: int, elapsed: float, now: float) -> None:
        if self.out is None or now - self.last < (0.5 if self.tty else self.every):
            return
        self.last = now
        text = self.line(traces, requests, elapsed)
        self.out.write("\r" + text + "\x1b[K" if self.tty else text + "\n")
        self.out.flush()

    def finish(self, text: str) -> None:
        if self.out is not None:
            self.out.write(("\r" + text + "\x1b[K\n") if self.tty else text + "\n")
            self.out.flush()


def run_generate(opts: GenerateOptions, out: TextIO | None = sys.stderr,
                 stop: threading.Event | None = None, status: dict | None = None) -> GenerateResult:
    """Send ``opts.rate`` requests/s for ``opts.duration`` s (0: until ``stop``); flush; return what was sent.

    ``status`` (optional) is updated live with ``requests`` and ``traces`` for callers that report progress.
    """
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if opts.scenario not in SCENARIOS:
        raise ValueError(f"--scenario: {opts.scenario!r} is not one of {', '.join(SCENARIOS)}")
    if not opts.rate > 0 or not opts.duration >= 0:
        raise ValueError("--rate must be > 0 and --duration >= 0")
    scenario = SCENARIOS[opts.scenario]
    stop = stop or threading.Event()
    counter = _CountingExporter(_exporter(opts))
    provider = TracerProvider(resource=Resource.create({"service.name": opts.service_name}))
    provider.add_span_processor(BatchSpanProcessor(counter, max_queue_size=opts.max_queue_size,
                                                   schedule_delay_millis=200, max_export_batch_size=512))
    tracer = provider.get_tracer("shadowlens.generate")
    rng = np.random.default_rng(opts.seed)
    progress = _Progress(out, opts.scenario, opts.progress_every)
    if opts.requests is not None:
        total = opts.requests
    else:
        total = int(round(opts.rate * opts.duration)) if opts.duration > 0 else None
    high_water = opts.max_queue_size * 3 // 4
    res = GenerateResult()
    spans_created = 0
    t0 = time.monotonic()
    try:
        while not stop.is_set() and (total is None or res.requests < total):
            now = time.monotonic()
            if opts.requests is None and opts.duration > 0 and now - t0 >= opts.duration:
                break   # slower than --rate: stop on time rather than run long
            due = int((now - t0) * opts.rate) + 1
            if total is not None:
                due = min(due, total)
            if due <= res.requests:
                stop.wait(min(0.05, (res.requests / opts.rate) - (now - t0)))
                continue
            burst_end = min(due, res.requests + max(1, int(opts.rate * 0.05)))   # small bursts, then re-check
            while res.requests < burst_end and not stop.is_set():
                # Backpressure: never let the span queue overflow (the SDK would drop spans silently).
                while spans_created - counter.spans - counter.failed > high_water and not stop.is_set():
                    time.sleep(0.005)
                plan = sample_request(rng, scenario)
                end_ns = time.time_ns()
                for tp in plan.traces:
                    spans_created += emit_trace(tracer, tp, plan.request_id, plan.cohort, end_ns)
                    res.traces_created += 1
                res.requests += 1
            if status is not None:
                status.update(requests=res.requests, traces=res.traces_created)
            now = time.monotonic()
            progress.tick(res.traces_created, res.requests, now - t0, now)
    finally:
        provider.force_flush(timeout_millis=120_000)
        provider.shutdown()
        res.seconds = time.monotonic() - t0
        res.spans, res.traces, res.failed_spans = counter.spans, counter.roots, counter.failed
        if status is not None:
            status.update(requests=res.requests, traces=res.traces_created)
        progress.finish(res.summary(opts.scenario))
    return res


def main_generate(opts: GenerateOptions) -> int:
    """The CLI entry: SIGINT/SIGTERM stop the generator cleanly (everything queued is flushed)."""
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        res = run_generate(opts, out=sys.stderr, stop=stop)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 1 if res.failed_spans else 0
