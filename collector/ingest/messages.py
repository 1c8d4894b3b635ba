"""Every message that crosses a process boundary of ingest, as a frozen dataclass.

    supervisor -> frontend:  Ack, Nack, Barrier, Stop
    frontend -> supervisor:  Ready, Failed, Counters, Stopped
    frontend -> decoder:     Record, Barrier
    decoder -> supervisor:   Batch, Undecodable, Counters, Barrier, Stopped

Pipes are ordered: a Barrier the supervisor sends to the frontend comes back through the decoder
after every record acknowledged before it, which is how a query sees every acknowledged span.
One message per request or per event, never per span: a Batch carries the request's Arrow columns,
which pickle as one IPC buffer each (NormalizedBatch.__getstate__). Each message pickles as its
class and a tuple of its fields (``_Message.__reduce__``): ~9 us a round trip, once per request.
This module imports no numpy, pyarrow or DuckDB: the frontend process loads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..settings import EvalSettings, ReceiversSettings

if TYPE_CHECKING:
    from ..decode.batch import NormalizedBatch


class _Message:
    """Pickles as (class, field values), read by one ``attrgetter``: a slotted frozen dataclass otherwise
    pickles a state list and sets each field through ``object.__setattr__`` twice over."""
    __slots__ = ()
    _values: Callable[[Any], tuple] = staticmethod(lambda _: ())

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        names = cls.__dict__.get("__slots__", ())     # dataclass(slots=True) builds the class again with them
        if len(names) == 1:
            get = attrgetter(names[0])
            cls._values = staticmethod(lambda m: (get(m),))
        elif names:
            cls._values = staticmethod(attrgetter(*names))

    def __reduce__(self):
        return type(self), self._values(self)


# -- settings: what the supervisor passes to both children when it starts them -----------------------
@dataclass(frozen=True, slots=True)
class IngestSettings:
    """The part of the configuration the children need; they never load the configuration."""
    data_dir: Path
    receivers: ReceiversSettings                    # endpoints, limits, TLS, token
    cohort_labels: Mapping[str, tuple[str, ...]]
    evals: EvalSettings                             # the eval pass/fail rule (the decoder stores outcomes)
    prices: tuple                                   # user price entries over the shipped table
    queue_max_spans: int                            # acknowledged, not yet committed spans before UNAVAILABLE
    metrics_max_models: int | None                  # unpriced_spans keeps this many ``model`` values; None: all


# -- supervisor -> frontend --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ack(_Message):
    """Record ``rid`` is committed to DuckDB: the frontend stops counting its spans as queued."""
    rid: int


@dataclass(frozen=True, slots=True)
class Nack(_Message):
    """Record ``rid`` is not in DuckDB and will not be by this run; ``message`` says where it is
    (set aside in the quarantine, or left in the segment log for the next start)."""
    rid: int
    message: str


@dataclass(frozen=True, slots=True)
class Barrier(_Message):
    """Passed supervisor -> frontend -> decoder -> supervisor behind every record acknowledged before it."""
    token: int


@dataclass(frozen=True, slots=True)
class Stop(_Message):
    """Stop accepting, let in-flight Exports get their acks, then exit (the decoder follows)."""


# -- children -> supervisor --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready(_Message):
    """The frontend's receivers listen."""


@dataclass(frozen=True, slots=True)
class Failed(_Message):
    """The frontend could not start; ``message`` says why (e.g. an address in use)."""
    message: str


@dataclass(frozen=True, slots=True)
class Counters(_Message):
    """A child's ingest counters (``IngestCounters.snapshot()``); the supervisor sums the two children's."""
    values: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Stopped(_Message):
    """The child passed on everything it had and exits."""


# -- frontend -> decoder -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Record(_Message):
    """An acknowledged request: its payload's place in the segment log, not its bytes.
    ``low_segment``: the lowest segment the frontend may still send records of (writer.replay_from)."""
    rid: int
    segment: int
    offset: int
    length: int
    signal: str                 # "traces" | "logs"
    low_segment: int

    @property
    def ref(self) -> tuple[int, int, int]:
        return self.segment, self.offset, self.length


# -- decoder -> supervisor ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Batch(_Message):
    """A record decoded to Arrow columns for the writer."""
    rid: int
    batch: NormalizedBatch
    ref: tuple[int, int, int]   # (segment, offset, length) of its payload
    low_segment: int


@dataclass(frozen=True, slots=True)
class Undecodable(_Message):
    """An acknowledged record the decoder could not decode: the supervisor sets it aside (see the rule in
    ``shadowlens.collector.ingest``)."""
    rid: int
    ref: tuple[int, int, int]
    signal: str
    low_segment: int
    reason: str
