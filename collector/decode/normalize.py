"""Pure: an OTLP request -> NormalizedBatch (columns for the store). No I/O, no clock.

Invalid spans (wrong-length or all-zero ids, end before start) are rejected with a reason
and a message; the rest of the request is kept (OTLP partial success).

``normalize_traces`` is the ingest hot path. A scanner (C, with a pure-Python reference in
scan.py) hands over each span's header and only the attributes whose key the alias table
knows; the bulky attributes are never converted here (the raw payload is stored and
decoded to JSON on read). Each step below works on whole columns of one request; the
per-value helpers live in convert.py, the id columns and dedup keys in ids.py.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
from google.protobuf.message import DecodeError
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from .. import schema
from ..errors import PermanentError
from ..settings import EvalSettings
from . import aliases as A
from . import wire
from .anyvalue import clean_text, raw_value, typed
from .batch import NormalizedBatch, rows_to_batch
from .check import EVENT_NAMES, PREFIXES, Check, Checker, span_rejections
from .convert import (
    CACHES,
    converter,
    finish_text,
    loads_obj,
    meta_lookup,
    null_negative,
    null_nonfinite,
    param_model,
    span_kind,
)
from .ids import KINDS_ARROW, SPAN_RECORD, STATUS_ARROW, HexList, enum_array, id_columns, int32, int64, span_keys
from .litellm import GATEWAY, mark_litellm
from .logs import normalize_logs
from .scan import column_merger, scanner

# NormalizedBatch and span_keys are imported from here by the store and the tests.
__all__ = ["MAX_SHARED_TEXT", "NormalizedBatch", "Normalizer", "span_keys"]

# Values that repeat on every span of their resource or scope (resource attributes, scope names) are
# cut to this many characters before they are copied to each span: a 60 MB service.name on a resource
# of a million tiny spans would otherwise make a 60 TB column (a request is at most 64 MiB).
MAX_SHARED_TEXT = 200
# Token counts below zero are stored as NULL (they would make negative costs).
_TOKEN_CONCEPTS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
_UNSEEN = object()


class Normalizer:
    """Turns ExportTraceServiceRequest / ExportLogsServiceRequest into store columns."""

    def __init__(self, cohort_labels: Mapping[str, tuple[str, ...]], evals: EvalSettings, prices=None,
                 scanner_choice: str = "auto"):
        """``prices``: a ``decode.pricing.PriceTable``; without one, only reported costs are stored.
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
        self._converters = {c: converter(t) for c, t in self._types.items()}
        self._converters["span_kind"] = span_kind
        self._converters["finish_reason"] = finish_text
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

    def check_traces(self, payload: bytes) -> Check:
        """What a receiver must know before it acknowledges (see check.py)."""
        return self.checker.check_traces(payload)

    def check_logs(self, request) -> Check:
        return self.checker.check_logs(request)

    # -- traces ----------------------------------------------------------------------------
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
        cols = self._concept_columns(sc["slots"], n)
        scopes = sc["scope"]
        if any(len(t) > MAX_SHARED_TEXT for t in set(scopes) if t is not None):
            scopes = [t if t is None or len(t) <= MAX_SHARED_TEXT else t[:MAX_SHARED_TEXT] for t in scopes]
        mixed = 0
        if cols["silent_experiment"] is not None or not A.LITELLM_SCOPES.isdisjoint(scopes):
            # before inheritance: a silent call's own route beats its resource's (litellm.py)
            mixed = mark_litellm(cols, scopes, n)
        # Trace-level concepts: the span, else its resource, else the metadata JSON (CONTRACT §4).
        resources = [self._resource_values(r) for r in sc["resources"]]
        self._inherit_from_resources(cols, resources, rs_idx, n)
        self._inherit_from_metadata(cols, resources, rs_idx, n)
        self._models_from_params(cols, scopes, n)
        _refusals_from_finish(cols, n)
        cols["cost_usd"], unpriced = self._costs(cols, rec, n)
        hex_t, hex_s = HexList(rec["trace_id"]), HexList(rec["span_id"])   # the few eval rows need text
        evals = self._span_evals(sc, cols, hex_t, hex_s, n)
        _refusals_from_evals(cols, evals, n)
        # Validation last, as a mask: the invalid spans (found by the scanner) are dropped from every column at once.
        invalid = sc["invalid"]
        reasons, message = span_rejections(invalid, n)
        batch, keys, eval_rows = self._span_batch(sc, rec, scopes, cols, evals, invalid, n)
        return NormalizedBatch(
            signal="traces", spans=batch if batch.num_rows else None,
            evals=rows_to_batch(eval_rows, schema.EVAL_SCHEMA) if eval_rows else None,
            logs=None, keys=keys, received=n, rejected=len(invalid), reasons=reasons, message=message, payload=payload,
            unpriced=unpriced, mixed=Counter({GATEWAY: mixed}) if mixed else Counter())

    def _concept_columns(self, slots, n: int) -> dict[str, list | None]:
        """Every concept's column from the scanner's sparse per-key lists (None where no span has it;
        scan.python_merge_column: the first alias key whose value reads as the concept's type wins).
        Numbers DuckDB would store but no query can use: NaN/inf (a double attribute is taken as it
        came) and negative token counts become NULL. Out-of-range integers never get here (typed())."""
        merge, concept_slots, exact, converters = self._merge, self._concept_slots, self._exact, self._converters
        cols: dict[str, list | None] = {
            c: merge(n, [slots[s] for s in concept_slots[c]], exact[c], converters[c], CACHES.get(c))
            for c in self._concepts}
        for concept in self._float_concepts:
            null_nonfinite(cols[concept])
        for concept in _TOKEN_CONCEPTS:
            null_negative(cols[concept])
        return cols

    def _inherit_from_resources(self, cols: dict, resources: list[dict], rs_idx: list[int], n: int) -> None:
        """A span without a trace-level concept takes its resource's value."""
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

    def _inherit_from_metadata(self, cols: dict, resources: list[dict], rs_idx: list[int], n: int) -> None:
        """A span still without a trace-level concept takes it from its own metadata JSON, then its resource's."""
        meta = cols["json_metadata"]
        res_meta = [loads_obj(r.get("json_metadata")) for r in resources]
        if meta is None and not any(res_meta):
            return
        relevant = self._meta_relevant
        span_meta = {}
        if meta is not None:
            parsed: dict[str, dict | None] = {}     # spans of a request repeat their metadata
            for i, t in enumerate(meta):
                if t and type(t) is str:
                    obj = parsed.get(t, _UNSEEN)
                    if obj is _UNSEEN:
                        obj = parsed[t] = loads_obj(t) if relevant(t) else None
                    if obj is not None:
                        span_meta[i] = obj
        for concept in self._inherit:
            col = cols[concept]
            for i, obj in span_meta.items():           # the span's own metadata JSON
                if obj and (col is None or col[i] is None):
                    v = meta_lookup(obj, concept, self._cohort_keys, self._meta_keys)
                    if v is not None:
                        if col is None:
                            col = cols[concept] = [None] * n
                        col[i] = clean_text(str(v))
            for r, obj in enumerate(res_meta):          # then its resource's, once per resource
                v = meta_lookup(obj, concept, self._cohort_keys)
                if v is None:
                    continue
                v = clean_text(str(v))[:MAX_SHARED_TEXT]
                if col is None:
                    col = cols[concept] = [None] * n
                cols[concept] = col = [v if x is None and (len(res_meta) == 1 or ri == r) else x
                                       for x, ri in zip(col, rs_idx)]

    @staticmethod
    def _models_from_params(cols: dict, scopes: list, n: int) -> None:
        """traceAI writes the response model into gen_ai.request.model and keeps the requested one only in
        its parameters JSON (quirk 1); others may lack a model attribute: the parameters' model fills in."""
        model, request_model, params = cols["model"], cols["request_model"], cols["json_params"]
        if params is None:
            return
        for i, text in enumerate(params):
            if text is None:
                continue
            traceai = bool(scopes[i]) and scopes[i].startswith("traceai")
            if not traceai and model is not None and model[i] is not None and request_model is not None \
                    and request_model[i] is not None:
                continue
            pm = param_model(text)
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

    def _span_batch(self, sc, rec, scopes, cols, evals, invalid, n) -> tuple[pa.RecordBatch, Any, list[tuple]]:
        """The spans in the store's schema, their dedup keys and their eval rows, without the invalid spans."""
        id_cols, keys = id_columns(rec)
        columns = {
            **id_cols,
            "name": sc["name"], "kind": enum_array(KINDS_ARROW, rec["kind"]),
            "service_name": cols["service_name"], "scope_name": scopes,
            "start_ns": int64(rec["start"]), "end_ns": int64(rec["end"]),
            "status_code": enum_array(STATUS_ARROW, rec["status_code"]), "status_message": sc["status_message"],
            "rs_idx": int32(rec["rs_idx"]), "ss_idx": int32(rec["ss_idx"]), "sp_idx": int32(rec["sp_idx"]),
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
        return batch, keys, eval_rows

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
        """Log records are low-volume GenAI events: stored whole (JSON) and joined by trace/span id (logs.py)."""
        return normalize_logs(request, payload, self._event_eval)



def _refusals_from_finish(cols: dict, n: int) -> None:
    """A finish reason that names a refusal marks the span refused."""
    refused = cols["refused"]
    finish = cols["finish_reason"]      # already comma-joined (finish_text)
    if finish is None:
        return
    refusals = {t for t in set(finish) if t and not A.REFUSAL_FINISH_REASONS.isdisjoint(t.split(","))}
    if refusals:
        if refused is None:
            refused = cols["refused"] = [None] * n
        for i, text in enumerate(finish):
            if text in refusals:
                refused[i] = True


def _refusals_from_evals(cols: dict, evals: list[tuple[int, tuple]], n: int) -> None:
    """A failed ``refusal`` eval on a span marks the span refused."""
    refused = cols["refused"]
    for e_idx, row in evals:
        if row[2] == "refusal" and row[5] is False:
            if refused is None:
                refused = cols["refused"] = [None] * n
            refused[e_idx] = True
