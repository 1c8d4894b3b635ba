"""Ingest's processes and their messages: an acknowledged record is never dropped silently."""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from harness import wait_for
from otlp_builders import random_spans, span_request
from pipeline import Pipeline

from shadowlens.collector.ingest import messages as m
from shadowlens.collector.ingest.supervisor import DecodePolicy
from shadowlens.collector.store.database import SEGMENTS_DIR
from shadowlens.collector.store.segments import read_frames, segment_path


@pytest.mark.parametrize("msg", [m.Ack(3), m.Nack(4, "set aside in /x"), m.Barrier(7), m.Stop(), m.Ready(),
                                 m.Failed("address in use"), m.Counters({"spans_received": {"grpc": 5}}), m.Stopped(),
                                 m.Record(1, 2, 3, 4, "traces", 2), m.Undecodable(1, (2, 3, 4), "logs", 2, "ValueError")])
def test_every_message_crosses_a_pipe_unchanged_as_its_class_and_fields(msg):
    cls, values = msg.__reduce__()
    assert cls is type(msg) and values == tuple(getattr(msg, f) for f in msg.__slots__)
    assert pickle.loads(pickle.dumps(msg)) == msg


@contextlib.contextmanager
def decoding_held(p: Pipeline, monkeypatch):
    """Records wait before they are decoded until the block ends: the decoder process stopped
    (SIGSTOP), or serve's own decoding held before it reads the payload."""
    decoder = p.ingest.pid("decoder")
    if decoder is not None:
        os.kill(decoder, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(decoder, signal.SIGCONT)
        return
    from shadowlens.collector.ingest.decoder import RecordDecoder
    go = threading.Event()
    decode = RecordDecoder.__call__
    monkeypatch.setattr(RecordDecoder, "__call__", lambda self, rec: go.wait(30) and decode(self, rec))
    try:
        yield
    finally:
        go.set()


@pytest.mark.parametrize("decoder_process", ["always", "never"])
def test_an_acknowledged_record_the_decoder_cannot_decode_is_set_aside_counted_and_named(tmp_path, decoder_process,
                                                                                          monkeypatch):
    """The rule (shadowlens.collector.ingest): the payload's bytes change on disk after the acknowledgement
    (as a failing disk would); the decoder cannot decode them. The record is not lost silently: its bytes
    are kept in the quarantine, a row says where and why, the counter counts it, and the frontend's queue
    lets go of it. Ingest goes on, and a restart neither fails on it nor counts it again. So whether the
    decoder process decodes or serve's own process does."""
    rng = random.Random(17)
    requests = [span_request(random_spans(5, rng)).SerializeToString() for _ in range(3)]
    with Pipeline(tmp_path, decoder_process=decoder_process) as p:
        p.export(requests[0])
        p.sync()
        assert (p.ingest.pid("decoder") is None) == (decoder_process == "never")
        with decoding_held(p, monkeypatch):       # the record waits to be decoded
            p.export(requests[1])                  # acknowledged: durable in the payload log
            seg = p.store.first_segment
            off = next(off for off, _, payload in read_frames(tmp_path / SEGMENTS_DIR, seg) if payload == requests[1])
            garbage = b"\xff" * len(requests[1])
            fd = os.open(segment_path(tmp_path / SEGMENTS_DIR, seg), os.O_WRONLY)
            try:
                os.pwrite(fd, garbage, off)
            finally:
                os.close(fd)
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


def _unpriced_request(seed: int) -> tuple[bytes, int]:
    """A request whose chat spans name a model no price table knows, and how many chat spans it has."""
    spans = random_spans(12, random.Random(seed))
    for sp in spans:
        if "gen_ai.request.model" in sp["attrs"]:
            sp["attrs"]["gen_ai.request.model"] = "house-model-1"
    return span_request(spans).SerializeToString(), sum("gen_ai.request.model" in sp["attrs"] for sp in spans)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_auto_decodes_here_starts_the_decoder_process_under_load_and_stops_it_once_quiet(tmp_path):
    """receivers.decoder_process: auto. Records are decoded in serve's own process until decoding takes more
    of a core than the policy allows; then the decoder process starts and takes the next records; once its
    load would be small here again for long enough, it stops and decoding comes back. Every record is
    stored once, read-your-acks holds across each switch, and what the decoders counted is summed."""
    policy = DecodePolicy(start_busy=1e-9, stop_busy=10.0, window_s=0.2, stop_after_s=3.0)
    requests = [_unpriced_request(seed) for seed in range(4)]
    with Pipeline(tmp_path, policy=policy) as p:
        p.export(requests[0][0])                          # decoded here: nothing has started the process yet
        p.sync()
        time.sleep(policy.window_s * 1.5)
        p.export(requests[1][0])                          # by now a window has passed: its decoding starts it
        wait_for(lambda: p.ingest.pid("decoder") is not None, 10, what="the decoder process started")
        child = p.ingest.pid("decoder")
        p.export(requests[2][0])                          # passed to it
        p.sync()
        assert p.query("select count(*) from spans_core") == [(36,)]
        assert p.ingest.records_passed >= 1
        wait_for(lambda: p.ingest.pid("decoder") is None, 15, what="the decoder process stopped")
        wait_for(lambda: not _alive(child), 10, what=f"pid {child} exited")
        passed = p.ingest.records_passed
        p.export(requests[3][0])                          # decoded here again
        p.sync()
        assert p.ingest.records_passed == passed
        assert p.query("select count(*) from spans_core") == [(48,)]
        assert p.child_counters["unpriced_spans"] == {"house-model-1": sum(n for _, n in requests)}


def test_auto_keeps_decoding_here_while_decoding_takes_less_than_the_policys_share(tmp_path):
    """The decoder process is for load: with decoding under ``start_busy`` of a core (here no rate could
    reach 10 cores), records across several windows are decoded in serve's process."""
    policy = DecodePolicy(start_busy=10.0, window_s=0.1)
    with Pipeline(tmp_path, policy=policy) as p:
        for seed in range(4):
            p.export(_unpriced_request(seed)[0])
            time.sleep(policy.window_s)
        p.sync()
        assert p.ingest.pid("decoder") is None and p.ingest.records_passed == 0
        assert p.query("select count(*) from spans_core") == [(48,)]


def test_a_decoder_process_that_auto_started_and_died_is_reported_as_a_dead_child(tmp_path):
    """Fail fast holds for a decoder process started on demand too: records passed to it are acknowledged
    and not yet stored, so the supervisor tells serve (which exits for its supervisor to restart it)."""
    policy = DecodePolicy(start_busy=1e-9, window_s=0.1)
    with Pipeline(tmp_path, policy=policy) as p:
        died = threading.Event()
        p.ingest.on_child_exit = died.set
        p.export(_unpriced_request(0)[0])
        time.sleep(policy.window_s * 2)
        p.export(_unpriced_request(1)[0])
        wait_for(lambda: p.ingest.pid("decoder") is not None, 10, what="the decoder process started")
        assert not died.is_set()
        os.kill(p.ingest.pid("decoder"), signal.SIGKILL)
        assert died.wait(10)
