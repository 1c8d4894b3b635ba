"""The server under test: `shadowlens serve` on free ports with a fresh data dir, watched from /proc.

``Server`` starts it, waits for /readyz, samples the process tree's memory (common.RssSampler) and CPU,
scrapes the shadowlens_* self metrics worth printing, stops it with SIGTERM (wait4, for the lifetime
rusage) and reads its log for problems. ``count_stored`` counts the stored spans with `shadowlens
query` after the stop: stored must equal acknowledged.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

from common import RssSampler, cpu_seconds, free_port


class BacklogSampler(threading.Thread):
    """A paced run's question is whether the pipeline keeps up, and the spans queued for DuckDB at
    the end cannot answer it alone: a steady pipeline always holds about one commit group in flight
    (16-32k spans). So the queue is read every 2 s, and the slope of a line through the second
    half's samples is the backlog's growth: about zero when the store keeps up, the offered rate
    minus the sustained one when it does not. (Every 2 s: /metrics costs the store process tens of
    ms with the analyzers' series in it.)"""

    def __init__(self, server, start, duration, interval=2.0):
        super().__init__(daemon=True)
        self.server, self.start_t, self.duration, self.interval = server, start, duration, interval
        self.samples: list[tuple[float, int]] = []
        self.start()

    def run(self):
        t = self.interval
        while t < self.duration:
            time.sleep(max(0.0, self.start_t + t - time.monotonic()))
            queued = self.server.scrape().get("shadowlens_ingest_queue_spans")
            if queued is not None:
                self.samples.append((round(time.monotonic() - self.start_t, 2), int(queued)))
            t += self.interval

    def growth_per_s(self):
        pts = [(t, q) for t, q in self.samples if t >= self.duration / 2]
        if len(pts) < 3:
            return None
        mt = sum(t for t, _ in pts) / len(pts)
        mq = sum(q for _, q in pts) / len(pts)
        return sum((t - mt) * (q - mq) for t, q in pts) / sum((t - mt) ** 2 for t, _ in pts)


class Server:
    def __init__(self, exe, data_dir, extra_env, verbose=False):
        self.exe, self.data_dir = exe, data_dir
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        env = dict(os.environ)
        env.update({
            "SHADOWLENS_RECEIVERS__GRPC__ENDPOINT": f"127.0.0.1:{self.grpc_port}",
            "SHADOWLENS_RECEIVERS__HTTP__ENDPOINT": f"127.0.0.1:{self.http_port}",
            "SHADOWLENS_METRICS__ENDPOINT": f"127.0.0.1:{self.metrics_port}",
        })
        env.update(extra_env)
        self.log_path = os.path.join(os.path.dirname(data_dir.rstrip("/")), os.path.basename(data_dir) + ".log")
        os.makedirs(data_dir, exist_ok=True)
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([exe, "serve", "--data-dir", data_dir], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.sampler = RssSampler(self.proc.pid)
        self.sampler.start()
        self.exit_code = None
        self.stop_seconds = None
        self.lifetime_cpu = None
        self.lifetime_maxrss_mb = None

    def wait_ready(self, timeout=90.0):
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        t_end = time.monotonic() + timeout
        while time.monotonic() < t_end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout:.0f} s ({url}):\n{self.log_tail()}")

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def scrape(self) -> dict:
        """shadowlens_* self metrics worth printing (summed over label sets)."""
        want = ("shadowlens_spans_received_total", "shadowlens_spans_rejected_total",
                "shadowlens_spans_duplicate_total", "shadowlens_ingest_queue_spans", "shadowlens_open_traces",
                "shadowlens_late_spans_total", "shadowlens_traces_total", "shadowlens_store_bytes",
                "shadowlens_pairs_total")
        out = {}
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
                text = r.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError) as e:
            return {"error": str(e)}
        for line in text.splitlines():
            if not line or line[0] == "#":
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in want:
                try:
                    out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
                except ValueError:
                    pass
        return out

    def stop(self, timeout=180.0):
        """SIGTERM, wait (wait4, to get the lifetime rusage), SIGKILL after `timeout`."""
        t0 = time.monotonic()
        pid = self.proc.pid
        killed = False
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            while True:
                wpid, status, ru = os.wait4(pid, os.WNOHANG)
                if wpid:
                    break
                if not killed and time.monotonic() - t0 > timeout:
                    self.proc.kill()
                    killed = True
                time.sleep(0.05)
            self.proc.returncode = os.waitstatus_to_exitcode(status)
            self.lifetime_cpu = round(ru.ru_utime + ru.ru_stime, 2)
            self.lifetime_maxrss_mb = round(ru.ru_maxrss / 1024, 1)
        self.exit_code = self.proc.returncode if not killed else f"SIGKILLed after {timeout:.0f} s SIGTERM timeout"
        self.stop_seconds = time.monotonic() - t0
        self.sampler.stop()
        self.log.close()

    def log_tail(self, n=25):
        try:
            self.log.flush()
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
            return "\n".join("    | " + ln for ln in lines[-n:])
        except OSError:
            return ""

    def log_problems(self):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return []
        keys = ("Traceback", "ERROR", "Error", "exception", "Exception", "CRITICAL", "WARNING")
        return [ln for ln in lines if any(k in ln for k in keys)]


def count_stored(exe, data_dir):
    cmd = [exe, "query", "--data-dir", data_dir, "--format", "json", "select count(*) as n from spans"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {r.returncode}: {r.stderr.strip()[-500:]}")
    rows = json.loads(r.stdout)
    return int(rows[0]["n"])

