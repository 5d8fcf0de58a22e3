"""Exclusive folder locks: one run per run directory, one converter per output folder.

The lock is an `flock` on `<folder>/.mose.lock`, a file holding the holder's PID, host, command and start time
(read only for the message a second run prints). The kernel drops an flock when its process dies, however it
dies, so a lock left by a killed run is detected (its file is still there) and taken over. Where the filesystem
has no flock, an exclusively created lock file stands in; a stale one is recognised by its PID being gone on this
host.

Ranks of one distributed run share their run's lock: only rank 0 of the launch takes it (`launcher_rank`), the
other ranks (started by Lightning, torchrun, SLURM or MPI, possibly before rank 0 got the lock) write nothing
outside what rank 0 coordinates.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from mose_lightning.io import remove_stale_temporaries

LOCK_NAME = ".mose.lock"
_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock; the message names the folder and the holder."""


def launcher_rank() -> int:
    """This process's global rank in a distributed launch, from the launcher's environment (0 outside one).

    torchrun (and `lightning run model`) set RANK; SLURM and MPI their own variables; Lightning's own launcher
    starts ranks 1.. with LOCAL_RANK (and NODE_RANK on further nodes) but no RANK."""
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    node = os.environ.get("NODE_RANK", "").strip()
    local = os.environ.get("LOCAL_RANK", "").strip()
    node_rank = int(node) if node.isdigit() else 0
    local_rank = int(local) if local.isdigit() else 0
    return 0 if node_rank == 0 and local_rank == 0 else max(1, node_rank * 1000 + local_rank)


def _holder_record(what: str) -> Dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _read_record(path: Path) -> Dict[str, object]:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(record: Dict[str, object]) -> str:
    if not record.get("pid"):
        return "a process that has not written its PID yet"
    where = f" on {record['host']}" if record.get("host") and record["host"] != socket.gethostname() else ""
    what = f" ({record['command']}, since {record.get('started', '?')})" if record.get("command") else ""
    return f"PID {record['pid']}{where}{what}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class FolderLock:
    folder: Path
    path: Path
    fd: Optional[int]  # None: the exclusive-file fallback

    def release(self) -> None:
        """Remove the lock file while still holding the lock (a process that opened it meanwhile sees that the
        file it locked is gone and tries again), then drop the lock."""
        _held.pop(os.path.realpath(self.folder), None)
        try:
            if self.fd is None or os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# Locks this process holds, by real folder path: acquiring one again (a stage rerun in the same process) is a no-op.
_held: Dict[str, FolderLock] = {}


def _busy(folder: Path, record: Dict[str, object], hint: str) -> FolderBusy:
    return FolderBusy(f"{folder} is in use by {_describe(record)}; {hint}")


def _take_over_note(folder: Path, record: Dict[str, object]) -> None:
    if record.get("pid"):
        print(f"note: {folder}: taking over the lock left by {_describe(record)}, which is no longer running",
              file=sys.stderr)


def acquire(folder: str | os.PathLike, what: str, hint: str = "wait for it to finish or use another folder") -> FolderLock:
    """Lock `folder` (created if missing) for this process, or raise FolderBusy naming the holder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    if key in _held:
        return _held[key]
    path = folder / LOCK_NAME
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(folder, _read_record(path), hint) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _NO_FLOCK:
                raise
            return _acquire_exclusive_file(folder, path, key, what, hint)
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current != os.fstat(fd).st_ino:  # released (and removed) between our open and flock: try again
            os.close(fd)
            continue
        previous = _read_record(path)
        _take_over_note(folder, previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_record(what)) + "\n").encode(), 0)
        lock = FolderLock(folder, path, fd)
        _held[key] = lock
        return lock
    raise _busy(folder, _read_record(path), hint)


def _acquire_exclusive_file(folder: Path, path: Path, key: str, what: str, hint: str) -> FolderLock:
    for _ in range(2):
        record = _read_record(path)
        if record.get("pid"):
            stale = record.get("host") == socket.gethostname() and not _pid_alive(int(record["pid"]))
            if not stale:
                raise _busy(folder, record, hint)
            _take_over_note(folder, record)
        path.unlink(missing_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(_holder_record(what)) + "\n")
        lock = FolderLock(folder, path, None)
        _held[key] = lock
        return lock
    raise _busy(folder, _read_record(path), hint)


def release(folder: str | os.PathLike) -> None:
    """Drop this process's lock on `folder`, if it holds one."""
    lock = _held.get(os.path.realpath(Path(folder)))
    if lock is not None:
        lock.release()


class folder_lock:
    """`with folder_lock(out, "mose data synthetic"):` holds the lock for the block (released also on errors).
    A folder this process had locked already stays locked after the block."""

    def __init__(self, folder: str | os.PathLike, what: str, hint: str = "wait for it to finish or use another folder"):
        self.folder, self.what, self.hint = Path(folder), what, hint
        self._acquired = False

    def __enter__(self) -> FolderLock:
        self._acquired = os.path.realpath(self.folder) not in _held
        return acquire(self.folder, self.what, self.hint)

    def __exit__(self, *exc) -> None:
        if self._acquired:
            release(self.folder)


@contextmanager
def taking_turns(lock_file: str | os.PathLike):
    """Wait until no other process holds `lock_file`, hold it for the block: for work that several processes may
    each find missing (a cache, the toy's preparation), which the first does and the others then find done."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_run_dir(run_dir: str | os.PathLike, stage: str) -> None:
    """Take a run directory's lock for this process (rank 0 of a distributed run; the other ranks share it) and
    clear what a killed run left there; FolderBusy names the directory and the run holding it."""
    if launcher_rank() != 0:
        return
    run_dir = Path(run_dir)
    acquire(run_dir, f"mose {stage.replace('_', '-')}", hint="wait for that run to finish, or give this one another run_dir=...")
    removed = [name for folder in (run_dir, run_dir / "checkpoints") for name in remove_stale_temporaries(folder)]
    if removed:
        print(f"note: {run_dir}: removed temporaries a killed run left behind: {', '.join(removed)}")


def holds_lock(arg: str, what: str, hint: str = "wait for it to finish or write to another --out") -> Callable:
    """Decorator: the call holds the lock of the folder passed as argument `arg` (a converter's output folder)."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            folder = signature.bind(*args, **kwargs).arguments[arg]
            with folder_lock(folder, what, hint):
                return fn(*args, **kwargs)

        return wrapper

    return decorate
