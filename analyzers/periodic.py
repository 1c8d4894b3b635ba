"""A component that recomputes something on an interval in a background thread."""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("shadowlens.analyzers")


class Periodic:
    """Subclasses set ``interval_s`` and implement ``refresh_now()``; a failing refresh is logged and retried."""
    interval_s: float = 5.0
    thread_name = "shadowlens-periodic"

    def refresh_now(self):
        raise NotImplementedError

    def start(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                self.refresh_now()
            except Exception:  # keep refreshing; the error is logged
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
