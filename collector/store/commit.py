"""What the store promises a receiver, and when it refuses work. No DuckDB here: the ingest
frontend process imports this without loading the database."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..counters import IngestCounters
from ..errors import Overloaded, ShuttingDown


@dataclass(frozen=True)
class CommitReceipt:
    """What the store promises a receiver: these rows are durable as of ``seq``."""
    seq: int
    stored: int
    duplicates: int


@dataclass(frozen=True)
class CommittedRows:
    """What one commit added, for in-process readers that follow the store (trace assembly):
    the stored rows' Arrow tables as inserted (duplicates already dropped), so that following the
    store costs no query. ``spans`` / ``evals`` are ``pyarrow.Table`` or None."""
    seq: int
    spans: Any
    evals: Any


def admit(stopping: bool, waiting: int, n: int, limit: int, stats: IngestCounters) -> None:
    """Refuse new work while draining, or when ``n`` more spans would overfill the queue (a lone
    request larger than the limit is still taken: it could never fit otherwise)."""
    if stopping:
        raise ShuttingDown("shadowlens is shutting down; retry against the restarted sidecar", 1.0)
    if waiting and waiting + n > limit:
        stats.add("requests_refused", "queue_full")
        raise Overloaded(f"ingest queue is full ({waiting} spans waiting); retry shortly", 1.0)
