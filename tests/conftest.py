"""Shared fixtures: a real ``shadowlens serve`` process on free loopback ports."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHADOWLENS = [sys.executable, "-m", "shadowlens.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    data_dir: Path
    grpc_port: int
    http_port: int
    metrics_port: int
    env: dict
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    extra_args: list = field(default_factory=list)
    ssl_context: object = None      # metrics.tls on: /readyz is polled over HTTPS with this context

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.metrics_port}"

    def start(self, timeout: float = 30.0) -> "Server":
        self.log_path = self.data_dir.parent / f"serve-{self.metrics_port}.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(SHADOWLENS + ["serve", "--data-dir", str(self.data_dir), *self.extra_args],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.metrics_url + "/readyz", timeout=1, context=self.ssl_context) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"serve did not become ready in {timeout}s:\n{self.log()}")

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
        with urllib.request.urlopen(self.metrics_url + "/metrics", timeout=10) as r:
            return r.read().decode()


def server_env(grpc_port, http_port, metrics_port, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHADOWLENS_")}
    env.update({
        "SHADOWLENS_RECEIVERS__GRPC__ENDPOINT": f"127.0.0.1:{grpc_port}",
        "SHADOWLENS_RECEIVERS__HTTP__ENDPOINT": f"127.0.0.1:{http_port}",
        "SHADOWLENS_METRICS__ENDPOINT": f"127.0.0.1:{metrics_port}",
        "PYTHONPATH": str(REPO),
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def serve_factory(tmp_path):
    """Start ``shadowlens serve`` processes; all are stopped at teardown."""
    started: list[Server] = []

    def make(data_dir: Path | None = None, env: dict | None = None, start: bool = True, args=()) -> Server:
        g, h, m = free_port(), free_port(), free_port()
        srv = Server(data_dir=Path(data_dir or tmp_path / f"data{len(started)}"), grpc_port=g, http_port=h,
                     metrics_port=m, env=server_env(g, h, m, **(env or {})), extra_args=list(args))
        started.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in started:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop(timeout=30)


@pytest.fixture
def server(serve_factory):
    return serve_factory()
