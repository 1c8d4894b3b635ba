"""A full data disk is a wait, not a loss: what counts as one, who is waiting, and the retry policy.

With the disk full (or the user's quota reached) nothing can be made durable, and an Export that
failed for it would succeed a little later: the receivers answer UNAVAILABLE / 503 with a retry delay
(``errors.StorageFull``, an ``Overloaded``), which OTLP exporters retry, where INTERNAL / 500 made them
drop the data. What was acknowledged before stays in the payload log, and the store writer keeps
retrying its commit until space returns (``retry_group``) instead of leaving it to the next start.

Each writer (the payload log in the ingest frontend, the DuckDB writer in the store process) has a
``WriteHealth``: failing from a write refused for want of space until a write that began after it
succeeds. It counts ``shadowlens_store_write_errors_total{reason}`` and sets
``shadowlens_store_writable`` through ``IngestCounters``, and ``/readyz`` says not ready meanwhile.

No DuckDB import here: the frontend process loads this module and never the database (a DuckDB
error is recognised by its message, which carries the operating system's).
"""
from __future__ import annotations

import errno
import logging
import threading
import time
import weakref

from ..errors import StorageFull

log = logging.getLogger("shadowlens.store")

# The delay an Export is told to wait. Space comes back by a person or a job deleting files, not in
# milliseconds; a shorter delay only multiplies failed attempts.
RETRY_AFTER_S = 5.0
# The writer's retries of a DuckDB commit: each failed attempt costs the group's inserts (~0.15 s of
# CPU for 32k spans), so they back off, but to no more than 2 s, which bounds how long acknowledged
# spans stay invisible once space has returned.
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 2.0
STILL_FAILING_LOG_S = 60.0

_REASONS = {errno.ENOSPC: "disk_full", errno.EDQUOT: "disk_quota"}
_MESSAGES = {"no space left on device": "disk_full", "disk quota exceeded": "disk_quota"}


