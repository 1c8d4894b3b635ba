"""The normalizer against the real OpenAI instrumentation libraries.

Each library (traceAI, OpenInference, the official OpenTelemetry ``-v2`` package in both semconv
modes, OpenLLMetry) runs in its own process (``drive.py``) with the real ``openai`` client against
a fake OpenAI-compatible server (``fake_openai.py``) started here, and exports through the official
OTLP/gRPC exporter into one real ``shadowlens serve`` for the whole module. The store must then
hold, for every LLM span, exactly the model and token counts the fake server returned (ground truth
recorded by the fake server itself), NULL where the library does not carry a value (never 0), and
the app root span's route / shadow request id / cohort columns.

Needs the pinned libraries: ``pip install -r tests/requirements-realinst.txt``; skipped without
them. Run: ``pytest -m realinst tests/realinst``.

Quirks met with the pinned versions (what the expectations in ``QUIRKS`` encode, and more):

* traceAI puts the *response* model in ``gen_ai.request.model`` on non-streaming calls and no model
  key on streams (only ``gen_ai.request.parameters`` JSON ``.model``, the request model), so the
  ``model`` column is the dated model for ``basic``/``tools`` and the undated one for the streams.
  No cached/reasoning token keys at all.
* traceAI loses the whole LLM span of a stream consumed as ``with client.chat.completions.create(
  stream=True) as s: for chunk in s`` (its wrapt proxy has no ``__enter__``, so the app iterates the
  unwrapped stream and the span is never ended). drive.py iterates without ``with``; run it with
  ``--stream-with`` to see the span go missing. The other libraries handle both idioms.
* -v2 (both modes) carries input/output tokens only; no finish reason on streams (only in its
  ``gen_ai.choice`` log record, default mode); latest mode sends no log records without content capture.
* OpenLLMetry drops reasoning tokens on streams (cache reads survive) and maps ``tool_calls`` to
  ``tool_call`` in ``gen_ai.response.finish_reasons``.
* OpenInference and OpenLLMetry (non-stream) send reasoning = 0 for non-reasoning models: a real 0
  the server returned, stored as 0 (not NULL).
* Importing traceai_openai prints "ai-evaluation is not installed, please install it to trace
  protect" (harmless).
"""

from __future__ import annotations

import importlib.util
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import drive
from fake_openai import FakeOpenAI, Record

pytestmark = [pytest.mark.realinst, pytest.mark.timeout(240)]

LIBRARIES = drive.LIBRARIES
SCENARIOS = drive.SCENARIOS

# Module each library needs (to skip cleanly when the requirements are not installed).
LIB_MODULES = {
    "traceai": "traceai_openai",
    "openinference": "openinference.instrumentation.openai",
    "otel_v2": "opentelemetry.instrumentation.openai_v2",
    "otel_v2_latest": "opentelemetry.instrumentation.openai_v2",
    "openllmetry": "opentelemetry.instrumentation.openai",
}

VISIBLE_WITHIN_S = 10.0  # CONTRACT: visible within 2 s of the ack; generous for a loaded CI box
TRACE_IDLE_S = 1  # traces.idle_seconds for this serve, so trace rows complete quickly


@dataclass(frozen=True)
class Carries:
    """What a library puts on its LLM span, i.e. what the normalizer can possibly recover.

    ``model``/``model_stream``: which model the ``model`` column must hold for non-streaming /
    streaming calls: ``"response"`` = the dated model the server answered (``o4-mini-2024-07-18``),
    ``"request"`` = only the requested model is on the span (``o4-mini``).
    A ``False`` token field means the library drops that count: the column must be NULL.
    Input and output tokens are carried by every library when the server sends usage
    (``stream_options.include_usage`` is always set by drive.py).
    """

    model: str
    model_stream: str
    cache_read: bool
    cache_read_stream: bool
    reasoning: bool
    reasoning_stream: bool
    keys: str  # where the values are (documentation)


