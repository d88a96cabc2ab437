"""Crash-safe storage of a saved adapter's two files (tensors, then the config as the commit point): atomic writes
(temporary file, fsync, rename), an advisory lock per directory, and the previous complete pair kept as ``*.prev``
while a save is in progress. Knows bytes and file names, nothing of what the files hold (``lowrank.adapter_file``
validates them, ``lowrank.io`` is the public save / load)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

CONFIG_NAME = "lowrank_config.json"
WEIGHTS_NAME = "lowrank_adapter.safetensors"
PREV = ".prev"
"""Suffix of the previous pair, kept while a save is in progress."""
LOCK_NAME = ".lowrank.lock"


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def locked(directory: Path, shared: bool = False):
    """An advisory lock on ``directory/.lowrank.lock`` (POSIX ``flock``): saves are serialized, reads wait for a
    save in progress. Where ``fcntl`` is missing (Windows) no lock is taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = directory / LOCK_NAME
    try:  # a reader opens read-only and never creates the file (a folder it may not write, another user's lock)
        fd = os.open(lock, os.O_RDONLY) if shared else os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if not shared:
            raise
        yield  # no lock to wait for: a save in progress is still caught by the checksum and the .prev fallback
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def pair_is_complete(cfg_path: Path, w_path: Path) -> bool:
    """Whether the weights file is the one its config's checksum names (a pair a save finished)."""
    try:
        meta = json.loads(cfg_path.read_text())
        return isinstance(meta, dict) and hashlib.sha256(w_path.read_bytes()).hexdigest() == meta.get("weights_sha256")
    except (OSError, ValueError, RecursionError):
        return False


def write_pair(out: Path, blob: bytes, config: bytes) -> None:
    """Weights, then config (the commit point). The last complete pair stays readable throughout: it is
    hard-linked to ``*.prev`` first (only if it *is* complete: after a save cut between its two files, the
    ``*.prev`` pair from before is kept, so two failures in a row never lose it), and ``read_adapter`` falls
    back to it while the current pair is inconsistent."""
    prev = [(out / name, out / (name + PREV)) for name in (WEIGHTS_NAME, CONFIG_NAME)]
    (w_cur, w_old), (c_cur, c_old) = prev
    linked = pair_is_complete(c_cur, w_cur)
    if linked:
        for cur, old in prev:
            old.unlink(missing_ok=True)
            os.link(cur, old)
    try:
        atomic_write(w_cur, blob)
    except BaseException:  # nothing replaced: the current pair is still the complete one
        if linked:
            for _, old in prev:
                old.unlink(missing_ok=True)
        raise
    atomic_write(c_cur, config)  # the commit point
    for _, old in prev:
        old.unlink(missing_ok=True)
