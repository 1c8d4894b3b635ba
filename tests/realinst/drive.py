"""Run one real OpenAI instrumentation library against the fake server, exporting over OTLP/gRPC.

Instrumentors patch ``openai`` globally, so every (library, scenario) runs in its own Python
process: :func:`run_library` starts ``python drive.py --lib ... --scenario ...`` and returns the
JSON line the child prints.

The child builds a ``TracerProvider`` with the official OTLP gRPC span exporter (and, for the
official ``-v2`` package, a ``LoggerProvider`` with the OTLP gRPC log exporter, since it puts its
GenAI events on the logs signal), instruments ``openai`` with the library, runs the scenario under
an app root span ``agent.run`` carrying the shadow/cohort attributes, then force-flushes and
shuts the providers down.

Libraries (``LIBRARIES``):
  traceai          traceai-openai + fi-instrumentation-otel
  openinference    openinference-instrumentation-openai
  otel_v2          opentelemetry-instrumentation-openai-v2, default mode (semconv 1.30 names)
  otel_v2_latest   the same with OTEL_SEMCONV_STABILITY_OPT_IN=gen_ai_latest_experimental
  openllmetry      opentelemetry-instrumentation-openai (Traceloop)

Scenarios (``SCENARIOS``):
  basic         one non-streaming call on gpt-4o-mini (temperature/top_p/max_tokens/seed/user)
  stream        one streaming call on gpt-4o-mini with stream_options.include_usage
  tools         two-round tool loop on o4-mini (reasoning tokens), non-streaming
  tools-stream  the same, streaming with include_usage

Manual use:
  python drive.py --lib openinference --scenario tools --otlp 127.0.0.1:4317 --base-url http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASE_HEADER = "x-shadowlens-case"  # same as fake_openai.CASE_HEADER

LIBRARIES = ("traceai", "openinference", "otel_v2", "otel_v2_latest", "openllmetry")
SCENARIOS = ("basic", "stream", "tools", "tools-stream")

ROOT_SPAN_NAME = "agent.run"
ROOT_ATTRIBUTES = {
    "shadow.route": "baseline",
    "cohort.intent": "billing",
    "cohort.language": "en",
    "cohort.tier": "free",
}
CHAT_MODEL = "gpt-4o-mini"
TOOLS_MODEL = "o4-mini"

# Environment each library's process gets on top of the parent's (set before any import).
LIBRARY_ENV: dict[str, dict[str, str]] = {
    "otel_v2": {},
    "otel_v2_latest": {"OTEL_SEMCONV_STABILITY_OPT_IN": "gen_ai_latest_experimental"},
}

# Variables that would change what the libraries or the exporter do, cleared in the child.
_SCRUB_ENV_PREFIXES = ("OTEL_", "TRACELOOP_", "OPENINFERENCE_", "FI_", "OPENAI_")


STREAM_WITH = False  # set by --stream-with: consume streams as ``with create(...) as s``


class DriveError(RuntimeError):
    pass


def run_library(
    lib_name: str,
    scenario: str,
    otlp_endpoint: str,
    fake_base_url: str,
    request_id: str | None = None,
    timeout: float = 90.0,
    python: str | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` with ``lib_name`` in a fresh interpreter; return the child's JSON result.

    The result has ``trace_id``, ``root_span_id``, ``request_id`` (also sent to the fake server
    in the ``x-shadowlens-case`` header), ``calls`` (what the openai client saw per call),
    ``exported_spans``/``export_failures`` (and ``exported_logs``/``log_export_failures``).
    """
    if lib_name not in LIBRARIES:
        raise ValueError(f"unknown library {lib_name!r}; one of {LIBRARIES}")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; one of {SCENARIOS}")
    request_id = request_id or str(uuid.uuid4())
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_ENV_PREFIXES)}
    env.update(LIBRARY_ENV.get(lib_name, {}))
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [
        python or sys.executable, str(HERE / "drive.py"),
        "--lib", lib_name, "--scenario", scenario,
        "--otlp", otlp_endpoint, "--base-url", fake_base_url,
        "--request-id", request_id,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    result = None
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
                break
            except ValueError:
                continue
    if proc.returncode != 0 or result is None:
        raise DriveError(
            f"drive.py {lib_name}/{scenario} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    result["stderr"] = proc.stderr
    return result


# --------------------------------------------------------------------------- child side


def _grpc_url(endpoint: str) -> str:
    return endpoint if "://" in endpoint else "http://" + endpoint


def _instrument(lib: str, tracer_provider: Any, logger_provider: Any) -> Any:
    if lib == "traceai":
        from traceai_openai import OpenAIInstrumentor

        inst = OpenAIInstrumentor()
        inst.instrument(tracer_provider=tracer_provider)
    elif lib == "openinference":
        from openinference.instrumentation.openai import OpenAIInstrumentor

        inst = OpenAIInstrumentor()
        inst.instrument(tracer_provider=tracer_provider)
    elif lib in ("otel_v2", "otel_v2_latest"):
        from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

        inst = OpenAIInstrumentor()
        inst.instrument(tracer_provider=tracer_provider, logger_provider=logger_provider)
    elif lib == "openllmetry":
        from opentelemetry.instrumentation.openai import OpenAIInstrumentor

        inst = OpenAIInstrumentor()
        inst.instrument(tracer_provider=tracer_provider)
    else:  # pragma: no cover - checked by the caller
        raise ValueError(lib)
    return inst


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_invoice",
            "description": "Look up an invoice by id and return its payment status.",
            "parameters": {
                "type": "object",
                "properties": {"invoice_id": {"type": "string"}},
                "required": ["invoice_id"],
            },
        },
    }
]


