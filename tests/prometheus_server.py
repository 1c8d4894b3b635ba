"""A real Prometheus server for end-to-end tests: scrapes one target on loopback every second.

    prom = PrometheusServer(target="127.0.0.1:9464", workdir=tmp_path / "prom").start()
    try:
        prom.wait_for('count_over_time(up{job="shadowlens"}[1m])', lambda r: r and float(r[0]["value"][1]) >= 2)
        rows = prom.query("sum(shadowlens_traces_total)")
    finally:
        prom.stop()

The binary is Debian's ``prometheus`` package (``make test`` installs it with
scripts/install-prometheus.sh). Without it the test is skipped, unless ``CI`` is set: CI must run it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

import pytest
from harness import free_port, wait_for

JOB = "shadowlens"


def prometheus_binary() -> str:
    """The path of ``prometheus``; skips the test when it is missing (fails instead when ``CI`` is set)."""
    path = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if path:
        return path
    reason = ("the `prometheus` binary is not on PATH; install it with `sh scripts/install-prometheus.sh` "
              "(Debian's prometheus package; `make test` does this)")
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the Prometheus end-to-end test must run, but {reason}", pytrace=False)
    pytest.skip(reason)


class PrometheusError(AssertionError):
    pass


class PrometheusServer:
    """One ``prometheus`` process with a temporary config and TSDB under ``workdir``."""

    def __init__(self, target: str, workdir: Path, scrape_interval: str = "1s", metrics_path: str = "/metrics",
                 job: str = JOB, extra_args: tuple[str, ...] = (), scrape: dict | None = None):
        """``scrape``: more keys of the scrape config (scheme, tls_config, authorization, ...)."""
        self.target = target
        self.workdir = Path(workdir)
        self.scrape_interval = scrape_interval
        self.metrics_path = metrics_path
        self.job = job
        self.extra_args = list(extra_args)
        self.scrape = dict(scrape or {})
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_config(self) -> Path:
        cfg = self.workdir / "prometheus.yml"
        # JSON is YAML; no YAML library needed.
        cfg.write_text(json.dumps({
            "global": {"scrape_interval": self.scrape_interval, "scrape_timeout": self.scrape_interval,
                       "evaluation_interval": self.scrape_interval},
            "scrape_configs": [{"job_name": self.job, "metrics_path": self.metrics_path, "scheme": "http",
                                "static_configs": [{"targets": [self.target]}], **self.scrape}],
        }, indent=2))
        return cfg

    def start(self, timeout: float = 30.0, attempts: int = 3) -> "PrometheusServer":
        binary = prometheus_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self._write_config()
        last = ""
        for _ in range(attempts):       # a free port can be taken between probing and binding: retry
            self.port = free_port()
            storage = self.workdir / f"tsdb-{self.port}"
            args = [binary, f"--config.file={cfg}", f"--storage.tsdb.path={storage}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn", *self.extra_args]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                             start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    pass
                time.sleep(0.1)
            last = self.log()
            self.stop()
            if "address already in use" not in last:
                break
        raise PrometheusError(f"prometheus did not become ready:\n{last}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "PrometheusServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP API ------------------------------------------------------------------------------------
    def api(self, path: str, **params) -> dict | list:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list:
        """An instant query; returns the result list (for a vector: ``[{"metric": {...}, "value": [t, "v"]}]``)."""
        data = self.api("query", query=promql)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, promql: str, predicate: Callable[[list], bool], timeout: float = 30.0,
                 interval: float = 0.25) -> list:
        """Poll ``promql`` until ``predicate(result)`` holds; raise with the last result on timeout."""
        last: list = [[]]

        def holds():
            if self.proc is not None and self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            last[0] = self.query(promql)
            return predicate(last[0])
        wait_for(holds, timeout, interval, what=f"prometheus: {promql!r}",
                 detail=lambda: f"last result: {last[0]}\ntargets: {self.targets()}\nlog:\n{self.log()}")
        return last[0]

    def targets(self) -> list:
        try:
            return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError", "lastScrape")}
                    for t in self.api("targets")["activeTargets"]]
        except (OSError, PrometheusError) as e:
            return [f"unavailable: {e}"]


def value(sample: dict) -> float:
    """The float value of one instant-vector sample (``"+Inf"``/``"NaN"`` included)."""
    return float(sample["value"][1])
