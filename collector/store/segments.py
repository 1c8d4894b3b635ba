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


class SegmentLog:
    """Writer side: append payloads, fsync once per group. Used by the writer thread only."""

    def __init__(self, directory: Path, start_segment: int, segment_bytes: int = SEGMENT_BYTES):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.segment = start_segment
        self._open(start_segment)

    def _open(self, segment: int) -> None:
        self.segment = segment
        self._fd = os.open(segment_path(self.dir, segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.offset = os.fstat(self._fd).st_size
        _fsync_dir(self.dir)

    def append(self, data: bytes) -> tuple[int, int]:
        if self.offset and self.offset + len(data) > self.segment_bytes:
            self.sync()
            os.close(self._fd)
            self._open(self.segment + 1)
        seg, off = self.segment, self.offset
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.offset += len(data)
        return seg, off

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        try:
            self.sync()
        finally:
            os.close(self._fd)


def segment_path(directory: Path, segment: int) -> Path:
    return Path(directory) / f"{segment:08d}.seg"


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
