"""``shadowlens demo``: ``serve`` as a child process plus the synthetic generator, printing the gate every 5 s."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from .config import Config, Endpoint
from .generate import GenerateOptions, run_generate

POLL_S = 5.0


def _local(ep: Endpoint) -> str:
    """Where a client on this machine reaches a listener bound to ``ep``."""
    host = "127.0.0.1" if ep.host in ("0.0.0.0", "::", "") else ep.host
    return f"[{host}]:{ep.port}" if ":" in host else f"{host}:{ep.port}"


def _fmt_effect(rule: dict) -> str:
    effect, margin = rule.get("effect"), rule.get("margin")
    if not isinstance(effect, (int, float)):
        return ""
    if rule.get("kind", "ratio" if isinstance(margin, (int, float)) and margin >= 1 else "difference") == "ratio":
        return f" (×{effect:.2f}, margin ×{margin:g})"
    text = f" ({effect * 100:+.1f} pts" if abs(effect) <= 1 else f" ({effect:+.3g}"
    return text + (f", margin {margin * 100:g} pts)" if isinstance(margin, (int, float)) else ")")


def _severity(rule: dict) -> float:
    effect, margin = rule.get("effect"), rule.get("margin")
    if isinstance(effect, (int, float)) and isinstance(margin, (int, float)) and margin:
        return abs(effect / margin)
    return 0.0


def gate_summary(doc: dict) -> str:
    """One line for a ``GET /gate`` document (CONTRACT §7)."""
    verdict = doc.get("verdict", "?")
    rules = doc.get("rules") or []
    # Largest effect relative to its margin first: the planted regressions before their echoes in "all".
    failing = sorted((r for r in rules if r.get("state") == "fail"), key=_severity, reverse=True)
    if failing:
        parts = [f"{r.get('rule')} fails for {r.get('cohort')}{_fmt_effect(r)}" for r in failing[:4]]
        more = f"; +{len(failing) - 4} more" if len(failing) > 4 else ""
        return f"gate: {verdict} — " + "; ".join(parts) + more
    counts: dict[str, int] = {}
    for r in rules:
        counts[r.get("state", "?")] = counts.get(r.get("state", "?"), 0) + 1
    detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no rules judged yet"
    return f"gate: {verdict} — {detail}"


def fetch_gate(url: str, timeout: float = 5.0) -> str:
    """The gate's one-line summary; never raises (block answers non-2xx, which is still a verdict)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read()
    except urllib.error.HTTPError as exc:
        body = exc.read() if exc.code != 404 else b""
        if exc.code == 404:
            return "gate: not available yet (404)"
    except (OSError, ValueError) as exc:
        return f"gate: not available yet ({getattr(exc, 'reason', exc)})"
    try:
        doc = json.loads(body)
    except ValueError:
        return "gate: not available yet (no JSON)"
    return gate_summary(doc) if isinstance(doc, dict) else "gate: not available yet (unexpected JSON)"


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        stop.wait(0.2)
    return False


def _stop_child(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_demo(cfg: Config, *, config_file: str | None, data_dir: str, rate: float, duration: float,
             scenario: str, seed: int, out=sys.stdout) -> int:
    """Start serve, feed it synthetic traffic, print the gate every 5 s; SIGINT/SIGTERM stop everything, exit 0."""
    say = lambda text: (out.write(text + "\n"), out.flush())  # noqa: E731
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    log_path = Path(data_dir) / "serve.log"
    cmd = [sys.executable, "-m", "collector.cli", "serve", "--data-dir", str(data_dir)]
    if config_file:
        cmd += ["--config", str(config_file)]
    metrics = f"http://{_local(cfg.metrics)}"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=os.environ.copy())
    gen: threading.Thread | None = None
    status: dict = {}
    try:
        say(f"demo: starting shadowlens serve (pid {proc.pid}, data {data_dir}, log {log_path}) ...")
        if not _wait_ready(proc, metrics + "/readyz", 60.0, stop):
            if stop.is_set():
                return 0
            say(f"demo: serve did not become ready (exit {proc.poll()}); see {log_path}")
            return 1
        say(f"demo: serve is ready; sending {scenario} shadow traffic at {rate:g} requests/s"
            f" (x2 traces) to {_local(cfg.receivers.grpc)}. Look at:\n"
            f"  curl {metrics}/metrics | grep shadowlens_\n"
            f"  curl {metrics}/gate\n"
            f"  shadowlens report --data-dir {data_dir}\n"
            f"  shadowlens gate --url {metrics}\n"
            f"Ctrl-C stops the generator and serve.")
        opts = GenerateOptions(endpoint=_local(cfg.receivers.grpc), protocol="grpc", rate=rate, duration=duration,
                               scenario=scenario, seed=seed, service_name="shadowlens-demo")
        gen = threading.Thread(target=run_generate, args=(opts,), daemon=True, name="generate",
                               kwargs={"out": None, "stop": stop, "status": status})
        gen.start()
        t0 = time.monotonic()
        announced = False
        while not stop.wait(POLL_S):
            if proc.poll() is not None:
                say(f"demo: serve exited unexpectedly ({proc.returncode}); see {log_path}")
                return 1
            if not gen.is_alive() and not announced:
                announced = True
                say("demo: generator finished; serve keeps running until Ctrl-C")
            say(f"[{time.monotonic() - t0:5.0f}s] {status.get('traces', 0)} traces sent | {fetch_gate(metrics + '/gate')}")
        return 0
    finally:
        stop.set()
        if gen is not None:
            gen.join(timeout=150)
        code = _stop_child(proc)
        for s, h in old.items():
            signal.signal(s, h)
        say(f"demo: stopped ({status.get('traces', 0)} traces sent; serve exited {code})")
