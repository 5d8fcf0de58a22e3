"""What the three converters share: bad-input policy, the run report, image loading and the CLI bits."""

from __future__ import annotations

import argparse
import io
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


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-bad", action="store_true", help="skip bad entries (listed in the manifest) instead of stopping")
    parser.add_argument("--overwrite", action="store_true", help="redo an output directory that is already complete")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--progress", action="store_true", default=None, help="force the progress bar on")
