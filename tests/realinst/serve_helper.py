"""Start a real ``shadowlens serve`` on free loopback ports and query its store.

Stand-in for the ``serve_factory`` fixture of ``tests/conftest.py`` (same attributes:
``grpc_endpoint``, ``http_endpoint``, ``metrics_url``, ``data_dir``, ``query(sql)``, ``stop()``),
used when that fixture is missing or cannot be used from a module-scoped fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def shadowlens_cmd() -> list[str]:
    """``$REALINST_SHADOWLENS`` if set, else the console script next to the interpreter, else on PATH."""
    override = os.environ.get("REALINST_SHADOWLENS")
    if override:
        return [override]
    exe = Path(sys.executable).with_name("shadowlens")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("shadowlens")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from collector.cli import main; sys.exit(main())"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServe:
    def __init__(self, data_dir: Path, extra_env: dict[str, str] | None = None, ready_timeout: float = 60.0) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.grpc_endpoint = f"127.0.0.1:{self.grpc_port}"
        self.http_endpoint = f"127.0.0.1:{self.http_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        self.log_path = self.data_dir.parent / (self.data_dir.name + "-serve.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SHADOWLENS_", "OTEL_"))}
        env.update({
            "SHADOWLENS_RECEIVERS__GRPC__ENDPOINT": self.grpc_endpoint,
            "SHADOWLENS_RECEIVERS__HTTP__ENDPOINT": self.http_endpoint,
            "SHADOWLENS_METRICS__ENDPOINT": f"127.0.0.1:{self.metrics_port}",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(extra_env or {})
        self._env = env
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            shadowlens_cmd() + ["serve", "--data-dir", str(self.data_dir)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self._wait_ready(ready_timeout)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"shadowlens serve exited {self.proc.returncode} before ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.metrics_url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:
                last = str(e)
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"shadowlens serve not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def query(self, sql: str) -> list[dict[str, Any]]:
        proc = subprocess.run(
            shadowlens_cmd() + ["query", "--data-dir", str(self.data_dir), "--format", "json", sql],
            env=self._env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"shadowlens query failed ({proc.returncode}): {sql}\n{proc.stderr[-3000:]}")
        out = proc.stdout.strip()
        return json.loads(out) if out else []

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode
