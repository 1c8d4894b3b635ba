"""Restart recovery: records in the segment log (the write-ahead log) that DuckDB never got.

``serve`` acknowledges an Export once its payload is fdatasynced in a segment and inserts the
columns into DuckDB a little later. After ``kill -9`` or a power cut in between, those records are
only in the segments: this walks every segment from the store's replay segment (the newest row of
``shadowlens_replay_from``) on, decodes each record no ``payloads`` row points at, and inserts it
like a new request (deduplicated, so a record the client also retried is stored once). A record that
fails to decode or to insert is set aside, counted and logged (the rule:
``shadowlens.collector.ingest``), never a reason for ``serve`` not to start; so are bytes between
records that do not frame as one (``stage="read"``), since a record damaged on disk after its
acknowledgement looks like that.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

from .segments import FRAME, list_segments, read_frames

log = logging.getLogger("shadowlens.replay")

GROUP_SPANS = 65536
UNREADABLE = ("bytes in the payload log that do not frame as a record: a write refused on a full disk (never"
              " acknowledged), or a record damaged on disk after it was acknowledged")


def replay(writer, segments_dir: Path, from_segment: int, before_segment: int) -> tuple[int, int]:
    """Insert the missing records of segments ``from_segment`` .. ``before_segment - 1``.

    ``writer``: an open StoreWriter whose writer thread has not started. Returns (records, spans).
    """
    segments = [s for s in list_segments(segments_dir) if from_segment <= s < before_segment]
    if not segments:
        return 0, 0
    normalizer = writer.replay_normalizer
    if normalizer is None:     # tools and tests: the default alias keys of the store's cohort columns
        from ..decode.normalize import Normalizer
        from ..settings import default_evals
        normalizer = Normalizer({name: (f"cohort.{name}",) for name in writer.cohort_labels}, default_evals())
    t0 = time.monotonic()
    records = spans = 0
    group: list = []
    group_spans = 0

    def flush() -> None:
        nonlocal group, group_spans
        if group:
            writer.commit_replayed(group)
            group, group_spans = [], 0

    for seg in segments:
        done = {r[0] for r in writer.con.execute(
            "SELECT byte_offset FROM payloads WHERE segment = ?", [seg]).fetchall()}
        done |= writer.quarantine.offsets(writer.con, seg)
        def keep_unreadable(offset: int, data: bytes, seg: int = seg, done: set = done) -> None:
            # Kept once: the quarantine row marks it for the next start. A record already set aside or
            # stored (its payload starts one frame header in) is not kept again.
            if offset not in done and offset + FRAME.size not in done:
                writer.quarantine.set_aside(writer.con, (seg, offset, len(data)), "unknown", "read", UNREADABLE, data)

        for offset, signal, payload in read_frames(segments_dir, seg, on_skip=keep_unreadable):
            if offset in done:
                continue
            try:
                if signal == "traces":
                    batch = normalizer.normalize_traces(payload)
                else:
                    batch = normalizer.normalize_logs(ExportLogsServiceRequest.FromString(payload), payload)
            except Exception as exc:  # acknowledged, yet it does not decode: set it aside, go on
                writer.quarantine.set_aside(writer.con, (seg, offset, len(payload)), signal, "decode", exc, payload)
                continue
            if not batch.accepted and batch.logs is None:
                continue
            group.append((batch, (seg, offset, len(payload))))
            group_spans += batch.accepted
            records += 1
            spans += batch.accepted
            if group_spans >= GROUP_SPANS:
                flush()
    flush()
    if records:
        log.info("replayed %d records (%d spans) from the segment log into DuckDB in %.1f s",
                 records, spans, time.monotonic() - t0)
    return records, spans

