"""Start-up conflicts are one line and exit 2, and leave nothing behind: a data dir another serve holds,
an address another process listens on; and bad SQL in ``shadowlens query``."""
from __future__ import annotations

import os
import socket
import subprocess

import pytest
from harness import REPO, SHADOWLENS, free_port, server_env


def run(*args, env, timeout=90):
    out = subprocess.run(SHADOWLENS + list(args), capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    return out.returncode, out.stdout, out.stderr


def test_second_serve_on_one_data_dir_is_one_line_naming_the_first(serve_factory, tmp_path):
    first = serve_factory()
    other_ports = server_env(free_port(), free_port(), free_port())   # only the data dir conflicts
    code, _, err = run("serve", "--data-dir", str(first.data_dir), env=other_ports)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert f"data dir {first.data_dir} is in use by shadowlens serve (pid {first.proc.pid})" in lines[0]
    assert first.proc.poll() is None            # the first one is untouched


@pytest.mark.parametrize("which,key,env_key", [
    (0, "receivers.grpc.endpoint", "SHADOWLENS_RECEIVERS__GRPC__ENDPOINT"),
    (1, "receivers.http.endpoint", "SHADOWLENS_RECEIVERS__HTTP__ENDPOINT"),
    (2, "metrics.endpoint", "SHADOWLENS_METRICS__ENDPOINT"),
])
def test_address_in_use_names_address_and_key_and_creates_no_store(tmp_path, which, key, env_key):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [free_port(), free_port(), free_port()]
        ports[which] = taken.getsockname()[1]
        data = tmp_path / "new-store"
        code, _, err = run("serve", "--data-dir", str(data), env=server_env(*ports))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"127.0.0.1:{ports[which]}" in lines[0] and key in lines[0] and env_key in lines[0], err
    assert not data.exists(), sorted(p.name for p in data.iterdir())


def test_failed_start_in_an_existing_empty_dir_leaves_it_empty(tmp_path):
    data = tmp_path / "mine"
    data.mkdir()
    (data / "notes.txt").write_text("kept")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run("serve", "--data-dir", str(data),
                           env=server_env(free_port(), free_port(), taken.getsockname()[1]))
    assert code == 2, err
    assert sorted(os.listdir(data)) == ["notes.txt"]


def test_bad_sql_is_a_usage_error_that_keeps_duckdbs_hint(tmp_path):
    # exit 2 like every other mistake in what the user typed; DuckDB's suggestion survives
    import duckdb

    from shadowlens.collector.store.database import db_path
    con = duckdb.connect(str(db_path(tmp_path)))
    con.execute("CREATE TABLE spans (name TEXT, model TEXT)")
    con.close()
    env = server_env(free_port(), free_port(), free_port())
    code, _, err = run("query", "--data-dir", str(tmp_path), "select * from span", env=env)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and 'Did you mean "spans"' in err, err
    code, _, err = run("query", "--data-dir", str(tmp_path), "select nme from spans", env=env)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "Candidate bindings" in err and '"name"' in err, err
