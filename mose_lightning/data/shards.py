"""Writing and finding WebDataset shards of `Sample` records.

A shard directory is complete only when `manifest.json` exists: the writer renames each shard from
`<name>.tar.tmp` to `<name>.tar` when it is full, and writes the manifest last, atomically. A directory without a
manifest is what a crashed or interrupted converter left; `prepare_output_dirs` cleans it before a rerun.

manifest.json:
    {"format": "mose-wds-1", "num_samples": N, "tasks": {task: count},
     "shards": [{"name": "train-000000.tar", "count": n, "sha256": hex, "tasks": {task: count}}, ...],
     ... plus whatever the converter adds (dataset, split, options, skipped entries, category counts)}

Readers check every shard that has a manifest entry against it: the number of samples always (a tar cut at a
512-byte record boundary reads as a valid, shorter archive), the sha256 when asked (`verify_checksum`; evaluation
does by default). A mismatch is a damaged shard, named in the error or, when skipping, in `ReadStats`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

from mose_lightning.config import ConfigError
from mose_lightning.data.sample import Sample, SampleError
from mose_lightning.io import atomic_write_json

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mose-wds-1"
# Fixed tar metadata: same samples -> byte-identical shards, whoever and whenever writes them.
_TAR_MTIME = 0.0
_TAR_USER = "mose"


class ShardError(RuntimeError):
    """A shard directory, spec or tar file is unusable; the message names the path and what was expected."""


class IncompleteData(RuntimeError):
    """A stage met fewer samples than its data's manifests list; the message names the missing keys and shards."""


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


class ShardWriter:
    """Write samples into `DIR/<prefix>-000000.tar`, ... with at most `maxcount` samples per shard.

    Use as a context manager (the manifest is written on a clean exit, the partial shard removed on an error), or
    call `write` and then `commit(extra)`; a converter producing several directories calls `close()` on each and
    `commit` once all are closed, so no directory looks complete while a sibling is still unwritten.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", maxcount: int = 1000):
        if maxcount < 1:
            raise ConfigError(f"ShardWriter({out_dir}): maxcount must be >= 1, got {maxcount}")
        if not re.match(r"^[A-Za-z0-9_-]+$", prefix):
            raise ConfigError(f"ShardWriter({out_dir}): prefix must be [A-Za-z0-9_-]+, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.maxcount = maxcount
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._shards: List[Dict[str, Any]] = []
        self._tasks: Counter = Counter()
        self._keys: set = set()
        self._file = None
        self._tar = None
        self._tmp_path: Optional[Path] = None
        self._count = 0
        self._shard_tasks: Counter = Counter()
        self._closed = False
        self._committed = False

    @property
    def num_samples(self) -> int:
        return sum(self._tasks.values())

    @property
    def task_counts(self) -> Dict[str, int]:
        return dict(sorted(self._tasks.items()))

    def _open_next(self) -> None:
        import webdataset as wds

        name = shard_name(self.prefix, len(self._shards))
        self._tmp_path = self.out_dir / (name + ".tmp")
        self._file = open(self._tmp_path, "wb")
        self._tar = wds.TarWriter(
            self._file, encoder=False, mtime=_TAR_MTIME, user=_TAR_USER, group=_TAR_USER, mode=0o444
        )
        self._count = 0
        self._shard_tasks = Counter()

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # closes the tar stream, not our file object
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._tmp_path.with_suffix("")  # drop ".tmp"
        os.replace(self._tmp_path, final)
        self._shards.append({"name": final.name, "count": self._count, "sha256": file_sha256(final),
                             "tasks": dict(sorted(self._shard_tasks.items()))})
        self._tar = self._file = self._tmp_path = None

    def write(self, sample: Sample) -> None:
        if self._closed:
            raise ShardError(f"{self.out_dir}: write after close")
        if sample.key in self._keys:
            raise SampleError(f"sample {sample.key!r}: duplicate __key__ in {self.out_dir}; keys must be unique")
        record = sample.to_record()  # validates
        if self._tar is None:
            self._open_next()
        self._tar.write(record)
        self._keys.add(sample.key)
        self._count += 1
        self._shard_tasks[sample.task] += 1
        self._tasks[sample.task] += 1
        if self._count >= self.maxcount:
            self._finish_shard()

    def close(self) -> Dict[str, Any]:
        """Finish the open shard; returns the manifest body (not yet written)."""
        if not self._closed:
            self._finish_shard()
            self._closed = True
        return {
            "format": MANIFEST_FORMAT,
            "num_samples": self.num_samples,
            "tasks": self.task_counts,
            "shards": list(self._shards),
        }

    def commit(self, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Close and write the manifest last, atomically; the directory is complete from then on."""
        manifest = dict(extra or {})
        manifest.update(self.close())
        path = self.out_dir / MANIFEST_NAME
        atomic_write_json(path, manifest)
        self._committed = True
        return manifest

    def abort(self) -> None:
        """Drop the partial shard; finished shards stay but without a manifest the directory reads as incomplete."""
        if self._file is not None:
            try:
                # Close the tar stream before the file, or its buffered tail is flushed later into a closed file.
                self._tar.close()
            except Exception:
                pass
            try:
                self._file.close()
            finally:
                if self._tmp_path is not None and self._tmp_path.exists():
                    self._tmp_path.unlink()
        self._tar = self._file = self._tmp_path = None
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._committed:
            self.commit()


