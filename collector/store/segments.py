"""Append-only segment files holding each request's raw OTLP payload (the spans' bulky part).

DuckDB appends narrow typed columns at ~300k rows/s on this machine but wide text at
~20-25k rows/s, so attributes, events and message text stay here, written once with one
fsync per group commit, and are decoded to JSON only when a query asks for them.
"""
from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from pathlib import Path

SEGMENT_BYTES = 256 << 20


class _Segment:
    def __init__(self, directory: Path, number: int):
        self.number = number
        self.fd = os.open(segment_path(directory, number), os.O_WRONLY | os.O_CREAT, 0o644)
        self.size = os.fstat(self.fd).st_size
        self.inflight = 0          # writes reserved but not finished
        self.retired = False


class SegmentLog:
    """Writer side. ``append`` from any thread: space is reserved under a lock and the bytes are
    written outside it (``pwrite``), so receivers copy their payloads in parallel while the
    writer thread commits; ``sync`` (one ``fdatasync`` per group commit) covers every append that
    returned before it was called.
    """

    def __init__(self, directory: Path, start_segment: int, segment_bytes: int = SEGMENT_BYTES):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._current = _Segment(self.dir, start_segment)
        self._retired: list[_Segment] = []
        _fsync_dir(self.dir)

    @property
    def segment(self) -> int:
        return self._current.number

    def append(self, data: bytes) -> tuple[int, int]:
        with self._lock:
            seg = self._current
            if seg.size and seg.size + len(data) > self.segment_bytes:
                seg.retired = True
                self._retired.append(seg)
                seg = self._current = _Segment(self.dir, seg.number + 1)
                _fsync_dir(self.dir)
            off = seg.size
            seg.size += len(data)
            seg.inflight += 1
        try:
            view = memoryview(data)
            pos = off
            while view:
                n = os.pwrite(seg.fd, view, pos)
                view, pos = view[n:], pos + n
        finally:
            with self._lock:
                seg.inflight -= 1
        return seg.number, off

    def sync(self) -> None:
        with self._lock:
            segs = self._retired + [self._current]
        for seg in segs:
            os.fdatasync(seg.fd)
        with self._lock:
            for seg in [s for s in self._retired if s.inflight == 0]:
                os.close(seg.fd)
                self._retired.remove(seg)

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
    """Read side: bytes of one payload by (segment, offset, length); mmaps cached, thread-safe."""

    def __init__(self, directory: Path, cache_files: int = 8):
        self.dir = Path(directory)
        self._maps: OrderedDict[int, tuple[int, mmap.mmap]] = OrderedDict()
        self._lock = threading.Lock()
        self._cache_files = cache_files

    def read(self, segment: int, offset: int, length: int) -> bytes:
        with self._lock:
            entry = self._maps.get(segment)
            if entry is None or entry[0] < offset + length:
                if entry is not None:
                    entry[1].close()
                path = segment_path(self.dir, segment)
                size = path.stat().st_size
                with open(path, "rb") as fh:
                    entry = (size, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)) if size else (0, None)
                self._maps[segment] = entry
                while len(self._maps) > self._cache_files:
                    _, (_, old) = self._maps.popitem(last=False)
                    if old is not None:
                        old.close()
            self._maps.move_to_end(segment)
            return bytes(entry[1][offset:offset + length])

    def close(self) -> None:
        with self._lock:
            for _, m in self._maps.values():
                if m is not None:
                    m.close()
            self._maps.clear()
