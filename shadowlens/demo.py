"""``shadowlens demo``: ``serve`` as a child process plus the synthetic generator, printing the gate every 5 s.

The demo sends only to the serve it started: it refuses to start when an address it needs is taken
(another serve, typically ``make run``, would otherwise receive the synthetic traces), and it sends
nothing until its own child has written its ready file (the child's pid, after every listener is up).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from . import startup
from .config import Config, Endpoint, parse_endpoint
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
    missing = [r.get("rule") for r in rules if r.get("cohort") == "all" and r.get("no_input")]
    if missing:        # waiting will not fix these: say so in the one line too
        detail += f"; no input for {', '.join(map(str, missing))} (`gate` says how to send it)"
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


def _wait_ready(proc: subprocess.Popen, ready_file: Path, timeout: float, stop: threading.Event) -> dict | None:
    """The child's ready file once it exists and names the child; None if the child exits first.
    A /readyz answer would not do: it may come from another server on the same port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set():
        if proc.poll() is not None:
            return None
        try:
            doc = json.loads(ready_file.read_text())
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict) and doc.get("pid") == proc.pid:
            return doc
        stop.wait(0.2)
    return None


def _last_error(log_path: Path, since: int) -> str:
    """The child's own one-line reason (the last line it logged this run), for the demo's message."""
    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _free_port_near(ep: Endpoint) -> int:
    """A port to suggest in place of a taken one: +10000 if free, else any free one."""
    for port in (ep.port + 10000, 0):
        if port < 65536 and not startup.address_in_use(Endpoint(ep.host, port)):
            if port:
                return port
            family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
            with socket.socket(family) as s:
                s.bind((ep.host, 0))
                return s.getsockname()[1]
    return 0


def shadowlens_command() -> str:
    """How to run shadowlens from the user's shell, exactly as printed: ``shadowlens`` when that is what
    PATH finds, else this install's script (relative when under the current directory, e.g.
    ``.venv/bin/shadowlens``), else ``python -m shadowlens.cli``."""
    scripts = []
    if os.path.basename(sys.argv[0]) == "shadowlens":
        scripts.append(os.path.abspath(sys.argv[0]))
    scripts.append(os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "shadowlens"))
    for script in scripts:
        if not (os.path.isfile(script) and os.access(script, os.X_OK)):
            continue
        on_path = shutil.which("shadowlens")
        if on_path and os.path.samefile(on_path, script):
            return "shadowlens"
        rel = os.path.relpath(script)
        return shlex.quote(rel if not rel.startswith("..") else script)
    return f"{shlex.quote(sys.executable)} -m shadowlens.cli"


def ports_taken_message(taken: list[tuple[str, Endpoint]]) -> str:
    moves = " ".join(f"{startup.env_name(key)}={ep.host}:{_free_port_near(ep)}" for key, ep in taken)
    again = shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["demo"] else "demo"    # the same command, other ports
    return (f"demo: {startup.describe_in_use(taken)} (another shadowlens serve, e.g. `make run`?).\n"
            "demo: it sends only to the serve it starts itself, so it sent nothing. Stop the other server, or"
            " give the demo free addresses (or set these keys in a --config file):\n"
            f"  {moves} {shadowlens_command()} {again}")


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
             scenario: str, seed: int, out=sys.stdout, err=sys.stderr) -> int:
    """Start serve, feed it synthetic traffic, print the gate every 5 s; SIGINT/SIGTERM stop everything, exit 0.
    Exit 2, having started and sent nothing, when an address or the data dir is taken; 1 when serve fails."""
    say = lambda text, to=out: (to.write(text + "\n"), to.flush())
    refused = _refusal(cfg, data_dir)
    if refused:
        say(refused, err)
        return 2
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    child = _ServeChild.start(data_dir, config_file)
    gen: threading.Thread | None = None
    status: dict = {}
    with_config = f" --config {shlex.quote(str(config_file))}" if config_file else ""
    report = f"{shadowlens_command()} report --data-dir {shlex.quote(str(data_dir))}{with_config}"
    try:
        say(f"demo: starting shadowlens serve (pid {child.proc.pid}, data {data_dir}, log {child.log_path}) ...")
        ready = _wait_ready(child.proc, child.ready_file, 60.0, stop)
        if ready is None:
            return 0 if stop.is_set() else child.not_ready(lambda text: say(text, err))
        grpc = Endpoint(*parse_endpoint(ready["receivers.grpc.endpoint"], "receivers.grpc.endpoint"))
        metrics = f"http://{_local(Endpoint(*parse_endpoint(ready['metrics.endpoint'], 'metrics.endpoint')))}"
        say(_ready_message(child.proc.pid, scenario, rate, _local(grpc), metrics, report))
        opts = GenerateOptions(endpoint=_local(grpc), protocol="grpc", rate=rate, duration=duration,
                               scenario=scenario, seed=seed, service_name="shadowlens-demo")
        gen = threading.Thread(target=run_generate, args=(opts,), daemon=True, name="generate",
                               kwargs={"out": None, "stop": stop, "status": status})
        gen.start()
        return _watch(child, gen, stop, status, metrics, say, lambda text: say(text, err))
    finally:
        stop.set()
        if gen is not None:
            gen.join(timeout=150)
        code = _stop_child(child.proc)
        shutil.rmtree(child.ready_file.parent, ignore_errors=True)
        for s, h in old.items():
            signal.signal(s, h)
        say(f"demo: stopped ({status.get('traces', 0)} traces sent; serve exited {code})")
        if gen is not None:
            say(f"demo: the store stays in {data_dir}; for the full table: {report}")


