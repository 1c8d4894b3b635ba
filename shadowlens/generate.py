"""``shadowlens generate``: the traffic model's requests (traffic.py) as spans with explicit past timestamps,
through the official OpenTelemetry SDK OTLP exporter, paced by a monotonic clock.

Imports only the standard library, numpy, the OpenTelemetry SDK/exporters and traffic.py.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO

import numpy as np

from .traffic import SCENARIOS, TracePlan, sample_request


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


def _check(opts: GenerateOptions) -> None:
    """The flags the exporter does not check itself, before anything starts."""
    if opts.scenario not in SCENARIOS:
        raise ValueError(f"--scenario: {opts.scenario!r} is not one of {', '.join(SCENARIOS)}")
    if not opts.rate > 0 or not opts.duration >= 0:
        raise ValueError("--rate must be > 0 and --duration >= 0")


def _tracer_provider(opts: GenerateOptions, exporter: _CountingExporter):
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": opts.service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=opts.max_queue_size,
                                                   schedule_delay_millis=200, max_export_batch_size=512))
    return provider


class _Emitter:
    """Samples one request at a time and emits its traces, holding back while the SDK's span queue is
    three-quarters full: a full queue would drop spans silently."""

    def __init__(self, opts: GenerateOptions, tracer, counter: _CountingExporter, stop: threading.Event):
        self.tracer, self.counter, self.stop = tracer, counter, stop
        self.rng = np.random.default_rng(opts.seed)
        self.scenario = SCENARIOS[opts.scenario]
        self.high_water = opts.max_queue_size * 3 // 4
        self.spans_created = 0

    def request(self, res: GenerateResult) -> None:
        counter = self.counter
        while self.spans_created - counter.spans - counter.failed > self.high_water and not self.stop.is_set():
            time.sleep(0.005)
        plan = sample_request(self.rng, self.scenario)
        end_ns = time.time_ns()
        for tp in plan.traces:
            self.spans_created += emit_trace(self.tracer, tp, plan.request_id, plan.cohort, end_ns)
            res.traces_created += 1
        res.requests += 1


def _pace(opts: GenerateOptions, emitter: _Emitter, res: GenerateResult, t0: float, tick: Callable[[], None]) -> None:
    """Emit ``opts.rate`` requests a second from ``t0`` in small bursts until the total (``--requests``, or
    rate x duration), the duration, or ``stop``."""
    stop = emitter.stop
    if opts.requests is not None:
        total = opts.requests
    else:
        total = int(round(opts.rate * opts.duration)) if opts.duration > 0 else None
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
            emitter.request(res)
        tick()


def run_generate(opts: GenerateOptions, out: TextIO | None = sys.stderr,
                 stop: threading.Event | None = None, status: dict | None = None) -> GenerateResult:
    """Send ``opts.rate`` requests/s for ``opts.duration`` s (0: until ``stop``); flush; return what was sent.

    ``status`` (optional) is updated live with ``requests`` and ``traces`` for callers that report progress.
    """
    _check(opts)
    stop = stop or threading.Event()
    counter = _CountingExporter(_exporter(opts))
    provider = _tracer_provider(opts, counter)
    emitter = _Emitter(opts, provider.get_tracer("shadowlens.generate"), counter, stop)
    progress = _Progress(out, opts.scenario, opts.progress_every)
    res = GenerateResult()
    t0 = time.monotonic()

    def report() -> None:
        if status is not None:
            status.update(requests=res.requests, traces=res.traces_created)

    def tick() -> None:
        report()
        now = time.monotonic()
        progress.tick(res.traces_created, res.requests, now - t0, now)
    try:
        _pace(opts, emitter, res, t0, tick)
    finally:
        provider.force_flush(timeout_millis=120_000)
        provider.shutdown()
        res.seconds = time.monotonic() - t0
        res.spans, res.traces, res.failed_spans = counter.spans, counter.roots, counter.failed
        report()
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
