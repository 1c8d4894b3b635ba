"""``shadowlens demo`` feeds only the serve it started, and the commands it prints work as printed."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from harness import REPO, SHADOWLENS, free_port, server_env


def _path_without_venv() -> str:
    # the newcomer's shell: the venv is not activated, so its bin directory is not on PATH
    venv_bin = os.path.dirname(os.path.abspath(sys.executable))
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and os.path.abspath(p) != venv_bin)


def test_demo_refuses_ports_another_serve_holds_and_sends_it_nothing(serve_factory, tmp_path):
    other = serve_factory()           # e.g. `make run` still up on the ports the demo would use
    demo_dir = tmp_path / "demo"
    out = subprocess.run(SHADOWLENS + ["demo", "--data-dir", str(demo_dir), "--rate", "50", "--duration", "3"],
                         env=other.env, capture_output=True, text=True, cwd=REPO, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    for key, port in (("receivers.grpc.endpoint", other.grpc_port), ("receivers.http.endpoint", other.http_port),
                      ("metrics.endpoint", other.metrics_port)):
        assert f"127.0.0.1:{port} ({key}" in text, text
    assert "SHADOWLENS_RECEIVERS__GRPC__ENDPOINT=127.0.0.1:" in text      # how to choose others
    assert not demo_dir.exists()
    time.sleep(2)        # longer than a generator's first batch export would take to arrive
    assert other.query("select count(*) AS n from spans") == [{"n": 0}]


def test_demo_hints_are_commands_that_work_as_printed(tmp_path):
    env = server_env(free_port(), free_port(), free_port(), SHADOWLENS_TRACES__IDLE_SECONDS="1")
    env["PATH"] = _path_without_venv()
    demo_dir = tmp_path / "demo"
    proc = subprocess.Popen(SHADOWLENS + ["demo", "--data-dir", str(demo_dir), "--rate", "20"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            if line.startswith("["):         # the first gate line: traffic has been flowing for 5 s
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines) + rest
    assert proc.returncode == 0, text
    report = [m.group(1) for m in re.finditer(r"^\s*(\S+ report --data-dir .*)$", text, re.M)]
    assert report, text
    for command in dict.fromkeys(report):   # as printed, through the user's shell, from where the demo ran
        out = subprocess.run(command, shell=True, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{command!r} -> {out.returncode}: {out.stderr}"
        assert "baseline" in out.stdout or "candidate" in out.stdout, out.stdout


def test_the_demos_gate_line_names_rules_without_input():
    from shadowlens.demo import gate_summary
    doc = {"verdict": "inconclusive", "rules": [
        {"rule": "task_completion", "cohort": "all", "state": "insufficient_data", "no_input": True},
        {"rule": "task_completion", "cohort": "intent=a", "state": "insufficient_data", "no_input": True},
        {"rule": "steps", "cohort": "all", "state": "pass", "no_input": False}]}
    line = gate_summary(doc)
    assert line.startswith("gate: inconclusive — ") and "no input for task_completion" in line, line
    assert "no input" not in gate_summary({"verdict": "promote", "rules": doc["rules"][2:]})
