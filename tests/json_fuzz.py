"""Malformed OTLP/JSON bodies and /gate requests, and the oracle for their answers (issue 18 part 3).

Every body gets a complete HTTP answer: 200 (it was a valid request after all) or 400 with a
google.rpc.Status JSON body whose message says what was wrong. A 500, a closed connection without an
answer, or an unreadable message is a failure. Used by tests/test_json_fuzz.py (seconds, through
hypothesis) and bench/fuzz_json.py (longer runs, printing counts).

Mutations start from valid OTLP/JSON trace and log requests and replace a node with a poisoned value
(lone surrogates, deep nesting, huge or non-finite numbers, wrong types, enum names), rename keys,
or cut, flip and splice the serialized bytes.
"""
from __future__ import annotations

import json
import random
import socket
import time

T0 = 1_700_000_000_000_000_000

TRACE_DOC = {"resourceSpans": [{
    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "fuzz"}}]},
    "scopeSpans": [{"scope": {"name": "fuzz", "version": "1"}, "spans": [{
        "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
        "parentSpanId": "eee19b7ec3c1b173", "name": "chat", "kind": 3,
        "startTimeUnixNano": str(T0), "endTimeUnixNano": str(T0 + 10**9),
        "attributes": [
            {"key": "llm.model_name", "value": {"stringValue": "gpt-4o"}},
            {"key": "llm.token_count.prompt", "value": {"intValue": "12"}},
            {"key": "metadata", "value": {"kvlistValue": {"values": [{"key": "a", "value": {"doubleValue": 1.5}}]}}},
            {"key": "tags", "value": {"arrayValue": {"values": [{"boolValue": True}, {"bytesValue": "AAE="}]}}}],
        "events": [{"timeUnixNano": str(T0), "name": "gen_ai.evaluation.result",
                    "attributes": [{"key": "gen_ai.evaluation.name", "value": {"stringValue": "task"}}]}],
        "links": [{"traceId": "5b8efff798038103d269b633813fc60d", "spanId": "eee19b7ec3c1b175"}],
        "status": {"code": 2, "message": "boom"}}]}]}]}
LOG_DOC = {"resourceLogs": [{
    "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "fuzz"}}]},
    "scopeLogs": [{"scope": {"name": "fuzz"}, "logRecords": [{
        "timeUnixNano": str(T0), "severityNumber": 9, "severityText": "INFO",
        "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
        "body": {"stringValue": "hello"},
        "attributes": [{"key": "event.name", "value": {"stringValue": "gen_ai.evaluation.result"}}]}]}]}]}
SEEDS = {"/v1/traces": TRACE_DOC, "/v1/logs": LOG_DOC}

SURROGATES = ("\ud800", "\udfff", "a\udc00b", "\ud83d")     # lone halves: valid JSON escapes, not Unicode
ENUM_FIELDS = ("kind", "code", "severityNumber")


class Deep:
    """Nested lists, objects or AnyValues ``depth`` levels deep, written as text (json.dumps would recurse)."""
    OPEN = ("[", '{"a":', '{"kvlistValue":{"values":[{"key":"k","value":')
    CLOSE = ("]", "}", "}]}}")

    def __init__(self, rng: random.Random, depth: int):
        self.depth, self.shape = depth, rng.randrange(3)
        self.leaf = rng.choice(["1", '"x"', "null", "{}"])

    def text(self) -> str:
        return self.OPEN[self.shape] * self.depth + self.leaf + self.CLOSE[self.shape] * self.depth


def dumps(doc) -> bytes:
    """json.dumps with every Deep written in place; lone surrogates become \\udXXX escapes (ensure_ascii),
    as a client's JSON library writes them."""
    deep: list[Deep] = []

    def placeholder(o):
        if not isinstance(o, Deep):
            raise TypeError(type(o))
        deep.append(o)
        return f"@@deep{len(deep) - 1}@@"
    text = json.dumps(doc, allow_nan=True, default=placeholder)
    for i, d in enumerate(deep):
        text = text.replace(f'"@@deep{i}@@"', d.text(), 1)
    return text.encode()


