"""Stage: pretraining of the view router on cached router inputs, the cheap warm start before fine-tuning.

The router reads only the kept views' visual tokens, the question's mean token embedding and the command, all
computed by the frozen backbone. So one vision pass per sample (the kept views only) gives every input it will
ever see; they are cached on disk (keyed by backbone fingerprint, shards, views and encoding settings) and the
router then trains on the cache with the focal loss for `views.pretrain.epochs`, in seconds. With a trainable
vision tower or embeddings the cache would go stale during fine-tuning; it is meant for the usual frozen ones.

Outputs in the run dir: view_router.pt (loaded by fine-tuning through views.router_checkpoint), metrics.json
(`view_router/acc`, `view_router/macro_f1` on the held-out samples), confusion.json / confusion.md /
confusion.png.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Dict, List, Tuple

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mose_lightning.checkpoint import backbone_fingerprint, model_from_config
from mose_lightning.config import ConfigError, ExperimentConfig, resolve_path
from mose_lightning.data.datamodule import DriveDataModule
from mose_lightning.evaluation.view_metrics import ViewRoutingAccuracy
from mose_lightning.io import atomic_write_json, atomic_write_text, torch_save
from mose_lightning.moe.view_routing import ViewDecision, view_router_loss
from mose_lightning.training import cached_features_trainer, finish_run, is_global_zero, start_run
from mose_lightning.views import ViewEncoder


class RouterInputs(Dataset):
    """Cached router inputs: per sample the kept views' tokens (float16), the question embedding, the command,
    the router targets and available classes, and the sample key and frame (for frame-level holdouts)."""

    def __init__(self, data: Dict[str, list]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["keys"])

    def __getitem__(self, i: int):
        d = self.data
        return d["visual"][i], d["question"][i], d["command"][i], d["targets"][i], d["available"][i]

    def subset(self, indices: List[int]) -> "RouterInputs":
        return RouterInputs({k: [v[i] for i in indices] for k, v in self.data.items()})


def collate_inputs(rows):
    visual = [r[0].float() for r in rows]
    longest = max(v.shape[0] for v in visual)
    padded = visual[0].new_zeros((len(rows), longest, visual[0].shape[-1]))
    mask = torch.zeros((len(rows), longest), dtype=torch.bool)
    for i, v in enumerate(visual):
        padded[i, : v.shape[0]] = v
        mask[i, : v.shape[0]] = True
    return (padded, mask, torch.stack([r[1] for r in rows]).float(), torch.stack([r[2] for r in rows]),
            torch.stack([r[3] for r in rows]), torch.stack([r[4] for r in rows]))


def _cache_key(model, cfg: ExperimentConfig, shards: List[str], split: str) -> str:
    files = []
    for shard in shards:
        stat = os.stat(shard) if os.path.exists(shard) else None
        files.append([shard, stat.st_size if stat else None, int(stat.st_mtime) if stat else None])
    v = cfg.views
    identity = {
        "backbone": backbone_fingerprint(model),
        "backbone_cfg": [cfg.backbone.name, cfg.backbone.path, cfg.backbone.init_checkpoint, cfg.backbone.dtype],
        "views": [v.names, v.kept, v.fallback, v.commands],
        "shards": files,
        "split": split,
        "encode": [cfg.data.image_width, cfg.data.image_height, cfg.data.max_length, cfg.data.system_prompt,
                   cfg.data.blank_images],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def extract_router_inputs(model, loader, desc: str = "view router inputs") -> Tuple[RouterInputs, int]:
    """One vision pass per sample over its kept views; returns the inputs and the number of images encoded."""
    model.eval()
    views = model.views
    kept = [views.view_index(name) for name in model.cfg.views.kept]
    embed = model.backbone.get_input_embeddings()
    data: Dict[str, list] = {k: [] for k in ("visual", "question", "command", "targets", "available", "keys", "frames")}
    encoded = 0
    device = next(model.parameters()).device
    bar = tqdm(desc=desc, unit="sample", disable=not is_global_zero())
    for batch in loader:
        items = [{k: t.to(device) for k, t in item.items()} for item in batch["view_items"]]
        encoder = ViewEncoder(model, items)
        feats = encoder.encode([(b, v) for b in range(len(items)) for v in kept])
        encoded += encoder.encoded
        for b, meta in enumerate(batch["meta"]):
            if meta.get("pad", False):
                continue
            data["visual"].append(torch.cat([feats[(b, v)] for v in kept]).to(torch.float16).cpu())
            data["question"].append(embed(items[b]["question_ids"]).float().mean(dim=0).cpu())
            data["command"].append(batch["command"][b].cpu())
            data["targets"].append(batch["view_targets"][b].cpu())
            data["available"].append(batch["view_available"][b].cpu())
            data["keys"].append(meta["key"])
            data["frames"].append(meta.get("frame") or meta["key"])
        bar.update(len(batch["meta"]))
    bar.close()
    return RouterInputs(data), encoded


def cached_inputs(model, cfg: ExperimentConfig, datamodule: DriveDataModule, split: str) -> Tuple[RouterInputs, int]:
    info = datamodule.split_info(split)
    if info is None:
        raise ConfigError(f"data.{split}_shards is empty")
    path = resolve_path(cfg.views.pretrain.cache_dir) / f"{split}-{_cache_key(model, cfg, info.shards, split)}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        print(f"view router inputs: cache hit {path} ({len(data['keys'])} samples, no vision pass)")
        return RouterInputs(data), 0
    # Only the kept views are decoded and preprocessed: they are all the router reads.
    loader = datamodule.loader(datamodule.eval_stream(split, with_answer=False, kept_views_only=True),
                               cfg.data.eval_batch_size, "left")
    inputs, encoded = extract_router_inputs(model, loader, desc=f"view router inputs ({split})")
    torch_save(inputs.data, path)
    return inputs, encoded


def holdout_by_frame(inputs: RouterInputs, fraction: float, seed: int) -> Tuple[RouterInputs, RouterInputs]:
    """Held-out samples drawn by frame (never a frame's questions on both sides)."""
    frames = sorted(set(inputs.data["frames"]))
    random.Random(f"view-holdout:{seed}").shuffle(frames)
    test_frames = set(frames[: max(1, round(len(frames) * fraction))])
    test = [i for i, f in enumerate(inputs.data["frames"]) if f in test_frames]
    train = [i for i, f in enumerate(inputs.data["frames"]) if f not in test_frames]
    if not train:
        raise ConfigError(f"view router pretraining: holding out {fraction} of {len(frames)} frames leaves none to train on")
    return inputs.subset(train), inputs.subset(test)


class ViewRouterPretrainModule(pl.LightningModule):
    """The view router on cached inputs, trained with the focal loss of fine-tuning."""

    def __init__(self, views, cfg: ExperimentConfig) -> None:
        super().__init__()
        self.views = views
        self.cfg = cfg
        self.metric = ViewRoutingAccuracy(views.classes)
        self.final: Dict[str, object] = {}

    def _decision(self, batch) -> ViewDecision:
        visual, mask, question, command, targets, available = batch
        logits = self.views.router(visual, mask, question, command)
        return ViewDecision(self.views.classes, logits, available.bool(), logits.new_zeros((logits.shape[0], 0)).long(),
                            "router", None, targets.bool())

    def training_step(self, batch, batch_idx):
        d = self._decision(batch)
        v = self.cfg.views
        alpha = self.views.class_alpha if v.class_weights == "inverse_frequency" else None
        loss = view_router_loss(d.logits, d.targets, d.available, alpha, v.focal_gamma)
        self.log("view_router/train_loss", loss, prog_bar=True, batch_size=d.logits.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        self.metric.update(self._decision(batch))

    def on_validation_epoch_end(self) -> None:
        result = self.metric.compute()
        self.metric.reset()
        for key, name in (("accuracy", "acc"), ("macro_f1", "macro_f1")):
            if result[key] is not None:
                self.log(f"view_router/{name}", result[key], prog_bar=name == "acc")
        self.final = result

    def configure_optimizers(self):
        p = self.cfg.views.pretrain
        return torch.optim.AdamW(self.views.router.parameters(), lr=p.lr, weight_decay=p.weight_decay)


def confusion_markdown(result: Dict[str, object]) -> str:
    classes = result["classes"]
    lines = ["### View router (rows: needed view class, columns: router top-1)", "",
             "| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    lines += [f"| {classes[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(result["confusion"])]
    return "\n".join(lines) + "\n"


def run_view_pretrain(cfg: ExperimentConfig) -> Tuple[Path, Dict[str, object]]:
    if not cfg.views.enabled:
        raise ConfigError("view router pretraining needs views.enabled=true")
    run_dir = start_run(cfg, "pretrain_view_router")
    cfg = dataclasses.replace(cfg, views=dataclasses.replace(cfg.views, router_checkpoint=None))  # trained here
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the router's initial weights are drawn in the build
    model = model_from_config(cfg, load_routers=False)
    datamodule = DriveDataModule(cfg.data, model.adapter, model.processor, model.taxonomy, cfg.views)
    train, encoded = cached_inputs(model, cfg, datamodule, "train")
    p = cfg.views.pretrain
    if cfg.data.val_shards and p.holdout_fraction <= 0:
        test, more = cached_inputs(model, cfg, datamodule, "val")
        encoded += more
    else:
        train, test = holdout_by_frame(train, p.holdout_fraction or 0.1, cfg.seed)
    targets = torch.stack(train.data["targets"]) if len(train) else torch.zeros(0, len(model.views.classes))
    if not bool(targets.any()):
        raise ConfigError("view router pretraining: no training sample carries view labels (sample field view_labels)")
    counts = targets.long().sum(dim=0)
    model.views.set_class_weights(counts.tolist())
    views = model.views.float()
    views.router.requires_grad_(True)
    views.train()  # the cache pass left it in eval mode; the router's dropout trains
    module = ViewRouterPretrainModule(views, cfg)
    train_loader = DataLoader(train, batch_size=p.batch_size, shuffle=True, collate_fn=collate_inputs,
                              generator=torch.Generator().manual_seed(cfg.seed))
    test_loader = DataLoader(test, batch_size=256, collate_fn=collate_inputs)

    trainer = cached_features_trainer(run_dir, p.epochs)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    trainer.fit(module, train_loader, test_loader)
    views.eval()
    trainer.validate(module, test_loader, verbose=False)  # the held-out numbers of the router as saved
    result = module.final
    torch_save({"router": views.router.state_dict(), "classes": views.classes, "class_alpha": views.class_alpha},
               run_dir / "view_router.pt")
    atomic_write_json(run_dir / "confusion.json", {"classes": result["classes"], "matrix": result["confusion"],
                                                   "per_class": result["per_class"]})
    atomic_write_text(run_dir / "confusion.md", confusion_markdown(result))
    from mose_lightning.evaluation.plots import plot_view_confusion

    plot_view_confusion(result["confusion"], result["classes"], run_dir / "confusion.png")
    metrics = {"view_router/acc": result["accuracy"], "view_router/macro_f1": result["macro_f1"],
               "train_samples": len(train), "test_samples": len(test), "test_labelled": result["labelled"],
               "images_encoded": encoded,
               "train_label_counts": dict(zip(views.classes, counts.tolist()))}
    finish_run(run_dir, metrics)
    return run_dir, metrics
