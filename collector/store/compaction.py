"""Compaction: closed segments of the payload log rewritten as zstd blocks, off the acknowledgement path.

The payload log keeps every request's raw OTLP bytes for the whole retention (attributes, events and
message text are decoded from it on query), ~2.6 KB per span of agent traffic. Once every record of a
segment is in DuckDB or set aside (the segment is below ``StoreWriter.current_segment()``), nothing
appends to it or replays it, and this rewrites it as ``NNNNNNNN.segz``: the same bytes in zstd blocks of
about ``BLOCK_BYTES`` of consecutive records, with an index from original offsets to blocks
(``segments.CompressedSegment`` reads it). Rows keep their (segment, offset, length), so DuckDB is
not touched. Measured on the bench traffic (512-span requests of ~1.3 MB, one request per block):
level 3 compresses 7.7x at ~300 MB/s of one core (161 MB/s with the fsync and the read-back, about
62,000 spans/s; bench/compaction.py); level 1 5.5x, no faster here; level 6 8.1x at ~80 MB/s.

Crash safety, step by step (``compact_segment``): write ``.segz.tmp``, fsync it, read every block back
against the original's checksums, rename it to ``.segz``, fsync the directory, delete the ``.seg``.
A crash before the rename leaves the plain segment and a stray temp file (``recover`` deletes it); a
crash after it leaves both complete files (readers take the plain one; ``recover`` deletes it once the
compressed one checks out). Every acknowledged payload stays readable at every point.

The work runs on one low-priority thread of serve's main process (niceness raised by ``NICE``): zstd
releases the GIL, and the acknowledgement path is in the ingest frontend process, so at peak the
compactor takes what CPU is left and lags (while it compresses flat out, a frontend-like append+fdatasync
loop acknowledged 0.88x its spans/s alone, 124k vs 141k: shared disk and memory, not CPU priority);
``pending_bytes`` (``shadowlens_store_compaction_pending_bytes``) shows the lag, and it catches up when
the rate drops.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from google_crc32c import value as crc32c

from .files import open_private
from .segments import (
    FRAME,
    FRAME_MAGIC,
    ZBLOCK,
    ZEND_MAGIC,
    ZFOOTER,
    ZHEADER,
    ZMAGIC,
    ZVERSION,
    CompressedSegment,
    _fsync_dir,
    compressed_path,
    list_plain_segments,
    segment_path,
    temp_compressed_path,
)

log = logging.getLogger("shadowlens.compaction")

DEFAULT_LEVEL = 3
BLOCK_BYTES = 1 << 20           # input per zstd frame: small requests still compress together; one read, one block
MAX_BLOCK = 4                   # a record larger than 4 blocks is cut across blocks (bounds the memory of a read)
NICE = 10                       # added to the compactor thread's niceness
INTERVAL_S = 5.0


class Stopped(Exception):
    """The compactor was asked to stop in the middle of a segment (its temp file is removed)."""


@dataclass(frozen=True)
class Compacted:
    segment: int
    input_bytes: int
    output_bytes: int
    seconds: float


def _block_ends(fd: int, size: int, block_bytes: int) -> list[int]:
    """Where blocks end: at record boundaries once a block holds ``block_bytes`` (so that a read usually
    decompresses one block), at ``MAX_BLOCK`` times that at most. Bytes that do not frame as a record are cut
    anywhere: a block boundary inside a record only costs its reader a second block."""
    ends = []
    start = pos = 0
    while pos < size:
        header = os.pread(fd, FRAME.size, pos)
        if len(header) == FRAME.size:
            magic, _, length, _ = FRAME.unpack(header)
            nxt = pos + FRAME.size + length if magic == FRAME_MAGIC else pos + block_bytes
        else:
            nxt = size
        pos = min(max(nxt, pos + 1), size, start + MAX_BLOCK * block_bytes)
        if pos - start >= block_bytes or pos == size:
            ends.append(pos)
            start = pos
    return ends


def write_compressed(directory: Path, segment: int, level: int = DEFAULT_LEVEL, block_bytes: int = BLOCK_BYTES,
                     stop: threading.Event | None = None) -> tuple[Path, int, int]:
    """Write the compressed form of plain ``segment`` to its temp name, fsynced, and read it back.
    Returns (temp path, input bytes, output bytes). The plain segment is left as it is."""
    import pyarrow as pa
    codec = pa.Codec("zstd", level)
    src = os.open(segment_path(directory, segment), os.O_RDONLY)
    tmp = temp_compressed_path(directory, segment)
    try:
        size = os.fstat(src).st_size
        out = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(out, ZHEADER.pack(ZMAGIC, ZVERSION, 1))
            pos, written, index = 0, ZHEADER.size, []
            for end in _block_ends(src, size, block_bytes):
                if stop is not None and stop.is_set():
                    raise Stopped(f"segment {segment}")
                data = os.pread(src, end - pos, pos)
                if len(data) != end - pos:
                    raise OSError(f"segment {segment} shrank while it was compacted")
                comp = codec.compress(data, asbytes=True)
                _write_all(out, comp)
                index.append(ZBLOCK.pack(pos, len(data), len(comp), crc32c(data)))
                written += len(comp)
                pos = end
            raw_index = b"".join(index)
            _write_all(out, raw_index + ZFOOTER.pack(written, size, len(index), crc32c(raw_index), ZEND_MAGIC))
            os.fsync(out)
            total = os.fstat(out).st_size
        finally:
            os.close(out)
        # Read back what the disk holds: every block must decompress to the original's checksum.
        with CompressedSegment(os.open(tmp, os.O_RDONLY), tmp.name) as check:
            if check.size != size:
                raise OSError(f"{tmp.name}: holds {check.size} bytes of segment {segment}, not {size}")
            for i in range(len(check.blocks)):
                check.block(i)
        return tmp, size, total
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        os.close(src)


def install(directory: Path, segment: int) -> None:
    """Rename the verified temp file in, make that durable, then delete the plain segment."""
    os.replace(temp_compressed_path(directory, segment), compressed_path(directory, segment))
    _fsync_dir(Path(directory))
    try:
        os.remove(segment_path(directory, segment))
    except FileNotFoundError:      # retention removed it meanwhile; its next pass removes this one too
        pass
    _fsync_dir(Path(directory))


def compact_segment(directory: Path, segment: int, level: int = DEFAULT_LEVEL, block_bytes: int = BLOCK_BYTES,
                    stop: threading.Event | None = None) -> Compacted:
    t0 = time.perf_counter()
    _, size, total = write_compressed(directory, segment, level, block_bytes, stop)
    install(directory, segment)
    return Compacted(segment, size, total, time.perf_counter() - t0)


def recover(directory: Path) -> None:
    """After a crash: delete stray temp files, and the plain copy of a segment whose compressed file is
    complete (a compressed file that does not check out is deleted instead; the segment is compacted again)."""
    d = Path(directory)
    if not d.exists():
        return
    for tmp in d.glob("*.segz.tmp"):
        log.info("compaction: removing %s, left by an interrupted compaction", tmp.name)
        tmp.unlink(missing_ok=True)
    for seg in list_plain_segments(d):
        path = compressed_path(d, seg)
        if not path.exists():
            continue
        try:
            with CompressedSegment(os.open(path, os.O_RDONLY), path.name) as f:
                ok = f.size == segment_path(d, seg).stat().st_size
                for i in range(len(f.blocks)):
                    f.block(i)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("compaction: %s does not check out (%s); the plain segment is kept", path.name, exc)
            ok = False
        if ok:
            segment_path(d, seg).unlink(missing_ok=True)
        else:
            path.unlink(missing_ok=True)
        _fsync_dir(d)


class Compactor:
    """Compacts closed segments on a low-priority thread, every ``interval_s``, until none is left."""

    def __init__(self, segments_dir: Path, closed_below: Callable[[], int], level: int = DEFAULT_LEVEL,
                 interval_s: float = INTERVAL_S, block_bytes: int = BLOCK_BYTES,
                 after_pass: Callable[[], None] | None = None):
        """``closed_below``: segments below it hold only records in DuckDB or set aside
        (``StoreWriter.current_segment``). ``after_pass``: e.g. a reader's ``prune``, so that descriptors
        of deleted plain segments do not keep their space."""
        self.dir = Path(segments_dir)
        self.closed_below = closed_below
        self.level = level
        self.interval_s = interval_s
        self.block_bytes = block_bytes
        self.after_pass = after_pass
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._recovered = False
        self.input_bytes = 0
        self.output_bytes = 0
        self.segments = 0
        self.failures = 0

    def pending(self) -> list[int]:
        below = self.closed_below()
        return [s for s in list_plain_segments(self.dir) if s < below]

    def pending_bytes(self) -> float:
        """Bytes of closed segments not compressed yet: the compactor's lag."""
        total = 0
        for seg in self.pending():
            try:
                total += segment_path(self.dir, seg).stat().st_size
            except FileNotFoundError:
                pass
        return float(total)

    def run_once(self) -> list[Compacted]:
        if not self._recovered:
            recover(self.dir)
            self._recovered = True
        done = []
        for seg in self.pending():
            if self._stop.is_set():
                break
            try:
                c = compact_segment(self.dir, seg, self.level, self.block_bytes, self._stop)
            except FileNotFoundError:        # retention removed it meanwhile
                continue
            except Stopped:
                break
            except OSError as exc:           # e.g. a full disk: the plain segment stays; the next pass retries
                self.failures += 1
                log.warning("compaction of segment %d failed, will retry: %s", seg, exc)
                break
            self.input_bytes += c.input_bytes
            self.output_bytes += c.output_bytes
            self.segments += 1
            done.append(c)
            log.debug("compacted segment %d: %d -> %d bytes in %.2f s", seg, c.input_bytes, c.output_bytes,
                      c.seconds)
        if done and self.after_pass is not None:
            self.after_pass()
        return done

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="shadowlens-compaction", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        lower_priority()
        while True:
            try:
                self.run_once()
            except Exception:  # a bug must not end compaction for the life of the process
                self.failures += 1
                log.exception("compaction pass failed; retrying in %.0f s", self.interval_s)
            if self._stop.wait(self.interval_s):
                return

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def lower_priority() -> str:
    """Raise the calling thread's niceness by ``NICE`` (a thread is a task on Linux: this lowers the thread
    alone). Not SCHED_IDLE: on a node kept busy by the agent, an idle-class thread may never run and the
    log never shrink, while +10 still gets about a tenth of a contended core; and SCHED_IDLE measured no
    kinder to the acknowledgement path (bench/compaction.py: 0.89x vs 0.88x while compressing flat out).
    Returns what was done."""
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + NICE))
        return f"nice +{NICE}"
    except (AttributeError, OSError) as exc:
        log.debug("compaction: could not lower the thread's priority (%s)", exc)
        return "unchanged"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
