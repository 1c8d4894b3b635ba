"""Fixtures: real ``shadowlens serve`` processes (tests/harness.py), stopped at teardown."""
from __future__ import annotations

from pathlib import Path

import pytest
from harness import Server, new_server


@pytest.fixture
def serve_factory(tmp_path):
    """``make(data_dir=None, env=None, start=True, args=())`` -> a ``Server`` on free ports; all are stopped
    at teardown."""
    started: list[Server] = []

    def make(data_dir: Path | None = None, env: dict | None = None, start: bool = True, args=()) -> Server:
        srv = new_server(data_dir or tmp_path / f"data{len(started)}", env, args)
        started.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in started:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop(timeout=30)


@pytest.fixture
def server(serve_factory):
    return serve_factory()
