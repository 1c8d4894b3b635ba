"""A component that recomputes something on an interval in a background thread."""
from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger("shadowlens.analyzers")


class Periodic:
    """Subclasses set ``interval_s`` and implement ``refresh_now()``; a failing refresh is logged and retried.

    A subclass whose result can be known unchanged (nothing was written, nothing aged out) overrides
    ``stale()``: the thread still wakes every ``interval_s``, so a change is picked up as soon as
    before, but an idle sidecar no longer reruns the same queries every few seconds."""
    interval_s: float = 5.0
    thread_name = "shadowlens-periodic"
    refreshes = 0          # refresh_now calls made by the loop (tests: a quiet store is not recomputed)
    # called first on every tick: what the result is computed from is brought up to date (serve: the
    # assembler's round_now, so that traces due now are in the table the refresh reads)
    before: Callable[[], object] | None = None

    def refresh_now(self):
        raise NotImplementedError

    def stale(self) -> bool:
        """Whether the last result may differ from a new one; True: always recompute."""
        return True

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        failed = False
        while True:
            try:
                if self.before is not None:
                    self.before()
                if failed or self.stale():
                    self.refreshes += 1
                    self.refresh_now()
                failed = False
            except Exception:  # keep refreshing; the error is logged
                failed = True
                log.exception("%s failed", self.thread_name)
            if self._stop.wait(self.interval_s):
                return

    def shutdown(self, timeout: float = 5.0) -> None:
        stop, thread = getattr(self, "_stop", None), getattr(self, "_thread", None)
        if stop is not None:
            stop.set()
        if thread is not None:
            thread.join(timeout)
            self._thread = None
