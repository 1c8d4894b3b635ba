"""The one test harness for a real ``shadowlens serve``: a subprocess on free loopback ports with its own data
dir, ready once it writes its ready file, stopped with SIGTERM; plus ``free_port`` and ``wait_for``.

Tests get servers through the ``serve_factory`` / ``server`` fixtures (tests/conftest.py); scripts under
bench/ that need a server import ``start_server`` from here. The in-process pipeline has its own harness.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

REPO = Path(__file__).resolve().parents[1]
SHADOWLENS = [sys.executable, "-m", "shadowlens.cli"]
T = TypeVar("T")


_HANDED_OUT: set[int] = set()
_PICK = random.Random()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback TCP port nobody listens on right now, never one handed out before in this process, and below
    the range the OS takes ephemeral ports from. Asking the OS for port 0 can give the same port twice in a row
    (one server's gRPC and HTTP receivers then collide), and an outgoing connection can take that port before
    the server binds it: both made a restarted serve fail with "Address already in use" once in a while."""
    low = _ephemeral_low()
    if low - 1024 >= 4000:
        for _ in range(1000):
            port = _PICK.randrange(max(1024, low - 12000), low)
            if port in _HANDED_OUT:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            return port
    while True:           # no room below the ephemeral range: let the OS pick, still never the same port twice
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started (serve's frontend and decoder), from /proc."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def wait_for(pred: Callable[[], T], timeout: float = 60.0, interval: float = 0.1, what: str = "condition",
             detail: Callable[[], str] | None = None) -> T:
    """Call ``pred`` until it returns something truthy and return that; after ``timeout`` seconds fail the
    test with ``what`` (and ``detail()``, e.g. a server log, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not met in {timeout:g} s" + (f"\n{detail()}" if detail else ""))
        time.sleep(interval)


def server_env(grpc_port: int, http_port: int, metrics_port: int, **extra) -> dict:
    """This process's environment without any SHADOWLENS_* variable, listening on the three given ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_")}
    env.update({
        "SHADOWLENS_RECEIVERS__GRPC__ENDPOINT": f"127.0.0.1:{grpc_port}",
        "SHADOWLENS_RECEIVERS__HTTP__ENDPOINT": f"127.0.0.1:{http_port}",
        "SHADOWLENS_METRICS__ENDPOINT": f"127.0.0.1:{metrics_port}",
        "PYTHONPATH": str(REPO),
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Server:
    """One ``shadowlens serve`` subprocess. ``start()`` returns once it wrote its ready file (every listener
    is up); ``stop()`` sends SIGTERM and returns the exit status. The log goes to ``serve-<port>.log``
    beside the data dir."""
    data_dir: Path
    grpc_port: int
    http_port: int
    metrics_port: int
    env: dict
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    extra_args: list = field(default_factory=list)
    ssl_context: object = None      # metrics.tls on: /metrics is read over HTTPS with this context

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.metrics_port}"

    @property
    def ready_path(self) -> Path:
        return self.data_dir.parent / f"serve-{self.metrics_port}.ready"

    def start(self, timeout: float = 30.0) -> "Server":
        self.log_path = self.data_dir.parent / f"serve-{self.metrics_port}.log"
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.ready_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                SHADOWLENS + ["serve", "--data-dir", str(self.data_dir), "--ready-file", str(self.ready_path),
                              *self.extra_args], env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(self._ready, timeout, what="serve wrote no ready file", detail=self.log)
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return json.loads(self.ready_path.read_text())["pid"] == self.proc.pid
        except FileNotFoundError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def query(self, sql: str) -> list[dict]:
        out = subprocess.run(SHADOWLENS + ["query", "--data-dir", str(self.data_dir), "--format", "json", sql],
                             env=self.env, capture_output=True, text=True, cwd=REPO, timeout=120)
        if out.returncode != 0:
            raise AssertionError(f"query failed ({out.returncode}): {out.stderr}")
        return json.loads(out.stdout)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.metrics_url + "/metrics", timeout=10, context=self.ssl_context) as r:
            return r.read().decode()


def new_server(data_dir: Path, env: dict | None = None, args=()) -> Server:
    """A ``Server`` on three free ports with ``env`` (SHADOWLENS_* overrides) added; not started yet."""
    g, h, m = free_port(), free_port(), free_port()
    return Server(data_dir=Path(data_dir), grpc_port=g, http_port=h, metrics_port=m,
                  env=server_env(g, h, m, **(env or {})), extra_args=list(args))


def start_server(data_dir: Path, env: dict | None = None, args=(), timeout: float = 30.0) -> Server:
    """Start ``shadowlens serve`` on free ports and return it once ready; the caller stops it."""
    return new_server(data_dir, env, args).start(timeout)
