"""Stage: router pretraining (the paper's Sec. 3.3, after Med-MoE).

Every MoSE router learns, with cross-entropy, to predict the sample's skill at its layer's level from the mean
of the prompt tokens entering its layer. With upcycled experts the block output does not depend on the route, so
the hidden states do not either: one frozen-backbone forward per sample gives the router inputs of *all* MoSE
layers. They are cached on disk (keyed by backbone fingerprint, shards, layer selection and encoding settings)
and the routers then train on the cache for as many epochs as configured, in seconds.

Outputs in the run dir: routers.pt (loaded by SFT through moe.router_checkpoint), metrics.json with
router/acc/<level> and router/acc/mean on the held-out split, confusion.json and confusion.md per level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from mose_lightning.checkpoint import backbone_fingerprint, model_from_config
from mose_lightning.config import ConfigError, ExperimentConfig, resolve_path
from mose_lightning.data.datamodule import DriveDataModule
from mose_lightning.io import atomic_write_json, atomic_write_text, torch_save
from mose_lightning.model import MoEVisionLanguageModel
from mose_lightning.surgery import router_state, skill_routers
from mose_lightning.training import cached_features_trainer, finish_run, is_global_zero, start_run


class PooledFeatures:
    """Router inputs of every MoSE layer for a set of samples: features (N, L, H), labels (N, levels), keys."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, keys: List[str], backbone_forwards: int) -> None:
        self.features, self.labels, self.keys = features, labels, keys
        self.backbone_forwards = backbone_forwards


