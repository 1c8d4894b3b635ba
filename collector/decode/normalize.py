"""Pure: an OTLP request -> NormalizedBatch (columns for the store). No I/O, no clock.

Invalid spans (wrong-length or all-zero ids, end before start) are rejected with a reason
and a message; the rest of the request is kept (OTLP partial success).

The loop below is the ingest hot path: one pass over each span's attributes, looking up
only the keys the alias table knows; the bulky attributes are not converted here at all
(the raw payload is stored and decoded to JSON on read).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow as pa

from .. import schema
from ..config import EvalConfig
from . import aliases as A
from .anyvalue import attributes_to_json, to_python, typed

_KINDS = ("UNSPECIFIED", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
_STATUS = ("UNSET", "OK", "ERROR")
_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)


@dataclass
class NormalizedBatch:
    """What decode hands to the store. ``keys`` (trace_id+span_id) align with ``spans`` rows."""
    signal: str                       # "traces" | "logs"
    spans: pa.RecordBatch | None
    evals: pa.RecordBatch | None
    logs: pa.RecordBatch | None
    keys: list[str]
    received: int                     # spans or log records in the request
    rejected: int
    reasons: Counter = field(default_factory=Counter)
    message: str = ""
    payload: bytes = b""              # the request as protobuf bytes (the bulky part's home)

    @property
    def accepted(self) -> int:
        return len(self.keys)


class Normalizer:
    """Turns ExportTraceServiceRequest / ExportLogsServiceRequest into store columns."""

    def __init__(self, cohort_labels: Mapping[str, tuple[str, ...]], evals: EvalConfig):
        self.cohort_labels = tuple(cohort_labels)
        extra = {f"cohort:{name}": tuple(keys) for name, keys in cohort_labels.items()}
        self._index = A.key_index(extra)
        self._types = dict(A.CONCEPT_TYPES, **{c: A.STR for c in extra})
        self._cohort_concepts = tuple(extra)
        self._cohort_keys = {c: keys for c, keys in extra.items()}
        self._evals = evals
        self._schema = schema.span_schema(self.cohort_labels)
        # Trace-level concepts inherit from the resource, then the metadata JSON.
        self._inherit = A.TRACE_CONCEPTS + self._cohort_concepts

    # -- shared pieces ---------------------------------------------------------------------
    def _scan(self, attrs) -> dict[str, Any]:
        """One pass over attributes: concept -> typed value (first alias key wins)."""
        index_get = self._index.get
        best: dict[str, tuple[int, Any]] = {}
        evals_oi = None
        for kv in attrs:
            hits = index_get(kv.key)
            if hits is None:
                if kv.key.startswith(A.OPENINFERENCE_EVAL_PREFIX):
                    evals_oi = evals_oi or []
                    evals_oi.append(kv)
                continue
            for concept, prio in hits:
                cur = best.get(concept)
                if cur is None or prio < cur[0]:
                    best[concept] = (prio, kv.value)
        types = self._types
        out = {}
        for concept, (_, av) in best.items():
            value = typed(av, types[concept])
            if value is not None:
                out[concept] = value
        if evals_oi:
            out["_evals_oi"] = evals_oi
        return out

    def _from_metadata(self, found: dict, concept: str) -> Any:
        meta = found.get("_metadata_obj")
        if meta is None:
            text = found.get("json_metadata")
            meta = _loads_obj(text) if text else {}
            found["_metadata_obj"] = meta
        if not meta:
            return None
        keys = self._cohort_keys.get(concept) or A.SPAN_ALIASES.get(concept, ())
        for key in keys:
            if key in meta:
                return meta[key]
            # nested form {"shadow": {"route": ...}} and the bare label name {"intent": ...}
            node: Any = meta
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                return node
        if concept.startswith("cohort:") and concept[7:] in meta:
            return meta[concept[7:]]
        return None

    def _eval_row(self, trace_id, span_id, name, score, label, passed, explanation, source):
        ok = self._evals.passed(name, passed, label, score)
        return (trace_id, span_id, name, score, label, ok, explanation, source)

    # -- traces ----------------------------------------------------------------------------
    def normalize_traces(self, request, payload: bytes = b"") -> NormalizedBatch:
        rows: list[tuple] = []
        keys: list[str] = []
        evals: list[tuple] = []
        reasons: Counter = Counter()
        first_error = ""
        received = 0
        inherit = self._inherit
        cohort_concepts = self._cohort_concepts
        scan = self._scan
        for rs_idx, rs in enumerate(request.resource_spans):
            res = scan(rs.resource.attributes)
            service = res.get("service_name")
            for ss_idx, ss in enumerate(rs.scope_spans):
                scope = ss.scope.name or None
                traceai = bool(scope) and scope.startswith("traceai")
                for sp_idx, span in enumerate(ss.spans):
                    received += 1
                    tid, sid, pid = span.trace_id, span.span_id, span.parent_span_id
                    start, end = span.start_time_unix_nano, span.end_time_unix_nano
                    bad = None
                    if len(tid) != 16 or tid == _ZERO_TRACE:
                        bad = "invalid_trace_id"
                    elif len(sid) != 8 or sid == _ZERO_SPAN:
                        bad = "invalid_span_id"
                    elif pid and (len(pid) != 8 or pid == _ZERO_SPAN):
                        bad = "invalid_parent_span_id"
                    elif end < start:
                        bad = "end_before_start"
                    if bad:
                        reasons[bad] += 1
                        if not first_error:
                            first_error = (f"span {received - 1} (name {span.name!r}) rejected: {bad.replace('_', ' ')}"
                                           f" (trace_id {tid.hex() or 'empty'}, span_id {sid.hex() or 'empty'})")
                        continue
                    f = scan(span.attributes)
                    for concept in inherit:
                        if concept not in f:
                            v = res.get(concept)
                            if v is None and ("json_metadata" in f or "json_metadata" in res):
                                v = self._from_metadata(f, concept)
                                if v is None:
                                    v = self._from_metadata(res, concept)
                            if v is not None:
                                f[concept] = str(v)
                    model = f.get("model")
                    request_model = f.get("request_model")
                    if traceai or model is None or request_model is None:
                        params = _loads_obj(f.get("json_params"))
                        pm = params.get("model") if params else None
                        if isinstance(pm, str):
                            if traceai or request_model is None:
                                request_model = pm   # traceAI puts the response model in gen_ai.request.model
                            if model is None:
                                model = pm
                    kind_v = f.get("span_kind")
                    span_kind = A.SPAN_KIND_VALUES.get(kind_v.strip().lower(), kind_v.upper()) if kind_v else None
                    finish = f.get("finish_reason")
                    refused = f.get("refused")
                    if finish and A.REFUSAL_FINISH_REASONS.intersection(finish):
                        refused = True
                    tid_h, sid_h = tid.hex(), sid.hex()
                    # evals carried by this span
                    span_evals = None
                    if "eval_name" in f:
                        span_evals = [self._eval_row(tid_h, sid_h, f["eval_name"], f.get("eval_score"),
                                                     f.get("eval_label"), f.get("eval_passed"),
                                                     f.get("eval_explanation"), "span_attribute")]
                    if "_evals_oi" in f:
                        span_evals = (span_evals or []) + self._openinference_evals(f["_evals_oi"], tid_h, sid_h)
                    if span.events:
                        for ev in span.events:
                            if ev.name == A.EVAL_EVENT_NAME:
                                row = self._event_eval(ev.attributes, tid_h, sid_h, "span_event")
                                if row:
                                    span_evals = (span_evals or []) + [row]
                    if span_evals:
                        evals.extend(span_evals)
                        if any(e[2] == "refusal" and e[5] is False for e in span_evals):
                            refused = True
                    keys.append(tid_h + sid_h)
                    rows.append((
                        tid_h, sid_h, pid.hex() if pid else None, span.name, _KINDS[span.kind] if span.kind < 6 else None,
                        span_kind, f.get("service_name") or service, scope, start, end,
                        _STATUS[span.status.code] if span.status.code < 3 else None, span.status.message or None,
                        f.get("route"), f.get("request_id"), f.get("session_id"), f.get("step"), model, request_model,
                        f.get("input_tokens"), f.get("output_tokens"), f.get("cache_read_tokens"),
                        f.get("cache_write_tokens"), f.get("reasoning_tokens"), f.get("reported_cost_usd"),
                        ",".join(finish) if finish else None, refused, f.get("escalated"),
                        rs_idx, ss_idx, sp_idx,
                        *[f.get(c) for c in cohort_concepts],
                    ))
        rejected = received - len(rows)
        message = ""
        if rejected:
            summary = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(reasons.items()))
            message = f"{rejected} of {received} spans rejected ({summary}); first: {first_error}"
        return NormalizedBatch(
            signal="traces",
            spans=_to_batch(rows, self._schema) if rows else None,
            evals=_to_batch(evals, schema.EVAL_SCHEMA) if evals else None,
            logs=None, keys=keys, received=received, rejected=rejected, reasons=reasons,
            message=message, payload=payload,
        )

    def _openinference_evals(self, kvs, tid_h, sid_h) -> list[tuple]:
        # evaluations.N.evaluation.{name,score,label,explanation}
        by_n: dict[str, dict[str, Any]] = {}
        for kv in kvs:
            parts = kv.key.split(".")
            if len(parts) >= 4 and parts[2] == "evaluation":
                by_n.setdefault(parts[1], {})[parts[3]] = kv.value
        out = []
        for _, d in sorted(by_n.items()):
            name = typed(d["name"], A.STR) if "name" in d else None
            if not name:
                continue
            out.append(self._eval_row(
                tid_h, sid_h, name,
                typed(d["score"], A.FLOAT) if "score" in d else None,
                typed(d["label"], A.STR) if "label" in d else None, None,
                typed(d["explanation"], A.STR) if "explanation" in d else None, "openinference"))
        return out

    def _event_eval(self, attrs, tid_h, sid_h, source) -> tuple | None:
        d = {kv.key: kv.value for kv in attrs}
        k = A.EVAL_EVENT_KEYS
        name = typed(d[k["name"]], A.STR) if k["name"] in d else None
        if not name:
            return None
        return self._eval_row(
            tid_h, sid_h, name,
            typed(d[k["score"]], A.FLOAT) if k["score"] in d else None,
            typed(d[k["label"]], A.STR) if k["label"] in d else None, None,
            typed(d[k["explanation"]], A.STR) if k["explanation"] in d else None, source)

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
                    bad = None
                    if tid and len(tid) != 16:
                        bad = "invalid_trace_id"
                    elif sid and len(sid) != 8:
                        bad = "invalid_span_id"
                    if bad:
                        reasons[bad] += 1
                        first_error = first_error or f"log record {received - 1} rejected: {bad.replace('_', ' ')}"
                        continue
                    tid_h = tid.hex() if tid and tid != _ZERO_TRACE else None
                    sid_h = sid.hex() if sid and sid != _ZERO_SPAN else None
                    event_name = getattr(rec, "event_name", "") or next(
                        (kv.value.string_value for kv in rec.attributes if kv.key == "event.name"), "") or None
                    if event_name == A.EVAL_EVENT_NAME:
                        row = self._event_eval(rec.attributes, tid_h, sid_h, "log")
                        if row:
                            evals.append(row)
                    body = to_python(rec.body) if rec.HasField("body") else None
                    keys.append(f"{tid_h}{sid_h}{received}")
                    rows.append((tid_h, sid_h, rec.time_unix_nano or rec.observed_time_unix_nano, event_name,
                                 rec.severity_text or None, service,
                                 json.dumps(body, ensure_ascii=False) if body is not None else None,
                                 attributes_to_json(rec.attributes), res_json))
        rejected = received - len(rows)
        message = f"{rejected} of {received} log records rejected; first: {first_error}" if rejected else ""
        return NormalizedBatch(
            signal="logs", spans=None,
            evals=_to_batch(evals, schema.EVAL_SCHEMA) if evals else None,
            logs=_to_batch(rows, schema.LOG_SCHEMA) if rows else None,
            keys=keys, received=received, rejected=rejected, reasons=reasons, message=message, payload=payload,
        )


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
