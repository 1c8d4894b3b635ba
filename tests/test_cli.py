"""The command line: one-line errors with exit 2, config precedence, --print-config."""
from __future__ import annotations

import subprocess

import pytest
import yaml
from harness import REPO, SHADOWLENS, free_port, server_env


def plain_env(**extra) -> dict:
    env = {k: v for k, v in server_env(1, 2, 3).items() if not k.startswith("SHADOWLENS_")}
    env.update(extra)
    return env


def run(*args, env=None):
    out = subprocess.run(SHADOWLENS + list(args), capture_output=True, text=True, cwd=REPO,
                         env=env or plain_env(), timeout=60)
    return out.returncode, out.stdout, out.stderr


@pytest.mark.parametrize("args,needle", [
    (["serve", "--bogus"], "--bogus"),
    (["query"], "SQL"),
    (["query", "select 1", "--format", "xml"], "xml"),
    (["nosuchcommand"], "nosuchcommand"),
])
def test_usage_errors_are_one_line_and_exit_2(args, needle):
    code, _, err = run(*args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_unknown_config_key_in_file_names_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("traces:\n  idle_secs: 3\n")
    code, _, err = run("serve", "--config", str(cfg), "--print-config")
    assert code == 2 and "traces.idle_secs" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text,needle", [
    ("receivers: {grpc: {endpoint: nonsense}}", "receivers.grpc.endpoint"),
    ("window: forever", "window"),
    ("store: {retention: 7 days}", "store.retention"),
    ("cohorts: {max_values: lots}", "cohorts.max_values"),
    ("- a list", "mapping"),
])
def test_bad_config_values_name_the_key(tmp_path, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, _, err = run("serve", "--config", str(cfg), "--print-config")
    assert code == 2 and needle in err, err


def test_env_overrides_file_and_flag_overrides_both(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("traces: {idle_seconds: 7, max_seconds: 100}\nstore: {data_dir: /from/file}\n"
                   "cohorts: {labels: {plan: [customer.plan]}}\n")
    env = server_env(1, 2, 3, SHADOWLENS_TRACES__IDLE_SECONDS="11")
    code, out, err = run("serve", "--config", str(cfg), "--data-dir", "/from/flag", "--print-config", env=env)
    assert code == 0, err
    eff = yaml.safe_load(out)
    assert eff["traces"] == {"idle_seconds": 11, "max_seconds": 100, "max_open": 100000,
                            "content_pairing_seconds": 1}
    assert eff["store"]["data_dir"] == "/from/flag"
    assert eff["receivers"]["grpc"]["endpoint"] == "127.0.0.1:1"
    assert eff["cohorts"]["labels"]["plan"] == ["customer.plan"]


def test_unknown_env_key_is_an_error():
    env = plain_env(SHADOWLENS_STORE__RETENTON="1d")
    code, _, err = run("serve", "--print-config", env=env)
    assert code == 2 and "SHADOWLENS_STORE__RETENTON" in err


def test_port_in_use_is_a_clear_error(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = server_env(free_port(), port, free_port())
        code, _, err = run("serve", "--data-dir", str(tmp_path / "d"), env=env)
    assert code == 2 and "cannot start" in err and f"127.0.0.1:{port} (receivers.http.endpoint" in err, err


def test_every_command_has_help():
    for cmd in ([], ["serve"], ["query"]):
        code, out, _ = run(*cmd, "--help")
        assert code == 0 and "Usage:" in out
