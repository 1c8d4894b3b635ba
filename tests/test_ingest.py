"""Ingest's processes and their messages: an acknowledged record is never dropped silently."""
from __future__ import annotations

import os
import pickle
import random
import signal
from pathlib import Path

import pytest
from harness import wait_for
from otlp_builders import random_spans, span_request
from pipeline import Pipeline

from shadowlens.collector.ingest import messages as m
from shadowlens.collector.store.database import SEGMENTS_DIR
from shadowlens.collector.store.segments import read_frames, segment_path


@pytest.mark.parametrize("msg", [m.Ack(3), m.Nack(4, "set aside in /x"), m.Barrier(7), m.Stop(), m.Ready(),
                                 m.Failed("address in use"), m.Counters({"spans_received": {"grpc": 5}}), m.Stopped(),
                                 m.Record(1, 2, 3, 4, "traces", 2), m.Undecodable(1, (2, 3, 4), "logs", 2, "ValueError")])
def test_every_message_crosses_a_pipe_unchanged_as_its_class_and_fields(msg):
    cls, values = msg.__reduce__()
    assert cls is type(msg) and values == tuple(getattr(msg, f) for f in msg.__slots__)
    assert pickle.loads(pickle.dumps(msg)) == msg


def test_an_acknowledged_record_the_decoder_cannot_decode_is_set_aside_counted_and_named(tmp_path):
    """The rule (shadowlens.collector.ingest): the payload's bytes change on disk after the acknowledgement
    (as a failing disk would); the decoder cannot decode them. The record is not lost silently: its bytes
    are kept in the quarantine, a row says where and why, the counter counts it, and the frontend's queue
    lets go of it. Ingest goes on, and a restart neither fails on it nor counts it again."""
    rng = random.Random(17)
    requests = [span_request(random_spans(5, rng)).SerializeToString() for _ in range(3)]
    with Pipeline(tmp_path) as p:
        p.export(requests[0])
        p.sync()
        decoder = p.ingest.pid("decoder")
        os.kill(decoder, signal.SIGSTOP)           # the record waits in the decoder's pipe
        try:
            p.export(requests[1])                  # acknowledged: durable in the payload log
            seg = p.store.first_segment
            off = next(off for off, _, payload in read_frames(tmp_path / SEGMENTS_DIR, seg) if payload == requests[1])
            garbage = b"\xff" * len(requests[1])
            fd = os.open(segment_path(tmp_path / SEGMENTS_DIR, seg), os.O_WRONLY)
            try:
                os.pwrite(fd, garbage, off)
            finally:
                os.close(fd)
        finally:
            os.kill(decoder, signal.SIGCONT)
        p.export(requests[2])
        p.sync()
        rows = p.query("select segment, byte_offset, stage, reason, file from quarantine")
        assert [r[:3] for r in rows] == [(seg, off, "decode")]
        assert "malformed protobuf" in rows[0][3]
        assert Path(rows[0][4]).read_bytes() == garbage
        assert p.stats.records_quarantined == {"decode": 1}
        assert p.query("select count(*) from spans_core") == [(10,)]
        wait_for(lambda: p.child_counters.get("ingest_queue_spans") == 0, 10, what="the frontend's queue emptied",
                 detail=lambda: str(p.child_counters.get("ingest_queue_spans")))
    with Pipeline(tmp_path) as p:
        assert p.query("select count(*) from quarantine") == [(1,)]
        assert p.query("select count(*) from spans_core") == [(10,)]
        assert p.stats.records_quarantined == {}