def is_complete(out_dir: str | os.PathLike) -> bool:
    return (Path(out_dir) / MANIFEST_NAME).is_file()


def _is_ours(path: Path) -> bool:
    name = path.name
    return path.is_file() and (
        name == MANIFEST_NAME
        or name.endswith(".tar")
        or name.endswith(".tar.tmp")
        or (name.startswith(f".{MANIFEST_NAME}.") and name.endswith(".tmp"))
    )


def prepare_output_dirs(dirs: Sequence[str | os.PathLike], overwrite: bool = False) -> None:
    """Make `dirs` ready for a converter run that writes all of them.

    All complete (each has a manifest): refuse unless `overwrite`. Otherwise (none or only some complete: an
    earlier run stopped midway) remove the shard, temporary and manifest files, so a rerun starts clean. Other
    files are left alone: a converter never deletes what it did not write.
    """
    paths = [Path(d) for d in dirs]
    if paths and all(is_complete(p) for p in paths) and not overwrite:
        shown = ", ".join(str(p) for p in paths)
        raise ShardError(f"{shown}: already converted (manifest.json present); pass --overwrite to redo it")
    for path in paths:
        if path.exists() and not path.is_dir():
            raise ShardError(f"{path}: expected a directory for the shards, found a file")
        if path.is_dir():
            for child in path.iterdir():
                if _is_ours(child):
                    child.unlink()
        path.mkdir(parents=True, exist_ok=True)


def read_manifest(out_dir: str | os.PathLike) -> Dict[str, Any]:
    import json

    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        splits = sorted(p.parent.name for p in Path(out_dir).glob(f"*/{MANIFEST_NAME}"))
        if splits:
            raise ShardError(
                f"{out_dir}: holds the split directories {splits}, not shards; name one of them (e.g. {Path(out_dir) / splits[0]})"
            )
        raise ShardError(
            f"{out_dir}: no {MANIFEST_NAME}, so the shard directory is incomplete (a converter did not finish); "
            f"rerun the converter"
        )
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardError(f"{path}: expected a JSON object with a `shards` list")
    return manifest


# --- shard specs -------------------------------------------------------------------------------------------------

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^pipe:")


def _split_top_level(spec: str) -> List[str]:
    """Split on commas outside braces (so `a-{0,1}.tar` stays one item)."""
    items, depth, current = [], 0, []
    for ch in spec:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [s.strip() for s in items if s.strip()]