# Per-library quirks (INSTRUMENTATIONS.md quirks 1, 4, 6; re-checked against captures of these
# exact versions, see tests/requirements-realinst.txt).
QUIRKS: dict[str, Carries] = {
    # traceAI writes the *response* model into gen_ai.request.model (sic) on non-streaming calls and
    # no model key at all on streams: there only gen_ai.request.parameters JSON {"model": "o4-mini"}
    # is left, the request model. No cached or reasoning token keys at all.
    "traceai": Carries("response", "request", False, False, False, False,
                       "gen_ai.request.model (response model!), gen_ai.request.parameters JSON .model, "
                       "gen_ai.usage.{input,output,total}_tokens"),
    # OpenInference is complete, streams included; it also sends reasoning 0 for non-o models.
    "openinference": Carries("response", "response", True, True, True, True,
                             "llm.model_name, llm.token_count.{prompt,completion,total}, "
                             "llm.token_count.prompt_details.cache_read, "
                             "llm.token_count.completion_details.reasoning"),
    # -v2 (semconv 1.30 and latest-experimental): request + response model, input/output only.
    "otel_v2": Carries("response", "response", False, False, False, False,
                       "gen_ai.response.model, gen_ai.request.model, gen_ai.usage.{input,output}_tokens"),
    "otel_v2_latest": Carries("response", "response", False, False, False, False,
                              "same keys as otel_v2; scope opentelemetry.util.genai.handler"),
    # OpenLLMetry: cache reads everywhere, reasoning tokens only on non-streaming calls.
    "openllmetry": Carries("response", "response", True, True, True, False,
                           "gen_ai.response.model, gen_ai.usage.{input,output,total}_tokens, "
                           "gen_ai.usage.cache_read.input_tokens, gen_ai.usage.reasoning_tokens"),
}

SPAN_COLUMNS = "*"  # CONTRACT §5 columns are checked by name; extra columns (request_model) where present


def _missing_library(lib: str) -> str | None:
    for mod in ("openai", LIB_MODULES[lib]):
        try:
            if importlib.util.find_spec(mod) is None:
                return mod
        except (ImportError, ValueError):
            return mod
    return None


def _sql_list(values: list[str]) -> str:
    for v in values:
        assert all(c in "0123456789abcdef" for c in v), v
    return ", ".join(f"'{v}'" for v in values)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fake() -> Any:
    with FakeOpenAI() as server:
        yield server


def _start_serve(data_dir: Path, env: dict[str, str]) -> Any:
    """One serve for the module (``serve_factory`` in tests/conftest.py is function-scoped)."""
    from harness import start_server  # tests/harness.py
    return start_server(data_dir, env)


def _serve_log(srv: Any) -> str:
    tail = getattr(srv, "log_tail", None) or getattr(srv, "log", None)
    return tail()[-4000:] if tail else ""


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Any:
    data_dir = tmp_path_factory.mktemp("realinst") / "data"
    srv = _start_serve(data_dir, {"SHADOWLENS_TRACES__IDLE_SECONDS": str(TRACE_IDLE_S), "SHADOWLENS_PRICES": TEST_PRICES})
    try:
        yield srv
    finally:
        rc = srv.stop()
        # A clean drain on SIGTERM exits 0 (CONTRACT §1).
        assert rc == 0, f"serve exited {rc}:\n{_serve_log(srv)}"


@dataclass
class Case:
    lib: str
    scenario: str
    request_id: str
    result: dict[str, Any] | None = None
    error: str | None = None
    fake_records: list[Record] | None = None
    rows: list[dict[str, Any]] | None = None


@pytest.fixture(scope="module")
def cases(request: pytest.FixtureRequest, fake: FakeOpenAI, serve: Any) -> dict[tuple[str, str], Case]:
    """Drive every (library, scenario) selected in this session up front, a few processes at a time,
    then read all their spans from the store in one query."""
    wanted: list[tuple[str, str]] = []
    for item in request.session.items:
        cs = getattr(item, "callspec", None)
        if item.module is request.module and cs is not None and "lib" in cs.params and "scenario" in cs.params:
            key = (cs.params["lib"], cs.params["scenario"])
            if key not in wanted and _missing_library(key[0]) is None:
                wanted.append(key)
    out = {k: Case(k[0], k[1], str(uuid.uuid4())) for k in wanted}

    def one(c: Case) -> None:
        try:
            c.result = drive.run_library(c.lib, c.scenario, serve.grpc_endpoint, fake.base_url, request_id=c.request_id)
        except Exception as e:  # reported by the case's own test
            c.error = f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(one, out.values()))

    done = [c for c in out.values() if c.result is not None]
    for c in out.values():
        c.fake_records = fake.records_for(c.request_id)
    if done:
        ids = [c.result["trace_id"] for c in done]
        want = {c.result["trace_id"]: c.result["exported_spans"] for c in done}
        deadline = time.monotonic() + VISIBLE_WITHIN_S
        while True:
            rows = serve.query(f"SELECT {SPAN_COLUMNS} FROM spans WHERE trace_id IN ({_sql_list(ids)}) "
                               "ORDER BY trace_id, start_time, span_id")
            by_trace: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                by_trace.setdefault(r["trace_id"], []).append(r)
            if all(len(by_trace.get(t, [])) >= n for t, n in want.items()) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        for c in done:
            c.rows = by_trace.get(c.result["trace_id"], [])
    return out


