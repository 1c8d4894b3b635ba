"""Memory settings of serve's processes (issue 18, part 4: the sidecar's memory): allocators, and the
library code a process at rest gives back (``release_code_pages``, ``IdleRelease``, at the end).

The allocator settings are applied before the allocator each tunes first runs, and a value the user set in
the environment wins.
Measured with bench/footprint.py (summed PSS of the three processes, distinct pages; medians of 2 runs,
old and new back to back; 40 s at 1,000 spans/s), both together with DuckDB's async_threads (database.py):
idle 236 -> 230 MB, 1,000 spans/s 312 -> 305 MB.

- Arrow buffers from glibc's malloc instead of pyarrow's bundled mimalloc (``ARROW_DEFAULT_MEMORY_POOL``):
  mimalloc keeps the pages of freed buffers for reuse, and the decoder, which builds one request's columns
  at a time and pickles them away, held 63 MB at 1,000 spans/s and 46 idle; with malloc 55 and 44. Serve's
  process: no mimalloc reservation (4-6 MB resident), its Arrow buffers now in the main heap instead.
  pyarrow reads the variable once, when its first buffer is allocated, which importing it already does:
  so ``shadowlens serve`` sets it before it imports serve's modules, and the children inherit it.
- At most two glibc malloc arenas (``MALLOC_ARENA_MAX`` / ``mallopt(M_ARENA_MAX)``): glibc gives each thread
  that allocates an arena of its own (up to 8 per core) and keeps the free pages of each. In serve's process
  (twenty-odd Python threads) the thread arenas held 14 MB resident at 1,000 spans/s, 6 MB with two (one
  snapshot each; the process's median moves by +-5 MB from run to run, more than this). The children read
  the variable when they start; serve's process has started already and is told by mallopt, which holds for
  the threads that allocate after it.

Tried and left out (no change beyond that noise at 1,000 spans/s): polars' jemalloc with a 1 s dirty decay
(``_RJEM_MALLOC_CONF``), DuckDB's allocator_flush_threshold 16MB, memory_limit 64MB or 32MB (DuckDB holds
~28 MB allocated after 40 s), malloc_trim every 2 s in serve's process (released 0.6 MB on average).
"""
from __future__ import annotations

import ctypes
import os
import time

ARENA_MAX = 2
M_ARENA_MAX = -8          # glibc's malloc.h
TRIM_FREE_BYTES = 16 << 20
TRIM_EVERY_S = 10.0
IDLE_RELEASE_S = 30.0
MADV_PAGEOUT = 21         # Linux 5.4's <asm-generic/mman-common.h>


def set_environment() -> None:
    """Before pyarrow is imported: the environment of serve's process and of the children it starts."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    os.environ.setdefault("MALLOC_ARENA_MAX", str(ARENA_MAX))


def limit_arenas() -> bool:
    """This process's glibc malloc: at most ``MALLOC_ARENA_MAX`` arenas from now on; False where there is
    no glibc (musl has no arenas to limit)."""
    try:
        n = int(os.environ.get("MALLOC_ARENA_MAX", ARENA_MAX))
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, n))
    except (OSError, AttributeError, ValueError):
        return False


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


class HeapTrim:
    """Gives the free pages of glibc's heap back to the system once more than ``free_bytes`` are held, at most
    every ``every_s``; call ``maybe()`` from a periodic thread.

    The frontend's gRPC receive buffers (16 in flight of ~1.3 MB each at saturation) come from the heap, and
    glibc keeps the pages of freed chunks that are not at its top: after a burst the frontend held 76 MB where
    it started with 34, and kept them at 1,000 spans/s (the window-full reading of bench/footprint.py).
    ``malloc_trim(0)`` after the burst: 37 MB. ``mallinfo2`` costs ~1 us; a trim ~0.1 ms, and the pages it
    gives back during a burst are faulted in again (16 MB every 10 s at most: nothing beside the 0.5 GB/s the
    frontend copies then). A no-op without glibc (``available`` False)."""

    def __init__(self, free_bytes: int = TRIM_FREE_BYTES, every_s: float = TRIM_EVERY_S, clock=None):
        import time
        self.free_bytes, self.every_s = free_bytes, every_s
        self.clock = clock or time.monotonic
        self._last = float("-inf")
        self.trims = 0
        try:
            libc = ctypes.CDLL(None)
            self._info, self._trim = libc.mallinfo2, libc.malloc_trim
            self._info.restype = _MallInfo2
            self.available = True
        except (OSError, AttributeError):      # not glibc, or older than 2.33 (no mallinfo2)
            self.available = False

    def free_held(self) -> int:
        """Bytes free in the heap's arenas (glibc's ``fordblks``): held by the process, used by nothing."""
        return int(self._info().fordblks) if self.available else 0

    def maybe(self) -> bool:
        """Trim if it is time and enough is free; True if it trimmed."""
        now = self.clock()
        if not self.available or now - self._last < self.every_s:
            return False
        self._last = now
        if self.free_held() < self.free_bytes:
            return False
        self._trim(0)
        self.trims += 1
        return True


def release_code_pages() -> int:
    """Ask the kernel to reclaim this process's pages of read-only file mappings (its libraries' code and
    constants) that no other process maps; the bytes of the mappings advised (0 where MADV_PAGEOUT is
    unknown: before Linux 5.4, or not Linux).

    Importing pyarrow, polars, DuckDB and gRPC touches far more of their code than serving uses: serve's
    process held ~65 MB of library pages at rest that it does not run again, which the kernel reclaims
    only under memory pressure, so they count in the pod's memory until then. A page that is used again
    is read back in (a page fault, from the page cache or the disk) and stays: what remains resident is
    what the process runs. Writable mappings (a library's data, the heap) are not touched."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised = 0
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or not fields[5].startswith("/") or "w" in fields[1]:
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if madvise(start, end - start, MADV_PAGEOUT) == 0:
                    advised += end - start
    except OSError:
        return advised
    return advised


class IdleRelease:
    """Once a process has had no work for ``idle_s``, ``release_code_pages`` once, until the next work.

    ``busy()`` when work comes; ``maybe()`` from the loop that waits for it, at least every ``wait_s()``
    seconds (None: nothing to release until more work). The pages that startup alone touched go back to
    the kernel half a minute after start or after a burst, and the periodic work of a sidecar at rest
    (scrapes, the gate's refresh) reads back the few it runs."""

    def __init__(self, idle_s: float = IDLE_RELEASE_S, clock=time.monotonic, release=release_code_pages):
        self.idle_s, self.clock, self._release = idle_s, clock, release
        self._last = clock()
        self._released = False
        self.released_bytes = 0

    def busy(self) -> None:
        self._last = self.clock()
        self._released = False

    def wait_s(self) -> float | None:
        return None if self._released else max(0.0, self._last + self.idle_s - self.clock())

    def maybe(self) -> bool:
        """Release if the process has been idle long enough and has not released since its last work."""
        if self._released or self.clock() - self._last < self.idle_s:
            return False
        self._released = True
        self.released_bytes = self._release()
        return True