def disk_full_reason(exc: BaseException | None) -> str | None:
    """``disk_full`` / ``disk_quota`` if ``exc`` (or an exception it was raised from) is a write
    refused for want of space; None for any other failure, which no waiting would cure."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, StorageFull):
            return exc.reason
        if isinstance(exc, OSError) and exc.errno in _REASONS:
            return _REASONS[exc.errno]
        # DuckDB's I/O failures (IOException, a COMMIT's TransactionException, a spill's OutOfMemory) are
        # OperationalErrors carrying the OS message. Only those: a data error's message may quote a
        # client's value, and taking it for a full disk would retry it for ever.
        if any(k.__name__ == "OperationalError" for k in type(exc).__mro__):
            text = str(exc).lower()
            for needle, reason in _MESSAGES.items():
                if needle in text:
                    return reason
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def refusal(exc: BaseException, what: str) -> BaseException:
    """The exception to raise for a failed write of ``what``: a StorageFull (UNAVAILABLE / 503, retry
    later) when the disk is full, else ``exc`` itself."""
    reason = disk_full_reason(exc)
    if reason is None or isinstance(exc, StorageFull):
        return exc
    room = "the data disk is full" if reason == "disk_full" else "the data disk's quota is used up"
    return StorageFull(f"{room} ({exc.strerror if isinstance(exc, OSError) else exc}); {what} was not stored "
                       f"and nothing was acknowledged: retry in {RETRY_AFTER_S:.0f} s, and free space on the "
                       "store's disk", RETRY_AFTER_S, reason)


class WriteHealth:
    """Whether one writer's writes to the data disk succeed (thread-safe).

    A caller takes ``generation`` before a write and reports ``succeeded(generation)`` after it: a
    success that began before the latest failure proves nothing about the disk now, so it does not
    clear the failing state (two writers racing would make readiness flap).
    """

    def __init__(self, name: str, stats=None):
        self.name = name
        self.stats = stats              # IngestCounters or None
        self._lock = threading.Lock()
        self.generation = 0
        self.failing_since: float | None = None
        self.reason = ""
        self._logged_at = 0.0

    @property
    def ok(self) -> bool:
        return self.failing_since is None

    def failed(self, reason: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self.generation += 1
            first = self.failing_since is None
            if first:
                self.failing_since = now
            self.reason = reason
            say = first or now - self._logged_at >= STILL_FAILING_LOG_S
            if say:
                self._logged_at = now
            since = self.failing_since
        if self.stats is not None:
            self.stats.add("store_write_errors", reason)
            if first:
                self.stats.add("store_write_failing", None, 1)
        if first:
            log.error("%s: a write failed for want of space (%s): Exports get UNAVAILABLE / 503 with a retry "
                      "delay and /readyz says not ready until writes succeed again; free space on the data disk",
                      self.name, exc)
        elif say:
            log.error("%s: writes still fail for want of space after %.0f s (%s)", self.name, now - since, exc)

    def succeeded(self, generation: int) -> None:
        with self._lock:
            if self.failing_since is None or generation != self.generation:
                return
            took = time.monotonic() - self.failing_since
            self.failing_since = None
            self.reason = ""
        if self.stats is not None:
            self.stats.add("store_write_failing", None, -1)
        log.info("%s: writes succeed again after %.1f s without space", self.name, took)


def readiness(started: bool, *stats_sources) -> tuple[bool, str]:
    """``/readyz``: ready once started and while no writer (of this process, or of the ingest
    processes, whose counters arrive as dicts) fails for want of space."""
    if not started:
        return False, "starting or stopping"
    failing = sum(_get(s, "store_write_failing") for s in stats_sources)
    if failing:
        return False, ("not ready: writes to the data disk fail for want of space; Exports are answered "
                       "UNAVAILABLE / 503 with a retry delay and acknowledged spans wait in the payload log. "
                       "Free space on the store's disk")
    return True, "ready"


def _get(source, key: str):
    return source.get(key, 0) if isinstance(source, dict) else getattr(source, key, 0)


_writer_health: "weakref.WeakKeyDictionary[object, WriteHealth]" = weakref.WeakKeyDictionary()


def retry_group(writer, group: list, low, exc: BaseException) -> list | None:
    """The store writer's commit of ``group`` failed with ``exc``. If the disk is full, wait for space
    and commit again (backing off from 0.25 s to 2 s) until it succeeds, and return its results;
    otherwise, or if the writer stops meanwhile, return None and the caller fails the group as before.

    Requires that a failed ``writer._commit`` leaves nothing behind (it remembers duplicate keys only
    once committed). An OSError is the in-process payload sync's, which runs beside the commit and
    may fail after it: retrying that commit would insert the group twice, so only the database's
    failures are retried here.
    """
    reason = disk_full_reason(exc)
    if reason is None or isinstance(exc, OSError):
        return None
    health = _writer_health.get(writer)
    if health is None:
        health = _writer_health[writer] = WriteHealth("store (DuckDB commits)", writer.stats)
    health.failed(reason, exc)
    delay = RETRY_FIRST_S
    while True:
        with writer._cond:
            # wakes early only to stop; new submissions notify this condition too
            stopping = writer._cond.wait_for(lambda: writer._stopping, delay)
        if stopping:
            log.error("stopping while the data disk is full: %d acknowledged requests stay in the payload log "
                      "and are inserted on the next start", len(group))
            return None
        generation = health.generation
        try:
            results = writer._commit(group, low)
        except BaseException as again:  # classified below; the writer thread must go on
            try:
                writer.con.rollback()
            except Exception:  # no transaction open after a failed COMMIT
                pass
            reason = disk_full_reason(again)
            if reason is None:
                log.error("a commit retried after a full disk failed otherwise: %s", again)
                health.succeeded(health.generation)    # not for want of space: not this module's state
                return None
            health.failed(reason, again)
            delay = min(delay * 2, RETRY_MAX_S)
            continue
        writer.stats.add("store_commits", None, 1)
        health.succeeded(generation)
        return results
