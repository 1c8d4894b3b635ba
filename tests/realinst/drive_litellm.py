"""Run LiteLLM's Router with ``silent_model`` and its ``otel`` callback against the fake server, in the three
settings a LiteLLM user has (docs/litellm.md), exporting into a real ``shadowlens serve``.

LiteLLM builds its TracerProvider from OTEL_EXPORTER=otlp_http and OTEL_ENDPOINT (its documented setup), with
the resource from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (``cohort.tier=pro``: how a deployment sets
a cohort), and the application makes its spans with the global tracer LiteLLM set. ``--requests`` requests in
each setting, in this order:
  bare         no ambient span: each call is the root of its own trace (this first call also initialises the
               callback, so the application's tracer records from then on)
  app_span     an ambient span ``agent.run`` (cohort attributes) per request and
               USE_OTEL_LITELLM_REQUEST_SPAN=true: both calls are ``litellm_request`` children of it
  app_default  the same with LiteLLM's default: no span of its own, both calls' attributes on ``agent.run``
then ``--regression`` requests in the app_span setting, concurrently, alternating ``cohort.language`` de / fr
on the ambient span and naming it in the prompt (``[lang=fr]``: the fake server's planted refusals key on it).
LiteLLM reads USE_OTEL_LITELLM_REQUEST_SPAN at each call, so one process runs all of it (importing litellm
takes ~10 s of CPU). Prints one JSON line: the ambient spans' trace ids per setting and the router's answers.

Manual use:
  python drive_litellm.py --base-url http://127.0.0.1:PORT/v1 --http http://127.0.0.1:4318 --requests 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = ("bare", "app_span", "app_default")
PRIMARY, SILENT = "gpt-4o-mini", "my-rlaif-1"        # deployments' models (the fake answers -2024-07-18)
AMBIENT_ATTRIBUTES = {"cohort.intent": "billing", "cohort.language": "de"}


REGRESSION_LANGUAGES = ("de", "fr")
REGRESSION_CONCURRENCY = 16


def run(base_url: str, http: str, requests: int = 2, regression: int = 0, timeout: float = 120) -> dict:
    """Run the three settings (and the regression traffic) in a child process; returns its JSON line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LITELLM_", "USE_OTEL"))}
    env.update({
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",       # no fetch of the remote price map (no network in tests)
        "OTEL_EXPORTER": "otlp_http", "OTEL_ENDPOINT": f"{http}/v1/traces",
        "OTEL_SERVICE_NAME": "billing-agent", "OTEL_RESOURCE_ATTRIBUTES": "cohort.tier=pro",
    })
    out = subprocess.run([sys.executable, str(Path(__file__)), "--base-url", base_url, "--http", http,
                          "--requests", str(requests), "--regression", str(regression)],
                         env=env, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    if out.returncode != 0:
        raise RuntimeError(f"drive_litellm exited {out.returncode}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def _calls(router, requests: int, regression: int = 0) -> dict:
    from opentelemetry import trace

    tracer = trace.get_tracer("billing-agent")
    out: dict = {"ambient_trace_ids": {"app_span": [], "app_default": [], "regression": []}, "models": []}
    for i, setting in enumerate(s for s in SETTINGS for _ in range(requests)):
        messages = [{"role": "user", "content": f"Request {i}: what is the total of invoice INV-{1000 + i}?"}]
        if setting == "bare":
            r = await router.acompletion(model=PRIMARY, messages=messages)
        else:
            if setting == "app_span":
                os.environ["USE_OTEL_LITELLM_REQUEST_SPAN"] = "true"
            else:
                os.environ.pop("USE_OTEL_LITELLM_REQUEST_SPAN", None)
            with tracer.start_as_current_span("agent.run", attributes=AMBIENT_ATTRIBUTES) as span:
                r = await router.acompletion(model=PRIMARY, messages=messages)
                # the silent call runs in the background: keep the ambient span open until it is logged
                await asyncio.sleep(0.4)
                assert span.is_recording(), "the application's tracer does not record: LiteLLM set no provider"
                out["ambient_trace_ids"][setting].append(format(span.get_span_context().trace_id, "032x"))
        out["models"].append(r.model)
        await asyncio.sleep(0.2)      # the silent call of a bare request ends before the next one starts
    if regression:
        os.environ["USE_OTEL_LITELLM_REQUEST_SPAN"] = "true"
        gate = asyncio.Semaphore(REGRESSION_CONCURRENCY)

        async def one(i: int) -> str:
            lang = REGRESSION_LANGUAGES[i % len(REGRESSION_LANGUAGES)]
            messages = [{"role": "user", "content": f"[lang={lang}] Request {i}: is invoice INV-{2000 + i} paid?"}]
            async with gate:
                with tracer.start_as_current_span("agent.run", attributes={**AMBIENT_ATTRIBUTES,
                                                                           "cohort.language": lang}) as span:
                    await router.acompletion(model=PRIMARY, messages=messages)
                    await asyncio.sleep(0.4)
                    return format(span.get_span_context().trace_id, "032x")
        out["ambient_trace_ids"]["regression"] = list(await asyncio.gather(*(one(i) for i in range(regression))))
    await asyncio.sleep(0.4)          # the last silent call and its success callback
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--http", required=True)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--regression", type=int, default=0)
    a = ap.parse_args()
    import litellm
    from litellm import Router
    from opentelemetry import trace

    litellm.callbacks = ["otel"]
    router = Router(model_list=[
        {"model_name": PRIMARY, "litellm_params": {"model": f"openai/{PRIMARY}", "api_base": a.base_url,
                                                   "api_key": "sk-fake", "silent_model": "candidate-group"}},
        {"model_name": "candidate-group", "litellm_params": {"model": f"openai/{SILENT}", "api_base": a.base_url,
                                                             "api_key": "sk-fake"}},
    ])
    t0 = time.monotonic()
    out = asyncio.run(_calls(router, a.requests, a.regression))
    provider = trace.get_tracer_provider()      # the one LiteLLM built and set globally
    provider.force_flush()
    provider.shutdown()
    out["seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
