"""Error classes shared by every stage; ``receivers/status.py`` maps them to gRPC/HTTP once."""
from __future__ import annotations


class ShadowlensError(Exception):
    """Base class for errors shadowlens raises on purpose."""


class ConfigError(ShadowlensError):
    """The configuration (file, env or flag) is wrong; the message names the key."""


class PermanentError(ShadowlensError):
    """The request itself is bad (undecodable, wrong content type); retrying cannot help."""


class TooLarge(ShadowlensError):
    """The request is over the configured size limit (before or after decompression)."""


class Overloaded(ShadowlensError):
    """The ingest queue is full; the client should retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShuttingDown(Overloaded):
    """The server is draining; the client should retry against the restarted sidecar."""


class StorageFull(Overloaded):
    """The data disk is full (or its quota used up): nothing was acknowledged, and the same request
    succeeds once space returns, so it is answered like a full queue (UNAVAILABLE / 503 with a delay).
    ``reason`` is ``disk_full`` or ``disk_quota``."""

    def __init__(self, message: str, retry_after_s: float = 5.0, reason: str = "disk_full"):
        super().__init__(message, retry_after_s)
        self.reason = reason


class SetAside(PermanentError):
    """The store could not insert this record although it passed the checks: it was copied to the
    quarantine (``store/quarantine.py``) instead of failing the records committed with it."""
