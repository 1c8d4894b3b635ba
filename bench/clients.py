"""The ingest bench's client processes: each keeps ``concurrency`` Exports in flight for the timed phase.

gRPC: one channel per process (its own TCP connection), shared by the worker threads. HTTP: one
keep-alive connection per worker. A closed loop sends the next Export as soon as the last is
answered; paced (``--rate``), each worker sends one every ``interval`` seconds and latency counts
from the scheduled send time, so a slow answer that delays the next send is charged to it (no
coordinated omission). Retryable refusals (UNAVAILABLE, RESOURCE_EXHAUSTED, HTTP 429/503) are
retried after the server's delay until the deadline.
"""
from __future__ import annotations

import resource
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from common import say
from pool import SPANS_PER_REQUEST, build_pool, id_suffix, materialize

GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

POOL: list = []   # set in the parent before forking; children read it copy-on-write


def load_pool(requests: int, seed: int):
    """Build the seeded pool of ``requests`` templates into ``POOL`` (before forking) and print what it holds;
    returns the generator's stats."""
    templates, stats, _ = build_pool(requests, seed)
    POOL[:] = templates
    for line in stats.lines():
        say(line)
    return stats


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


def grpc_sender(channel, timeout):
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


def http_sender(host, port, timeout):
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


def worker_loop(send, wid, nonce, start, deadline, st: WorkerStats, interval=None, phase=0.0):
    """Closed loop (the next Export as soon as the last is answered), or with ``interval`` one Export
    every ``interval`` seconds from ``start + phase``. Paced latency counts from the scheduled send
    time, so a slow answer that delays the next send is charged to it (no coordinated omission)."""
    pool = POOL
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
        senders = [http_sender(host, int(port), timeout) for _ in range(args.concurrency)]
    else:
        import grpc
        channel = grpc.insecure_channel(args.target, options=[
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.use_local_subchannel_pool", 1),   # own TCP connection per client process
        ])
        grpc.channel_ready_future(channel).result(timeout=30)
        send = grpc_sender(channel, timeout)
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
    threads = [threading.Thread(target=worker_loop,
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

