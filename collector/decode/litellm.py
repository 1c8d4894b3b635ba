"""LiteLLM's ``otel`` callback: the decode steps its spans need beyond the alias table (docs/litellm.md).

A deployment with ``silent_model`` mirrors each chat request to a second model; LiteLLM marks the
mirrored call's span ``metadata.is_silent_experiment = true`` and nothing on the primary call. Decode
knows one span at a time, so it does what a span alone tells:

* a silent call is the ``candidate`` route, unless the span names a route itself: the span's own route
  (the per-call route). At the root of its trace (LiteLLM's default without an ambient span) that is the
  trace's route too; under a parent span the analyzers compare the calls one by one (analyzers/units.py):
  a trace's route is its root's, and a trace holding a gateway's call pair is routed ``calls``;
* a silent flag on a span LiteLLM did not create (another scope) means LiteLLM wrote both calls'
  attributes onto the application's span (its default inside an ambient span; last writer wins): the
  span's model, tokens and cost belong to either call. It gets route ``mixed`` (stored, never
  compared) and is counted (``shadowlens_mixed_spans_total{gateway="litellm"}``);
* LiteLLM reports a cost of 0.0 for a model it has no price for: a zero reported cost on a LiteLLM
  span with tokens is not a price, so the price table prices the span (or counts it unpriced).

The primary call carries no mark: the analyzers route it (pairing by parent or by request content) or the
``routes`` config does: see docs/litellm.md.

>>> from collections import Counter
>>> cols = {"silent_experiment": [True, None, True], "route": None, "reported_cost_usd": [0.0, 0.0, None],
...         "input_tokens": [10, 10, 10], "output_tokens": [5, 5, 5]}
>>> mixed = mark_litellm(cols, ["litellm", "litellm", "app"], 3)
>>> cols["route"], cols["reported_cost_usd"], mixed
(['candidate', None, 'mixed'], [None, None, None], 1)
>>> cols = {"silent_experiment": [True], "route": None}
>>> mark_litellm(cols, ["litellm"], 1), cols["route"]
(0, ['candidate'])
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

from . import aliases as A

CANDIDATE = "candidate"
MIXED = "mixed"            # a route value no rule compares (CONTRACT: anything else is stored, not compared)
GATEWAY = "litellm"        # the gateway label of shadowlens_mixed_spans_total


def mark_litellm(cols: dict, scopes: Sequence[str | None], n: int) -> int:
    """Routes of LiteLLM's silent calls, the mixed spans' route, LiteLLM's zero costs (see the module doc);
    ``cols``: the normalizer's concept columns, changed in place. Returns the number of mixed spans."""
    silent = cols.get("silent_experiment")
    mixed = 0
    if silent is not None:
        route = cols.get("route")
        for i, flag in enumerate(silent):
            if flag is not True:
                continue
            if scopes[i] in A.LITELLM_SCOPES:
                if route is None or route[i] is None:
                    if route is None:
                        route = cols["route"] = [None] * n
                    route[i] = CANDIDATE
            else:
                if route is None:
                    route = cols["route"] = [None] * n
                route[i] = MIXED
                mixed += 1
    reported = cols.get("reported_cost_usd")
    if reported is not None and not A.LITELLM_SCOPES.isdisjoint(scopes):
        inp, out = cols.get("input_tokens") or [None] * n, cols.get("output_tokens") or [None] * n
        for i, cost in enumerate(reported):
            if cost == 0 and scopes[i] in A.LITELLM_SCOPES and ((inp[i] or 0) > 0 or (out[i] or 0) > 0):
                reported[i] = None
    return mixed


class MixedSpansWarning:
    """Says in the log that mixed spans arrive: at the first, then at most once per ``interval_s`` with the
    number seen since the last line (never one line per span).

    >>> lines = []
    >>> w = MixedSpansWarning(interval_s=60, now=iter([0.0, 10.0, 70.0]).__next__, emit=lines.append)
    >>> w.note(2); w.note(3); w.note(1)
    >>> [line.split(":")[0] for line in lines]
    ['2 spans', '4 spans']
    """

    def __init__(self, interval_s: float = 60.0, now: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] | None = None):
        self.interval_s = interval_s
        self._now = now
        self._emit = emit or logging.getLogger("shadowlens.decode").warning
        self._last: float | None = None
        self._pending = 0

    def note(self, count: int) -> None:
        if count <= 0:
            return
        self._pending += count
        t = self._now()
        if self._last is not None and t - self._last < self.interval_s:
            return
        self._last = t
        self._emit(f"{self._pending} spans: LiteLLM wrote its calls' attributes onto an application span (a "
                   "non-LiteLLM span carries metadata.is_silent_experiment; last writer wins). Stored with route "
                   "'mixed' and not compared; set USE_OTEL_LITELLM_REQUEST_SPAN=true so that each call gets its own "
                   "span (docs/litellm.md). Counted in shadowlens_mixed_spans_total.")
        self._pending = 0
