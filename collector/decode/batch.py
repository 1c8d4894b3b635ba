"""NormalizedBatch: what decode hands to the store, and how it crosses to the store process."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa


@dataclass
class NormalizedBatch:
    """What decode hands to the store. ``keys`` (64-bit span keys, see ``ids.span_keys``) align with ``spans`` rows."""
    signal: str                       # "traces" | "logs"
    spans: pa.RecordBatch | None
    evals: pa.RecordBatch | None
    logs: pa.RecordBatch | None
    keys: Any                         # numpy uint64 array (traces); a list for logs
    received: int                     # spans or log records in the request
    rejected: int
    reasons: Counter = field(default_factory=Counter)
    message: str = ""
    payload: bytes = b""              # the request as protobuf bytes (the bulky part's home)
    unpriced: Counter = field(default_factory=Counter)   # model -> LLM spans with tokens but no price
    mixed: Counter = field(default_factory=Counter)      # gateway -> spans a gateway wrote two calls onto (litellm.py)

    @property
    def accepted(self) -> int:
        return len(self.keys)

    # Crossing to the store process: each Arrow batch as one IPC stream buffer. Pickle's default
    # (a __reduce__ per array and field, ~40 columns) cost ~4 us a span of the frontend's GIL.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in ("spans", "evals", "logs"):
            if state[name] is not None:
                state[name] = _ipc_bytes(state[name])
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("spans", "evals", "logs"):
            if state[name] is not None:
                state[name] = pa.ipc.open_stream(state[name], options=_IPC_READ).read_next_batch()
        self.__dict__.update(state)


_IPC_WRITE = pa.ipc.IpcWriteOptions(use_threads=False)   # 512 rows: a thread pool costs more than it saves
_IPC_READ = pa.ipc.IpcReadOptions(use_threads=False)


def _ipc_bytes(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema, options=_IPC_WRITE) as w:
        w.write_batch(batch)
    # as bytes: pickling the pa.Buffer itself measured ~380 us for a 512-span batch, the copy ~5 us
    return sink.getvalue().to_pybytes()


def rows_to_batch(rows: list[tuple], sch: pa.Schema) -> pa.RecordBatch:
    """Row tuples (the few eval and log rows) -> one record batch of schema ``sch``."""
    columns = list(zip(*rows))
    return pa.RecordBatch.from_arrays(
        [pa.array(col, type=f.type) for col, f in zip(columns, sch)], schema=sch)