def _usage_dict(usage: Any) -> dict[str, Any] | None:
    if usage is None:
        return None
    ptd = getattr(usage, "prompt_tokens_details", None)
    ctd = getattr(usage, "completion_tokens_details", None)
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": getattr(ptd, "cached_tokens", None),
        "reasoning_tokens": getattr(ctd, "reasoning_tokens", None),
    }


def _call(client: Any, stream: bool, **kwargs: Any) -> dict[str, Any]:
    """One chat.completions.create; returns what the app saw (model, usage, message, tool calls)."""
    if not stream:
        resp = client.chat.completions.create(**kwargs)
        msg = resp.choices[0].message
        return {
            "model": resp.model,
            "usage": _usage_dict(resp.usage),
            "finish_reason": resp.choices[0].finish_reason,
            "content": msg.content,
            "tool_calls": [
                {"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": tc.function.arguments}}
                for tc in (msg.tool_calls or [])
            ],
        }
    out: dict[str, Any] = {"model": None, "usage": None, "finish_reason": None, "content": "", "tool_calls": []}
    calls: dict[int, dict[str, Any]] = {}
    s = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    # Plain iteration, not ``with ... as s``: traceAI's stream proxy (a wrapt ObjectProxy) does not
    # define __enter__, so the ``with`` form hands the app the *unwrapped* openai.Stream and the
    # traceAI LLM span is never ended nor exported (--stream-with reproduces it).
    with (s if STREAM_WITH else contextlib.nullcontext(s)) as s:
        for chunk in s:
            out["model"] = chunk.model or out["model"]
            if chunk.usage is not None:
                out["usage"] = _usage_dict(chunk.usage)
            for ch in chunk.choices:
                if ch.finish_reason:
                    out["finish_reason"] = ch.finish_reason
                d = ch.delta
                if d is None:
                    continue
                if d.content:
                    out["content"] += d.content
                for tc in d.tool_calls or []:
                    slot = calls.setdefault(tc.index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                    if tc.id:
                        slot["id"] = tc.id
                    if tc.function is not None:
                        if tc.function.name:
                            slot["function"]["name"] += tc.function.name
                        if tc.function.arguments:
                            slot["function"]["arguments"] += tc.function.arguments
    s.close()
    out["tool_calls"] = [calls[i] for i in sorted(calls)]
    return out


def _run_scenario(scenario: str, client: Any, tracer: Any) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    stream = scenario.endswith("stream")
    if scenario in ("basic", "stream"):
        kwargs: dict[str, Any] = dict(
            model=CHAT_MODEL,
            messages=[
                {"role": "system", "content": "You are a billing assistant. Answer briefly."},
                {"role": "user", "content": "Why was I charged twice this month?"},
            ],
        )
        if scenario == "basic":
            kwargs.update(temperature=0.2, top_p=0.9, max_tokens=128, seed=7, user="user-42")
        calls.append(_call(client, stream, **kwargs))
        return calls

    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are a billing assistant. Use tools to look things up."},
        {"role": "user", "content": "Is invoice INV-1042 paid?"},
    ]
    first = _call(client, stream, model=TOOLS_MODEL, messages=messages, tools=TOOLS)
    calls.append(first)
    if not first["tool_calls"]:
        raise DriveError(f"fake server did not ask for a tool call: {first}")
    messages.append({"role": "assistant", "content": first["content"] or None, "tool_calls": first["tool_calls"]})
    for tc in first["tool_calls"]:
        # The app's own tool-execution span (no OpenAI instrumentation creates one).
        with tracer.start_as_current_span(
            f"execute_tool {tc['function']['name']}",
            attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tc["function"]["name"],
                        "gen_ai.tool.call.id": tc["id"] or ""},
        ):
            result = {"invoice_id": "INV-1042", "status": "paid", "paid_on": "2024-07-01"}
        messages.append({"role": "tool", "tool_call_id": tc["id"], "content": json.dumps(result)})
    calls.append(_call(client, stream, model=TOOLS_MODEL, messages=messages, tools=TOOLS))
    return calls


