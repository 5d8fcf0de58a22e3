"""The one LightningDataModule every stage reads from.

Streams over WebDataset shards with the guarantees distributed training needs:
  * training: rank r reads shards r, r+W, ... (distinct shards per rank); each rank draws exactly
    `samples_per_rank` samples per epoch, cycling its shards in a seeded order that changes every epoch, through a
    seeded shuffle buffer. Equal counts mean equal batch counts on every rank, so DDP never waits on a rank that
    ran out of data.
  * evaluation: sample i goes to rank i mod W, so every sample is visited exactly once across ranks; ranks with
    one sample fewer get a copy of one of their samples flagged `pad` (excluded from metrics), again keeping batch
    counts equal.
Within a rank, DataLoader workers split the rank's shards (or, with fewer shards than workers, its samples).
Samples that cannot be read, decoded or encoded are skipped and counted; the counts per reason travel with the
next batch (`batch["skipped"]`) so the LightningModule can log them, and one record per skipped sample or damaged
shard (`batch["skipped_samples"]`) so the stage can list them (mose_lightning.data.skips): nothing is dropped
silently, an epoch never crashes. Shards are checked against their manifests (sample count always, sha256 per
`data.verify_checksums`).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mose_lightning.config import ConfigError, DataConfig
from mose_lightning.data.encode import BadSkill, EncodeSettings, Overlong, SampleEncoder, collate
from mose_lightning.data.sample import Sample, SampleError
from mose_lightning.data.shards import ReadStats, ShardError, expand_shards, iter_records, shard_expectations


def _dist_rank_world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def count_samples(shards: List[str], expected: Optional[Dict[str, Dict[str, Any]]] = None) -> int:
    """Samples in a shard list: from the manifests beside the shards where present, else by reading them."""
    expected = shard_expectations(shards) if expected is None else expected
    unknown = [s for s in shards if (expected.get(s) or {}).get("count") is None]
    total = sum(expected[s]["count"] for s in shards if (expected.get(s) or {}).get("count") is not None)
    if unknown:
        total += sum(1 for _ in iter_records(unknown, on_error="skip", expected={}))
    return total


class _Skips:
    """Samples skipped since the last yielded item of this worker: counts per reason (logged per step) and one
    record per sample or damaged shard ({"reason", "key", "shard", "detail", "samples"}, for skipped.jsonl)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.records: List[Dict[str, Any]] = []

    def add(self, reason: str, key: Optional[str] = None, shard: Optional[str] = None, detail: str = "",
            samples: Optional[int] = None) -> None:
        self.counts[reason] += 1
        self.records.append({"reason": reason, "key": key, "shard": shard, "detail": detail, "samples": samples})

    def drain(self) -> tuple:
        out = (dict(self.counts), self.records)
        self.counts = Counter()
        self.records = []
        return out