def _refusal(cfg: Config, data_dir: str) -> str | None:
    """Why the demo must not start (an address it needs, or the data dir, is taken), or None."""
    taken = startup.endpoints_in_use(cfg)
    if taken:
        return ports_taken_message(taken)
    holder = startup.lock_holder(startup.db_path(Path(data_dir)))
    if holder is not None:
        return f"demo: {startup.data_dir_in_use(data_dir, holder)}; nothing was sent"
    return None


@dataclass(frozen=True)
class _ServeChild:
    """``shadowlens serve`` as the demo's child: its process, log (and where this run's part starts), ready file."""
    proc: subprocess.Popen
    log_path: Path
    log_start: int
    ready_file: Path

    @classmethod
    def start(cls, data_dir: str, config_file: str | None) -> _ServeChild:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        log_path = Path(data_dir) / "serve.log"
        ready_file = Path(tempfile.mkdtemp(prefix="shadowlens-demo-")) / "ready.json"
        cmd = [sys.executable, "-m", "shadowlens.cli", "serve", "--data-dir", str(data_dir),
               "--ready-file", str(ready_file)]
        if config_file:
            cmd += ["--config", str(config_file)]
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=os.environ.copy())
        return cls(proc, log_path, log_start, ready_file)

    def not_ready(self, complain) -> int:
        """The serve never reported ready: say why; 2 if it refused its configuration, else 1."""
        code = self.proc.poll()
        if code is None:
            complain(f"demo: serve did not report ready in 60 s; nothing was sent; see {self.log_path}")
            return 1
        reason = _last_error(self.log_path, self.log_start)
        complain(f"demo: serve exited ({code}) before it was ready; nothing was sent. {reason}"
                 f" (full log: {self.log_path})")
        return 2 if code == 2 else 1


def _ready_message(pid: int, scenario: str, rate: float, grpc: str, metrics: str, report: str) -> str:
    me = shadowlens_command()
    return (f"demo: serve (pid {pid}) is ready; sending {scenario} shadow traffic at {rate:g} requests/s"
            f" (x2 traces) to {grpc}. Look at:\n"
            f"  curl {metrics}/metrics | grep shadowlens_\n"
            f"  curl {metrics}/gate\n"
            f"  {report}\n"
            f"  {me} gate --url {metrics}\n"
            f"Ctrl-C stops the generator and serve.")


def _watch(child: _ServeChild, gen: threading.Thread, stop: threading.Event, status: dict, metrics: str,
           say, complain) -> int:
    """Print the gate every POLL_S until stopped (0); 1 if the serve dies first."""
    t0 = next_print = time.monotonic()
    announced = False
    # the child is watched every 0.5 s: if it dies, the generator stops before another process can
    # take over its port
    while not stop.wait(0.5):
        if child.proc.poll() is not None:
            stop.set()
            complain(f"demo: serve exited unexpectedly ({child.proc.returncode}); see {child.log_path}")
            return 1
        if not gen.is_alive() and not announced:
            announced = True
            say("demo: generator finished; serve keeps running until Ctrl-C")
        if time.monotonic() >= next_print + POLL_S:
            next_print += POLL_S
            say(f"[{time.monotonic() - t0:5.0f}s] {status.get('traces', 0)} traces sent"
                f" | {fetch_gate(metrics + '/gate')}")
    return 0