def _cache_key(model: MoEVisionLanguageModel, cfg: ExperimentConfig, shards: List[str], split: str) -> str:
    files = []
    for shard in shards:
        stat = os.stat(shard) if os.path.exists(shard) else None
        files.append([shard, stat.st_size if stat else None, int(stat.st_mtime) if stat else None])
    taxonomy_file = resolve_path(cfg.skills.taxonomy)
    identity = {
        "backbone": backbone_fingerprint(model),
        "backbone_cfg": [cfg.backbone.name, cfg.backbone.path, cfg.backbone.init_checkpoint, cfg.backbone.dtype],
        "layers": model.layout.layer_indices,
        "router_input": cfg.moe.router_input,
        "shards": files,
        "split": split,
        "encode": [cfg.data.image_width, cfg.data.image_height, cfg.data.max_length, cfg.data.overlong,
                   cfg.data.system_prompt, cfg.data.blank_images],
        "taxonomy": Path(taxonomy_file).read_text() if Path(taxonomy_file).is_file() else cfg.skills.taxonomy,
        "max_samples": cfg.router_pretrain.max_samples,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def extract_pooled_features(model: MoEVisionLanguageModel, loader, max_samples: int = 0,
                            desc: str = "router inputs") -> PooledFeatures:
    """One backbone forward per sample (prompt only: causal attention makes the prompt's hidden states the same
    with or without the answer), collecting the pooled input of every MoSE layer."""
    if not model.layout.sequence_routed:
        raise ConfigError("router pretraining needs MoSE layers (moe.kind=mose)")
    model.eval()
    device = next(model.parameters()).device
    feats, labels, keys = [], [], []
    forwards = 0
    bar = tqdm(desc=desc, unit="sample", disable=not is_global_zero())
    for batch in loader:
        keep = [i for i, m in enumerate(batch["meta"]) if not m.get("pad", False)]
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        out = model(batch, with_loss=False)
        forwards += len(batch["meta"])
        pooled = torch.stack([route.pooled for route in out.routes], dim=1)  # (B, L, H)
        feats.append(pooled[keep].cpu())
        labels.append(batch["skill_labels"][keep].cpu())
        keys.extend(batch["meta"][i]["key"] for i in keep)
        bar.update(len(keep))
        if max_samples and len(keys) >= max_samples:
            break
    bar.close()
    features, label_tensor = torch.cat(feats), torch.cat(labels)
    if max_samples:
        features, label_tensor, keys = features[:max_samples], label_tensor[:max_samples], keys[:max_samples]
    return PooledFeatures(features, label_tensor, keys, forwards)


def cached_features(model, cfg: ExperimentConfig, datamodule: DriveDataModule, split: str) -> PooledFeatures:
    info = datamodule.split_info(split)
    if info is None:
        raise ConfigError(f"data.{split}_shards is empty")
    path = resolve_path(cfg.router_pretrain.cache_dir) / f"{split}-{_cache_key(model, cfg, info.shards, split)}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        print(f"router inputs: cache hit {path} ({len(data['keys'])} samples, no backbone forward)")
        return PooledFeatures(data["features"], data["labels"], list(data["keys"]), 0)
    loader = datamodule.loader(datamodule.eval_stream(split, with_answer=False), cfg.data.eval_batch_size, "left")
    limit = cfg.router_pretrain.max_samples if split == "train" else 0
    pooled = extract_pooled_features(model, loader, limit, desc=f"router inputs ({split})")
    torch_save({"features": pooled.features, "labels": pooled.labels, "keys": pooled.keys}, path)
    return pooled


class RouterPretrainModule(pl.LightningModule):
    """Trains the skill router of every MoSE layer on cached pooled inputs.

    Preconditioning: the (RMS-normalised) pooled vectors of a layer share a large common component, and what tells
    skills apart lives in small deviations from it, which a linear router reaches only with large weights, i.e.
    slowly. With `standardize`, each router's input standardisation is set from the training set's per-feature
    mean and std first (`SequenceSkillRouter.set_standardisation`), so its classifier trains, here and when it goes
    on training during SFT, on inputs of unit scale.
    """

    def __init__(self, routers: Dict[int, nn.Module], level_of_layer: List[int], level_names: List[str],
                 num_skills: int, cfg: ExperimentConfig, train_features: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.layer_ids = sorted(routers)
        self.routers = nn.ModuleList([routers[i] for i in self.layer_ids])
        self.level_of_layer = level_of_layer
        self.level_names = level_names
        self.num_skills = num_skills
        self.cfg = cfg
        self._confusion: Optional[torch.Tensor] = None
        self.final: Dict[str, float] = {}
        if train_features is not None:
            for j, router in enumerate(self.routers):
                router.set_standardisation(router.normalise(train_features[:, j].float()))

    def _logits(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.stack([router(feats[:, j]) for j, router in enumerate(self.routers)], dim=1)  # (B, L, E)

    def _targets(self, labels: torch.Tensor) -> torch.Tensor:
        return labels[:, self.level_of_layer]  # (B, L)

    def training_step(self, batch, batch_idx):
        feats, labels = batch
        logits, target = self._logits(feats), self._targets(labels)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-1)
        self.log("router/train_loss", loss, prog_bar=True, batch_size=feats.shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        levels = len(self.level_names)
        self._confusion = torch.zeros(levels, self.num_skills, self.num_skills, dtype=torch.long)

    def validation_step(self, batch, batch_idx):
        feats, labels = batch
        pred, target = self._logits(feats).argmax(-1), self._targets(labels)
        for j, level in enumerate(self.level_of_layer):
            ok = target[:, j] >= 0
            index = target[:, j][ok] * self.num_skills + pred[:, j][ok]
            self._confusion[level] += torch.bincount(index.cpu(), minlength=self.num_skills**2).view(
                self.num_skills, self.num_skills
            )

    def on_validation_epoch_end(self) -> None:
        accs = []
        for li, level in enumerate(self.level_names):
            conf = self._confusion[li]
            total = int(conf.sum())
            acc = float(conf.diag().sum()) / total if total else float("nan")
            self.log(f"router/acc/{level}", acc)
            self.final[f"router/acc/{level}"] = acc
            accs.append(acc)
        mean = sum(accs) / len(accs)
        self.log("router/acc/mean", mean, prog_bar=True)
        self.final["router/acc/mean"] = mean

    def configure_optimizers(self):
        r = self.cfg.router_pretrain
        return torch.optim.Adam(self.parameters(), lr=r.lr, weight_decay=r.weight_decay)


def _holdout(features: PooledFeatures, fraction: float, seed: int) -> Tuple[PooledFeatures, PooledFeatures]:
    n = len(features.keys)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = max(1, int(round(n * fraction)))
    test, train = order[:cut], order[cut:]

    def take(idx):
        return PooledFeatures(features.features[idx], features.labels[idx], [features.keys[i] for i in idx], 0)

    return take(train), take(test)


def _confusion_markdown(module: RouterPretrainModule, taxonomy) -> Tuple[dict, str]:
    out, lines = {}, []
    for li, level in enumerate(module.level_names):
        names = [taxonomy.skill_name(level, e) for e in range(module.num_skills)]
        conf = module._confusion[li].tolist()
        out[level] = {"skills": names, "matrix": conf}
        lines += [f"### {level} (rows: annotated skill, columns: router choice)", "",
                  "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {names[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(conf)]
        lines.append("")
    return out, "\n".join(lines)


def run_router_pretrain(cfg: ExperimentConfig) -> Tuple[Path, Dict[str, float]]:
    if cfg.moe.kind != "mose":
        raise ConfigError(f"router pretraining trains MoSE routers: expected moe.kind=mose, got {cfg.moe.kind!r}")
    run_dir = start_run(cfg, "pretrain_router")
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, router_checkpoint=None))  # these are trained here
    # Seeded before the build: the routers' initial weights are drawn there.
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = model_from_config(cfg, load_routers=False)
    datamodule = DriveDataModule(cfg.data, model.adapter, model.processor, model.taxonomy)
    train = cached_features(model, cfg, datamodule, "train")
    if cfg.data.val_shards and cfg.router_pretrain.holdout_fraction <= 0:
        test = cached_features(model, cfg, datamodule, "val")
    else:
        train, test = _holdout(train, cfg.router_pretrain.holdout_fraction or 0.1, cfg.seed)
    if int((train.labels >= 0).all(dim=1).sum()) == 0:
        raise ConfigError("router pretraining: no training sample carries skill labels; run `mose skills annotate`")
    routers = skill_routers(model.layout)
    levels = model.taxonomy.level_names
    level_of_layer = [levels.index(block.level_name) for block in model.layout.sequence_routed]
    num_skills = model.layout.sequence_routed[0].num_skills
    for router in routers.values():
        router.float().requires_grad_(True)
    module = RouterPretrainModule(routers, level_of_layer, levels, num_skills, cfg,
                                  train.features if cfg.router_pretrain.standardize else None)
    r = cfg.router_pretrain
    train_loader = DataLoader(TensorDataset(train.features, train.labels), batch_size=r.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(cfg.seed))
    test_loader = DataLoader(TensorDataset(test.features, test.labels), batch_size=1024)
    trainer = cached_features_trainer(run_dir, r.epochs)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer.fit(module, train_loader, test_loader)
    # The held-out numbers below come from the routers exactly as saved.
    trainer.validate(module, test_loader, verbose=False)
    state = router_state(model.layout)
    torch_save(state, run_dir / "routers.pt")
    confusion, markdown = _confusion_markdown(module, model.taxonomy)
    atomic_write_json(run_dir / "confusion.json", confusion)
    atomic_write_text(run_dir / "confusion.md", markdown)
    metrics = dict(module.final)
    metrics.update({"train_samples": len(train.keys), "test_samples": len(test.keys),
                    "backbone_forwards": train.backbone_forwards + test.backbone_forwards})
    finish_run(run_dir, metrics)
    return run_dir, metrics
