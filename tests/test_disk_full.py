"""A full data disk is a wait, not a loss (collector/store/diskfull.py).

With the disk full an Export is refused as retryable (UNAVAILABLE with RetryInfo / 503 with
Retry-After), never acknowledged; /readyz says not ready; once space returns Exports succeed,
/readyz is ready, and every span acknowledged before, during or after is queryable, with no restart.

The end-to-end tests fill a real filesystem: a small tmpfs mounted for the test (root only; without
the right to mount they skip and say so). The unit tests below them inject ENOSPC at the OS boundary
(``os.pwritev`` / ``os.fdatasync``) and run everywhere.
"""
from __future__ import annotations

import errno
import os
import random
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import duckdb
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from harness import wait_for
from otlp_builders import random_spans, span_request
from pipeline import Handover
from test_receivers import TRACE_METHOD, http_post

from shadowlens.collector.errors import StorageFull
from shadowlens.collector.store import segments as segments_mod
from shadowlens.collector.store.segments import SegmentLog, read_frames, segment_path


# --- a real full disk -------------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root; the ENOSPC-injection tests below run instead")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"this environment does not allow mounting a tmpfs ({out.stderr.strip()}); "
                    "the ENOSPC-injection tests below run instead")


@pytest.fixture
def mounts():
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        _mount_tmpfs(path, size)
        mounted.append(path)
        return path
    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(directory: Path) -> Path:
    """Take every free byte of the filesystem holding ``directory``."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 12, 1):
            chunk = bytes(size)
            while True:
                try:
                    if os.write(fd, chunk) < size:
                        break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


class Client:
    """Sends distinct span requests over both transports, remembering what was acknowledged."""

    def __init__(self, server, seed: int):
        self.server = server
        self.rng = random.Random(seed)
        self.acked: set[str] = set()
        self.channel = grpc.insecure_channel(server.grpc_endpoint)
        self.call = self.channel.unary_unary(TRACE_METHOD)

    def _request(self, n: int):
        spans = random_spans(n, self.rng)
        return spans, span_request(spans).SerializeToString()

    def _keep(self, spans) -> None:
        self.acked.update(s["trace_id"].hex() + s["span_id"].hex() for s in spans)

    def grpc(self, n: int = 40):
        """None when acknowledged, else the RpcError."""
        spans, body = self._request(n)
        try:
            self.call(body, timeout=30)
        except grpc.RpcError as exc:
            return exc
        self._keep(spans)
        return None

    def http(self, n: int = 40):
        spans, body = self._request(n)
        status, headers, payload = http_post(self.server.http_endpoint + "/v1/traces", body)
        if status == 200:
            self._keep(spans)
        return status, headers, payload

    def close(self) -> None:
        self.channel.close()


def _readyz(server) -> int:
    try:
        with urllib.request.urlopen(server.metrics_url + "/readyz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _wait_readyz(server, status: int, timeout: float = 20.0) -> None:
    wait_for(lambda: _readyz(server) == status, timeout, what=f"/readyz {status}", detail=lambda: server.log()[-3000:])


def _metric(server, name: str) -> float:
    for line in server.metrics_text().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            if name + "{" not in line or 'reason="disk_full"' in line:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not exposed")


def _settled_metric(server, name: str, done, timeout: float = 10.0) -> float:
    """``name``'s value once ``done(value)`` holds, or its last value after ``timeout``: counters of the
    frontend process reach /metrics with its next stats message (twice a second), not at once."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = _metric(server, name)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        else:
            if done(value) or time.monotonic() > deadline:
                return value
        time.sleep(0.1)


def _assert_refused_as_retryable(client: Client) -> None:
    err = client.grpc()
    assert err is not None, "an Export was acknowledged although nothing could be written"
    assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
    assert "disk" in err.details()
    details = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin")
    assert details, "UNAVAILABLE without google.rpc.Status details"
    status = status_pb2.Status.FromString(details)
    infos = [error_details_pb2.RetryInfo.FromString(d.value) for d in status.details
             if d.type_url.endswith("google.rpc.RetryInfo")]
    assert infos and infos[0].retry_delay.seconds >= 1
    code, headers, _ = client.http()
    assert code == 503, code
    assert int(headers["Retry-After"]) >= 1


def _stored(server) -> set[str]:
    return {r["k"] for r in server.query("select trace_id || span_id as k from spans_core")}


