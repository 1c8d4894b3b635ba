"""The frontend's admission: spans acknowledged but not yet committed are bounded; a full queue makes
an Export wait for room, and refuses it (UNAVAILABLE, with a retry delay) only when none comes."""
from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.errors import Overloaded, ShuttingDown
from shadowlens.collector.ingest import intake
from shadowlens.collector.ingest.intake import Intake
from shadowlens.collector.ingest.messages import Ack, Record
from shadowlens.collector.store.segments import SegmentLog, read_frames


@pytest.fixture
def frontend(tmp_path):
    to_store, store_end = multiprocessing.Pipe()
    to_decoder, decoder_end = multiprocessing.Pipe(duplex=False)
    log = SegmentLog(tmp_path, 1)
    stats = IngestCounters()
    rs = Intake(to_store, decoder_end, log, stats, queue_max_spans=10)
    yield rs, to_decoder, stats, tmp_path
    log.close()


def test_a_record_is_in_the_log_before_the_decoder_hears_of_it(frontend):
    rs, decoder_in, _, directory = frontend
    rs.persist(b"payload-bytes", "traces", 4)
    msg = decoder_in.recv()
    assert isinstance(msg, Record) and msg.signal == "traces"
    assert [(o, p) for o, _, p in read_frames(directory, msg.segment)] == [(msg.offset, b"payload-bytes")]
    assert msg.length == len(b"payload-bytes") and msg.low_segment == msg.segment == 1
    assert rs.stats.gauges["ingest_queue_spans"]() == 4


def test_a_full_queue_waits_for_a_commit_then_goes_on(frontend):
    rs, decoder_in, _, _ = frontend
    rs.persist(b"a", "traces", 8)
    first = decoder_in.recv().rid
    done = threading.Event()
    threading.Thread(target=lambda: (rs.persist(b"b", "traces", 8), done.set()), daemon=True).start()
    assert not done.wait(0.3)                  # 8 + 8 > 10: waits for room
    rs.on_message(Ack(first))              # the store committed the first record
    assert done.wait(5)
    assert rs.stats.gauges["ingest_queue_spans"]() == 8


def test_no_room_in_time_is_unavailable_with_a_retry_delay(frontend, monkeypatch):
    rs, _, stats, _ = frontend
    monkeypatch.setattr(intake, "ADMIT_WAIT_S", 0.2)
    rs.persist(b"a", "traces", 8)
    t0 = time.monotonic()
    with pytest.raises(Overloaded) as err:
        rs.persist(b"b", "traces", 8)
    assert time.monotonic() - t0 >= 0.2
    assert err.value.retry_after_s > 0 and stats.requests_refused["queue_full"] == 1


def test_stopping_wakes_a_waiting_export_with_shutting_down(frontend):
    rs, _, _, _ = frontend
    rs.persist(b"a", "traces", 8)
    outcome = []

    def second():
        try:
            rs.persist(b"b", "traces", 8)
        except ShuttingDown as exc:
            outcome.append(exc)
    t = threading.Thread(target=second, daemon=True)
    t.start()
    time.sleep(0.2)
    rs.stop_accepting()
    t.join(2)
    assert outcome and isinstance(outcome[0], ShuttingDown)