def poison(rng: random.Random):
    """A value a client should not send where a field is expected."""
    pick = rng.randrange(12)
    if pick == 0:
        return rng.choice(SURROGATES)
    if pick == 1:
        return Deep(rng, rng.choice([50, 200, 900, 1_100, 5_000, 50_000]))
    if pick == 2:
        return rng.choice([2**63, -2**63 - 1, 2**64, 10**30, -1, 1e308, float("nan"), float("inf"), -0.0, 1.5])
    if pick == 3:
        return rng.choice(["", "x" * rng.randrange(1, 3000), "9" * 40, "-1", "0x10", "1e5", "NaN", " 1", "null"])
    if pick == 4:
        return rng.choice([None, True, False, [], {}, [None], [[]], [{}], {"": {}}])
    if pick == 5:
        return rng.choice(["SPAN_KIND_SERVER", "STATUS_CODE_ERROR", "SEVERITY_NUMBER_WARN", "NOPE", "\ud800"])
    if pick == 6:
        return {rng.choice(["stringValue", "intValue", "doubleValue", "boolValue", "bytesValue", "arrayValue",
                            "kvlistValue", "\ud800"]): poison(rng)}
    if pick == 7:
        return rng.choice(["AAE", "!!!", "\ud800", "QUJD" * 1000, "zz" * 16, "5B8EFFF798038103D269B633813FC60C"])
    if pick == 8:
        return [poison(rng) for _ in range(rng.randrange(1, 4))]
    if pick == 9:
        return {poison_key(rng): poison(rng)}
    if pick == 10:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 20)))
    return rng.randrange(-2**70, 2**70)


def poison_key(rng: random.Random) -> str:
    return rng.choice(["\ud800", "", "kind", "trace_id", "start_time_unix_nano", "@type", "resource_spans",
                       "attributes", "value", "__proto__", "x" * 500])


def _nodes(doc):
    """Every (container, key) in ``doc`` (iterative: poisoned documents may be deep)."""
    out, stack = [], [doc]
    while stack and len(out) < 10_000:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append((node, k))
            if isinstance(v, (dict, list)):
                stack.append(v)
    return out


def mutate_doc(rng: random.Random, doc):
    for _ in range(rng.randrange(1, 4)):
        nodes = _nodes(doc)
        if not nodes:
            return poison(rng)
        container, key = rng.choice(nodes)
        r = rng.random()
        if r < 0.15 and isinstance(container, dict):
            container[poison_key(rng)] = container.pop(key)
        elif r < 0.3 and key in ENUM_FIELDS:
            container[key] = rng.choice(["\ud800", 2**40, "SPAN_KIND_\ud800", -5, "3"])
        else:
            container[key] = poison(rng)
    return doc


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(5)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1:
            b[i:i] = rng.choice([b"[", b"{", b'"', b"\\", b"\\ud800", b"\xff", b"\x00", b",", b"}", b"]", b"1e999"])
        elif op == 2:
            del b[i:i + rng.randrange(1, 20)]
        elif op == 3:
            b = b[:i]
        else:
            b[i:i] = rng.choice([b"[" * 3000, b'{"a":' * 3000])
    return bytes(b)


def random_body(rng: random.Random) -> tuple[str, bytes]:
    """(path, body) of one malformed (or sometimes still valid) OTLP/JSON request."""
    path = rng.choice(list(SEEDS))
    doc = mutate_doc(rng, json.loads(json.dumps(SEEDS[path])))
    data = dumps(doc)
    if rng.random() < 0.3:
        data = mutate_bytes(rng, data)
    return path, data