def _case(cases: dict[tuple[str, str], Case], lib: str, scenario: str) -> Case:
    missing = _missing_library(lib)
    if missing:
        pytest.skip(f"{missing} not installed: pip install -r tests/requirements-realinst.txt")
    c = cases[(lib, scenario)]
    if c.error:
        pytest.fail(f"driving {lib}/{scenario} failed: {c.error}")
    assert c.result is not None
    return c


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("lib", LIBRARIES)
def test_llm_spans_match_fake_server(cases: dict[tuple[str, str], Case], lib: str, scenario: str) -> None:
    c = _case(cases, lib, scenario)
    res, recs, rows = c.result, c.fake_records or [], c.rows or []
    assert res["export_failures"] == 0, res
    if res.get("log_export_failures"):
        pytest.fail(f"log export failed: {res}")
    n_calls = 2 if scenario.startswith("tools") else 1
    assert len(recs) == n_calls, f"fake server saw {len(recs)} requests, expected {n_calls}"
    assert len(rows) == res["exported_spans"], (
        f"store has {len(rows)} spans of trace {res['trace_id']}, the exporter had {res['exported_spans']} acked")

    # The ground truth also reached the app unchanged (sanity check of the fake and the client).
    for call, rec in zip(res["calls"], recs):
        assert call["model"] == rec.response_model
        assert call["usage"]["prompt_tokens"] == rec.prompt_tokens
        assert call["usage"]["completion_tokens"] == rec.completion_tokens

    llm = [r for r in rows if r["span_kind"] == "LLM"]
    assert len(llm) == n_calls, (
        f"expected {n_calls} LLM spans, store has span_kind {[(r['name'], r['span_kind']) for r in rows]}")

    q = QUIRKS[lib]
    stream = scenario.endswith("stream")
    mismatches = []
    for i, (row, rec) in enumerate(zip(llm, recs)):  # both in start order
        model_src = q.model_stream if stream else q.model
        expected = {
            "model": rec.response_model if model_src == "response" else rec.request_model,
            "input_tokens": rec.prompt_tokens,
            "output_tokens": rec.completion_tokens,
            "cache_read_tokens": rec.cached_tokens if (q.cache_read_stream if stream else q.cache_read) else None,
            "cache_write_tokens": None,  # OpenAI has no cache writes; nobody sends a key
            "reasoning_tokens": rec.reasoning_tokens if (q.reasoning_stream if stream else q.reasoning) else None,
        }
        if "request_model" in row:  # not a CONTRACT column; checked where the store has it (quirk 1)
            expected["request_model"] = rec.request_model
        for col, want in expected.items():
            got = row.get(col)
            if got != want or (want is None) != (got is None):
                mismatches.append(f"LLM span #{i} {row['name']!r} {col}: store {got!r}, expected {want!r}")
    assert not mismatches, f"{lib}/{scenario} ({q.keys}):\n  " + "\n  ".join(mismatches)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("lib", LIBRARIES)
