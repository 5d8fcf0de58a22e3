"""What the fine-tuning LightningModules share: optimiser and schedule, the step with its safety checks, and the
logging of routing that TensorBoard shows (router accuracy per level, expert usage per layer, skill chains)."""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional

import lightning.pytorch as pl
import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from mose_lightning.checkpoint import saved_parameter_names
from mose_lightning.config import ExperimentConfig


def lr_lambda(scheduler: str, warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warm-up, then cosine / linear decay to `min_ratio`, or constant."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if scheduler == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(module: pl.LightningModule, params, cfg: ExperimentConfig, total_steps: int):
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    warmup = int(round(o.warmup_ratio * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.scheduler, warmup, total_steps, o.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class NonFiniteLoss(RuntimeError):
    pass


class FineTuneModule(pl.LightningModule):
    """Autoregressive loss on answer tokens (+ MoE aux losses); trains what the surgery left trainable."""

    def __init__(self, model, cfg: ExperimentConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.level_names = model.taxonomy.level_names if model.taxonomy else []
        self._usage: Optional[torch.Tensor] = None
        self._tick: Optional[float] = None
        self._val: Dict[str, float] = {}
        self.final_metrics: Dict[str, float] = {}

    # ---- optimisation -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("nothing to train: every parameter is frozen (check moe.kind / moe.extra_trainable)")
        return build_optimizer(self, params, self.cfg, self.cfg.trainer.max_steps)

    def on_train_epoch_start(self) -> None:
        # Lightning builds the training DataLoader once; the stream's shuffle must still change every epoch (and
        # follow the restored epoch on resume). Workers are re-created per epoch and pick the new value up.
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        root = self.trainer.strategy.model
        if gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm" and isinstance(root, FSDP):
            # Each rank holds a shard of the gradients: only the root FSDP module can compute the global norm
            # (Lightning's FSDP precision plugin refuses norm clipping for that reason).
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- checkpoints hold only what trains -----------------------------------------------------------------
    def _trained_keys(self, checkpoint: Dict[str, Any]) -> set:
        """The state-dict keys a checkpoint keeps; a KeyError if the checkpoint lacks any (a run resumed without
        them would go on from untrained weights without a word)."""
        keep = {f"model.backbone.{name}" for name in saved_parameter_names(self.model)}
        missing = keep - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint state lacks {len(missing)} trained tensors of this model, e.g. {sorted(missing)[:3]}")
        return keep

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # The frozen backbone is rebuilt from its source on resume; storing it would multiply checkpoint size.
        if not checkpoint["state_dict"] and not self.trainer.is_global_zero:
            return  # FSDP gathers the full state on rank 0 only; the other ranks write no checkpoint
        keep = self._trained_keys(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    # Checkpoints leave the frozen tensors out, so Lightning's load cannot be strict (FSDP loads the module state
    # before any hook could fill them in); on_load_checkpoint checks instead that every trained tensor is there.
    strict_loading = False

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # FSDP has loaded (and removed) it already; on_save_checkpoint checked it
            self._trained_keys(checkpoint)

    # ---- steps ------------------------------------------------------------------------------------------
    def _loss(self, batch: Dict[str, Any]):
        out = self.model(batch)
        loss = out.loss
        if out.aux_loss is not None:
            loss = loss + out.aux_loss
        return out, loss

    def _check_finite(self, loss: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor:
        if torch.isfinite(loss):
            return loss
        keys = [m["key"] for m in batch["meta"]]
        message = f"non-finite loss {loss.item()} at step {self.global_step}, batch keys {keys}"
        if self.cfg.trainer.nonfinite == "stop":
            raise NonFiniteLoss(message + " (trainer.nonfinite=skip skips such batches instead)")
        self.print(f"skipping batch: {message}")
        # A zero loss that still touches every trainable parameter keeps DDP's gradient buckets in step.
        return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)

    def training_step(self, batch: Dict[str, Any], batch_idx: int):
        out, raw = self._loss(batch)
        loss = self._check_finite(raw, batch)
        size = len(batch["meta"])
        # Logged every step (0 or 1): a metric logged only on some steps is re-sent with its stale value on the
        # following steps, which would show skipped batches where there were none.
        self.log("train/skipped_nonfinite", float(loss is not raw), on_step=True, reduce_fx="sum", batch_size=1)
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=size)
        if out.aux_loss is not None:
            self.log("train/aux_loss", out.aux_loss.detach(), batch_size=size)
        self._log_throughput(batch)
        self._log_skipped(batch, "train")
        self._log_routing(batch, "train")
        return loss

    def validation_step(self, batch: Dict[str, Any], batch_idx: int):
        keep = torch.tensor([not m.get("pad", False) for m in batch["meta"]], device=batch["input_ids"].device)
        out = self.model(batch)
        labels = batch["labels"]
        logits = out.logits[:, :-1]
        target = labels[:, 1:]
        valid = (target != -100) & keep.view(-1, 1)
        token_loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1).clamp_min(0), reduction="none"
        ).view_as(target)
        n = valid.sum().clamp_min(1)
        loss = (token_loss * valid).sum() / n
        acc = ((logits.argmax(-1) == target) & valid).sum() / n
        self.log("val/loss", loss, sync_dist=True, batch_size=int(keep.sum().clamp_min(1)), prog_bar=True)
        self.log("val/answer_token_acc", acc, sync_dist=True, batch_size=int(keep.sum().clamp_min(1)))
        self._log_routing(batch, "val")

    # ---- logging ----------------------------------------------------------------------------------------
    def _log_throughput(self, batch: Dict[str, Any]) -> None:
        now = time.perf_counter()
        if self._tick is not None:
            dt = max(now - self._tick, 1e-9)
            self.log("perf/samples_per_s", len(batch["meta"]) / dt, batch_size=1)
            self.log("perf/tokens_per_s", float(batch["attention_mask"].sum()) / dt, batch_size=1)
        self._tick = now

    def _log_skipped(self, batch: Dict[str, Any], stage: str) -> None:
        for reason, count in (batch.get("skipped") or {}).items():
            self.log(f"{stage}/skipped_{reason.replace(' ', '_')}", float(count), reduce_fx="sum", batch_size=1)

    def _log_routing(self, batch: Dict[str, Any], stage: str) -> None:
        counts = [c for c in self.model.expert_counts() if c is not None]
        if counts and len({c.numel() for c in counts}) == 1:
            usage = torch.stack([c.float().cpu() for c in counts])
            self._usage = usage if self._usage is None else self._usage + usage
        chain = self.model.skill_chain()
        labels = batch.get("skill_labels")
        if not chain or labels is None:
            return
        labels = labels.to(self.device)
        for li, level in enumerate(self.level_names):
            routes = [torch.tensor(r.expert, device=self.device) for r in chain if r.level == level]
            mask = labels[:, li] >= 0
            if not routes or not bool(mask.any()):
                continue
            correct = torch.stack([(r == labels[:, li])[mask].float().mean() for r in routes]).mean()
            # Not synced across ranks: whether a batch carries labels is data-dependent, and a collective that
            # only some ranks enter would hang.
            self.log(f"{stage}/router_acc/{level}", correct, batch_size=int(mask.sum()))

    def take_usage(self) -> Optional[torch.Tensor]:
        usage, self._usage = self._usage, None
        return usage