def test_a_full_disk_refuses_exports_as_retryable_and_loses_nothing(serve_factory, mounts, tmp_path):
    disk = mounts(tmp_path / "disk", "24m")
    srv = serve_factory(data_dir=disk)         # its log goes beside, off the full disk
    client = Client(srv, 1)
    for _ in range(5):
        assert client.grpc() is None
        assert client.http()[0] == 200
    before = len(client.acked)

    filler = _fill(disk)
    for _ in range(3):
        _assert_refused_as_retryable(client)
    assert len(client.acked) == before
    _wait_readyz(srv, 503)
    assert _metric(srv, "shadowlens_store_writable") == 0
    assert _metric(srv, "shadowlens_store_write_errors_total") >= 1
    assert _settled_metric(srv, "shadowlens_requests_refused_total", lambda v: v >= 1) >= 1

    filler.unlink()
    _wait_readyz(srv, 200)          # no Export needed: the payload log probes the disk itself
    assert _metric(srv, "shadowlens_store_writable") == 1
    for _ in range(3):
        assert client.grpc() is None
        assert client.http()[0] == 200
    assert len(client.acked) == before + 6 * 40
    assert client.acked <= _stored(srv)      # no restart
    client.close()
    assert srv.stop() == 0, srv.log()


def test_spans_acknowledged_while_the_database_cannot_commit_appear_once_space_returns(serve_factory, mounts, tmp_path):
    """The payload log has room, DuckDB's file does not: Exports are acknowledged (durable in the
    log), their commit waits and is retried, and they are queryable as soon as space returns."""
    data = mounts(tmp_path / "data", "24m")
    mounts(data / "segments", "24m")
    srv = serve_factory(data_dir=data)
    client = Client(srv, 2)
    for _ in range(3):
        assert client.grpc() is None
    assert len(_stored(srv)) == len(client.acked)

    filler = _fill(data)
    for _ in range(4):
        assert client.grpc() is None        # durable in the payload log: acknowledged
        time.sleep(0.3)                     # separate commits
    _wait_readyz(srv, 503)                  # their commits fail
    assert _metric(srv, "shadowlens_store_writable") == 0

    filler.unlink()
    _wait_readyz(srv, 200)
    assert client.acked <= _stored(srv)     # no restart: the failed commits were retried
    assert len(_stored(srv)) == len(client.acked)
    client.close()
    assert srv.stop() == 0, srv.log()


