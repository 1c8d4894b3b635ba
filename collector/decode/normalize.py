"""Pure: an OTLP request -> NormalizedBatch (columns for the store). No I/O, no clock.

Invalid spans (wrong-length or all-zero ids, end before start) are rejected with a reason
and a message; the rest of the request is kept (OTLP partial success).

The loop below is the ingest hot path. A scanner (C, with a pure-Python reference in
scan.py) hands over each span's header and only the attributes whose key the alias table
knows; the bulky attributes are never converted here (the raw payload is stored and
decoded to JSON on read).
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
from google.protobuf.message import DecodeError
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from .. import schema
from shadowlens.config import EvalConfig
from ..errors import PermanentError
from . import aliases as A
from . import wire
from .anyvalue import attributes_to_json, clean_text, raw_value, to_python, typed
from .check import (
    EVENT_NAMES,
    PREFIXES,
    Check,
    Checker,
    log_message,
    log_rejection,
    log_rejection_text,
    log_time,
    span_rejections,
)
from .scan import ZERO_SPAN, ZERO_TRACE, column_merger, scanner

# One span's fixed columns as the scanners write them (little-endian, 64 bytes; see _wirescan.c).
SPAN_RECORD = np.dtype([("trace_id", "u1", 16), ("span_id", "u1", 8), ("parent_span_id", "u1", 8),
                        ("start", "<u8"), ("end", "<u8"), ("rs_idx", "<i4"), ("ss_idx", "<i4"), ("sp_idx", "<i4"),
                        ("kind", "u1"), ("status_code", "u1"), ("_pad", "V2")])

# Values that repeat on every span of their resource or scope (resource attributes, scope names) are
# cut to this many characters before they are copied to each span: a 60 MB service.name on a resource
# of a million tiny spans would otherwise make a 60 TB column (a request is at most 64 MiB).
MAX_SHARED_TEXT = 200
# Token counts below zero are stored as NULL (they would make negative costs).
_TOKEN_CONCEPTS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")

_KINDS = ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
_STATUS = ("UNSET", "OK", "ERROR")


@dataclass
class NormalizedBatch:
    """What decode hands to the store. ``keys`` (64-bit span keys, see ``span_keys``) align with ``spans`` rows."""
    signal: str                       # "traces" | "logs"
    spans: pa.RecordBatch | None
    evals: pa.RecordBatch | None
    logs: pa.RecordBatch | None
    keys: Any                         # numpy uint64 array (traces); a list for logs
    received: int                     # spans or log records in the request
    rejected: int
    reasons: Counter = field(default_factory=Counter)
    message: str = ""
    payload: bytes = b""              # the request as protobuf bytes (the bulky part's home)
    unpriced: Counter = field(default_factory=Counter)   # model -> LLM spans with tokens but no price

    @property
    def accepted(self) -> int:
        return len(self.keys)

    # Crossing to the store process: each Arrow batch as one IPC stream buffer. Pickle's default
    # (a __reduce__ per array and field, ~40 columns) cost ~4 us a span of the frontend's GIL.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in ("spans", "evals", "logs"):
            if state[name] is not None:
                state[name] = _ipc_bytes(state[name])
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("spans", "evals", "logs"):
            if state[name] is not None:
                state[name] = pa.ipc.open_stream(state[name], options=_IPC_READ).read_next_batch()
        self.__dict__.update(state)


_IPC_WRITE = pa.ipc.IpcWriteOptions(use_threads=False)   # 512 rows: a thread pool costs more than it saves
_IPC_READ = pa.ipc.IpcReadOptions(use_threads=False)


def _ipc_bytes(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=_IPC_WRITE) as w:
        w.write_batch(batch)
    # as bytes: pickling the pa.Buffer itself measured ~380 us for a 512-span batch, the copy ~5 us
    return sink.getvalue().to_pybytes()


class Normalizer:
    """Turns ExportTraceServiceRequest / ExportLogsServiceRequest into store columns."""

    def __init__(self, cohort_labels: Mapping[str, tuple[str, ...]], evals: EvalConfig, prices=None,
                 scanner_choice: str = "auto"):
        """``prices``: an ``decode.pricing.PriceTable``; without one, only reported costs are stored.
        ``scanner_choice``: auto (the C scanner when built), c or python (the reference)."""
        self.prices = prices
        self._scan = scanner(scanner_choice)
        self.checker = Checker(cohort_labels, scanner_choice)
        self.cohort_labels = tuple(cohort_labels)
        extra = {f"cohort:{name}": tuple(keys) for name, keys in cohort_labels.items()}
        index = self.checker.index
        # The scanner reports a slot per known key; a slot may feed several concepts.
        self._key_slots = self.checker.key_slots
        self._slot_hits = list(index.values())
        self._concepts = tuple(A.SPAN_ALIASES) + tuple(extra)
        by_concept: dict[str, list[tuple[int, int]]] = {c: [] for c in self._concepts}
        for slot, hits in enumerate(self._slot_hits):
            for concept, prio in hits:
                by_concept[concept].append((prio, slot))
        self._concept_slots = {c: [slot for _, slot in sorted(v)] for c, v in by_concept.items()}   # best key first
        self._merge = column_merger(scanner_choice)
        self._column_concepts = {name: f"cohort:{name}" for name in cohort_labels}
        self._types = dict(A.CONCEPT_TYPES, **{c: A.STR for c in extra})
        self._converters = {c: _converter(t) for c, t in self._types.items()}
        self._converters["span_kind"] = _span_kind
        self._converters["finish_reason"] = _finish_text
        self._exact = {c: {A.INT: int, A.FLOAT: float, A.STR: str, A.BOOL: bool}.get(t) for c, t in self._types.items()}
        self._exact["span_kind"] = None
        self._float_concepts = tuple(c for c, t in self._types.items() if t == A.FLOAT)
        self._cohort_concepts = tuple(extra)
        self._cohort_keys = {c: keys for c, keys in extra.items()}
        self._evals = evals
        self._schema = schema.span_schema(self.cohort_labels)
        # Trace-level concepts inherit from the resource, then the metadata JSON.
        self._inherit = A.TRACE_CONCEPTS + self._cohort_concepts
        self._meta_keys = frozenset(
            [k for c in self._inherit for k in (self._cohort_keys.get(c) or A.SPAN_ALIASES.get(c, ()))]
            + [c[7:] for c in self._cohort_concepts])
        # A metadata string that names none of the keys a lookup could use (as a JSON string, or the
        # first part of a dotted path) is not parsed at all; one with escapes always is.
        needles = set(self._meta_keys) | {k.split(".")[0] for k in self._meta_keys}
        self._meta_relevant = re.compile("|".join(re.escape(f'"{k}"') for k in sorted(needles)) + r"|\\").search

    # -- shared pieces ---------------------------------------------------------------------
    def _eval_row(self, trace_id, span_id, name, score, label, passed, explanation, source):
        ok = self._evals.passed(name, passed, label, score)
        return (trace_id, span_id, name, score, label, ok, explanation, source)

    # -- traces ----------------------------------------------------------------------------
    def _column(self, concept: str, slots, n: int) -> list | None:
        """One concept's column from the scanner's sparse per-key lists; None if no span has it
        (scan.python_merge_column: the first alias key whose value reads as the concept's type wins)."""
        return self._merge(n, [slots[s] for s in self._concept_slots[concept]], self._exact[concept],
                           self._converters[concept], _CACHES.get(concept))

    def check_traces(self, payload: bytes) -> Check:
        """What a receiver must know before it acknowledges (see check.py)."""
        return self.checker.check_traces(payload)

    def check_logs(self, request) -> Check:
        return self.checker.check_logs(request)

    def normalize_traces(self, payload: bytes) -> NormalizedBatch:
        """``payload``: ExportTraceServiceRequest protobuf bytes. Raises PermanentError if malformed."""
        try:
            sc = self._scan(payload, self._key_slots, len(self._slot_hits), PREFIXES, EVENT_NAMES)
        except ValueError as exc:
            raise PermanentError(f"body is not a valid OTLP traces protobuf request: {exc}") from None
        n = sc["n"]
        if n == 0:
            return NormalizedBatch("traces", None, None, None, [], 0, 0, payload=payload)
        rec = np.frombuffer(sc["spans"], dtype=SPAN_RECORD)
        rs_idx = rec["rs_idx"].tolist()
        slots = sc["slots"]
        cols: dict[str, list | None] = {c: self._column(c, slots, n) for c in self._concepts}
        # Numbers DuckDB would store but no query can use: NaN/inf (a double attribute is taken as it
        # came) and negative token counts become NULL. Out-of-range integers never get here (typed()).
        for concept in self._float_concepts:
            _null_nonfinite(cols[concept])
        for concept in _TOKEN_CONCEPTS:
            _null_negative(cols[concept])

        # Trace-level concepts: the span, else its resource, else the metadata JSON (CONTRACT §4).
        resources = [self._resource_values(r) for r in sc["resources"]]
        for concept in self._inherit + ("service_name",):
            for r, values in enumerate(resources):
                v = values.get(concept)
                if v is None:
                    continue
                col = cols[concept]
                if col is None:
                    col = cols[concept] = [None] * n
                if len(resources) == 1:
                    cols[concept] = [v if x is None else x for x in col]
                else:
                    cols[concept] = [v if x is None and ri == r else x for x, ri in zip(col, rs_idx)]
        meta = cols["json_metadata"]
        res_meta = [_loads_obj(r.get("json_metadata")) for r in resources]
        if meta is not None or any(res_meta):
            relevant = self._meta_relevant
            span_meta = {}
            if meta is not None:
                parsed: dict[str, dict | None] = {}     # spans of a request repeat their metadata
                for i, t in enumerate(meta):
                    if t and type(t) is str:
                        obj = parsed.get(t, _UNSEEN)
                        if obj is _UNSEEN:
                            obj = parsed[t] = _loads_obj(t) if relevant(t) else None
                        if obj is not None:
                            span_meta[i] = obj
            for concept in self._inherit:
                col = cols[concept]
                for i, obj in span_meta.items():           # the span's own metadata JSON
                    if obj and (col is None or col[i] is None):
                        v = _meta_lookup(obj, concept, self._cohort_keys, self._meta_keys)
                        if v is not None:
                            if col is None:
                                col = cols[concept] = [None] * n
                            col[i] = clean_text(str(v))
                for r, obj in enumerate(res_meta):          # then its resource's, once per resource
                    v = _meta_lookup(obj, concept, self._cohort_keys)
                    if v is None:
                        continue
                    v = clean_text(str(v))[:MAX_SHARED_TEXT]
                    if col is None:
                        col = cols[concept] = [None] * n
                    cols[concept] = col = [v if x is None and (len(res_meta) == 1 or ri == r) else x
                                           for x, ri in zip(col, rs_idx)]

        # Model: traceAI writes the response model into gen_ai.request.model and keeps the
        # requested one only in its parameters JSON (quirk 1); others may lack a model attribute.
        model, request_model, params = cols["model"], cols["request_model"], cols["json_params"]
        scopes = sc["scope"]
        if any(len(t) > MAX_SHARED_TEXT for t in set(scopes) if t is not None):
            scopes = [t if t is None or len(t) <= MAX_SHARED_TEXT else t[:MAX_SHARED_TEXT] for t in scopes]
        if params is not None:
            for i, text in enumerate(params):
                if text is None:
                    continue
                traceai = bool(scopes[i]) and scopes[i].startswith("traceai")
                if not traceai and model is not None and model[i] is not None and request_model is not None \
                        and request_model[i] is not None:
                    continue
                pm = _param_model(text)
                if pm is None:
                    continue
                if request_model is None:
                    request_model = cols["request_model"] = [None] * n
                if model is None:
                    model = cols["model"] = [None] * n
                if traceai or request_model[i] is None:
                    request_model[i] = pm
                if model[i] is None:
                    model[i] = pm

        refused = cols["refused"]
        finish = cols["finish_reason"]      # already comma-joined (_finish_text)
        if finish is not None:
            refusals = {t for t in set(finish) if t and not A.REFUSAL_FINISH_REASONS.isdisjoint(t.split(","))}
            if refusals:
                if refused is None:
                    refused = cols["refused"] = [None] * n
                for i, text in enumerate(finish):
                    if text in refusals:
                        refused[i] = True

        cost, unpriced = self._costs(cols, rec, n)
        cols["cost_usd"] = cost

        hex_t, hex_s = _HexList(rec["trace_id"]), _HexList(rec["span_id"])   # the few eval rows need text
        evals = self._span_evals(sc, cols, hex_t, hex_s, n)
        for e_idx, row in evals:
            if row[2] == "refusal" and row[5] is False:
                if refused is None:
                    refused = cols["refused"] = [None] * n
                refused[e_idx] = True

        # Validation last, as a mask: the invalid spans (found by the scanner) are dropped from every column at once.
        invalid = sc["invalid"]
        reasons, message = span_rejections(invalid, n)

        id_columns, keys = _id_columns(rec)
        columns = {
            **id_columns,
            "name": sc["name"], "kind": _enum_array(_KINDS_ARROW, rec["kind"]),
            "service_name": cols["service_name"], "scope_name": scopes,
            "start_ns": _int64(rec["start"]), "end_ns": _int64(rec["end"]),
            "status_code": _enum_array(_STATUS_ARROW, rec["status_code"]), "status_message": sc["status_message"],
            "rs_idx": _int32(rec["rs_idx"]), "ss_idx": _int32(rec["ss_idx"]), "sp_idx": _int32(rec["sp_idx"]),
        }
        arrays = []
        for field_ in self._schema:
            name = field_.name
            if name in columns:
                values = columns[name]
            else:
                values = cols[self._column_concepts.get(name, name)]
            if values is None:
                arrays.append(pa.nulls(n, field_.type))
            else:
                arrays.append(values if isinstance(values, pa.Array) else pa.array(values, type=field_.type))
        batch = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        eval_rows = [row for _, row in evals]
        if invalid:
            keep = np.ones(n, dtype=bool)
            keep[[row[0] for row in invalid]] = False
            batch = batch.filter(pa.array(keep))
            keys = keys[keep]
            eval_rows = [row for i, row in evals if keep[i]]
        return NormalizedBatch(
            signal="traces", spans=batch if batch.num_rows else None,
            evals=_to_batch(eval_rows, schema.EVAL_SCHEMA) if eval_rows else None,
            logs=None, keys=keys, received=n, rejected=len(invalid), reasons=reasons, message=message, payload=payload,
            unpriced=unpriced)

    def _costs(self, cols, rec, n) -> tuple[list | None, Counter]:
        """Cost of LLM spans: the reported cost, else tokens x the price table (CONTRACT §4)."""
        reported = cols["reported_cost_usd"]
        kinds = cols["span_kind"]
        if self.prices is None or kinds is None or (cols["input_tokens"] is None and cols["output_tokens"] is None):
            return (list(reported) if reported is not None else None), Counter()
        llm = [i for i, k in enumerate(kinds) if k == "LLM"]
        if not llm:
            return (list(reported) if reported is not None else None), Counter()
        return self.prices.price_columns(
            cols["model"], rec["start"].tolist(), cols["input_tokens"], cols["output_tokens"], cols["cache_read_tokens"],
            cols["cache_write_tokens"], reported, rows=llm)

    def _resource_values(self, matches) -> dict[str, Any]:
        best: dict[str, tuple[int, Any]] = {}
        for slot, raw in matches:
            for concept, prio in self._slot_hits[slot]:
                v = self._converters[concept](raw)
                if type(v) is str and len(v) > MAX_SHARED_TEXT:
                    v = v[:MAX_SHARED_TEXT]
                if v is not None and (concept not in best or prio < best[concept][0]):
                    best[concept] = (prio, v)
        return {c: v for c, (_, v) in best.items()}

    def _span_evals(self, sc, cols, hex_t, hex_s, n) -> list[tuple[int, tuple]]:
        """(span index, evals row) for every eval a span carries: attributes, OpenInference keys, events."""
        out = []
        names = cols["eval_name"]
        if names is not None:
            score, label, passed, expl = (cols[c] or [None] * n for c in
                                          ("eval_score", "eval_label", "eval_passed", "eval_explanation"))
            for i, name in enumerate(names):
                if name:
                    out.append((i, self._eval_row(hex_t[i], hex_s[i], name, score[i], label[i], passed[i], expl[i],
                                                  "span_attribute")))
        if sc["prefixed"]:
            by_span: dict[int, list] = {}
            for i, key, raw in sc["prefixed"]:
                by_span.setdefault(i, []).append((key, raw))
            for i, pairs in by_span.items():
                out.extend((i, row) for row in self._openinference_evals(pairs, hex_t[i], hex_s[i]))
        for i, raw in sc["events"]:
            try:
                attrs = {kv.key: raw_value(kv.value) for kv in Span.Event.FromString(raw).attributes}
            except DecodeError:
                # the receiver read only the event's name: one bad string or a deep value inside it costs
                # that value (wire.py), not the request
                attrs = wire.event_raw_attributes(raw)
            row = self._event_eval(attrs, hex_t[i], hex_s[i], "span_event")
            if row:
                out.append((i, row))
        return out

    def _openinference_evals(self, pairs, tid_h, sid_h) -> list[tuple]:
        # evaluations.N.evaluation.{name,score,label,explanation}
        by_n: dict[str, dict[str, Any]] = {}
        for key, raw in pairs:
            parts = key.split(".")
            if len(parts) >= 4 and parts[2] == "evaluation":
                by_n.setdefault(parts[1], {})[parts[3]] = raw
        out = []
        for _, d in sorted(by_n.items()):
            name = typed(d.get("name"), A.STR)
            if not name:
                continue
            out.append(self._eval_row(tid_h, sid_h, name, typed(d.get("score"), A.FLOAT),
                                      typed(d.get("label"), A.STR), None, typed(d.get("explanation"), A.STR),
                                      "openinference"))
        return out

    def _event_eval(self, d: dict, tid_h, sid_h, source) -> tuple | None:
        """``d``: the event's (or log record's) attributes, key -> raw value."""
        k = A.EVAL_EVENT_KEYS
        name = typed(d.get(k["name"]), A.STR)
        if not name:
            return None
        return self._eval_row(tid_h, sid_h, name, typed(d.get(k["score"]), A.FLOAT), typed(d.get(k["label"]), A.STR),
                              None, typed(d.get(k["explanation"]), A.STR), source)

    # -- logs ------------------------------------------------------------------------------
    def normalize_logs(self, request, payload: bytes = b"") -> NormalizedBatch:
        """Log records are low-volume GenAI events: stored whole (JSON) and joined by trace/span id."""
        rows, evals, keys = [], [], []
        reasons: Counter = Counter()
        received = 0
        first_error = ""
        for rl in request.resource_logs:
            res_json = attributes_to_json(rl.resource.attributes)
            service = next((kv.value.string_value for kv in rl.resource.attributes if kv.key == "service.name"), None)
            for sl in rl.scope_logs:
                for rec in sl.log_records:
                    received += 1
                    tid, sid = rec.trace_id, rec.span_id
                    bad = log_rejection(tid, sid, log_time(rec))
                    if bad:
                        reasons[bad] += 1
                        first_error = first_error or log_rejection_text(received - 1, bad)
                        continue
                    tid_h = tid.hex() if tid and tid != ZERO_TRACE else None
                    sid_h = sid.hex() if sid and sid != ZERO_SPAN else None
                    event_name = getattr(rec, "event_name", "") or next(
                        (kv.value.string_value for kv in rec.attributes if kv.key == "event.name"), "") or None
                    if event_name == A.EVAL_EVENT_NAME:
                        row = self._event_eval({kv.key: raw_value(kv.value) for kv in rec.attributes}, tid_h, sid_h,
                                               "log")
                        if row:
                            evals.append(row)
                    body = to_python(rec.body) if rec.HasField("body") else None
                    keys.append(f"{tid_h}{sid_h}{received}")
                    rows.append((tid_h, sid_h, log_time(rec), event_name,
                                 rec.severity_text or None, service,
                                 json.dumps(body, ensure_ascii=False) if body is not None else None,
                                 attributes_to_json(rec.attributes), res_json))
        rejected = received - len(rows)
        message = log_message(rejected, received, first_error)
        return NormalizedBatch(
            signal="logs", spans=None,
            evals=_to_batch(evals, schema.EVAL_SCHEMA) if evals else None,
            logs=_to_batch(rows, schema.LOG_SCHEMA) if rows else None,
            keys=keys, received=received, rejected=rejected, reasons=reasons, message=message, payload=payload,
        )


_UNSEEN = object()
_KINDS_ARROW = pa.array(_KINDS + (None,), pa.string())     # the last entry: any value OTLP does not define
_STATUS_ARROW = pa.array(_STATUS + (None,), pa.string())


def _id_columns(rec: np.ndarray) -> tuple[dict[str, pa.Array], np.ndarray]:
    """The ids' storage columns (schema.ID_COLUMNS: big-endian 64-bit integers; no parent -> null)
    and the spans' dedup keys (``span_keys``)."""
    trace = np.ascontiguousarray(rec["trace_id"]).view(">u8").astype(np.uint64)
    span = np.ascontiguousarray(rec["span_id"]).view(">u8")[:, 0].astype(np.uint64)
    parent = np.ascontiguousarray(rec["parent_span_id"]).view(">u8")[:, 0].astype(np.uint64)
    present = parent != 0
    columns = {"trace_id_hi": pa.array(trace[:, 0]), "trace_id_lo": pa.array(trace[:, 1]), "span_id_int": pa.array(span),
               "parent_span_id_int": pa.array(parent, mask=None if present.all() else ~present)}
    return columns, span_keys(trace[:, 0], trace[:, 1], span)


_MIX1, _MIX2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_SALT = np.uint64(0x9E3779B97F4A7C15)
_S33 = np.uint64(33)


def _fmix64(k: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer: a bijection in which every input bit flips about half the
    output bits (numpy's uint64 arithmetic wraps, as the hash wants)."""
    k = k ^ (k >> _S33)
    k *= _MIX1
    k ^= k >> _S33
    k *= _MIX2
    k ^= k >> _S33
    return k


def span_keys(trace_hi: np.ndarray, trace_lo: np.ndarray, span: np.ndarray) -> np.ndarray:
    """64-bit keys of span identities, for the store's memory of recent spans: a pre-filter only.

    Equal identities give equal keys; distinct ones almost always differ, whatever the ids' shape.
    Not a fold like span ^ hi ^ lo, which real id schemes defeat: Zipkin/B3 roots (hi = 0,
    span = lo), sequential ids (trace ...01 with span ...01), or one counter XORed into both ids
    all fold to one value. A key match is confirmed on the whole 24-byte identity before a span
    is dropped (store.writer). The writer computes the same from stored columns after a restart.
    """
    h = _fmix64(np.asarray(trace_hi, dtype=np.uint64) + _SALT)
    h = _fmix64(h ^ np.asarray(trace_lo, dtype=np.uint64))
    return _fmix64(h ^ np.asarray(span, dtype=np.uint64))


def _enum_array(names: pa.Array, codes: np.ndarray) -> pa.Array:
    """Enum codes -> their names; a code past the known ones -> null (the last entry of ``names``)."""
    return names.take(np.minimum(codes, len(names) - 1))


# The two below first ask one C-speed question of the whole column (filter(None, ...) drops the Nones,
# and the zeros, which change neither answer); np.array of a list holding None cost ~3 us a span.
def _null_nonfinite(col: list | None) -> None:
    """NaN and +-inf in a float column -> None. A sum is NaN or infinite if any term is (or if finite
    terms overflow: then the loop finds nothing to change)."""
    if col is None or math.isfinite(sum(filter(None, col))):
        return
    for i, v in enumerate(col):
        if v is not None and not math.isfinite(v):
            col[i] = None


def _null_negative(col: list | None) -> None:
    """Values below 0 in an integer column -> None."""
    if col is None or min(filter(None, col), default=0) >= 0:
        return
    for i, v in enumerate(col):
        if v is not None and v < 0:
            col[i] = None


def _int64(values: np.ndarray) -> pa.Array:
    return pa.array(np.ascontiguousarray(values).view(np.int64))


def _int32(values: np.ndarray) -> pa.Array:
    return pa.array(np.ascontiguousarray(values))


class _HexList:
    """``ids[i]`` as hex text on demand, from an (n, width) uint8 array."""
    __slots__ = ("ids",)

    def __init__(self, ids: np.ndarray):
        self.ids = ids

    def __getitem__(self, i: int) -> str:
        return self.ids[i].tobytes().hex()


def _converter(kind: str):
    """A fast per-value converter: the common case (already the right type) costs one type check."""
    exact = {A.INT: int, A.FLOAT: float, A.STR: str, A.BOOL: bool}.get(kind)
    if exact is None:
        return lambda v: typed(v, kind)
    return lambda v: v if type(v) is exact else typed(v, kind)


# Answers of the converters below for str values (a few distinct ones in practice); the column
# merge looks them up before calling the converter. Bounded: the values are client-controlled.
_KIND_CACHE: dict = {}
_FINISH_CACHE: dict = {}
_CACHES = {"span_kind": _KIND_CACHE, "finish_reason": _FINISH_CACHE}
_CACHE_MAX = 1024


def _remembered(cache: dict):
    """A converter that keeps its answers in ``cache`` (and reads them from it): for str values, and
    for arrays under their tuple (``gen_ai.response.finish_reasons`` is an array of strings, a new
    list object on every span: converting each cost ~11 % of normalizing the benchmark's traffic)."""
    def wrap(convert):
        @functools.wraps(convert)
        def converter(raw):
            t = type(raw)
            key = raw if t is str else tuple(raw) if t is list else None
            if key is not None:
                try:
                    hit = cache.get(key)
                except TypeError:          # an array holding arrays or maps: not hashable
                    key = hit = None
                if hit is not None:
                    return hit
            out = convert(raw)
            if out is not None and key is not None and len(cache) < _CACHE_MAX:
                cache[key] = out
            return out
        return converter
    return wrap


@_remembered(_KIND_CACHE)
def _span_kind(raw) -> str | None:
    v = typed(raw, A.STR)
    return A.SPAN_KIND_VALUES.get(v.strip().lower(), v.upper()) if v else None


@_remembered(_FINISH_CACHE)
def _finish_text(raw) -> str | None:
    """Finish reasons (an array, a JSON array string or one string) as the stored comma-joined text;
    None for none, so the next alias key is tried."""
    reasons = typed(raw, A.STRS)
    return ",".join(reasons) if reasons else None


def _meta_lookup(meta: dict | None, concept: str, cohort_keys: Mapping[str, tuple[str, ...]],
                 meta_keys: frozenset | None = None) -> Any:
    """A trace concept inside a ``metadata`` JSON object: by attribute key, nested path, or bare label.

    ``meta_keys`` (every top-level key any lookup could use) lets an object with none of them and
    no nested object be skipped at once, which is the common case.
    """
    if not meta:
        return None
    if meta_keys is not None and meta_keys.isdisjoint(meta) and not any(type(v) is dict for v in meta.values()):
        return None
    for key in cohort_keys.get(concept) or A.SPAN_ALIASES.get(concept, ()):
        if key in meta:
            return meta[key]
        node: Any = meta
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            return node
    if concept.startswith("cohort:") and concept[7:] in meta:
        return meta[concept[7:]]
    return None


_MODEL_KEY = re.compile(r'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')


@functools.lru_cache(maxsize=1024)      # an instrumentation sends the same few parameter strings
def _param_model(text: str) -> str | None:
    """``model`` of a parameters JSON string (OpenInference, traceAI), without parsing the rest.

    These objects are flat (model, temperature, stream, ...), so the first ``"model": "..."`` is it;
    a string with escapes is decoded properly.
    """
    m = _MODEL_KEY.search(text)
    if m is None:
        return None
    raw = m.group(1)
    if "\\" not in raw:
        return raw
    try:
        return clean_text(json.loads(f'"{raw}"'))
    except ValueError:
        return None


def _loads_obj(text) -> dict | None:
    if not text or not isinstance(text, str) or text[:1] != "{":
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _to_batch(rows: list[tuple], sch: pa.Schema) -> pa.RecordBatch:
    columns = list(zip(*rows))
    return pa.RecordBatch.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, sch)], schema=sch)
