"""Owner-only files: the store holds prompts and completions (CONTRACT §8: readable by its owner only).

Everything the store creates is made 0700 (directories) or 0600 (files) whatever the umask: the files
we create ourselves get explicit modes, ``serve`` adds 077 to its umask for the files DuckDB creates
(the database, its WAL, spill files) and the socket, and opening a store tightens what an older
version left readable by others.
"""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("shadowlens.store")

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_umask() -> None:
    """Add 077 to this process's umask (inherited by the ingest processes it starts)."""
    os.umask(os.umask(0o077) | 0o077)


def make_private_dir(path: Path) -> None:
    path = Path(path)
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    _tighten(path, PRIVATE_DIR)


def open_private(path: Path, flags: int) -> int:
    """os.open creating ``path`` 0600 (the mode is masked by the umask, which can only narrow it)."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE)
    try:
        if os.fstat(fd).st_mode & 0o077:      # an existing file, created before this rule
            os.fchmod(fd, PRIVATE_FILE)
    except OSError:
        pass                                  # not ours to change; tighten() says so once
    return fd


def _tighten(path: Path, mode: int) -> bool:
    """chmod ``path`` to ``mode`` if others or the group can reach it; False when that is refused."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
            return True
        os.chmod(path, mode)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


def tighten(data_dir: Path) -> None:
    """Make an existing store owner-only: the data dir and its directories 0700, its files 0600."""
    data_dir = Path(data_dir)
    refused = [] if _tighten(data_dir, PRIVATE_DIR) else [data_dir]
    for root, dirs, files in os.walk(data_dir):
        for name in dirs:
            if not _tighten(Path(root) / name, PRIVATE_DIR):
                refused.append(Path(root) / name)
        for name in files:
            if not _tighten(Path(root) / name, PRIVATE_FILE):
                refused.append(Path(root) / name)
    if refused:
        log.warning("cannot make %d path(s) in the store owner-only (e.g. %s): they hold prompts and completions;"
                    " chown them to the user serve runs as", len(refused), refused[0])
