"""A tiny OpenAI-compatible chat-completions server for the real-instrumentation tests.

Standard library only (``http.server`` in a daemon thread, port 0, loopback). It answers
``POST /v1/chat/completions``:

* non-streaming, and SSE streaming; with ``stream_options.include_usage`` a final chunk
  with ``choices: []`` and the usage is sent, as the real API does;
* tools: when the request offers ``tools`` and the last message is not a ``tool`` result,
  the reply asks for one tool call (``finish_reason: tool_calls``); once a tool result is
  in the conversation, it answers with text. That gives a two-round tool loop;
* usage with ``prompt_tokens_details.cached_tokens`` (always set, a third of the prompt)
  and ``completion_tokens_details.reasoning_tokens`` (non-zero for o-models, 0 otherwise);
* model ``X`` is answered as ``X-2024-07-18`` (a dated snapshot, like the real API);
* ``FakeOpenAI(refuse=f)``: where ``f(model, last user text)`` is true, the answer is a refusal
  (``finish_reason: content_filter``), a planted regression for the gate tests.

Every request is recorded in :attr:`FakeOpenAI.records` with the exact model and usage the
server returned. That is the ground truth the tests compare the store against; it is
computed here, independently of any shadowlens code.

Run it on its own with ``python fake_openai.py`` to poke at it with curl.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

SNAPSHOT_SUFFIX = "-2024-07-18"
CASE_HEADER = "x-shadowlens-case"
_DATED = re.compile(r"-\d{4}-\d{2}-\d{2}$")


def response_model_for(request_model: str) -> str:
    """The dated snapshot name the fake answers with."""
    if _DATED.search(request_model):
        return request_model
    return request_model + SNAPSHOT_SUFFIX


def is_reasoning_model(model: str) -> bool:
    """o1, o3, o4-mini, ... (the models for which the real API reports reasoning tokens)."""
    return re.match(r"^o\d", model) is not None


@dataclass
class Record:
    """What one request asked and exactly what the fake answered."""

    case: str | None
    request_model: str
    response_model: str
    stream: bool
    include_usage: bool
    kind: str  # "text" | "tool_calls"
    finish_reason: str
    response_id: str
    # The usage the server sent (None when a stream was sent without usage).
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    content: str | None = None
    received_at: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


def compute_usage(body: dict[str, Any], reply_text: str, tool_calls: list[dict[str, Any]]) -> dict[str, int]:
    """Deterministic, request-dependent token counts (distinct per request and per round)."""
    messages = body.get("messages") or []
    chars = sum(len(_text_of(m.get("content"))) for m in messages)
    chars += sum(len(json.dumps(tc)) for m in messages for tc in (m.get("tool_calls") or []))
    prompt = 100 + 7 * len(messages) + chars // 4 + 13 * len(body.get("tools") or [])
    out_chars = len(reply_text) + sum(len(json.dumps(tc)) for tc in tool_calls)
    completion = 9 + out_chars // 4
    reasoning = 0
    if is_reasoning_model(str(body.get("model", ""))):
        reasoning = 17 + 3 * len(messages)
        completion += reasoning  # reasoning tokens are part of completion tokens
    cached = prompt // 3  # part of prompt tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": cached,
        "reasoning_tokens": reasoning,
    }


def usage_object(u: dict[str, int]) -> dict[str, Any]:
    return {
        "prompt_tokens": u["prompt_tokens"],
        "completion_tokens": u["completion_tokens"],
        "total_tokens": u["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": u["cached_tokens"], "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": u["reasoning_tokens"],
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def plan_reply(body: dict[str, Any], response_id: str) -> tuple[str | None, list[dict[str, Any]], str]:
    """Decide what to answer: (text, tool_calls, finish_reason)."""
    messages = body.get("messages") or []
    tools = body.get("tools") or []
    last_role = messages[-1].get("role") if messages else None
    if tools and last_role != "tool":
        fn = tools[0].get("function", {}) if isinstance(tools[0], dict) else {}
        name = fn.get("name", "tool")
        call = {
            "id": "call_" + response_id[-12:],
            "type": "function",
            "function": {"name": name, "arguments": json.dumps({"invoice_id": "INV-1042"})},
        }
        return None, [call], "tool_calls"
    if last_role == "tool":
        text = "Invoice INV-1042 was paid on 2024-07-01; nothing is due."
    else:
        last_user = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        text = f"You asked: {last_user[:60]}. Here is a short answer from the fake model."
    return text, [], "stop"


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep quiet
        pass

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": []})
        else:
            self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self.path.split("?")[0].rstrip("/").endswith("/chat/completions"):
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._json(400, {"error": {"message": "bad json", "type": "invalid_request_error"}})
            return
        model = body.get("model")
        if not isinstance(model, str) or not body.get("messages"):
            self._json(400, {"error": {"message": "model and messages are required", "type": "invalid_request_error"}})
            return

        response_id = "chatcmpl-" + uuid.uuid4().hex[:24]
        resp_model = response_model_for(model)
        text, tool_calls, finish = plan_reply(body, response_id)
        refuse = self.server.owner.refuse
        last_user = next((_text_of(m.get("content")) for m in reversed(body["messages"]) if m.get("role") == "user"), "")
        if refuse is not None and not tool_calls and refuse(model, last_user):
            text, finish = "I can't help with that.", "content_filter"
        u = compute_usage(body, text or "", tool_calls)
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        sent_usage = (not stream) or include_usage
        rec = Record(
            case=self.headers.get(CASE_HEADER),
            request_model=model,
            response_model=resp_model,
            stream=stream,
            include_usage=include_usage,
            kind="tool_calls" if tool_calls else "text",
            finish_reason=finish,
            response_id=response_id,
            prompt_tokens=u["prompt_tokens"] if sent_usage else None,
            completion_tokens=u["completion_tokens"] if sent_usage else None,
            total_tokens=u["total_tokens"] if sent_usage else None,
            cached_tokens=u["cached_tokens"] if sent_usage else None,
            reasoning_tokens=u["reasoning_tokens"] if sent_usage else None,
            tool_calls=tool_calls,
            content=text,
            received_at=time.time(),
        )
        self.server.owner._add(rec)
        created = int(time.time())
        if not stream:
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if tool_calls:
                message["tool_calls"] = tool_calls
            self._json(200, {
                "id": response_id,
                "object": "chat.completion",
                "created": created,
                "model": resp_model,
                "system_fingerprint": "fp_fake0001",
                "service_tier": "default",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage_object(u),
            })
            return
        self._stream(body, response_id, resp_model, created, text, tool_calls, finish, u, include_usage)

    def _stream(self, body, response_id, resp_model, created, text, tool_calls, finish, u, include_usage) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def chunk(delta: dict[str, Any] | None, finish_reason: str | None = None, usage: Any = None,
                  no_choices: bool = False) -> None:
            obj: dict[str, Any] = {
                "id": response_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": resp_model,
                "system_fingerprint": "fp_fake0001",
                "service_tier": "default",
                "choices": [] if no_choices else [
                    {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            if include_usage:
                obj["usage"] = usage  # null on every chunk but the last, as the real API does
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        chunk({"role": "assistant", "content": "" if not tool_calls else None, "refusal": None})
        if tool_calls:
            for i, tc in enumerate(tool_calls):
                chunk({"tool_calls": [{"index": i, "id": tc["id"], "type": "function",
                                        "function": {"name": tc["function"]["name"], "arguments": ""}}]})
                args = tc["function"]["arguments"]
                for j in range(0, len(args), 8):
                    chunk({"tool_calls": [{"index": i, "function": {"arguments": args[j:j + 8]}}]})
        else:
            words = (text or "").split(" ")
            for k, w in enumerate(words):
                chunk({"content": w if k == 0 else " " + w})
        chunk({}, finish_reason=finish)
        if include_usage:
            chunk(None, usage=usage_object(u), no_choices=True)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "FakeOpenAI"


class FakeOpenAI:
    """Start with :meth:`start` (or as a context manager); :attr:`base_url` ends in ``/v1``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 refuse: Callable[[str, str], bool] | None = None) -> None:
        self._host, self._port = host, port
        self.refuse = refuse
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "FakeOpenAI":
        self._server = _Server((self._host, self._port), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _add(self, rec: Record) -> None:
        with self._lock:
            self._records.append(rec)

    @property
    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    def records_for(self, case: str) -> list[Record]:
        """Requests that carried header ``x-shadowlens-case: <case>``, in arrival order."""
        return [r for r in self.records if r.case == case]


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    fake = FakeOpenAI(port=port).start()
    print(fake.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()
