"""Encoding (label masking, prompt mask, padding), rank/worker splitting, and skipping of bad samples."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mose_lightning.backbones import get_adapter
from mose_lightning.backbones.qwen2_vl import END_OF_TURN
from mose_lightning.data.datamodule import DriveDataModule, ShardStream, _Collate
from mose_lightning.data.encode import EncodeSettings, Overlong, SampleEncoder
from mose_lightning.data.sample import Sample
from mose_lightning.data.shards import ShardWriter, expand_shards, file_sha256, iter_records, iter_samples
from mose_lightning.skills import load_taxonomy


@pytest.fixture(scope="module")
def cfg(make_config):
    return make_config()


@pytest.fixture(scope="module")
def toy(cfg):
    """(adapter, processor, taxonomy) of the shared toy backbone."""
    adapter = get_adapter("toy")
    _, processor = adapter.load(cfg.backbone)
    return adapter, processor, load_taxonomy(cfg.skills.taxonomy)


@pytest.fixture(scope="module")
def dm(cfg, toy):
    return DriveDataModule(cfg.data, *toy)


@pytest.fixture(scope="module")
def val_samples(synthetic_dir):
    return list(iter_samples(str(synthetic_dir / "val")))


def encoder(toy, with_answer=True, max_length=512, overlong="skip"):
    adapter, processor, taxonomy = toy
    settings = EncodeSettings(224, 126, max_length, overlong, "You are a careful driving assistant.", with_answer)
    return SampleEncoder(adapter, processor, taxonomy, settings)


def write_shards(directory: Path, samples, maxcount: int):
    with ShardWriter(directory, prefix="part", maxcount=maxcount) as writer:
        for sample in samples:
            writer.write(sample)
    return expand_shards(str(directory))


def shard_of_keys(shards):
    return {record["__key__"]: shard for shard in shards for record in iter_records([shard])}


def light_encode(sample: Sample):
    """A stand-in for SampleEncoder when only the splitting is under test (module level: picklable)."""
    return {"meta": {"key": sample.key}}


def drain(stream):
    return [item["meta"] for item in stream]


# ---- 1. label masking, prompt mask, padding ---------------------------------------------------------------------


def test_labels_mask_exactly_prompt_and_padding(dm, toy, val_samples):
    _, processor, _ = toy
    tok = processor.tokenizer
    batch = next(iter(dm.val_dataloader()))
    ids, attn, labels, prompt = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"], batch["prompt_mask"]
    image_id = toy[0].image_token_id(processor)
    by_key = {s.key: s for s in val_samples}
    lengths = attn.sum(1)
    assert lengths.min() < ids.shape[1], "the batch should need padding"
    for row, meta in enumerate(batch["meta"]):
        n = int(lengths[row])
        # Right padding: real tokens first, then pad ids with attention 0.
        assert attn[row, :n].all() and not attn[row, n:].any()
        assert (ids[row, n:] == tok.pad_token_id).all()
        # -100 exactly on prompt and padding.
        assert torch.equal(labels[row] == -100, prompt[row] | ~attn[row])
        assert torch.equal(labels[row][labels[row] != -100], ids[row][labels[row] != -100])
        # The prompt is a prefix: image + question (+ template), nothing after the first answer token.
        p = int(prompt[row].sum())
        assert prompt[row, :p].all() and not prompt[row, p:].any()
        assert (ids[row] == image_id).sum() == 32 and prompt[row][ids[row] == image_id].all()
        assert batch["mm_token_type_ids"][row].bool().tolist() == (ids[row] == image_id).tolist()
        sample = by_key[meta["key"]]
        prompt_text = tok.decode(ids[row, :p])
        assert sample.question in prompt_text and prompt_text.endswith("assistant\n")
        assert tok.decode(labels[row][labels[row] != -100]) == sample.answer.strip() + END_OF_TURN
    assert batch["skill_labels"].shape == (4, 3) and (batch["skill_labels"] >= 0).all()


def test_generation_batch_is_left_padded_prompt_only(dm, toy):
    tok = toy[1].tokenizer
    batch = next(iter(dm.generation_dataloader("test")))
    ids, attn = batch["input_ids"], batch["attention_mask"].bool()
    assert "labels" not in batch
    assert torch.equal(batch["prompt_mask"], attn)
    lengths = attn.sum(1)
    assert lengths.min() < ids.shape[1]
    for row in range(ids.shape[0]):
        pad = ids.shape[1] - int(lengths[row])
        assert not attn[row, :pad].any() and attn[row, pad:].all()
        assert (ids[row, :pad] == tok.pad_token_id).all()
        assert tok.decode(ids[row, pad:]).endswith("assistant\n")
    assert all(meta["answer"] for meta in batch["meta"])  # the reference answer travels in meta only


# ---- 2. rank splitting --------------------------------------------------------------------------------------------


def test_training_ranks_read_disjoint_shards_and_equal_counts(synthetic_dir):
    shards = expand_shards(str(synthetic_dir / "train"))
    assert len(shards) == 8
    where = shard_of_keys(shards)
    for subset, per_rank in ((shards, 32), (shards[:5], 20), (shards, 45)):  # even, uneven shards, cycling
        streams = [ShardStream(subset, light_encode, r, 2, True, 0, 8, per_rank) for r in (0, 1)]
        metas = [drain(s) for s in streams]
        assert [len(m) for m in metas] == [per_rank, per_rank] == [len(s) for s in streams]
        used = [{where[m["key"]] for m in ms} for ms in metas]
        assert used[0] <= set(subset[0::2]) and used[1] <= set(subset[1::2])
        assert not used[0] & used[1]
        # Samples come from the rank's shards only (resampled: the shuffle buffer mixes passes, so an epoch of
        # len(shards) samples is not a permutation, but most samples are drawn).
        for rank, ms in enumerate(metas):
            own = {k for k, shard in where.items() if shard in subset[rank::2]}
            assert {m["key"] for m in ms} <= own and len({m["key"] for m in ms}) >= min(per_rank, len(own)) // 2


def test_training_shuffle_is_seeded(synthetic_dir):
    shards = expand_shards(str(synthetic_dir / "train"))

    def keys(seed=0, epoch=0, rank=0):
        stream = ShardStream(shards, light_encode, rank, 2, True, seed, 8, 32)
        stream.set_epoch(epoch)
        return [m["key"] for m in drain(stream)]

    first = keys()
    assert first == keys()
    assert first != keys(epoch=1)
    assert first != keys(seed=1)


def test_too_few_training_shards_for_the_ranks(synthetic_dir):
    from mose_lightning.config import ConfigError

    shards = expand_shards(str(synthetic_dir / "train"))
    with pytest.raises(ConfigError, match="every rank needs its own shard"):
        ShardStream(shards[:1], light_encode, 0, 2, True, 0, 8, 4)


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_visits_every_sample_once(synthetic_dir, world):
    shards = expand_shards(str(synthetic_dir / "val"))
    all_keys = sorted(shard_of_keys(shards))
    assert len(all_keys) == 16
    metas = [drain(ShardStream(shards, light_encode, r, world, False, 0, 0, total=16)) for r in range(world)]
    per_rank = -(-16 // world)
    assert [len(m) for m in metas] == [per_rank] * world
    real = [m["key"] for ms in metas for m in ms if not m["pad"]]
    assert sorted(real) == all_keys  # union is everything, no duplicates
    assert sum(m["pad"] for ms in metas for m in ms) == per_rank * world - 16
    for rank, ms in enumerate(metas):
        assert [m["key"] for m in ms if not m["pad"]] == all_keys_in_order(shards)[rank::world]


def all_keys_in_order(shards):
    return [record["__key__"] for record in iter_records(shards)]


# ---- 3. bad samples -------------------------------------------------------------------------------------------------


def _broken_image(sample: Sample) -> Sample:
    """Passes format validation (JPEG magic) but does not decode."""
    return Sample(**{**sample.__dict__, "key": sample.key + "_badjpg", "images": [b"\xff\xd8\xff\xe0 not a jpeg"]})


def _append_raw_record(shard: str, key: str, members: dict) -> None:
    """Rewrite `shard` with one extra raw record (members written as given, no validation)."""
    with open(shard, "rb") as handle:
        data = handle.read()
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        for ext, payload in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            dst.addfile(info, io.BytesIO(payload))
    Path(shard).chmod(0o644)
    Path(shard).write_bytes(out.getvalue())
    # As if the converter had written the record: the manifest lists it (else the shard reads as damaged).
    manifest_path = Path(shard).parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["shards"]:
        if entry["name"] == Path(shard).name:
            entry["count"] += 1
            entry["sha256"] = file_sha256(shard)
    manifest_path.write_text(json.dumps(manifest))


@pytest.fixture()
def damaged_shards(tmp_path, val_samples):
    """Good samples, one undecodable image, one record with broken json, and a shard cut off mid-member (last).

    Returns (shards, good keys the reader must deliver, keys that may come out of the damaged shard); the
    undecodable sample's key is the second good sample's key + "_badjpg"."""
    good = val_samples[:6]
    samples = [good[0], _broken_image(good[1]), *good[1:6]]
    shards = write_shards(tmp_path / "damaged", samples, maxcount=4)
    assert len(shards) == 2
    _append_raw_record(shards[0], "broken_json", {"0.jpg": good[0].images[0], "json": b"{not json"})
    cut = write_shards(tmp_path / "cut", val_samples[6:9], maxcount=8)[0]
    blob = Path(cut).read_bytes()
    Path(cut).chmod(0o644)
    Path(cut).write_bytes(blob[: len(blob) * 2 // 3])
    return shards + [cut], {s.key for s in good}, {s.key for s in val_samples[6:9]}


@pytest.mark.parametrize("world", [1, 2])
def test_bad_samples_are_skipped_and_counted(dm, damaged_shards, world):
    from mose_lightning.data.datamodule import count_samples

    shards, good_keys, maybe_keys = damaged_shards
    total = count_samples(shards)
    # The manifests' count: the good samples, the two bad records and the three the cut shard was written with.
    assert total == len(good_keys) + 2 + len(maybe_keys)
    per_rank = -(-total // world)
    seen, skipped, items, records = [], Counter(), [], []
    for rank in range(world):
        stream = ShardStream(shards, dm.encoder(True), rank, world, False, 0, 0, total=total)
        batches = list(DataLoader(stream, batch_size=2, collate_fn=_Collate(0, "right")))
        items.append(sum(len(b["meta"]) for b in batches))
        seen += [m["key"] for b in batches for m in b["meta"] if not m["pad"]]
        for b in batches:
            skipped.update(b["skipped"])
            records += b["skipped_samples"]
    assert len(seen) == len(set(seen))
    assert good_keys <= set(seen) <= good_keys | maybe_keys
    # Each problem counted once across ranks, including the damaged tail that comes after the last sample.
    assert skipped == {"undecodable": 1, "malformed record": 1, "damaged shard": 1}
    # ... and listed with its key and shard (the damaged shard with the samples it lost).
    by_reason = {r["reason"]: r for r in records}
    assert len(records) == 3
    undecodable_key = next(k for k in shard_of_keys(shards[:2]) if k.endswith("_badjpg"))
    assert (by_reason["undecodable"]["key"], by_reason["undecodable"]["shard"]) == (undecodable_key, shards[0])
    assert (by_reason["malformed record"]["key"], by_reason["malformed record"]["shard"]) == ("broken_json", shards[0])
    damaged = by_reason["damaged shard"]
    assert damaged["shard"] == shards[2] and damaged["key"] is None
    assert damaged["samples"] == len(maybe_keys) - len(set(seen) & maybe_keys)
    # Skipping does not break equal counts across ranks: every rank still yields ceil(total / world) items.
    assert items == [per_rank] * world


def test_overlong_sample_is_skipped_or_truncated(toy, val_samples):
    sample = max(val_samples, key=lambda s: len(s.question.split()))
    full = encoder(toy)(sample)
    length = full["input_ids"].shape[0]
    answer_ids = full["labels"][full["labels"] != -100]

    with pytest.raises(Overlong, match="data.max_length"):
        encoder(toy, max_length=length - 3)(sample)

    cut = encoder(toy, max_length=length - 3, overlong="truncate_prompt")(sample)
    assert cut["input_ids"].shape[0] <= length - 3
    assert cut["meta"]["truncated_words"] > 0
    assert torch.equal(cut["labels"][cut["labels"] != -100], answer_ids)
    assert (cut["input_ids"] == toy[0].image_token_id(toy[1])).sum() == 32
    # The end of the question (the actual ask) survives.
    tok = toy[1].tokenizer
    assert tok.decode(cut["input_ids"][cut["prompt_mask"]]).rstrip().endswith(
        sample.question.split()[-1] + "<|im_end|>\n<|im_start|>assistant")

    # Too long even without any question: still Overlong, never a cut into the answer.
    with pytest.raises(Overlong, match="after truncating the question"):
        encoder(toy, max_length=int(answer_ids.numel()) + 10, overlong="truncate_prompt")(sample)


def test_overlong_skip_is_counted_in_the_batch(toy, val_samples, tmp_path):
    full = encoder(toy)
    lengths = {s.key: full(s)["input_ids"].shape[0] for s in val_samples[:6]}
    limit = sorted(lengths.values())[2]  # the longer half does not fit
    too_long = {k for k, n in lengths.items() if n > limit}
    assert 0 < len(too_long) < 6
    shards = write_shards(tmp_path / "overlong", val_samples[:6], maxcount=8)
    stream = ShardStream(shards, encoder(toy, max_length=limit), 0, 1, False, 0, 0, total=6)
    batches = list(DataLoader(stream, batch_size=4, collate_fn=_Collate(0, "right")))
    assert sum(b["skipped"].get("overlong", 0) for b in batches) == len(too_long)
    real = {m["key"] for b in batches for m in b["meta"] if not m["pad"]}
    assert real == set(lengths) - too_long
    assert all(b["input_ids"].shape[1] <= limit for b in batches)


# ---- 4. DataLoader workers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 3])
def test_workers_visit_each_eval_sample_once(synthetic_dir, world):
    shards = expand_shards(str(synthetic_dir / "val"))
    all_keys = sorted(shard_of_keys(shards))
    per_rank, batch_counts, real = -(-16 // world), [], []
    for rank in range(world):
        stream = ShardStream(shards, light_encode, rank, world, False, 0, 0, total=16)
        loader = DataLoader(stream, batch_size=2, num_workers=2, collate_fn=lambda items: items)
        batches = list(loader)
        metas = [item["meta"] for b in batches for item in b]
        assert len(metas) == per_rank
        batch_counts.append(len(batches))
        real += [m["key"] for m in metas if not m["pad"]]
    assert sorted(real) == all_keys
    assert len(set(batch_counts)) == 1, f"ranks would run different numbers of batches: {batch_counts}"


def test_datamodule_generation_loader_with_workers(make_config, toy, synthetic_dir):
    """The real encoder in two worker processes: every test sample once, no pads (16 samples, one rank)."""
    dm = DriveDataModule(make_config("data.num_workers=2").data, *toy)
    batches = list(dm.generation_dataloader("test"))
    keys = [m["key"] for b in batches for m in b["meta"]]
    assert not any(m["pad"] for b in batches for m in b["meta"])
    assert sorted(keys) == sorted(shard_of_keys(expand_shards(str(synthetic_dir / "test"))))
    assert all(b["input_ids"].shape[0] == b["attention_mask"].shape[0] == len(b["meta"]) for b in batches)


def test_training_order_changes_every_epoch_under_the_trainer(make_config, tmp_path):
    """Lightning builds the training DataLoader once: the fine-tuning module must advance the stream's epoch."""
    from mose_lightning.model import build_model
    from mose_lightning.stages.common import FineTuneModule
    from mose_lightning.training import make_trainer

    cfg = make_config("data.batch_size=32", "data.val_shards=", "trainer.max_steps=4", f"run_dir={tmp_path}",
                      "trainer.checkpoint_every_n_steps=100")
    model = build_model(cfg)
    seen = {}

    class Recording(FineTuneModule):
        def training_step(self, batch, batch_idx):
            seen.setdefault(self.current_epoch, []).extend(m["key"] for m in batch["meta"])
            return super().training_step(batch, batch_idx)

    datamodule = DriveDataModule(cfg.data, model.adapter, model.processor, model.taxonomy)
    make_trainer(cfg, tmp_path, model, validate=False).fit(Recording(model, cfg), datamodule=datamodule)
    assert sorted(seen) == [0, 1] and len(seen[0]) == len(seen[1]) == 64
    assert seen[0] != seen[1]
