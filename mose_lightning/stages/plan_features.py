"""The planning stage's data helpers: every sample of a split in one process, and the cache of the frozen VLM's
hidden states (one forward per sample, shared by the DDP ranks and by the runs of a comparison)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from mose_lightning.config import ConfigError, ExperimentConfig, resolve_path
from mose_lightning.data.datamodule import ShardStream
from mose_lightning.data.planning import PlanningDataModule
from mose_lightning.io import torch_save
from mose_lightning.locks import taking_turns
from mose_lightning.planning.vlm import vlm_features
from mose_lightning.training import is_global_zero

PLAN_KEYS = ("plan_trajectory", "plan_valid", "plan_state", "plan_scenario")


def to_device(batch: Dict[str, Any], device) -> Dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _model_identity(model) -> str:
    """Every parameter's name, shape and 64 evenly spaced elements: trained MoE blocks and routers included."""
    digest = hashlib.sha256()
    for name, param in sorted(model.backbone.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().flatten()
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


def _cache_file(cfg: ExperimentConfig, model, split: str, shards: List[str]) -> Path:
    files = [[s, os.stat(s).st_size, int(os.stat(s).st_mtime)] if os.path.exists(s) else [s] for s in shards]
    d = cfg.data
    identity = {"model": _model_identity(model), "shards": files, "layer": cfg.plan.vlm_layer,
                "level": cfg.plan.chain_level, "encode": [d.image_width, d.image_height, d.max_length, d.overlong,
                                                          d.system_prompt, d.blank_images]}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return resolve_path(cfg.plan.cache_dir) / f"{split}-{key}.pt"


def single_process_stream(datamodule: PlanningDataModule, split: str, with_answer: bool) -> ShardStream:
    """Every sample of a split in this process (also after a multi-rank fit, when rank 0 evaluates alone)."""
    info = datamodule.split_info(split)
    if info is None:
        raise ConfigError(f"data.{split}_shards is empty; expected the {split} shards")
    return ShardStream(info.shards, datamodule.encoder(with_answer), 0, 1, False, datamodule.cfg.seed, 0, total=info.total)


@torch.no_grad()
def compute_features(cfg: ExperimentConfig, model, datamodule: PlanningDataModule, split: str) -> List[Dict[str, Any]]:
    """One VLM forward per sample of `split`: per sample the prompt's hidden states (T, H), its planning-level
    MoSE route (-1 without one), the planning tensors and the meta the evaluation needs."""
    model.eval()
    device = next(model.parameters()).device
    loader = datamodule.loader(single_process_stream(datamodule, split, False), cfg.data.eval_batch_size, "right")
    items = []
    for batch in loader:
        batch = to_device(batch, device)
        feats = vlm_features(model, batch, cfg.plan.vlm_layer, cfg.plan.chain_level)
        for i, meta in enumerate(batch["meta"]):
            if meta.get("pad"):
                continue
            keep = {k: meta.get(k) for k in ("key", "task", "question", "skills", "planning")}
            items.append({
                "vlm_hidden": feats.hidden[i][feats.mask[i]].cpu().clone(),
                "chain_expert": int(feats.chain_expert[i]) if feats.chain_expert is not None else -1,
                **{k: batch[k][i : i + 1].cpu() for k in PLAN_KEYS},
                "meta": keep,
            })
    return items


def cached_features(cfg: ExperimentConfig, model, datamodule: PlanningDataModule, split: str) -> List[Dict[str, Any]]:
    """compute_features through the on-disk cache (keyed by the VLM's weights, shards and encoding); the first
    process computes, others (DDP ranks, later runs of a comparison) read it."""
    info = datamodule.split_info(split)
    path = _cache_file(cfg, model, split, info.shards)
    with taking_turns(path.with_name(path.name + ".lock")):
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=False)
        if is_global_zero():
            print(f"plan: caching the VLM's hidden states of the {split} split in {path}")
        items = compute_features(cfg, model, datamodule, split)
        torch_save(items, path)
        return items


class CachedFeatures(Dataset):
    def __init__(self, items: List[Dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.items[index]


def collate_cached(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    longest = max(item["vlm_hidden"].shape[0] for item in items)
    hidden = items[0]["vlm_hidden"].new_zeros(len(items), longest, items[0]["vlm_hidden"].shape[1])
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for i, item in enumerate(items):
        n = item["vlm_hidden"].shape[0]
        hidden[i, :n] = item["vlm_hidden"]
        mask[i, :n] = True
    batch = {"vlm_hidden": hidden, "vlm_mask": mask,
             "chain_expert": torch.tensor([item["chain_expert"] for item in items], dtype=torch.long),
             "meta": [item["meta"] for item in items]}
    for key in PLAN_KEYS:
        batch[key] = torch.cat([item[key] for item in items])
    return batch


class CachedPlanData(pl.LightningDataModule):
    """Training and validation batches from cached features (map-style: Lightning shards them across DDP ranks)."""

    def __init__(self, train: List[Dict[str, Any]], val: Optional[List[Dict[str, Any]]], batch_size: int,
                 eval_batch_size: int, seed: int) -> None:
        super().__init__()
        self.train, self.val = CachedFeatures(train), (CachedFeatures(val) if val else None)
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=len(self.train) >= self.batch_size,
                          collate_fn=collate_cached, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self):
        if self.val is None:
            return []
        return DataLoader(self.val, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate_cached)
