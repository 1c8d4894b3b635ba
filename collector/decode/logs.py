"""ExportLogsServiceRequest -> NormalizedBatch: log records stored whole, with the evals their events carry."""
from __future__ import annotations

import json
from collections import Counter
from typing import Callable

from .. import schema
from . import aliases as A
from .anyvalue import attributes_to_json, raw_value, to_python
from .batch import NormalizedBatch, rows_to_batch
from .check import log_message, log_rejection, log_rejection_text, log_time
from .scan import ZERO_SPAN, ZERO_TRACE


def normalize_logs(request, payload: bytes, event_eval: Callable[[dict, str | None, str | None, str], tuple | None]
                   ) -> NormalizedBatch:
    """Log records are low-volume GenAI events: stored whole (JSON) and joined by trace/span id.

    ``event_eval(attributes, trace_id_hex, span_id_hex, source)``: the eval row an eval event carries, or None."""
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
                    row = event_eval({kv.key: raw_value(kv.value) for kv in rec.attributes}, tid_h, sid_h, "log")
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
        evals=rows_to_batch(evals, schema.EVAL_SCHEMA) if evals else None,
        logs=rows_to_batch(rows, schema.LOG_SCHEMA) if rows else None,
        keys=keys, received=received, rejected=rejected, reasons=reasons, message=message, payload=payload,
    )
