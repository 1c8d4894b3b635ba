"""Memory settings of serve's processes (collector/ingest/memory.py): allocators, and the code pages given back at rest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from harness import child_pids

from shadowlens.collector.ingest import memory


def test_set_environment_fills_in_what_the_user_did_not_set(monkeypatch):
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    memory.set_environment()
    assert os.environ["ARROW_DEFAULT_MEMORY_POOL"] == "system"
    assert os.environ["MALLOC_ARENA_MAX"] == "4"


def test_serve_and_its_children_allocate_arrow_buffers_with_malloc(serve_factory):
    """Both children start with the settings (the decoder builds Arrow columns), and serve's process
    has no mimalloc: its first Arrow buffer (during imports) came after the variable was set."""
    srv = serve_factory(env={"SHADOWLENS_RECEIVERS__DECODER_PROCESS": "always"})
    assert len(child_pids(srv.proc.pid)) == 2
    for kid in child_pids(srv.proc.pid):
        env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{kid}/environ").read_bytes().split(b"\0") if b"=" in kv)
        assert env[b"ARROW_DEFAULT_MEMORY_POOL"] == b"system"
        assert env[b"MALLOC_ARENA_MAX"] == b"2"
    # what `shadowlens serve` does before it loads serve's modules, in a fresh interpreter
    code = ("from shadowlens.collector.ingest import memory; memory.set_environment(); import shadowlens.serve; "
            "import pyarrow; print(pyarrow.default_memory_pool().backend_name)")
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["system"]


def test_limit_arenas_caps_the_arenas_of_threads_started_after_it():
    """glibc creates an arena for each new thread that allocates, up to 8 per core; after limit_arenas()
    eight threads share two. malloc_stats() lists one "Arena N:" block per arena on stderr."""
    script = textwrap.dedent("""
        import ctypes, sys, threading
        from shadowlens.collector.ingest import memory
        if sys.argv[1] == "limit":
            assert memory.limit_arenas()
        hold = []
        barrier = threading.Barrier(8)
        def work():
            barrier.wait()                                     # all alive at once
            hold.append([bytes(1000 + i) for i in range(200)])  # above pymalloc's 512 bytes: malloc
            barrier.wait()
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        ctypes.CDLL(None).malloc_stats()
    """)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    counts = {}
    for mode in ("limit", "default"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env, check=True)
        counts[mode] = sum(line.startswith("Arena ") for line in out.stderr.splitlines())
    assert counts["limit"] <= memory.ARENA_MAX
    assert counts["default"] > memory.ARENA_MAX + 2, counts


def test_the_writers_duckdb_starts_one_async_io_thread_not_eight(tmp_path):
    """DuckDB 2 starts ``async_threads`` (default 8) threads per database whatever ``threads`` says."""
    from shadowlens.collector.store.database import connect_writer

    before = len(os.listdir("/proc/self/task"))
    con = connect_writer(tmp_path / "s.duckdb", {"threads": 1, "memory_limit": "128MB"})
    try:
        assert con.execute("SELECT current_setting('async_threads')").fetchone()[0] == 1
        assert con.execute("SELECT current_setting('allocator_background_threads')").fetchone()[0] is True
        # one asynchronous I/O thread, and the allocator's background thread (database.py)
        assert len(os.listdir("/proc/self/task")) - before <= 2
    finally:
        con.close()


def test_heap_trim_gives_back_what_a_burst_left_in_the_heap():
    """A burst of ~1 MB buffers freed below a live chunk stays resident (glibc trims only the heap's top);
    HeapTrim gives it back once more than free_bytes are held, and not again before every_s."""
    script = textwrap.dedent("""
        import ctypes, json, os
        from shadowlens.collector.ingest import memory
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 8 << 20)        # M_MMAP_THRESHOLD: 1 MB chunks from the heap, as after a burst's frees
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        now = [0.0]
        trim = memory.HeapTrim(free_bytes=16 << 20, every_s=10.0, clock=lambda: now[0])
        chunks = [libc.malloc(1 << 20) for _ in range(48)]
        for c in chunks:
            ctypes.memset(c, 1, 1 << 20)     # resident
        pin = libc.malloc(300_000)           # from the top, above them: the freed chunks are not the heap's top
        small = trim.maybe()                 # 48 MB in use, nothing free: no trim
        now[0] += 10.0
        for c in chunks:
            libc.free(c)
        held, before = trim.free_held(), rss()
        trimmed = trim.maybe()
        after, held_after = rss(), trim.free_held()
        now[0] += 1.0
        again = trim.maybe()
        print(json.dumps(dict(small=small, held=held, before=before, trimmed=trimmed, after=after,
                              again=again, trims=trim.trims, available=trim.available)))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    r = __import__("json").loads(out.stdout)
    assert r["available"]
    assert r["small"] is False
    assert r["held"] >= 40 << 20, r                       # the freed chunks are held by the process
    assert r["trimmed"] is True and r["trims"] == 1
    assert r["before"] - r["after"] >= 40 << 20, r        # and given back
    assert r["again"] is False                             # not again within every_s


def test_release_code_pages_gives_back_read_only_file_pages_and_they_come_back_when_read(tmp_path):
    """A read-only file mapping only this process maps (as a library's code is in the sidecar's container;
    here a file, since the test's own process maps this venv's libraries too, and the kernel keeps a page
    that two processes map): after release_code_pages the kernel has taken its pages back, the process
    reads the same bytes, and the pages it reads are resident again."""
    data = tmp_path / "lib.bin"
    data.write_bytes(bytes(range(256)) * (32 << 12))          # 32 MiB
    script = textwrap.dedent("""
        import json, mmap, re, sys
        from shadowlens.collector.ingest import memory
        path = sys.argv[1]
        def resident():       # kB resident of the file's mapping
            kb, take = 0, False
            for line in open("/proc/self/smaps"):
                if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                    take = line.rstrip().endswith(path)
                elif take and line.startswith("Rss:"):
                    kb += int(line.split()[1])
            return kb
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        def read():
            return sum(m[i] for i in range(0, len(m), 4096))
        first = read()
        before = resident()
        advised = memory.release_code_pages()
        after = resident()
        same = read() == first
        print(json.dumps({"advised": advised, "before": before, "after": after, "again": resident(), "same": same}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", script, str(data)], capture_output=True, text=True,
                                    check=True).stdout)
    if out["advised"] == 0:
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux < 5.4)")
    assert out["before"] >= 32 << 10, out                    # kB: every page read
    assert out["after"] < out["before"] / 8, out
    assert out["same"] and out["again"] >= 32 << 10, out


def test_idle_release_releases_once_per_quiet_spell():
    now = [100.0]
    calls = []
    idle = memory.IdleRelease(idle_s=30, clock=lambda: now[0], release=lambda: calls.append(now[0]) or 4096)
    assert idle.wait_s() == 30 and not idle.maybe()
    now[0] = 129.9
    assert not idle.maybe() and idle.wait_s() == pytest.approx(0.1)
    now[0] = 130.0
    assert idle.maybe() and calls == [130.0] and idle.released_bytes == 4096
    now[0] = 500.0
    assert idle.wait_s() is None and not idle.maybe()          # nothing more until work comes
    idle.busy()
    now[0] = 529.0
    assert not idle.maybe()
    now[0] = 530.0
    assert idle.maybe() and calls == [130.0, 530.0]
