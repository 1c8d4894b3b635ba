"""Append-only segment files: each request's raw OTLP payload, framed; the store's write-ahead log.

DuckDB appends narrow typed columns at ~300k rows/s on this machine but wide text at
~20-25k rows/s, so attributes, events and message text stay here, written once, and are
decoded to JSON only when a query asks for them.

Each record is a 16-byte frame header (magic, signal, payload length, CRC-32C of the payload)
followed by the payload. Once a record is fsynced its spans are durable: ``serve`` acknowledges
an Export at that point, and on restart ``replay.py`` re-inserts records DuckDB never got. The
CRC tells a torn record (never acknowledged) from a record. A torn record is not only a crash's
tail: a write refused for want of space leaves its reserved bytes torn or a hole, and a record
reserved after it may still be written and acknowledged, so a reader looks past a torn record.

A closed segment whose records are all in DuckDB is later rewritten compressed (``compaction.py``):
``NNNNNNNN.segz`` holds the same bytes as ``NNNNNNNN.seg`` in zstd blocks, with an index from the
original offsets to the blocks, so rows keep their (segment, offset, length). Every reader here
(``read_frames``, ``SegmentReader``, ``segment_lengths``, ``list_segments``, ``remove_segment``)
takes either kind; when both exist (a crash between the rename and the delete) the plain one is read.
"""
from __future__ import annotations

import bisect
import copy
import logging
import os
import struct
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Callable, Iterator

from google_crc32c import value as crc32c  # SSE4.2: 0.07 ms per 1.3 MB request; zlib.crc32 0.8 ms

from .diskfull import WriteHealth, refusal
from .files import make_private_dir, open_private

SEGMENTS_DIR = "segments"      # under the data dir

SEGMENT_BYTES = 256 << 20
SLOW_SYNC_S = 0.5
FRAME = struct.Struct("<4sB3xII")       # magic, signal, payload length, CRC-32C(payload)
FRAME_MAGIC = b"SLW1"
log = logging.getLogger("shadowlens.segments")
SIGNALS = ("traces", "logs")
PROBE_FILE = ".space-probe"     # under the segments dir, while writes fail for want of space
PROBE_BYTES = 256 << 10
FAILED_SYNCS_KEPT = 64
PLAIN_SUFFIX = ".seg"
COMPRESSED_SUFFIX = ".segz"
TEMP_SUFFIX = ".tmp"
# A compressed segment (compaction.py writes it, this module reads it):
ZHEADER = struct.Struct("<4sBB2x")      # magic, format version, codec (1: zstd)
ZMAGIC = b"SLZ1"
ZVERSION = 1
ZBLOCK = struct.Struct("<QIII")         # original offset, original length, compressed length, CRC-32C(original)
ZFOOTER = struct.Struct("<QQII4s")      # index offset, original size, blocks, CRC-32C(index), end magic
ZEND_MAGIC = b"SLZE"


class _Segment:
    def __init__(self, directory: Path, number: int):
        self.number = number
        self.fd = open_private(segment_path(directory, number), os.O_WRONLY)
        self.size = os.fstat(self.fd).st_size
        self.inflight = 0          # writes reserved but not finished
        self.retired = False