# --- ENOSPC at the OS boundary ----------------------------------------------------------------------------
def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_append_is_refused_as_storage_full_and_later_records_are_found(tmp_path, monkeypatch):
    log = SegmentLog(tmp_path, 1)
    a, b, c = b"a" * 5000, b"b" * 7000, b"c" * 3000
    log.wait_durable(log.append(a)[2])
    real = os.pwritev
    torn = []

    def half_then_enospc(fd, views, pos):
        # what a filling disk does: part of the record is written, then the next write fails
        if not torn:
            torn.append(pos)
            n = real(fd, [bytes(v)[: len(v) // 2] for v in views[:1]], pos)
            assert n
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, views, pos)

    monkeypatch.setattr(segments_mod.os, "pwritev", half_then_enospc)
    with pytest.raises(StorageFull) as err:
        log.append(b)
    assert err.value.retry_after_s >= 1 and err.value.reason == "disk_full"
    assert not log.health.ok
    monkeypatch.setattr(segments_mod.os, "pwritev", real)
    _, off_c, ticket = log.append(c)
    log.wait_durable(ticket)
    assert log.health.ok
    log.close()
    assert [p for _, _, p in read_frames(tmp_path, 1)] == [a, c]
    assert off_c > torn[0]


def test_a_record_after_a_torn_one_in_the_same_segment_is_replayed(tmp_path):
    """Two appends reserve space in turn; the first one's write fails, the second one's succeeds and
    is acknowledged. The torn bytes between must not hide the second record from replay."""
    log = SegmentLog(tmp_path, 1)
    a, b = b"x" * 4000, b"y" * 4000
    log.append(a)
    log.close()
    path = segment_path(tmp_path, 1)
    whole = path.read_bytes()
    # the first record keeps only its header and a few bytes, then zeros (a hole) up to the second
    torn = whole[:16 + 100] + bytes(len(whole) - 16 - 100)
    log = SegmentLog(tmp_path, 1)
    _, off_b, _ = log.append(b)
    log.close()
    data = bytearray(path.read_bytes())
    data[: len(torn)] = torn
    path.write_bytes(bytes(data))
    assert [(o, p) for o, _, p in read_frames(tmp_path, 1)] == [(off_b, b)]


def test_a_failed_sync_fails_every_append_it_covered_even_if_the_next_sync_succeeds(tmp_path, monkeypatch):
    """After a failed fdatasync the kernel may have dropped those dirty pages and report the error
    only once: a later successful fdatasync proves nothing for them (fsyncgate)."""
    log = SegmentLog(tmp_path, 1)
    _, _, t1 = log.append(b"one")
    real = os.fdatasync
    monkeypatch.setattr(segments_mod.os, "fdatasync", _enospc)
    with pytest.raises(StorageFull):
        log.wait_durable(t1)
    monkeypatch.setattr(segments_mod.os, "fdatasync", real)
    _, _, t2 = log.append(b"two")
    log.wait_durable(t2)                     # covers it
    with pytest.raises(StorageFull):
        log.wait_durable(t1)                 # still not durable as far as anyone knows
    log.close()


def test_other_write_errors_are_not_disguised_as_a_full_disk(tmp_path, monkeypatch):
    log = SegmentLog(tmp_path, 1)

    def eio(*_a, **_k):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(segments_mod.os, "pwritev", eio)
    with pytest.raises(OSError) as err:
        log.append(b"z")
    assert not isinstance(err.value, StorageFull) and err.value.errno == errno.EIO
    assert log.health.ok
    monkeypatch.undo()
    log.close()


# --- the store writer's retry, at the DuckDB connection boundary -------------------------------------------
class _FullDiskConnection:
    """The writer's connection, but COMMIT fails as DuckDB's does on a full disk, ``fail`` times."""

    def __init__(self, con, fail: float):
        self._con = con
        self.fail = fail
        self.failed = 0

    def commit(self):
        if self.failed < self.fail:
            self.failed += 1
            self._con.rollback()
            raise duckdb.TransactionException('TransactionContext Error: Failed to commit: Could not write file '
                                              '"shadowlens.duckdb.wal": No space left on device')
        return self._con.commit()

    def __getattr__(self, name):
        return getattr(self._con, name)


def _writer(tmp_path, stats):
    from shadowlens.collector.decode.normalize import Normalizer
    from shadowlens.collector.store.writer import StoreWriter
    from shadowlens.config import default_config
    cfg = default_config()
    store = StoreWriter(tmp_path, cfg.cohort_labels, stats)
    store.start()
    handover = Handover(store)
    batch = Normalizer(cfg.cohort_labels, cfg.evals).normalize_traces(
        span_request(random_spans(30, random.Random(9))).SerializeToString())
    return store, lambda: handover.submit(batch)      # as the supervisor submits a decoded record


def test_a_commit_refused_for_want_of_space_is_retried_until_it_succeeds(tmp_path):
    from shadowlens.collector.counters import IngestCounters
    from shadowlens.collector.store.diskfull import readiness
    stats = IngestCounters()
    store, submit = _writer(tmp_path, stats)
    store.con = _FullDiskConnection(store.con, fail=3)
    fut = submit()
    not_ready = []
    while not fut.done():
        ready, why = readiness(True, stats)
        if not ready:
            not_ready.append(why)
        time.sleep(0.01)
    assert fut.result().stored == 30
    assert not_ready and "space" in not_ready[0]
    assert readiness(True, stats) == (True, "ready")
    assert stats.store_write_errors == {"disk_full": 3} and stats.store_write_failing == 0
    assert store.cursor().execute("select count(*) from spans_core").fetchone()[0] == 30
    store.shutdown()


def test_stopping_while_the_disk_stays_full_fails_the_group_instead_of_hanging(tmp_path):
    from shadowlens.collector.counters import IngestCounters
    stats = IngestCounters()
    store, submit = _writer(tmp_path, stats)
    full = store.con = _FullDiskConnection(store.con, fail=float("inf"))
    fut = submit()
    deadline = time.monotonic() + 10
    while not full.failed:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    store.shutdown(timeout=10)
    assert time.monotonic() - t0 < 5
    assert "No space left on device" in str(fut.exception(0))


def test_what_counts_as_a_full_disk():
    from shadowlens.collector.store.diskfull import disk_full_reason
    assert disk_full_reason(OSError(errno.ENOSPC, "No space left on device")) == "disk_full"
    assert disk_full_reason(OSError(errno.EDQUOT, "Disk quota exceeded")) == "disk_quota"
    assert disk_full_reason(duckdb.IOException('Could not write file "x.wal": No space left on device')) == "disk_full"
    wrapped = RuntimeError("commit failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert disk_full_reason(wrapped) == "disk_full"
    # a client's value quoted in a data error is not the disk speaking
    assert disk_full_reason(duckdb.ConversionException("Could not convert 'No space left on device' to INT64")) is None
    assert disk_full_reason(OSError(errno.EIO, "Input/output error")) is None
