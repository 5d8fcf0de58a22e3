"""What the three converters share: bad-input policy, the run report, image loading and the CLI bits."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from PIL import Image

from mose_lightning.data.sample import encode_jpeg


class BadInputError(ValueError):
    """Input data breaks the official format; the message names the file and the entry."""


class BadEntries:
    """Bad-input policy of a converter run: stop at the first problem, or (skip_bad) record it and go on.

    Every converter routes each problem through `report`, so the stop message and the skip list name the same
    file and entry.
    """

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.entries: List[Dict[str, Any]] = []

    def report(self, file: str | os.PathLike, entry: str, reason: str, samples: int = 1) -> None:
        item = {"file": str(file), "entry": str(entry), "reason": reason, "samples": samples}
        if not self.skip_bad:
            raise BadInputError(f"{file}: entry {entry}: {reason} (pass --skip-bad to skip such entries)")
        self.entries.append(item)

    @property
    def num_samples(self) -> int:
        return sum(e["samples"] for e in self.entries)

    def manifest_fields(self) -> Dict[str, Any]:
        return {"num_skipped_entries": len(self.entries), "num_skipped_samples": self.num_samples, "skipped": self.entries}


class SampleKeys:
    """The sample keys a converter run has handed out, with their sources. Keys keep only [A-Za-z0-9_-], so two
    entries can map to one key (CODA-LM regions "1" and "1 ", files val_a.b.json and val_a_b.json): the second is
    bad input naming both (skipped with skip_bad), never a crash inside the shard writer."""

    def __init__(self, bad: BadEntries):
        self.bad = bad
        self.sources: Dict[str, Tuple[str, str]] = {}

    def claim(self, key: str, file: str | os.PathLike, entry: str) -> bool:
        """True when `key` is free (it is now taken by file/entry); False when it was taken and skip_bad is on."""
        if key in self.sources:
            first_file, first_entry = self.sources[key]
            self.bad.report(file, entry, f"sample key {key!r} is already taken by {first_file}: entry {first_entry} "
                                         f"(keys keep only [A-Za-z0-9_-], so both entries map to it)")
            return False
        self.sources[key] = (str(file), str(entry))
        return True


class DuplicateKeyError(ValueError):
    """A JSON object holds the same key twice (a JSON reader would silently keep the last value)."""


def _unique_keys(pairs):
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            keys = [k for k, _ in pairs]
            shown = keys[:6] + (["..."] if len(keys) > 6 else [])
            raise DuplicateKeyError(f"duplicate JSON key {key!r} in an object with keys {shown} "
                                    f"(a JSON reader keeps only the last value)")
        out[key] = value
    return out


def load_json_strict(path: Path) -> Any:
    """json.load that refuses duplicate keys (DuplicateKeyError naming the key)."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle, object_pairs_hook=_unique_keys)


@dataclass
class ConversionReport:
    """What a converter run returns and prints: samples per split and task, and what it skipped."""

    out_dir: str
    # split name ("" for a single output directory) -> task -> count
    counts: Dict[str, Dict[str, int]] = field(default_factory=dict)
    skipped: List[Dict[str, Any]] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def tasks(self) -> Dict[str, int]:
        total: Counter = Counter()
        for per_task in self.counts.values():
            total.update(per_task)
        return dict(sorted(total.items()))

    @property
    def num_samples(self) -> int:
        return sum(self.tasks.values())

    def summary(self) -> str:
        lines = [f"wrote {self.num_samples} samples to {self.out_dir}"]
        for split, per_task in self.counts.items():
            label = f"  {split}: " if split else "  "
            lines.append(label + ", ".join(f"{t}={n}" for t, n in per_task.items()) + f" (total {sum(per_task.values())})")
        if self.skipped:
            n = sum(e.get("samples", 1) for e in self.skipped)
            lines.append(f"skipped {len(self.skipped)} bad entries ({n} samples):")
            for e in self.skipped[:20]:
                lines.append(f"  {e['file']}: {e['entry']}: {e['reason']}")
            if len(self.skipped) > 20:
                lines.append(f"  ... {len(self.skipped) - 20} more, all listed in the manifest")
        for key, value in self.extra.items():
            lines.append(f"{key}: {value}")
        return "\n".join(lines)


def parse_size(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """'WxH' -> (W, H); None/'' -> None (keep the original size)."""
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size WIDTHxHEIGHT like 800x450, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size WIDTHxHEIGHT, got {text!r}")
    return w, h


def load_image(path: Path) -> Tuple[bytes, Image.Image]:
    """The file's bytes and its fully decoded RGB image; raises OSError/ValueError when missing or broken."""
    data = path.read_bytes()
    img = Image.open(io.BytesIO(data))
    img.load()  # decode now, so a truncated file is caught here and not in training
    return data, img.convert("RGB")


def jpeg_for(data: bytes, img: Image.Image, size: Optional[Tuple[int, int]], quality: int = 90) -> bytes:
    """Bytes to store for an unmodified view: the original JPEG when no resize is asked (no recompression)."""
    if size is None and data[:2] == b"\xff\xd8":
        return data
    if size is not None and img.size != size:
        img = img.resize(size, Image.BICUBIC)
    return encode_jpeg(img, quality)


def progress(iterable, desc: str, total: Optional[int] = None, enabled: Optional[bool] = None):
    """tqdm on stderr when it is a terminal (or forced); plain iteration in tests and logs."""
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, dynamic_ncols=True)


def int_at_least(low: int):
    """An argparse type: an integer >= low (argparse then names the option in its one-line error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-bad", action="store_true", help="skip bad entries (listed in the manifest) instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="redo an output directory that is already complete")
    parser.add_argument("--maxcount", type=int_at_least(1), default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--progress", action="store_true", default=None, help="force the progress bar on")
