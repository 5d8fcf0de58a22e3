"""Skipped samples of a run, shown where people look: a summary per reason printed at the end of training and
evaluation, and `skipped.jsonl` in the run directory with one line per skipped sample (reason, key, shard,
detail) or damaged shard (key null, `samples` lost when known).

The readers skip and count (mose_lightning.data.datamodule); every batch carries the records of what was skipped
since the previous one (`batch["skipped_samples"]`). Training passes over the same shards every epoch and meets the
same bad sample again, so records are kept once per (reason, shard, key): distinct samples, not read attempts.
Under DDP each rank writes its records to a part file (`.skipped/rank<r>.jsonl`) and rank 0 merges them, together
with the list an earlier (killed, resumed) attempt of the run wrote.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

import lightning.pytorch as pl

from mose_lightning.io import atomic_write_text

SKIPPED_FILE = "skipped.jsonl"
PARTS_DIR = ".skipped"
DAMAGED = "damaged shard"


class SkipLog:
    """Distinct skipped samples and damaged shards, in the order first seen."""

    def __init__(self, records: Iterable[Mapping[str, Any]] = ()) -> None:
        self._records: Dict[tuple, Dict[str, Any]] = {}
        self.add(records)

    def add(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            ident = (record.get("reason"), record.get("shard"), record.get("key"))
            if ident not in self._records:
                self._records[ident] = dict(record)

    def add_batch(self, batch: Mapping[str, Any]) -> None:
        self.add(batch.get("skipped_samples") or [])

    @property
    def records(self) -> List[Dict[str, Any]]:
        return list(self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    @property
    def samples(self) -> List[Dict[str, Any]]:
        return [r for r in self._records.values() if r.get("reason") != DAMAGED]

    @property
    def damaged_shards(self) -> List[Dict[str, Any]]:
        return [r for r in self._records.values() if r.get("reason") == DAMAGED]

    def counts(self) -> Dict[str, int]:
        """Skipped samples per reason (damaged shards: the shards)."""
        return dict(sorted(Counter(r.get("reason") for r in self._records.values()).items()))

    def summary(self, where: Optional[Path] = None, limit: int = 5) -> str:
        """One paragraph for the end of a run; empty when nothing was skipped."""
        if not self._records:
            return ""
        parts = []
        samples = Counter(r.get("reason") for r in self.samples)
        if samples:
            parts.append(f"skipped {sum(samples.values())} sample(s): "
                         + ", ".join(f"{reason} {n}" for reason, n in sorted(samples.items())))
        damaged = self.damaged_shards
        if damaged:
            shown = [f"{Path(str(r.get('shard'))).name}"
                     + (f" ({r['samples']} samples lost)" if r.get("samples") else "") for r in damaged[:limit]]
            more = f" and {len(damaged) - limit} more" if len(damaged) > limit else ""
            parts.append(f"{len(damaged)} damaged shard(s) not read to the end: {', '.join(shown)}{more}")
        text = "; ".join(parts)
        return text + (f" (listed in {where})" if where is not None else "")


def write_part(run_dir: str | Path, rank: int, log: SkipLog) -> None:
    """This rank's records, for rank 0 to merge; nothing is written when nothing was skipped."""
    if not len(log):
        return
    path = Path(run_dir) / PARTS_DIR / f"rank{rank}.jsonl"
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in log.records))


def _read_jsonl(path: Path) -> List[Dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line a killed writer cut short; the sample comes back on the next pass
    return out


def merge_parts(run_dir: str | Path, log: Optional[SkipLog] = None) -> SkipLog:
    """Merge the ranks' part files (and `log`, this process's records) into `skipped.jsonl`, keeping what an
    earlier attempt of the run listed there; returns everything listed."""
    run_dir = Path(run_dir)
    merged = SkipLog()
    target = run_dir / SKIPPED_FILE
    if target.is_file():
        merged.add(_read_jsonl(target))
    parts = sorted((run_dir / PARTS_DIR).glob("rank*.jsonl")) if (run_dir / PARTS_DIR).is_dir() else []
    for part in parts:
        merged.add(_read_jsonl(part))
    if log is not None:
        merged.add(log.records)
    if len(merged):
        atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged.records))
    for part in parts:
        part.unlink(missing_ok=True)
    if (run_dir / PARTS_DIR).is_dir() and not any((run_dir / PARTS_DIR).iterdir()):
        (run_dir / PARTS_DIR).rmdir()
    return merged


def clear(run_dir: str | Path) -> None:
    """Forget an earlier evaluation's list: an evaluation starts over, unlike a resumed training run."""
    run_dir = Path(run_dir)
    (run_dir / SKIPPED_FILE).unlink(missing_ok=True)
    if (run_dir / PARTS_DIR).is_dir():
        for part in (run_dir / PARTS_DIR).glob("rank*.jsonl"):
            part.unlink()


class SkippedSamples(pl.Callback):
    """Collects the skip records of every training, validation and prediction batch of this rank, and writes them
    to the rank's part file when fitting or predicting ends."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.skipped = SkipLog()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.skipped.add_batch(batch)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.skipped.add_batch(batch)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.skipped.add_batch(batch)

    def on_fit_end(self, trainer, pl_module) -> None:
        write_part(self.run_dir, trainer.global_rank, self.skipped)

    def on_predict_end(self, trainer, pl_module) -> None:
        write_part(self.run_dir, trainer.global_rank, self.skipped)