class SegmentLog:
    """Writer side. ``append`` from any thread: space is reserved under a lock and the bytes are
    written outside it (``pwrite``), so an append does not wait for a sync in progress; ``sync``
    (one ``fdatasync`` per group commit) covers every append that returned before it was called.
    """

    def __init__(self, directory: Path, start_segment: int, segment_bytes: int = SEGMENT_BYTES,
                 health: WriteHealth | None = None):
        self.dir = Path(directory)
        self.health = health or WriteHealth("payload log")
        make_private_dir(self.dir)
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
        # (last synced ticket, last ticket covered, error) of failed fdatasyncs: after one, Linux
        # may have dropped those dirty pages and reports the error once, so a later fdatasync that
        # succeeds proves nothing for them. Their appends are never acknowledged. Kept: the last few
        # (a waiter checks within moments of the failure).
        self._failed_syncs: deque[tuple[int, int, BaseException]] = deque(maxlen=FAILED_SYNCS_KEPT)
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
        generation = self.health.generation
        with self._lock:
            seg = self._current
            if seg.size and seg.size + size > self.segment_bytes:
                seg = self._next_segment(seg)
            off = seg.size
            seg.size += size
            seg.inflight += 1
        try:
            with self._write_lock:
                _pwrite_all(seg.fd, [header, data], off)
        except OSError as exc:
            with self._lock:
                self._cut(seg, off, size)
                seg.inflight -= 1
            raise self._refused(exc, "the request") from exc
        except BaseException:
            with self._lock:
                seg.inflight -= 1
            raise
        with self._lock:
            seg.inflight -= 1
        self.health.succeeded(generation)
        with self._sync_cond:
            self._written += 1
            ticket = self._written
        return seg.number, off + FRAME.size, ticket

    def _next_segment(self, seg: _Segment) -> _Segment:
        """Under ``_lock``: the next segment, made current only once its directory entry is durable
        (a record acknowledged in a file the directory may forget would be lost)."""
        try:
            new = _Segment(self.dir, seg.number + 1)
        except OSError as exc:
            raise self._refused(exc, "the request") from exc
        try:
            _fsync_dir(self.dir)
        except OSError as exc:
            os.close(new.fd)
            raise self._refused(exc, "the request") from exc
        seg.retired = True
        self._retired.append(seg)
        self._current = new
        return new

    def _cut(self, seg: _Segment, off: int, size: int) -> None:
        """Under ``_lock``, after the write of [off, off + size) failed: if no record was reserved after
        it, give the bytes back (the next record starts there); otherwise they stay torn, and readers
        look past them (``read_frames``)."""
        if seg.size != off + size:
            return
        try:
            os.ftruncate(seg.fd, off)      # shrinking needs no space
        except OSError as exc:
            log.warning("could not cut a failed write off segment %d at byte %d (%s); readers skip it", seg.number,
                        off, exc)
            return
        seg.size = off

    def _refused(self, exc: OSError, what: str) -> BaseException:
        out = refusal(exc, what)
        if out is not exc:
            self.health.failed(out.reason, exc)
        return out

    def wait_durable(self, ticket: int) -> None:
        """Group commit: block until an fdatasync that began after append ``ticket`` finished.

        One caller syncs for everyone whose bytes were written when it began; the others wait,
        so under load one fdatasync covers many requests (and releases the GIL while it runs).
        """
        with self._sync_cond:
            while True:
                for low, high, error in self._failed_syncs:
                    if low < ticket <= high:
                        raise copy.copy(error)      # one instance per waiter: each gets its own traceback
                if self._synced >= ticket:
                    return
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                low, target = self._synced, self._written
                generation = self.health.generation
                self._sync_cond.release()
                error = None
                try:
                    self.sync()
                except OSError as exc:
                    error = self._refused(exc, "a request waiting for its fdatasync")
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._sync_cond.notify_all()
                if error is not None:
                    self._failed_syncs.append((low, target, error))
                    continue
                self._synced = max(self._synced, target)
                self.health.succeeded(generation)

    def recheck(self) -> None:
        """While writes fail for want of space, try a small write and fdatasync of a probe file, so
        that readiness comes back with the space even if no client sends meanwhile (clients back off)."""
        if self.health.ok:
            return
        generation = self.health.generation
        path = self.dir / PROBE_FILE
        try:
            fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
            try:
                _pwrite_all(fd, [bytes(PROBE_BYTES)], 0)      # zeros written are allocated, unlike a hole
                os.fdatasync(fd)
            finally:
                os.close(fd)
                os.unlink(path)
        except OSError:
            return
        self.health.succeeded(generation)

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
        try:
            self.sync()
        except OSError as exc:      # nothing waits for these bytes any more: unacknowledged ones may be torn
            log.warning("the last fdatasync of the payload log failed (%s)", exc)
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


