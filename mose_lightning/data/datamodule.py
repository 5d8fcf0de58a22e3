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
Samples that cannot be read, decoded or encoded are skipped and counted; the count travels with the next batch
(`batch["skipped"]`) so the LightningModule can log it: nothing is dropped silently, an epoch never crashes.
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
from mose_lightning.data.encode import EncodeSettings, Overlong, SampleEncoder, collate
from mose_lightning.data.sample import Sample, SampleError
from mose_lightning.data.shards import ReadStats, ShardError, expand_shards, iter_records, read_manifest


def _dist_rank_world() -> tuple:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def count_samples(shards: List[str]) -> int:
    """Samples in a shard list: from the manifests beside the shards where present, else by reading them."""
    from pathlib import Path

    total, unknown = 0, []
    manifests: Dict[str, Dict[str, int]] = {}
    for shard in shards:
        folder = str(Path(shard).parent)
        if folder not in manifests:
            try:
                manifest = read_manifest(folder)
                manifests[folder] = {e["name"]: int(e.get("count", e.get("samples", 0))) for e in manifest["shards"]}
            except (ShardError, OSError, KeyError, TypeError, ValueError):
                manifests[folder] = {}
        name = Path(shard).name
        if name in manifests[folder]:
            total += manifests[folder][name]
        else:
            unknown.append(shard)
    if unknown:
        total += sum(1 for _ in iter_records(unknown, on_error="skip"))
    return total


class _Skips:
    """Reasons and counts of skipped samples since the last yielded item of this worker."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def add(self, reason: str) -> None:
        self.counts[reason] += 1

    def drain(self) -> Dict[str, int]:
        out = dict(self.counts)
        self.counts.clear()
        return out


class ShardStream(IterableDataset):
    """Encoded samples of one rank; see the module docstring for the splitting rules."""

    def __init__(self, shards: List[str], encode: Callable[[Sample], Dict[str, Any]], rank: int, world: int,
                 train: bool, seed: int, shuffle_buffer: int, samples_per_rank: int = 0, total: int = 0,
                 limit: int = 0) -> None:
        self.shards = shards
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

    def _records(self, shards: List[str], skips: _Skips, stride: int = 1, offset: int = 0) -> Iterator[Sample]:
        stats = ReadStats()
        index = 0
        for record in iter_records(shards, on_error="skip", stats=stats):
            for message in stats.skipped:
                skips.add("damaged shard")
            stats.skipped.clear()
            index += 1
            if self.train and self.limit and index > self.limit:
                break
            if (index - 1) % stride != offset:
                continue
            try:
                yield Sample.from_record(record, where=record.get("__url__", "?"))
            except SampleError:
                skips.add("malformed record")
        for message in stats.skipped:
            skips.add("damaged shard")

    def _encoded(self, samples: Iterator[Sample], skips: _Skips) -> Iterator[Dict[str, Any]]:
        for sample in samples:
            try:
                item = self.encode(sample)
            except Overlong:
                skips.add("overlong")
                continue
            except Exception:  # undecodable image, empty answer, processor failure: skip and count
                skips.add("undecodable")
                continue
            item["skipped"] = skips.drain()
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

        def mine() -> Iterator[Sample]:
            global_index = -1
            for sample in self._records(self.shards, record_skips):
                global_index += 1
                if global_index % self.world == self.rank and (global_index // self.world) % workers == worker:
                    yield sample

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
                yield {**first, "meta": {**first["meta"], "pad": True}, "skipped": {}}

        # Hold the last item back so skips after it (a damaged shard tail, bad last samples) still travel with it.
        held: Optional[Dict[str, Any]] = None
        for item in items():
            if held is not None:
                yield held
            held = item
        if held is not None:
            trailing = skips.drain()
            if trailing:
                held["skipped"] = dict(Counter(held.get("skipped", {})) + Counter(trailing))
            yield held

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return self._train_iter() if self.train else self._eval_iter()


@dataclass
class SplitInfo:
    shards: List[str]
    total: int


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
        info = SplitInfo(shards, count_samples(shards))
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
                             self.cfg.shuffle_buffer, self.samples_per_rank(world), limit=self.cfg.train_limit)
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        stream.set_epoch(epoch)
        return self.loader(stream, self.cfg.batch_size, "right")

    def eval_stream(self, split: str, with_answer: bool, kept_views_only: bool = False) -> ShardStream:
        info = self.split_info(split)
        if info is None:
            raise ConfigError(f"data.{split}_shards is empty; expected the {split} shards")
        rank, world = _dist_rank_world()
        return ShardStream(info.shards, self.encoder(with_answer, kept_views_only), rank, world, False, self.cfg.seed, 0,
                           total=info.total)

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
        for item in items:
            skipped.update(item.pop("skipped", {}))
        if "view_item" in items[0]:
            from mose_lightning.data.view_encode import collate_views

            batch = collate_views(items)
        else:
            batch = collate(items, self.pad_id, self.padding_side)
        batch["skipped"] = dict(skipped)
        return batch