def expand_braces(pattern: str) -> List[str]:
    """`a-{000..003}.tar` -> a-000.tar ... a-003.tar (zero padding from the first bound); `{x,y}` alternatives."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo_s, hi_s = rng.groups()
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ShardError(f"shard pattern {pattern!r}: range {{{body}}} goes down; expected low..high")
        width = len(lo_s) if lo_s.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(lo, hi + 1)]
    else:
        options = body.split(",")
    out: List[str] = []
    for option in options:
        out.extend(expand_braces(head + option + tail))
    return out


def expand_shards(spec: str | os.PathLike | Sequence[str], check: bool = True) -> List[str]:
    """Shard paths/URLs of a spec.

    A spec is a comma-separated list (or a Python list) of items; each item is a brace pattern
    (`data/train-{000000..000003}.tar`), a shard directory (-> the shards its manifest lists; a directory
    without manifest is an error: it is incomplete), a tar path, or a URL / `pipe:` command, which pass through
    after brace expansion. With `check`, missing local tar files are an error naming the item.
    """
    if isinstance(spec, (list, tuple)):
        items = [str(s) for s in spec]
    else:
        items = _split_top_level(str(spec))
    if not items:
        raise ShardError(f"shard spec {str(spec)!r} is empty; expected paths, patterns, directories or URLs")
    out: List[str] = []
    for item in items:
        if _URL_RE.match(item):
            out.extend(expand_braces(item))
            continue
        for path_s in expand_braces(os.path.expanduser(item)):
            path = Path(path_s)
            if path.is_dir():
                manifest = read_manifest(path)
                out.extend(str(path / entry["name"]) for entry in manifest["shards"])
            elif check and not path.is_file():
                raise ShardError(f"shard spec item {item!r}: {path} does not exist (expected a tar file or a shard directory)")
            else:
                out.append(str(path))
    return out


# --- reading -----------------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Checksums this process has computed, by (path, size, mtime): a shard read again (every training epoch, every
# evaluation worker) is hashed once.
_checksums: Dict[tuple, str] = {}


def _cached_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _checksums:
        _checksums[key] = file_sha256(path)
    return _checksums[key]


def shard_expectations(shards: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """What the manifests beside local shards record about them: {shard: {"count": n, "sha256": hex or None}}.
    Shards without a manifest entry (URLs, loose tar files) are left out: nothing to check them against."""
    out: Dict[str, Dict[str, Any]] = {}
    entries: Dict[str, Dict[str, Any]] = {}
    for shard in shards:
        if _URL_RE.match(shard):
            continue
        folder = str(Path(shard).parent)
        if folder not in entries:
            try:
                listed = read_manifest(folder)["shards"]
            except ShardError:
                listed = []
            entries[folder] = {e["name"]: e for e in listed if isinstance(e, dict) and isinstance(e.get("name"), str)}
        entry = entries[folder].get(Path(shard).name)
        if entry is None:
            continue
        count = entry.get("count", entry.get("samples"))
        out[shard] = {"count": int(count) if isinstance(count, int) else None, "sha256": entry.get("sha256")}
    return out


@dataclass
class ReadStats:
    """What a read skipped; filled in by `iter_samples(..., on_error="skip")`.

    `skipped` holds one message per problem; `problems` the same as records {"reason": "damaged shard" |
    "malformed record", "shard", "key" (None for a damaged shard), "detail", "samples" (samples lost, when known)}.
    """

    samples: int = 0
    skipped: List[str] = field(default_factory=list)
    problems: List[Dict[str, Any]] = field(default_factory=list)

    def add(self, reason: str, shard: str, detail: str, key: Optional[str] = None, samples: Optional[int] = None) -> None:
        self.skipped.append(detail)
        self.problems.append({"reason": reason, "shard": shard, "key": key, "detail": detail, "samples": samples})


def _open_stream(url: str):
    if _URL_RE.match(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


def iter_records(shards: Iterable[str], on_error: str = "raise", stats: Optional[ReadStats] = None,
                 expected: Any = "auto", verify_checksum: bool = False) -> Iterator[Dict[str, Any]]:
    """Raw records ({"__key__", "__url__", "0.jpg": bytes, "json": bytes}) of the given shard paths, in order.

    Members are grouped by key the WebDataset way (consecutive members sharing the part of the name before the
    first dot). `expected` ({shard: {"count", "sha256"}}, by default what the shards' manifests record): a shard
    whose sample count differs is damaged, found once it is read to its end; with `verify_checksum` a shard whose
    sha256 differs is damaged and not read at all. A damaged shard raises ShardError naming it (and, for a broken
    tar, the last good key); with on_error="skip" the rest of that shard is skipped and noted in `stats`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
    stats = stats if stats is not None else ReadStats()
    shards = list(shards)
    if isinstance(expected, str) and expected == "auto":
        expected = shard_expectations(shards)
    expected = expected or {}

    def damaged(url: str, message: str, lost: Optional[int] = None) -> None:
        if on_error == "raise":
            raise ShardError(message) from None
        stats.add("damaged shard", url, message, samples=lost)

    for url in shards:
        want = expected.get(url) or {}
        if verify_checksum and want.get("sha256") and not _URL_RE.match(url):
            try:
                actual = _cached_sha256(url)
            except OSError as err:
                damaged(url, f"shard {url}: unreadable: {err}", want.get("count"))
                continue
            if actual != want["sha256"]:
                damaged(url, f"shard {url}: damaged: sha256 {actual[:12]}... differs from the manifest's "
                             f"{str(want['sha256'])[:12]}... (the file changed after it was written)", want.get("count"))
                continue
        current: Optional[Dict[str, Any]] = None
        last_key = None
        count = 0
        broken = False
        try:
            with _open_stream(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = os.path.basename(member.name)
                    if "." not in base:
                        continue
                    key, ext = base.split(".", 1)
                    key = os.path.join(os.path.dirname(member.name), key) if os.path.dirname(member.name) else key
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is truncated")
                    if current is not None and current["__key__"] != key:
                        last_key = current["__key__"]
                        count += 1
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key, "__url__": url}
                    current[ext] = data
        except (tarfile.TarError, EOFError, OSError) as err:
            where = f"after key {last_key!r}" if last_key else "before the first complete record"
            broken = True
            current = None  # the record in progress may be incomplete
            lost = want["count"] - count if want.get("count") is not None else None
            damaged(url, f"shard {url}: damaged tar ({where}): {err}", lost)
        if current is not None:
            count += 1
            yield current
        if not broken and want.get("count") is not None and count != want["count"]:
            damaged(url, f"shard {url}: damaged: {count} samples, the manifest lists {want['count']} "
                         f"(a truncated or altered file)", max(0, want["count"] - count))


def iter_samples(spec: str | Sequence[str], on_error: str = "raise", stats: Optional[ReadStats] = None,
                 verify_checksum: bool = False) -> Iterator[Sample]:
    """Samples of a shard spec (see `expand_shards`), validated; bad records raise or (skip) are noted in stats."""
    stats = stats if stats is not None else ReadStats()
    for record in iter_records(expand_shards(spec), on_error=on_error, stats=stats, verify_checksum=verify_checksum):
        try:
            sample = Sample.from_record(record, where=record.get("__url__", "?"))
        except SampleError as err:
            if on_error == "raise":
                raise
            stats.add("malformed record", record.get("__url__", "?"), str(err), key=record.get("__key__"))
            continue
        stats.samples += 1
        yield sample