class ShardStream(IterableDataset):
    """Encoded samples of one rank; see the module docstring for the splitting rules."""

    def __init__(self, shards: List[str], encode: Callable[[Sample], Dict[str, Any]], rank: int, world: int,
                 train: bool, seed: int, shuffle_buffer: int, samples_per_rank: int = 0, total: int = 0,
                 limit: int = 0, expected: Optional[Dict[str, Dict[str, Any]]] = None,
                 verify_checksum: bool = False) -> None:
        self.shards = shards
        # What the manifests record per shard (count, sha256): read once here, checked by every worker's reader.
        self.expected = shard_expectations(shards) if expected is None else expected
        self.verify_checksum = verify_checksum
        self.encode = encode
        self.rank, self.world = rank, world
        self.train = train
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.samples_per_rank = samples_per_rank
        self.total = total
        # Data-scaling runs: this rank keeps only its share of the first `limit` samples of its shards.
        self.limit = -(-limit // world) if limit else 0
        self.epoch = 0
        if train and len(shards) < world:
            raise ConfigError(
                f"{len(shards)} training shard(s) for {world} ranks: every rank needs its own shard; "
                f"write the data with more, smaller shards (converter --maxcount)"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.train:
            return self.samples_per_rank
        return -(-self.total // self.world)

    def _records(self, shards: List[str], skips: _Skips, stride: int = 1, offset: int = 0) -> Iterator[tuple]:
        """(sample, shard) pairs of the shards in order; damaged shards and malformed records go to `skips`."""
        stats = ReadStats()

        def drain_problems() -> None:
            for p in stats.problems:
                skips.add(p["reason"], p["key"], p["shard"], p["detail"], p["samples"])
            stats.problems.clear()
            stats.skipped.clear()

        index = 0
        for record in iter_records(shards, on_error="skip", stats=stats, expected=self.expected,
                                   verify_checksum=self.verify_checksum):
            drain_problems()
            index += 1
            if self.train and self.limit and index > self.limit:
                break
            if (index - 1) % stride != offset:
                continue
            url = record.get("__url__", "?")
            try:
                yield Sample.from_record(record, where=url), url
            except SampleError as err:
                skips.add("malformed record", record.get("__key__"), url, str(err))
        drain_problems()

    def _encoded(self, samples: Iterator[tuple], skips: _Skips) -> Iterator[Dict[str, Any]]:
        for sample, shard in samples:
            try:
                item = self.encode(sample)
            except Overlong as err:
                skips.add("overlong", sample.key, shard, str(err))
                continue
            except BadSkill as err:
                skips.add("bad skill", sample.key, shard, str(err))
                continue
            except Exception as err:  # undecodable image, empty answer, processor failure: skip and count
                skips.add("undecodable", sample.key, shard, f"{type(err).__name__}: {err}")
                continue
            item["skipped"], item["skipped_samples"] = skips.drain()
            yield item

    def _worker(self):
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _cycle(self, shards: List[str], stride: int, offset: int, rng: random.Random, skips: _Skips):
        """Encoded samples forever, shard order reshuffled on every pass."""
        while True:
            order = list(shards)
            if not self.limit:  # with a limit the subset must stay the same every pass
                rng.shuffle(order)
            got_any = False
            for item in self._encoded(self._records(order, skips, stride, offset), skips):
                got_any = True
                yield item
            if not got_any:
                raise ShardError(f"rank {self.rank}: no usable sample in shards {order}")

    @staticmethod
    def _shuffled(items: Iterator[Dict[str, Any]], size: int, rng: random.Random) -> Iterator[Dict[str, Any]]:
        buffer: List[Dict[str, Any]] = []
        for item in items:
            buffer.append(item)
            if len(buffer) >= size:
                yield buffer.pop(rng.randrange(len(buffer)))

    def _train_iter(self) -> Iterator[Dict[str, Any]]:
        worker, workers = self._worker()
        mine = self.shards[self.rank :: self.world]
        if len(mine) >= workers:
            shards, stride, offset = mine[worker::workers], 1, 0
        else:
            shards, stride, offset = mine, workers, worker
        quota = self.samples_per_rank // workers + (1 if worker < self.samples_per_rank % workers else 0)
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{worker}")
        items = self._cycle(shards, stride, offset, rng, _Skips())
        return itertools.islice(self._shuffled(items, max(1, self.shuffle_buffer), rng), quota)

    def _eval_iter(self) -> Iterator[Dict[str, Any]]:
        worker, workers = self._worker()
        skips = _Skips()
        per_rank = -(-self.total // self.world)
        # Every worker of every rank yields exactly its share of `per_rank` (real samples, then pads): equal item
        # and batch counts on every rank, also when a rank has one sample fewer or skipped some.
        target = len(range(worker, per_rank, workers))
        # Every rank and worker reads all records; damaged shards and malformed records are counted once.
        record_skips = skips if self.rank == 0 and worker == 0 else _Skips()

        def mine() -> Iterator[tuple]:
            global_index = -1
            for pair in self._records(self.shards, record_skips):
                global_index += 1
                if global_index % self.world == self.rank and (global_index // self.world) % workers == worker:
                    yield pair

        def items() -> Iterator[Dict[str, Any]]:
            first: Optional[Dict[str, Any]] = None
            produced = 0
            for item in self._encoded(mine(), skips):
                item["meta"]["pad"] = False
                if first is None:
                    first = {**item, "meta": dict(item["meta"])}
                produced += 1
                yield item
            if produced >= target:
                return
            if first is None:
                # Nothing of this worker's share was usable: pad with the first usable sample of the split.
                first = next(self._encoded(self._records(self.shards, _Skips()), _Skips()), None)
                if first is None:
                    raise ShardError(f"rank {self.rank}: no usable sample in shards {self.shards}")
            for _ in range(target - produced):
                yield {**first, "meta": {**first["meta"], "pad": True}, "skipped": {}, "skipped_samples": []}

        # Hold the last item back so skips after it (a damaged shard tail, bad last samples) still travel with it.
        held: Optional[Dict[str, Any]] = None
        for item in items():
            if held is not None:
                yield held
            held = item
        if held is not None:
            counts, records = skips.drain()
            if records:
                held["skipped"] = dict(Counter(held.get("skipped", {})) + Counter(counts))
                held["skipped_samples"] = list(held.get("skipped_samples", [])) + records
            yield held

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self._train_iter() if self.train else self._eval_iter()


@dataclass
class SplitInfo:
    shards: List[str]
    # Samples the split holds: the manifests' counts where present.
    total: int
    # Per shard what its manifest records ({"count", "sha256"}); shards without one are absent.
    expected: Dict[str, Dict[str, Any]]


class DriveDataModule(pl.LightningDataModule):
    """CODA-LM, DriveLM and synthetic shards behind one interface, for every stage."""

    def __init__(self, cfg: DataConfig, adapter, processor, taxonomy, views=None) -> None:
        super().__init__()
        self.cfg = cfg
        # ViewsConfig with views.enabled: samples keep every view and leave the prompt to the model.
        self.views = views if views is not None and views.enabled else None
        self.adapter = adapter
        self.processor = processor
        self.taxonomy = taxonomy
        self.splits: Dict[str, SplitInfo] = {}
        self.tokenizer = getattr(processor, "tokenizer", processor)

    def split_info(self, name: str) -> Optional[SplitInfo]:
        """Shards and sample count of `train`, `val` or `test` (None when its shard setting is empty)."""
        if name in self.splits:
            return self.splits[name]
        spec = getattr(self.cfg, f"{name}_shards")
        if not spec:
            return None
        try:
            shards = expand_shards(spec)
        except ShardError as err:
            raise ConfigError(f"data.{name}_shards: {err}") from err
        expected = shard_expectations(shards)
        info = SplitInfo(shards, count_samples(shards, expected), expected)
        if info.total == 0:
            raise ConfigError(f"data.{name}_shards={spec!r}: the shards hold no samples")
        self.splits[name] = info
        return info

    def encoder(self, with_answer: bool, kept_views_only: bool = False) -> SampleEncoder:
        c = self.cfg
        settings = EncodeSettings(c.image_width, c.image_height, c.max_length, c.overlong, c.system_prompt or None,
                                  with_answer, c.blank_images)
        if self.views is not None:
            from mose_lightning.data.view_encode import ViewSampleEncoder

            v = self.views
            shown = len(v.names) if v.eval_mode == "all" or v.extra_view_prob > 0 else len(v.kept) + v.top_k
            return ViewSampleEncoder(self.adapter, self.processor, self.taxonomy, settings, v, shown, kept_views_only)
        return SampleEncoder(self.adapter, self.processor, self.taxonomy, settings)

    def samples_per_rank(self, world: int) -> int:
        info = self.split_info("train")
        if self.cfg.samples_per_epoch > 0:
            return self.cfg.samples_per_epoch
        return max(1, info.total // world)

    def loader(self, stream: ShardStream, batch_size: int, padding_side: str) -> DataLoader:
        """A DataLoader over a stream with this DataModule's workers and collation."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=self.cfg.num_workers,
            collate_fn=_Collate(pad_id, padding_side),
            # Workers are started anew each epoch so they see the stream's new epoch (set_epoch) and reshuffle.
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        info = self.split_info("train")
        if info is None:
            raise ConfigError("data.train_shards is empty; expected the training shards")
        rank, world = _dist_rank_world()
        stream = ShardStream(info.shards, self.encoder(True), rank, world, True, self.cfg.seed,
                             self.cfg.shuffle_buffer, self.samples_per_rank(world), limit=self.cfg.train_limit,
                             expected=info.expected, verify_checksum=self.cfg.verify_checksums == "always")
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        stream.set_epoch(epoch)
        return self.loader(stream, self.cfg.batch_size, "right")

    def eval_stream(self, split: str, with_answer: bool, kept_views_only: bool = False) -> ShardStream:
        info = self.split_info(split)
        if info is None:
            raise ConfigError(f"data.{split}_shards is empty; expected the {split} shards")
        rank, world = _dist_rank_world()
        return ShardStream(info.shards, self.encoder(with_answer, kept_views_only), rank, world, False, self.cfg.seed, 0,
                           total=info.total, expected=info.expected,
                           verify_checksum=self.cfg.verify_checksums in ("eval", "always"))

    def val_dataloader(self) -> DataLoader:
        if not self.cfg.val_shards:
            return []
        return self.loader(self.eval_stream("val", True), self.cfg.eval_batch_size, "right")

    def generation_dataloader(self, split: str) -> DataLoader:
        """Prompt-only, left-padded batches for generation; every sample exactly once across ranks."""
        return self.loader(self.eval_stream(split, False), self.cfg.eval_batch_size, "left")


class _Collate:
    """Picklable collate (DataLoader workers may be spawned) that also sums the skipped-sample counts."""

    def __init__(self, pad_id: int, padding_side: str) -> None:
        self.pad_id = pad_id
        self.padding_side = padding_side

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        skipped: Counter = Counter()
        records: List[Dict[str, Any]] = []
        for item in items:
            skipped.update(item.pop("skipped", {}))
            records.extend(item.pop("skipped_samples", []))
        if "view_item" in items[0]:
            from mose_lightning.data.view_encode import collate_views

            batch = collate_views(items)
        else:
            batch = collate(items, self.pad_id, self.padding_side)
        batch["skipped"] = dict(skipped)
        batch["skipped_samples"] = records
        return batch
