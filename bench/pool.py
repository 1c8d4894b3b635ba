"""The ingest bench's traffic pool: pre-serialized 512-span OTLP requests with rewritable ids.

The traffic is shadowlens.traffic_pool's (seeded paired baseline/candidate agent traces, the one
synthesizer the tests and ``generate`` share). Every trace id ends in one 8-byte marker and every
``shadow.request_id`` in its hex; ``build_pool`` finds their offsets once, so a send reuses a template and
rewrites only those bytes (``materialize``): two memcpys and ~530 small slice writes, cheap enough that
the client measures the server.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from shadowlens.traffic_pool import agent_pool

SPANS_PER_REQUEST = 512


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


def build_pool(n_requests: int, seed: int) -> tuple[list[Template], PoolStats, bytes]:
    """n_requests requests of exactly 512 spans from shadowlens.traffic_pool, with the offsets of their ids.
    Returns the templates, the pool's stats and the id marker."""
    t_gen = time.perf_counter()
    pool = agent_pool(n_requests, seed, SPANS_PER_REQUEST)
    marker_hex = pool.marker.hex().encode()
    templates = []
    for r, (data, n_roots) in enumerate(zip(pool.payloads, pool.roots)):
        trace_offs = _find_all(data, pool.marker)
        rid_offs = _find_all(data, marker_hex)
        if len(trace_offs) != SPANS_PER_REQUEST or len(rid_offs) != n_roots:
            raise RuntimeError(f"id marker found {len(trace_offs)}/{len(rid_offs)} times in request {r}, "
                               f"expected {SPANS_PER_REQUEST}/{n_roots}: pick another --seed")
        templates.append(Template(data, tuple(trace_offs), tuple(rid_offs), SPANS_PER_REQUEST))
    stats = PoolStats(requests=n_requests, spans=n_requests * SPANS_PER_REQUEST, traces=pool.traces, pairs=pool.pairs,
                      bytes=sum(len(d) for d in pool.payloads), span_attrs=pool.span_attrs,
                      resource_attrs_per_rs=pool.resource_attrs, kinds=Counter(pool.kinds), text_bytes=pool.text_bytes,
                      gen_seconds=time.perf_counter() - t_gen)
    return templates, stats, pool.marker


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