def read_frames(directory: Path, segment: int, start: int = 0,
                on_skip: Callable[[int, bytes], None] | None = None) -> Iterator[tuple[int, str, bytes]]:
    """(payload offset, signal, payload) of every intact record from byte ``start`` on.

    Bytes that do not frame as a record are skipped by searching for the next frame magic whose record
    checks out, since a record reserved after them may have been written and acknowledged. Such bytes are
    a write refused for want of space (never acknowledged) or a record damaged on disk after it was
    acknowledged; the bytes alone cannot tell which, so ``on_skip(offset, bytes)`` hands them to the
    caller to keep. A torn tail (a crash between write and fdatasync: never acknowledged) ends the read.
    A compressed segment reads as the same records at the same offsets.
    """
    with open_segment(directory, segment) as f:
        size = f.size
        pos = start
        while pos + FRAME.size <= size:
            header = f.pread(pos, FRAME.size)
            magic, sig, length, crc = FRAME.unpack(header)
            if magic == FRAME_MAGIC and sig < len(SIGNALS) and pos + FRAME.size + length <= size:
                data = f.pread(pos + FRAME.size, length)
                if len(data) == length and crc32c(data) == crc:
                    yield pos + FRAME.size, SIGNALS[sig], data
                    pos += FRAME.size + length
                    continue
            found = _find_magic(f, pos + 1, size)
            if found is None:
                return
            log.warning("segment %d: skipped %d bytes at offset %d that do not frame as a record", segment,
                        found - pos, pos)
            if on_skip is not None:
                on_skip(pos, f.pread(pos, found - pos))
            pos = found


def _find_magic(f, pos: int, size: int, chunk: int = 1 << 20) -> int | None:
    """The offset of the next FRAME_MAGIC at or after ``pos``."""
    keep = len(FRAME_MAGIC) - 1
    while pos + FRAME.size <= size:
        block = f.pread(pos, min(chunk, size - pos))
        i = block.find(FRAME_MAGIC)
        if i >= 0:
            return pos + i
        if len(block) <= keep:
            return None
        pos += len(block) - keep
    return None


def segment_path(directory: Path, segment: int) -> Path:
    """The plain (appendable) file of ``segment``."""
    return Path(directory) / f"{segment:08d}{PLAIN_SUFFIX}"


def compressed_path(directory: Path, segment: int) -> Path:
    return Path(directory) / f"{segment:08d}{COMPRESSED_SUFFIX}"


def temp_compressed_path(directory: Path, segment: int) -> Path:
    """Where compaction writes before the rename; matched by neither kind's glob."""
    return Path(directory) / f"{segment:08d}{COMPRESSED_SUFFIX}{TEMP_SUFFIX}"


def segment_sizes(directory: Path) -> dict[int, int]:
    """Each segment's bytes on disk now, whatever its form (what a disk budget counts)."""
    sizes = {n: segment_disk_bytes(directory, n) for n in list_segments(directory)}
    return {n: size for n, size in sizes.items() if size or segment_path(directory, n).exists()}


def segment_lengths(directory: Path) -> dict[int, int]:
    """Each segment's length in bytes of the original log (a compressed one: the length it was compressed
    from), the offsets rows refer to."""
    out = {}
    for n in list_segments(directory):
        try:
            with open_segment(directory, n) as f:
                out[n] = f.size
        except FileNotFoundError:       # removed meanwhile (retention)
            pass
    return out


def list_segments(directory: Path) -> list[int]:
    """Segment numbers present in either kind of file."""
    d = Path(directory)
    if not d.exists():
        return []
    return sorted({int(p.stem) for suffix in (PLAIN_SUFFIX, COMPRESSED_SUFFIX)
                   for p in d.glob(f"*{suffix}") if p.stem.isdigit()})


def list_plain_segments(directory: Path) -> list[int]:
    d = Path(directory)
    if not d.exists():
        return []
    return sorted(int(p.stem) for p in d.glob(f"*{PLAIN_SUFFIX}") if p.stem.isdigit())


