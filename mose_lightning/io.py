"""Atomic file output: a reader (or a resumed run) never sees half a file.

Temporary files and folders are created beside their target, named `.<target>.<random>.tmp`, with the
permissions the process's umask gives any other new file (tempfile's own are private: 0600 / 0700, which would
hide a run's outputs from the rest of a team sharing the machine). `remove_stale_temporaries` clears what a killed
writer left behind, once the caller knows that no other writer is active (it holds the folder's lock).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, List

TEMP_SUFFIX = ".tmp"


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which would
    briefly give other threads' new files the wrong permissions)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def temp_file(folder: str | os.PathLike, name: str) -> tuple:
    """(fd, path) of a new temporary file for `folder/name`, with umask permissions."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=TEMP_SUFFIX)
    os.fchmod(fd, file_mode())
    return fd, tmp


def temp_dir(folder: str | os.PathLike, name: str) -> Path:
    """A new temporary folder for `folder/name`, with umask permissions."""
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{name}.", suffix=TEMP_SUFFIX))
    os.chmod(tmp, dir_mode())
    return tmp


def apply_umask(path: str | os.PathLike) -> None:
    """Give `path` (and, for a folder, everything in it) the permissions of a new file under the umask: for
    writers that create private files themselves (safetensors does)."""
    path = Path(path)
    targets = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    for target in targets:
        if not target.is_symlink():
            os.chmod(target, dir_mode() if target.is_dir() else file_mode())


def remove_stale_temporaries(folder: str | os.PathLike) -> List[str]:
    """Remove the temporary files and folders (`.*.tmp`, and the `.*.old` a directory swap leaves) directly in
    `folder`; returns their names. Only for a folder whose lock the caller holds: another writer's live
    temporaries would go too."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for child in sorted(folder.iterdir()):
        name = child.name
        if not (name.startswith(".") and (name.endswith(TEMP_SUFFIX) or name.endswith(".old"))):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(name)
    return removed


def atomic_save(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Have `write(tmp)` write the file into a temporary beside `path` (umask permissions), then rename it into
    place: readers and resumed runs see the old file or the whole new one, never half of it. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, path.name)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # writers that replace the file (safetensors) create it private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _write_bytes(data: bytes) -> Callable[[str], None]:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    return write


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save, atomically."""
    import torch

    return atomic_save(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so a reader never sees half a file."""
    atomic_save(path, _write_bytes(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_save(path, _write_bytes(data))
