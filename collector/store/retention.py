"""Deletes data older than ``store.retention`` in the background, off the writer thread.

DuckDB lets a second connection of the same process delete old rows while the writer
appends new ones (they touch different rows), so ingest does not wait for retention.
Payload segments are removed once no payload row references them.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import duckdb

from .database import SEGMENTS_DIR
from .segments import list_segments, segment_path

log = logging.getLogger("shadowlens.retention")


class Retention:
    def __init__(self, data_dir: Path, cursor_factory, retention_s: float, interval_s: float,
                 current_segment: Callable[[], int], now: Callable[[], float] = time.time):
        self.data_dir = Path(data_dir)
        self.cursor_factory = cursor_factory
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
            except duckdb.Error as exc:   # e.g. a write conflict: the next round retries
                log.warning("retention pass failed, will retry: %s", exc)

    def run_once(self) -> int:
        cutoff_us = int((self.now() - self.retention_s) * 1e6)
        con = self.cursor_factory()
        try:
            con.begin()
            n = con.execute("DELETE FROM spans_core WHERE start_time < make_timestamp(?::BIGINT)",
                            [cutoff_us]).fetchone()[0]
            con.execute("DELETE FROM evals WHERE ingest_seq <= (SELECT max(ingest_seq) FROM payloads "
                        "WHERE received_at < make_timestamp(?::BIGINT))", [cutoff_us])
            con.execute("DELETE FROM logs WHERE received_at < make_timestamp(?::BIGINT)", [cutoff_us])
            con.execute("DELETE FROM payloads WHERE received_at < make_timestamp(?::BIGINT) AND payload_id NOT IN "
                        "(SELECT DISTINCT payload_id FROM spans_core WHERE payload_id IS NOT NULL)", [cutoff_us])
            con.commit()
            live = {r[0] for r in con.execute("SELECT DISTINCT segment FROM payloads").fetchall()}
        finally:
            con.close()
        current = self.current_segment()
        for seg in list_segments(self.data_dir / SEGMENTS_DIR):
            if seg < current and seg not in live:
                try:
                    os.remove(segment_path(self.data_dir / SEGMENTS_DIR, seg))
                except FileNotFoundError:
                    pass
        self.deleted_spans += int(n)
        return int(n)

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