def remove_segment(directory: Path, segment: int) -> bool:
    """Delete ``segment`` in every form (plain, compressed, a compaction's temp file); False if none was there."""
    removed = False
    for path in (segment_path(directory, segment), compressed_path(directory, segment),
                 temp_compressed_path(directory, segment)):
        try:
            os.remove(path)
            removed = True
        except FileNotFoundError:
            pass
    return removed


def segment_disk_bytes(directory: Path, segment: int) -> int:
    """Bytes ``segment`` takes on disk now, whatever its form."""
    total = 0
    for path in (segment_path(directory, segment), compressed_path(directory, segment),
                 temp_compressed_path(directory, segment)):
        try:
            total += path.stat().st_size
        except FileNotFoundError:
            pass
    return total


class _OpenFile:
    """A segment file open for reading, in either form; closed by ``close`` or at the end of a ``with``."""
    fd: int

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PlainSegment(_OpenFile):
    compressed = False

    def __init__(self, fd: int):
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def pread(self, offset: int, length: int, cache=None) -> bytes:
        return os.pread(self.fd, length, offset)


class CompressedSegment(_OpenFile):
    """Read side of a ``.segz`` file: ``pread`` by offsets of the original log, one zstd block at a time.

    Layout: ZHEADER, the blocks back to back, the index (one ZBLOCK per block, in order), ZFOOTER.
    A block's CRC-32C is of its decompressed bytes, checked at every decompression.
    """
    compressed = True

    def __init__(self, fd: int, name: str = "segment"):
        import pyarrow as pa
        self.fd = fd
        self.name = name
        try:
            total = os.fstat(fd).st_size
            if total < ZHEADER.size + ZFOOTER.size:
                raise CorruptSegment(f"{name}: {total} bytes, too short for a compressed segment")
            magic, version, _codec = ZHEADER.unpack(os.pread(fd, ZHEADER.size, 0))
            index_off, self.size, n, index_crc, end_magic = ZFOOTER.unpack(
                os.pread(fd, ZFOOTER.size, total - ZFOOTER.size))
            if magic != ZMAGIC or end_magic != ZEND_MAGIC or version != ZVERSION:
                raise CorruptSegment(f"{name}: not a complete compressed segment (header or footer missing)")
            index = os.pread(fd, n * ZBLOCK.size, index_off)
            if index_off + n * ZBLOCK.size + ZFOOTER.size != total or crc32c(index) != index_crc:
                raise CorruptSegment(f"{name}: its block index is damaged")
            self.blocks = [ZBLOCK.unpack_from(index, i * ZBLOCK.size) for i in range(n)]
            self.starts = [b[0] for b in self.blocks]
            self.places = []
            pos = ZHEADER.size
            for _, _, comp_len, _ in self.blocks:
                self.places.append(pos)
                pos += comp_len
        except BaseException:
            os.close(fd)
            raise
        self._codec = pa.Codec("zstd")

    def block(self, i: int) -> bytes:
        start, orig_len, comp_len, crc = self.blocks[i]
        comp = os.pread(self.fd, comp_len, self.places[i])
        try:
            data = self._codec.decompress(comp, decompressed_size=orig_len, asbytes=True)
        except Exception as exc:  # pyarrow's error classes: a damaged block
            raise CorruptSegment(f"{self.name}: block at byte {start} does not decompress ({exc})") from exc
        if len(data) != orig_len or crc32c(data) != crc:
            raise CorruptSegment(f"{self.name}: block at byte {start} fails its checksum")
        return data

    def pread(self, offset: int, length: int, cache: OrderedDict | None = None) -> bytes:
        """Bytes [offset, offset + length) of the original log, shorter at its end (as os.pread).
        ``cache``: decompressed blocks by (fd, block), most recent last; its owner bounds it."""
        end = min(offset + length, self.size)
        out = []
        i = bisect.bisect_right(self.starts, offset) - 1
        while offset < end and 0 <= i < len(self.blocks):
            key = (self.fd, i)
            data = cache.get(key) if cache is not None else None
            if data is None:
                data = self.block(i)
                if cache is not None:
                    cache[key] = data
            elif cache is not None:
                cache.move_to_end(key)
            start = self.starts[i]
            out.append(data[offset - start:end - start])
            offset = start + len(data)
            i += 1
        return out[0] if len(out) == 1 else b"".join(out)


