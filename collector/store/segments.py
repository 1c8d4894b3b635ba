"""Append-only segment files: each request's raw OTLP payload, framed; the store's write-ahead log.

DuckDB appends narrow typed columns at ~300k rows/s on this machine but wide text at
~20-25k rows/s, so attributes, events and message text stay here, written once, and are
decoded to JSON only when a query asks for them.

Each record is a 16-byte frame header (magic, signal, payload length, CRC-32C of the payload)
followed by the payload. Once a record is fsynced its spans are durable: ``serve`` acknowledges
an Export at that point, and on restart ``replay.py`` re-inserts records DuckDB never got. The
CRC tells a torn tail (never acknowledged) from a record.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

from google_crc32c import value as crc32c  # SSE4.2: 0.07 ms per 1.3 MB request; zlib.crc32 0.8 ms

SEGMENTS_DIR = "segments"      # under the data dir

SEGMENT_BYTES = 256 << 20
SLOW_SYNC_S = 0.5
FRAME = struct.Struct("<4sB3xII")       # magic, signal, payload length, CRC-32C(payload)
FRAME_MAGIC = b"SLW1"
log = logging.getLogger("shadowlens.segments")
SIGNALS = ("traces", "logs")


class _Segment:
    def __init__(self, directory: Path, number: int):
        self.number = number
        self.fd = os.open(segment_path(directory, number), os.O_WRONLY | os.O_CREAT, 0o644)
        self.size = os.fstat(self.fd).st_size
        self.inflight = 0          # writes reserved but not finished
        self.retired = False


class SegmentLog:
    """Writer side. ``append`` from any thread: space is reserved under a lock and the bytes are
    written outside it (``pwrite``), so an append does not wait for a sync in progress; ``sync``
    (one ``fdatasync`` per group commit) covers every append that returned before it was called.
    """

    def __init__(self, directory: Path, start_segment: int, segment_bytes: int = SEGMENT_BYTES):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        # One pwrite at a time. The kernel serializes buffered writes to a file anyway (ext4 takes
        # the inode lock), but its waiters spin on the lock's owner first: with 16 writer threads
        # that doubled the CPU of a write for the same wall time (microbenchmark: 0.87-1.03 ms of CPU
        # per 1.3 MB request, 0.52 with this lock; under the full ingest load, within noise).
        self._write_lock = threading.Lock()
        self._current = _Segment(self.dir, start_segment)
        self._retired: list[_Segment] = []
        self._sync_cond = threading.Condition()
        self._written = 0       # appends whose bytes are fully written (the ticket of the latest)
        self._synced = 0        # appends covered by a finished fdatasync
        self._syncing = False
        self.syncs = 0
        self.sync_seconds = 0.0
        _fsync_dir(self.dir)

    @property
    def segment(self) -> int:
        return self._current.number

    def append(self, data: bytes, signal: str = "traces") -> tuple[int, int, int]:
        """Write one framed record; returns (segment, payload offset, ticket for ``wait_durable``)."""
        header = FRAME.pack(FRAME_MAGIC, SIGNALS.index(signal), len(data), crc32c(data))
        size = FRAME.size + len(data)
        with self._lock:
            seg = self._current
            if seg.size and seg.size + size > self.segment_bytes:
                seg.retired = True
                self._retired.append(seg)
                seg = self._current = _Segment(self.dir, seg.number + 1)
                _fsync_dir(self.dir)
            off = seg.size
            seg.size += size
            seg.inflight += 1
        try:
            with self._write_lock:
                _pwrite_all(seg.fd, [header, data], off)
        finally:
            with self._lock:
                seg.inflight -= 1
        with self._sync_cond:
            self._written += 1
            ticket = self._written
        return seg.number, off + FRAME.size, ticket

    def wait_durable(self, ticket: int) -> None:
        """Group commit: block until an fdatasync that began after append ``ticket`` finished.

        One caller syncs for everyone whose bytes were written when it began; the others wait,
        so under load one fdatasync covers many requests (and releases the GIL while it runs).
        """
        with self._sync_cond:
            while self._synced < ticket:
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                target = self._written
                self._sync_cond.release()
                try:
                    self.sync()
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._sync_cond.notify_all()
                self._synced = max(self._synced, target)

    def sync(self) -> None:
        t0 = time.perf_counter()
        with self._lock:
            segs = self._retired + [self._current]
        for seg in segs:
            os.fdatasync(seg.fd)
        with self._lock:
            for seg in [s for s in self._retired if s.inflight == 0]:
                os.close(seg.fd)
                self._retired.remove(seg)
        self.syncs += 1
        took = time.perf_counter() - t0
        self.sync_seconds += took
        if took > SLOW_SYNC_S:
            log.warning("fdatasync of the payload log took %.2f s (acknowledgements wait for it): the disk is slow"
                        " or busy", took)

    def close(self) -> None:
        self.sync()
        with self._lock:
            for seg in self._retired + [self._current]:
                os.close(seg.fd)
            self._retired = []


class SegmentSyncer:
    """Makes appended payloads durable: ``fdatasync`` of the segments a group commit references.

    It opens the segment files itself, so the appender may be another process (the ingest
    frontend): an fdatasync on any descriptor of a file flushes all of its dirty pages.
    """

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self._fds: dict[int, int] = {}
        self.highest = 0

    def sync(self, segments) -> None:
        for seg in sorted(set(segments)):
            fd = self._fds.get(seg)
            if fd is None:
                fd = self._fds[seg] = os.open(segment_path(self.dir, seg), os.O_RDONLY)
            os.fdatasync(fd)
            self.highest = max(self.highest, seg)
        for seg in [s for s in self._fds if s < self.highest]:   # older segments get no more appends
            os.close(self._fds.pop(seg))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pwrite_all(fd: int, parts: list, pos: int) -> None:
    views = [memoryview(p) for p in parts]
    while views:
        n = os.pwritev(fd, views, pos)
        pos += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def read_frames(directory: Path, segment: int, start: int = 0) -> Iterator[tuple[int, str, bytes]]:
    """(payload offset, signal, payload) of every intact record from byte ``start`` on.

    Stops at the first torn or foreign frame: only an unacknowledged tail (a crash between
    write and fdatasync) can be torn, since records are appended in place and never rewritten.
    """
    path = segment_path(directory, segment)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        pos = start
        while pos + FRAME.size <= size:
            fh.seek(pos)
            header = fh.read(FRAME.size)
            magic, sig, length, crc = FRAME.unpack(header)
            if magic != FRAME_MAGIC or sig >= len(SIGNALS) or pos + FRAME.size + length > size:
                return
            data = fh.read(length)
            if len(data) != length or crc32c(data) != crc:
                return
            yield pos + FRAME.size, SIGNALS[sig], data
            pos += FRAME.size + length


def segment_path(directory: Path, segment: int) -> Path:
    return Path(directory) / f"{segment:08d}.seg"


def segment_sizes(directory: Path) -> dict[int, int]:
    return {n: segment_path(directory, n).stat().st_size for n in list_segments(directory)}


def list_segments(directory: Path) -> list[int]:
    d = Path(directory)
    if not d.exists():
        return []
    return sorted(int(p.stem) for p in d.glob("*.seg") if p.stem.isdigit())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentReader:
    """Read side: bytes of one payload by (segment, offset, length); descriptors cached, thread-safe.

    ``pread`` rather than mmap: the segment being written grows with every append, and a mapping
    would have to be redone for nearly every read of a fresh payload (the decoder's case).
    """

    def __init__(self, directory: Path, cache_files: int = 8):
        self.dir = Path(directory)
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()
        self._cache_files = cache_files

    def read(self, segment: int, offset: int, length: int, *, last_read: bool = False) -> bytes:
        """``last_read``: the caller will not read this record again soon (the decoder reads each
        record once), so its pages leave the page cache. Why: on this machine's VM the host takes
        back free memory (virtio-balloon free page reporting), and a page cache that only grows
        gets every new page from the host: writing a 1.3 MB request cost 2.1-2.4 ms of CPU over
        2 GB of appends, 0.8 ms when the pages were dropped once read and so came back warm.
        Queries and replay read the bytes from disk again, which they do rarely."""
        with self._lock:
            fd = self._fds.get(segment)
            if fd is None:
                fd = self._fds[segment] = os.open(segment_path(self.dir, segment), os.O_RDONLY)
                while len(self._fds) > self._cache_files:
                    os.close(self._fds.popitem(last=False)[1])
            self._fds.move_to_end(segment)
            data = os.pread(fd, length, offset)
            if last_read and len(data) == length:
                # The frame header too; pages shared with a neighbour record are kept by the kernel
                # (it drops only whole pages of the range), dirty ones are never dropped.
                os.posix_fadvise(fd, offset - FRAME.size, length + FRAME.size, os.POSIX_FADV_DONTNEED)
        if len(data) != length:
            raise OSError(f"segment {segment} ends before byte {offset + length} (a payload is missing)")
        return data

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
