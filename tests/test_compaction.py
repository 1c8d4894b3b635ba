"""Compaction: a closed payload segment rewritten compressed reads as the same bytes at the same offsets,
through every reader (read_frames, SegmentReader, the spans view, replay); a crash at any step loses nothing;
a restart copes with whatever a crash left; the segment shrinks."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from otlp_builders import random_spans, span_request

from shadowlens.collector.counters import IngestCounters
from shadowlens.collector.store import compaction
from shadowlens.collector.store.compaction import Compactor, compact_segment, recover, write_compressed
from shadowlens.collector.store.database import SEGMENTS_DIR
from shadowlens.collector.store.segments import (
    CorruptSegment,
    SegmentLog,
    SegmentReader,
    compressed_path,
    list_segments,
    open_segment,
    read_frames,
    remove_segment,
    segment_lengths,
    segment_path,
    segment_sizes,
    temp_compressed_path,
)
from shadowlens.collector.store.writer import StoreWriter
from shadowlens.config import default_config


def _request(n: int, seed: int) -> bytes:
    return span_request(random_spans(n, random.Random(seed))).SerializeToString()


def _segment(directory: Path, seg: int, payloads: list[bytes], garbage_after: int | None = None) -> list:
    """Append ``payloads`` to segment ``seg``; with ``garbage_after``, bytes that do not frame as a record
    follow that record (a write refused on a full disk, or damage). Returns [(offset, length)]."""
    log = SegmentLog(directory, seg)
    refs = []
    for i, p in enumerate(payloads):
        s, off, ticket = log.append(p)
        assert s == seg
        log.wait_durable(ticket)
        refs.append((off, len(p)))
        if i == garbage_after:
            log.close()
            with open(segment_path(directory, seg), "ab") as fh:
                fh.write(b"\x00garbage, not a frame" * 7)
            log = SegmentLog(directory, seg)
    log.close()
    return refs


def _everything(directory: Path, seg: int, refs: list) -> tuple:
    """What every reader sees of ``seg``: its frames, the bytes skipped, each payload, its length."""
    skipped = []
    frames = list(read_frames(directory, seg, on_skip=lambda off, data: skipped.append((off, data))))
    reader = SegmentReader(directory)
    try:
        payloads = [reader.read(seg, off, n) for off, n in refs]
    finally:
        reader.close()
    return frames, skipped, payloads, segment_lengths(directory)[seg]


@pytest.fixture
def segdir(tmp_path) -> tuple[Path, list, tuple]:
    payloads = [_request(n, seed) for seed, n in enumerate((3, 40, 1, 200, 7, 60))]
    refs = _segment(tmp_path, 1, payloads, garbage_after=2)
    return tmp_path, refs, _everything(tmp_path, 1, refs)


def test_a_compressed_segment_reads_as_the_same_bytes_at_the_same_offsets(segdir):
    d, refs, before = segdir
    plain = segment_path(d, 1).stat().st_size
    # small blocks: several records per block, and records cut across blocks (a read spans two)
    c = compact_segment(d, 1, block_bytes=4096)
    assert not segment_path(d, 1).exists() and compressed_path(d, 1).exists()
    assert list_segments(d) == [1]
    with open_segment(d, 1) as f:
        assert f.compressed and len(f.blocks) > 3
        assert any(b[1] > 4096 for b in f.blocks) and max(b[1] for b in f.blocks) <= 4 * 4096
    assert _everything(d, 1, refs) == before
    assert before[1] and before[1][0][0] == refs[2][0] + refs[2][1]     # the garbage is still seen, where it was
    assert c.input_bytes == plain and segment_sizes(d)[1] == c.output_bytes == compressed_path(d, 1).stat().st_size
    assert c.output_bytes < plain / 2


def test_the_default_block_holds_whole_records(segdir):
    d, refs, before = segdir
    compact_segment(d, 1)
    with open_segment(d, 1) as f:
        assert len(f.blocks) == 1          # ~90 KB of records: one block, one read decompresses it
    assert _everything(d, 1, refs) == before


@pytest.mark.parametrize("state", ["partial_temp", "complete_temp", "both", "both_compressed_damaged"])
def test_a_crash_at_any_step_loses_nothing_and_recover_finishes_or_undoes_it(segdir, state):
    d, refs, before = segdir
    tmp, _, _ = write_compressed(d, 1, block_bytes=4096)
    if state == "partial_temp":            # crash while writing the temp file
        with open(tmp, "r+b") as fh:
            fh.truncate(tmp.stat().st_size // 2)
    elif state in ("both", "both_compressed_damaged"):   # crash after the rename, before the delete
        os.replace(tmp, compressed_path(d, 1))
        if state == "both_compressed_damaged":
            with open(compressed_path(d, 1), "r+b") as fh:
                fh.truncate(compressed_path(d, 1).stat().st_size - 3)
    assert _everything(d, 1, refs) == before       # readers take the plain segment meanwhile
    recover(d)
    assert not temp_compressed_path(d, 1).exists()
    if state == "both":
        assert not segment_path(d, 1).exists() and compressed_path(d, 1).exists()
    else:
        assert segment_path(d, 1).exists() and not compressed_path(d, 1).exists()
    assert _everything(d, 1, refs) == before
    if segment_path(d, 1).exists():
        compact_segment(d, 1)
    assert _everything(d, 1, refs) == before


def test_a_damaged_compressed_block_is_an_error_not_wrong_bytes(segdir):
    d, refs, _ = segdir
    compact_segment(d, 1, block_bytes=4096)
    path = compressed_path(d, 1)
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF                      # inside the first block
    path.write_bytes(bytes(data))
    reader = SegmentReader(d)
    with pytest.raises(CorruptSegment):
        reader.read(1, refs[0][0], refs[0][1])
    reader.close()


def test_retention_helpers_remove_every_form(segdir):
    d, _, _ = segdir
    tmp, _, _ = write_compressed(d, 1)
    compressed_path(d, 1).write_bytes(tmp.read_bytes())     # all three forms at once
    assert segment_sizes(d)[1] == sum(p.stat().st_size for p in d.iterdir())
    assert remove_segment(d, 1)
    assert list_segments(d) == [] and list(d.iterdir()) == []


def test_a_reader_lets_go_of_a_plain_segment_compaction_deleted(segdir):
    d, refs, before = segdir
    reader = SegmentReader(d)
    reader.read(1, *refs[0])
    compact_segment(d, 1)
    reader.prune()                         # else its descriptor keeps the deleted file's space
    assert reader._files == {}
    assert [reader.read(1, off, n) for off, n in refs] == before[2]
    reader.close()


def test_a_stopped_compaction_leaves_the_plain_segment_and_no_temp_file(segdir):
    d, refs, before = segdir
    stop = compaction.threading.Event()
    stop.set()
    with pytest.raises(compaction.Stopped):
        compact_segment(d, 1, stop=stop)
    assert segment_path(d, 1).exists() and not temp_compressed_path(d, 1).exists()
    assert _everything(d, 1, refs) == before


# -- through the store -------------------------------------------------------------------------------

def _open(data_dir) -> StoreWriter:
    store = StoreWriter(data_dir, default_config().cohort_labels, IngestCounters())
    store.open()
    return store


def _json(store: StoreWriter) -> list:
    con = store.cursor()
    try:
        return con.execute("SELECT trace_id, span_id, attributes, events, resource_attributes FROM spans "
                           "ORDER BY trace_id, span_id").fetchall()
    finally:
        con.close()


def test_the_store_reads_compressed_segments_replays_them_and_restarts_half_compacted(tmp_path):
    store = _open(tmp_path)
    first = store.first_segment
    store.shutdown()
    seg_dir = tmp_path / SEGMENTS_DIR
    # acknowledged records DuckDB never got, in a segment compacted before the restart replays it
    _segment(seg_dir, first, [_request(30, 11), _request(5, 12)], garbage_after=0)
    compact_segment(seg_dir, first, block_bytes=2048)
    # and a second segment left half-compacted by a crash: both files and a stray temp file
    _segment(seg_dir, first + 1, [_request(50, 13)])
    write_compressed(seg_dir, first + 1)
    os.replace(temp_compressed_path(seg_dir, first + 1), compressed_path(seg_dir, first + 1))
    write_compressed(seg_dir, first + 1)
    store = _open(tmp_path)                # drop_torn_payloads and replay read both kinds
    rows = _json(store)
    assert len(rows) == 85 and all(r[2] is not None and r[4] is not None for r in rows)
    assert store.con.execute("SELECT count(*) FROM quarantine WHERE stage = 'read'").fetchone()[0] == 1
    # the replayed rows' JSON is the same once every segment is compacted
    compactor = Compactor(seg_dir, store.current_segment, after_pass=store.decoder.segments.prune)
    assert compactor.run_once() == []      # its recovery finished the half-done one: nothing left to compress
    assert compactor.pending_bytes() == 0
    assert sorted(p.name for p in seg_dir.iterdir()) == [compressed_path(seg_dir, n).name for n in (first, first + 1)]
    store.decoder._cache.clear()
    assert _json(store) == rows
    attrs = json.loads(rows[0][2])
    assert isinstance(attrs, dict)
    store.shutdown()
    store = _open(tmp_path)                # a restart on a compacted dir replays nothing a second time
    assert _json(store) == rows
    store.shutdown()


def test_the_compactor_leaves_open_segments_alone(tmp_path):
    seg_dir = tmp_path / SEGMENTS_DIR
    _segment(seg_dir, 1, [_request(20, 1)])
    _segment(seg_dir, 2, [_request(20, 2)])
    compactor = Compactor(seg_dir, closed_below=lambda: 2)
    pending = compactor.pending_bytes()
    assert pending == segment_path(seg_dir, 1).stat().st_size
    assert [c.segment for c in compactor.run_once()] == [1]
    assert segment_path(seg_dir, 2).exists() and compactor.pending_bytes() == 0
    assert compactor.input_bytes == pending > compactor.output_bytes > 0


def test_store_compression_level_is_optional_and_checked():
    from shadowlens.collector.errors import ConfigError
    from shadowlens.collector.settings import STORE, parse_store
    assert parse_store(STORE).compression_level == 3
    assert parse_store({k: v for k, v in STORE.items() if k != "compression_level"}).compression_level == 3
    assert parse_store({**STORE, "compression_level": 0}).compression_level == 0
    with pytest.raises(ConfigError, match="up to 22"):
        parse_store({**STORE, "compression_level": 23})
