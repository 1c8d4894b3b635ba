"""What can stop ``serve`` from starting, found before anything is created: a data dir another process
holds, an address another process listens on. Each becomes one line naming the conflict and the key
that moves it (``shadowlens serve`` exits 2 on it); ``shadowlens demo`` asks the same questions before
it starts its child.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import struct
from pathlib import Path

from .collector.errors import ConfigError, ShadowlensError
from .collector.store.database import db_path
from .config import ENV_PREFIX, Config, Endpoint

# the listeners serve opens, with the config key that sets each
ENDPOINT_KEYS = ("receivers.grpc.endpoint", "receivers.http.endpoint", "metrics.endpoint")


class StartupError(ShadowlensError):
    """serve cannot start because of something outside it (a held data dir, a taken address)."""


def env_name(key: str) -> str:
    """receivers.grpc.endpoint -> SHADOWLENS_RECEIVERS__GRPC__ENDPOINT (config.py's override rule)."""
    return ENV_PREFIX + "__".join(part.upper() for part in key.split("."))


def endpoints(cfg: Config) -> dict[str, Endpoint]:
    return dict(zip(ENDPOINT_KEYS, (cfg.receivers.grpc, cfg.receivers.http, cfg.metrics)))


def address_in_use(ep: Endpoint) -> bool:
    """Would binding ``ep`` fail because something listens there? Binds with SO_REUSEADDR, as the
    receivers do, so a port in TIME_WAIT is not reported; port 0 (any free port) never conflicts."""
    if ep.port == 0:
        return False
    family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ep.host, ep.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise          # e.g. an address this host does not have: the receiver's own error says so
    return False


def endpoints_in_use(cfg: Config) -> list[tuple[str, Endpoint]]:
    return [(key, ep) for key, ep in endpoints(cfg).items() if address_in_use(ep)]


def describe_in_use(taken: list[tuple[str, Endpoint]]) -> str:
    parts = [f"{ep} ({key}, or {env_name(key)})" for key, ep in taken]
    return ("address " if len(parts) == 1 else "addresses ") + ", ".join(parts) + \
        (" is" if len(parts) == 1 else " are") + " already in use by another process"


def lock_holder(db_file: Path) -> int | None:
    """The pid holding a lock on the DuckDB file, or None. DuckDB locks the whole file with fcntl
    (F_WRLCK for a writer, F_RDLCK for a read-only reader); F_GETLK names the holder without taking
    the lock or creating the file."""
    try:
        fd = os.open(db_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        layout = "hhqqi4x"           # struct flock on 64-bit Linux: type, whence, start, len, pid
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(layout, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        kind, _, _, _, pid = struct.unpack(layout, answer)
        return pid if kind != fcntl.F_UNLCK and pid > 0 else None
    except (OSError, struct.error):
        return None
    finally:
        os.close(fd)


def describe_process(pid: int) -> str:
    """"shadowlens serve" for a shadowlens command, else the program's name."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "another process"
    words = [os.path.basename(a.decode(errors="replace")) for a in args if a]
    for i, w in enumerate(words):
        if w in ("shadowlens", "shadowlens.cli") and i + 1 < len(words) and not words[i + 1].startswith("-"):
            return f"shadowlens {words[i + 1]}"
    return words[0] if words else "another process"


def data_dir_in_use(data_dir_text: str, pid: int) -> str:
    return (f"data dir {data_dir_text} is in use by {describe_process(pid)} (pid {pid}); stop it,"
            " or give this one another --data-dir (store.data_dir)")


def lock_error_pid(exc: BaseException) -> int | None:
    """DuckDB's own lock error (when another process won the race after the check) names the pid."""
    m = re.search(r"Conflicting lock is held in .*\(PID (\d+)\)", str(exc))
    return int(m.group(1)) if m else None


def check(cfg: Config, data_dir_text: str) -> None:
    """Raise StartupError for a held data dir, a taken address, or an unusable TLS or token file;
    creates nothing."""
    from .collector import security
    try:
        security.load(cfg)
    except ConfigError as exc:
        raise StartupError(str(exc)) from None
    pid = lock_holder(db_path(Path(cfg.store.data_dir)))
    if pid is not None and pid != os.getpid():
        raise StartupError(data_dir_in_use(data_dir_text, pid))
    taken = endpoints_in_use(cfg)
    if taken:
        raise StartupError(describe_in_use(taken) + "; stop it, or set another address")


class StoreFootprint:
    """What a start created in the data dir, so that a failed start can take it back.

    Only a start that found no store removes anything, and only while the payload log is empty:
    a span is acknowledged only after it is in the payload log, so an empty log means nothing
    anybody sent is lost."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.dir_existed = self.data_dir.exists()
        self.before = set(os.listdir(self.data_dir)) if self.dir_existed else set()
        self.store_existed = db_path(self.data_dir).exists()

    def _log_is_empty(self) -> bool:
        from .collector.store.segments import SEGMENTS_DIR
        seg = self.data_dir / SEGMENTS_DIR
        return not seg.exists() or all(p.stat().st_size == 0 for p in seg.rglob("*") if p.is_file())

    def take_back(self) -> None:
        if self.store_existed or not self.data_dir.exists() or not self._log_is_empty():
            return
        for name in set(os.listdir(self.data_dir)) - self.before:
            path = self.data_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if not self.dir_existed:
            try:
                self.data_dir.rmdir()
            except OSError:
                pass      # something else was put there meanwhile: leave it