def test_app_spans(cases: dict[tuple[str, str], Case], lib: str, scenario: str) -> None:
    """The app's root span carries the route / shadow pair / cohort; the app's tool span is a TOOL."""
    c = _case(cases, lib, scenario)
    rows = c.rows or []
    roots = [r for r in rows if r["span_id"] == c.result["root_span_id"]]
    assert len(roots) == 1, f"root span {c.result['root_span_id']} not in store: {[r['name'] for r in rows]}"
    root = roots[0]
    assert root["name"] == drive.ROOT_SPAN_NAME
    assert not root["parent_span_id"], root
    got = {k: root[k] for k in ("route", "request_id", "intent", "language", "tier")}
    assert got == {"route": "baseline", "request_id": c.request_id, "intent": "billing", "language": "en",
                   "tier": "free"}
    tools = [r for r in rows if r["name"].startswith("execute_tool")]
    assert len(tools) == (1 if scenario.startswith("tools") else 0)
    for t in tools:
        assert t["span_kind"] == "TOOL", t
    for r in rows:  # every span of the trace is a child of the app root (one trace per case)
        if r is not root:
            assert r["parent_span_id"], r


# User prices for the fake's models (USD per 1M tokens), so expected costs do not depend on the shipped table.
PRICE = {"gpt-4o-mini": (0.15, 0.60, 0.075), "o4-mini": (1.10, 4.40, 0.275)}
TEST_PRICES = "[" + ", ".join(f"{{match: '{m}(-\\d{{4}}-\\d{{2}}-\\d{{2}})?', input: {p[0]}, output: {p[1]}, "
                              f"cache_read: {p[2]}}}" for m, p in PRICE.items()) + "]"


def _expected_cost(lib: str, scenario: str, recs) -> float:
    """Tokens as the library reports them x PRICE; cached tokens only where the library carries them."""
    q = QUIRKS[lib]
    carries_cache = q.cache_read_stream if scenario.endswith("stream") else q.cache_read
    total = 0.0
    for r in recs:
        pin, pout, pcache = PRICE[r.request_model]
        cached = (r.cached_tokens or 0) if carries_cache else 0
        total += ((r.prompt_tokens - cached) * pin + cached * pcache + r.completion_tokens * pout) / 1e6
    return total


def test_trace_rows(cases: dict[tuple[str, str], Case], serve: Any) -> None:
    """Completed trace rows: trace-level columns and token sums over the LLM spans (never double counted)."""
    done = [c for c in cases.values() if c.result is not None]
    if not done:
        pytest.skip("no case was driven")
    ids = [c.result["trace_id"] for c in done]
    deadline = time.monotonic() + TRACE_IDLE_S + 20
    if not serve.query("SELECT table_name FROM information_schema.tables WHERE table_name = 'traces'"):
        pytest.skip("this build's store has no traces table yet")
    while True:
        rows = {r["trace_id"]: r for r in serve.query(
            "SELECT trace_id, route, request_id, intent, language, tier, llm_calls, tool_calls, steps, "
            f"input_tokens, output_tokens, model, incomplete, cost_usd FROM traces WHERE trace_id IN ({_sql_list(ids)})")}
        if len(rows) >= len(ids) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    problems = []
    for c in done:
        t = rows.get(c.result["trace_id"])
        if t is None:
            problems.append(f"{c.lib}/{c.scenario}: no traces row for {c.result['trace_id']}")
            continue
        recs = c.fake_records or []
        n_tools = 1 if c.scenario.startswith("tools") else 0
        want = {
            "route": "baseline", "request_id": c.request_id, "intent": "billing", "language": "en", "tier": "free",
            "llm_calls": len(recs), "tool_calls": n_tools, "steps": len(recs) + n_tools,
            "input_tokens": sum(r.prompt_tokens for r in recs),
            "output_tokens": sum(r.completion_tokens for r in recs),
        }
        for k, v in want.items():
            if t.get(k) != v:
                problems.append(f"{c.lib}/{c.scenario}: traces.{k} = {t.get(k)!r}, expected {v!r}")
        models = {r.response_model for r in recs} | {r.request_model for r in recs}
        if t.get("model") not in models:
            problems.append(f"{c.lib}/{c.scenario}: traces.model = {t.get('model')!r}, expected one of {models}")
        cost = _expected_cost(c.lib, c.scenario, recs)
        if t.get("cost_usd") is None or abs(t["cost_usd"] - cost) > 1e-12 + 1e-9 * cost:
            problems.append(f"{c.lib}/{c.scenario}: traces.cost_usd = {t.get('cost_usd')!r}, expected {cost!r}")
        if t.get("incomplete") not in (False, 0, None):
            problems.append(f"{c.lib}/{c.scenario}: traces.incomplete = {t.get('incomplete')!r}")
    assert not problems, "\n".join(problems)