def exchange(port: int, raw: bytes, timeout: float = 30.0) -> tuple[int | None, dict, bytes]:
    """Send ``raw`` (a whole HTTP request) and read one response: (status or None, headers, body).

    None means the connection closed without a complete answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)      # a body shorter than its Content-Length ends here
        except OSError:
            pass          # the server may answer (and close) before taking the whole body
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buf or buf.startswith(b"HTTP/1.1 100 "):
            if buf.startswith(b"HTTP/1.1 100 ") and b"\r\n\r\n" in buf:    # Expect: 100-continue's interim answer
                buf = buf.split(b"\r\n\r\n", 1)[1]
                continue
            try:
                chunk = s.recv(65536)
            except OSError:
                return None, {}, buf
            if not chunk or time.monotonic() > deadline:
                return None, {}, buf
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
        n = int(headers.get("content-length", "0"))
        while len(body) < n:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            body += chunk
        if len(body) < n:
            return None, headers, body
        return status, headers, body


def post_json(port: int, path: str, body: bytes) -> tuple[int | None, dict, bytes]:
    head = (f"POST {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return exchange(port, head + body)


def judge_otlp(status, body: bytes) -> str | None:
    """None when the answer is one the OTLP/HTTP spec allows for this body, else what is wrong."""
    if status is None:
        return "no answer (connection closed)"
    if status == 200:
        return None
    if status != 400:
        return f"HTTP {status}: {body[:300]!r}"
    try:
        st = json.loads(body)
    except ValueError:
        return f"400 whose body is not JSON: {body[:300]!r}"
    msg = st.get("message") if isinstance(st, dict) else None
    if st.get("code") != 3 or not isinstance(msg, str) or not msg.strip():
        return f"400 without an INVALID_ARGUMENT status and message: {body[:300]!r}"
    return None


# /gate: what a webhook caller (Flagger, Argo Rollouts) or an attacker might send
CONTENT_LENGTHS = ("abc", "-1", "+5", "1_0", " 0x1", "", "1, 2", "99999999999999999999999", "5 5", "\u00b2",
                   "0", "3", "18446744073709551617", "1e3", "-0")


def random_gate_request(rng: random.Random) -> bytes:
    method = rng.choice(["POST", "POST", "GET", "PUT", "POST"])
    path = rng.choice(["/gate", "/gate?strict=1", "/gate?always_ok=%ff", "/gate?" + "a=" * 100, "/metrics"])
    body = rng.choice([b"", b'{"name":"rollout","phase":"Progressing"}', b"{", b"\xff\xfe", b"x" * 5000])
    headers = ["Host: fuzz"]
    r = rng.random()
    if r < 0.5:
        headers.append(f"Content-Length: {rng.choice(CONTENT_LENGTHS)}")
    elif r < 0.65:
        headers.append(f"Content-Length: {len(body)}")
        headers.append(f"Content-Length: {len(body) + rng.choice([0, 1])}")
    elif r < 0.8:
        headers.append(rng.choice(["Transfer-Encoding: chunked", "Transfer-Encoding: gzip, chunked",
                                   "Transfer-Encoding: identity"]))
        if rng.random() < 0.5:
            body = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    else:
        headers.append(f"Content-Length: {len(body)}")
    if rng.random() < 0.3:
        headers.append(rng.choice(["Content-Type: application/json", "Accept: \ud800".encode("utf-8", "surrogatepass")
                                   .decode("latin-1"), "Expect: 100-continue", "Connection: keep-alive"]))
    headers.append("Connection: close")
    return f"{method} {path} HTTP/1.1\r\n".encode() + "\r\n".join(headers).encode("latin-1") + b"\r\n\r\n" + body


def judge_gate(status) -> str | None:
    if status is None:
        return "no answer (connection closed)"
    # 501: a method the endpoint does not implement; 503: no verdict yet (the first evaluation is running)
    if status >= 500 and status not in (501, 503):
        return f"HTTP {status}"
    return None