def _child(args: argparse.Namespace) -> int:
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class CountingSpanExporter(SpanExporter):
        """Delegates to the OTLP exporter and counts what the receiver acknowledged."""

        def __init__(self, inner: SpanExporter) -> None:
            self.inner, self.ok, self.failed = inner, 0, 0

        def export(self, spans):  # type: ignore[no-untyped-def]
            res = self.inner.export(spans)
            if res == SpanExportResult.SUCCESS:
                self.ok += len(spans)
            else:
                self.failed += len(spans)
            return res

        def shutdown(self) -> None:
            self.inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return self.inner.force_flush(timeout_millis)

    resource = Resource.create({"service.name": f"realinst-{args.lib}", "realinst.library": args.lib})
    span_exporter = CountingSpanExporter(OTLPSpanExporter(endpoint=_grpc_url(args.otlp), insecure=True, timeout=10))
    tp = TracerProvider(resource=resource)
    # One export request per span: children arrive before their root, as in many real apps.
    tp.add_span_processor(SimpleSpanProcessor(span_exporter))
    trace.set_tracer_provider(tp)

    lp = None
    log_exporter = None
    if args.lib.startswith("otel_v2"):
        from opentelemetry._logs import set_logger_provider
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
        from opentelemetry.sdk._logs import LoggerProvider
        from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult, SimpleLogRecordProcessor

        class CountingLogExporter(LogRecordExporter):
            def __init__(self, inner: Any) -> None:
                self.inner, self.ok, self.failed = inner, 0, 0

            def export(self, batch):  # type: ignore[no-untyped-def]
                res = self.inner.export(batch)
                if res == LogRecordExportResult.SUCCESS or getattr(res, "name", "") == "SUCCESS":
                    self.ok += len(batch)
                else:
                    self.failed += len(batch)
                return res

            def shutdown(self) -> None:
                self.inner.shutdown()

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return self.inner.force_flush(timeout_millis)

        log_exporter = CountingLogExporter(OTLPLogExporter(endpoint=_grpc_url(args.otlp), insecure=True, timeout=10))
        lp = LoggerProvider(resource=resource)
        lp.add_log_record_processor(SimpleLogRecordProcessor(log_exporter))
        set_logger_provider(lp)

    import openai

    _instrument(args.lib, tp, lp)
    client = openai.OpenAI(
        base_url=args.base_url, api_key="sk-fake-realinst", max_retries=0, timeout=30,
        default_headers={CASE_HEADER: args.request_id},
    )
    tracer = tp.get_tracer("shadowlens.realinst.app")
    attrs = dict(ROOT_ATTRIBUTES)
    attrs["shadow.request_id"] = args.request_id
    with tracer.start_as_current_span(ROOT_SPAN_NAME, attributes=attrs) as root:
        calls = _run_scenario(args.scenario, client, tracer)
        ctx = root.get_span_context()
    client.close()

    flushed = tp.force_flush(30_000)
    if lp is not None:
        flushed = lp.force_flush(30_000) and flushed
    tp.shutdown()
    if lp is not None:
        lp.shutdown()
    out = {
        "lib": args.lib,
        "scenario": args.scenario,
        "trace_id": format(ctx.trace_id, "032x"),
        "root_span_id": format(ctx.span_id, "016x"),
        "request_id": args.request_id,
        "calls": calls,
        "flushed": bool(flushed),
        "exported_spans": span_exporter.ok,
        "export_failures": span_exporter.failed,
        "exported_logs": log_exporter.ok if log_exporter else None,
        "log_export_failures": log_exporter.failed if log_exporter else None,
    }
    print(json.dumps(out), flush=True)
    return 0 if span_exporter.failed == 0 and (log_exporter is None or log_exporter.failed == 0) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", required=True, choices=LIBRARIES)
    p.add_argument("--scenario", required=True, choices=SCENARIOS)
    p.add_argument("--otlp", required=True, help="OTLP/gRPC endpoint, host:port")
    p.add_argument("--base-url", required=True, help="fake OpenAI base URL ending in /v1")
    p.add_argument("--request-id", default=None)
    p.add_argument("--stream-with", action="store_true",
                   help="consume streams with `with create(...) as s:` (shows the traceAI quirk)")
    args = p.parse_args(argv)
    global STREAM_WITH
    STREAM_WITH = args.stream_with
    args.request_id = args.request_id or str(uuid.uuid4())
    for k, v in LIBRARY_ENV.get(args.lib, {}).items():  # also when run by hand
        os.environ.setdefault(k, v)
    return _child(args)


if __name__ == "__main__":
    sys.exit(main())
