"""Deletes data older than ``store.retention``, every ``store.retention_check``.

The deletes are a derived write (``derived.delete_older_than``): the store's writer runs them
between two span commits, so one thread writes the file. A pass deletes what aged out since the
last one (a minute of data by default), so commits wait for a short delete, not for a backlog.
Payload segments are removed here, off the writer thread, once no payload row references them.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import duckdb

from .database import SEGMENTS_DIR
from .derived import DerivedWrite, delete_older_than
from .segments import list_segments, remove_segment

log = logging.getLogger("shadowlens.retention")


class Retention:
    def __init__(self, data_dir: Path, write: Callable[[DerivedWrite], Future], retention_s: float, interval_s: float,
                 current_segment: Callable[[], int], now: Callable[[], float] = time.time):
        """``write``: the store writer's ``write`` (its deletes run on the writer's thread)."""
        self.data_dir = Path(data_dir)
        self.write = write
        self.retention_s = retention_s
        self.interval_s = interval_s
        self.current_segment = current_segment
        self.now = now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.deleted_spans = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="shadowlens-retention", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except duckdb.Error as exc:   # e.g. a full disk: rolled back by the writer; the next round retries
                log.warning("retention pass failed, will retry: %s", exc)

    def run_once(self) -> int:
        cutoff_us = int((self.now() - self.retention_s) * 1e6)
        done = self.write(delete_older_than(cutoff_us)).result()
        n, live = done.spans, done.live_segments
        current = self.current_segment()
        for seg in list_segments(self.data_dir / SEGMENTS_DIR):
            if seg < current and seg not in live:
                remove_segment(self.data_dir / SEGMENTS_DIR, seg)     # plain or compressed
        self.deleted_spans += n
        return n

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


def store_bytes(data_dir: Path) -> float:
    total = 0
    for root, _, files in os.walk(data_dir):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return float(total)