class CorruptSegment(OSError):
    """A compressed segment whose bytes do not check out."""


def open_segment(directory: Path, segment: int) -> _PlainSegment | CompressedSegment:
    """The segment's file for reading, plain if present (it is the original), else compressed.
    FileNotFoundError when neither exists."""
    for _ in range(2):      # compaction renames the compressed file in before it deletes the plain one
        try:
            return _PlainSegment(os.open(segment_path(directory, segment), os.O_RDONLY))
        except FileNotFoundError:
            pass
        try:
            path = compressed_path(directory, segment)
            return CompressedSegment(os.open(path, os.O_RDONLY), path.name)
        except FileNotFoundError:
            pass
    raise FileNotFoundError(f"segment {segment}: neither {segment_path(directory, segment)} nor "
                            f"{compressed_path(directory, segment).name} exists (removed by retention?)")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentReader:
    """Read side: bytes of one payload by (segment, offset, length), plain or compressed segment alike;
    open files and the last few decompressed blocks cached, thread-safe.

    ``pread`` rather than mmap: the segment being written grows with every append, and a mapping
    would have to be redone for nearly every read of a fresh payload (the decoder's case).
    """

    def __init__(self, directory: Path, cache_files: int = 8, cache_blocks: int = 4):
        self.dir = Path(directory)
        self._files: OrderedDict[int, _PlainSegment | CompressedSegment] = OrderedDict()
        self._blocks: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._cache_files = cache_files
        self._cache_blocks = cache_blocks

    def read(self, segment: int, offset: int, length: int, *, last_read: bool = False) -> bytes:
        """``last_read``: the caller will not read this record again soon (the decoder reads each
        record once), so its pages leave the page cache. Why: on this machine's VM the host takes
        back free memory (virtio-balloon free page reporting), and a page cache that only grows
        gets every new page from the host: writing a 1.3 MB request cost 2.1-2.4 ms of CPU over
        2 GB of appends, 0.8 ms when the pages were dropped once read and so came back warm.
        Queries and replay read the bytes from disk again, which they do rarely."""
        with self._lock:
            f = self._files.get(segment)
            if f is None:
                self._prune()
                f = self._files[segment] = open_segment(self.dir, segment)
                while len(self._files) > self._cache_files:
                    self._forget(self._files.popitem(last=False)[1])
            self._files.move_to_end(segment)
            if f.compressed:
                data = f.pread(offset, length, self._blocks)
                while len(self._blocks) > self._cache_blocks:
                    self._blocks.popitem(last=False)
            else:
                data = os.pread(f.fd, length, offset)
                if last_read and len(data) == length:
                    # The frame header too; pages shared with a neighbour record are kept by the kernel
                    # (it drops only whole pages of the range), dirty ones are never dropped.
                    os.posix_fadvise(f.fd, offset - FRAME.size, length + FRAME.size, os.POSIX_FADV_DONTNEED)
        if len(data) != length:
            raise OSError(f"segment {segment} ends before byte {offset + length} (a payload is missing)")
        return data

    def _forget(self, f) -> None:
        if f.compressed:
            for key in [k for k in self._blocks if k[0] == f.fd]:
                del self._blocks[key]
        f.close()

    def _prune(self) -> None:
        """Under ``_lock``: close files that compaction or retention deleted, so their space is freed
        (an open descriptor keeps a deleted file's blocks allocated)."""
        for seg, f in list(self._files.items()):
            try:
                gone = os.fstat(f.fd).st_nlink == 0
            except OSError:
                gone = True
            if gone:
                del self._files[seg]
                self._forget(f)

    def prune(self) -> None:
        with self._lock:
            self._prune()

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
            self._blocks.clear()
