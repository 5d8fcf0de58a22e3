"""What the fine-tuning LightningModules share: optimiser and schedule, the step with its safety checks, and the
logging of routing that TensorBoard shows (router accuracy per level, expert usage per layer, skill chains)."""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional

import lightning.pytorch as pl
import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from mose_lightning.checkpoint import saved_tensor_names
from mose_lightning.config import ExperimentConfig
from mose_lightning.model import EVAL_VIEW_SOURCE, TRAIN_VIEW_SOURCE
from mose_lightning.evaluation.routing_metrics import RoutingAccuracy
from mose_lightning.evaluation.view_metrics import ViewRoutingAccuracy, batch_accuracy


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


def build_optimizer(params, cfg: ExperimentConfig, total_steps: int):
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    warmup = int(round(o.warmup_ratio * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o.scheduler, warmup, total_steps, o.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class NonFiniteLoss(RuntimeError):
    pass


# Where the backbone's tensors sit in a FineTuneModule's state dict (module.model.backbone).
BACKBONE_PREFIX = "model.backbone."
VIEWS_PREFIX = "model.views."


def backbone_tensors(lightning_state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The backbone's entries of a FineTuneModule state dict, by backbone tensor name."""
    n = len(BACKBONE_PREFIX)
    return {k[n:]: v for k, v in lightning_state.items() if k.startswith(BACKBONE_PREFIX)}


def finite_or_skip(module: pl.LightningModule, loss: torch.Tensor, batch: Dict[str, Any], params, what: str):
    """The training step's loss, or for a non-finite one per trainer.nonfinite: stop naming the step and the batch's
    sample keys, or skip the batch with a zero loss that still touches every trainable parameter (which keeps DDP's
    gradient buckets in step)."""
    if torch.isfinite(loss):
        return loss
    keys = [m["key"] for m in batch["meta"]]
    message = f"non-finite {what} {loss.item()} at step {module.global_step}, batch keys {keys}"
    if module.cfg.trainer.nonfinite == "stop":
        raise NonFiniteLoss(message + " (trainer.nonfinite=skip skips such batches instead)")
    module.print(f"skipping batch: {message}")
    return sum(p.sum() * 0.0 for p in params if p.requires_grad)


class FineTuneModule(pl.LightningModule):
    """Autoregressive loss on answer tokens (+ MoE aux losses); trains what the surgery left trainable.

    Each step returns what the routing callback shows: the loss, and the output's routes and expert counts."""

    def __init__(self, model, cfg: ExperimentConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.level_names = model.level_names
        self._tick: Optional[float] = None
        blocks = model.layout.sequence_routed
        self.val_routing = RoutingAccuracy([b.layer_index for b in blocks], [b.level_name for b in blocks],
                                           self.level_names) if blocks else None
        self.val_view_routing = ViewRoutingAccuracy(model.views.classes) if model.views is not None else None

    # ---- optimisation -----------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("nothing to train: every parameter is frozen (check moe.kind / moe.extra_trainable)")
        routers = {id(p) for b in self.model.layout.sequence_routed for p in b.router.parameters() if p.requires_grad}
        if routers and self.cfg.moe.router_lr > 0:
            params = [{"params": [p for p in params if id(p) not in routers]},
                      {"params": [p for p in params if id(p) in routers], "lr": self.cfg.moe.router_lr}]
        return build_optimizer(params, self.cfg, self.cfg.trainer.max_steps)

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
        keep = {BACKBONE_PREFIX + name for name in saved_tensor_names(self.model)}
        if self.model.views is not None:  # the view router and view embeddings live beside the backbone
            keep |= {VIEWS_PREFIX + name for name in self.model.views.state_dict()}
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
    def _check_finite(self, loss: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor:
        return finite_or_skip(self, loss, batch, self.model.parameters(), "loss")

    def training_step(self, batch: Dict[str, Any], batch_idx: int):
        out = self.model(batch, route_source="labels" if self.cfg.moe.teacher_forcing else "router",
                         recentre_routers=True, view_source=TRAIN_VIEW_SOURCE[self.cfg.views.train_mode])
        raw = out.training_loss
        loss = self._check_finite(raw, batch)
        size = len(batch["meta"])
        # Logged every step (0 or 1): a metric logged only on some steps is re-sent with its stale value on the
        # following steps, which would show skipped batches where there were none.
        self.log("train/skipped_nonfinite", float(loss is not raw), on_step=True, reduce_fx="sum", batch_size=1)
        self.log("train/loss", out.loss.detach(), prog_bar=True, batch_size=size)
        if out.aux_loss is not None:
            self.log("train/aux_loss", out.aux_loss.detach(), batch_size=size)
            for name, value in out.aux_losses.items():
                self.log(f"train/aux/{name}", value.detach(), batch_size=size)
        self._log_throughput(batch, out)
        self._log_skipped(batch, "train")
        self._log_batch_routing(out.routes, batch)
        if out.views is not None:
            acc = batch_accuracy(out.views.decision)
            if acc is not None:  # not synced: whether a batch carries view labels is data-dependent
                self.log("train/view_router_acc", acc, batch_size=size)
            self.log("train/image_tokens_per_sample", out.views.image_tokens.float().mean(), batch_size=size)
        return {"loss": loss, "expert_counts": out.expert_counts}

    def validation_step(self, batch: Dict[str, Any], batch_idx: int):
        keep = torch.tensor([not m.get("pad", False) for m in batch["meta"]], device=self.device)
        # Validation shows what inference would (views.eval_mode), so val/loss measures the deployed routing.
        out = self.model(batch, view_source=EVAL_VIEW_SOURCE[self.cfg.views.eval_mode])
        labels = batch["labels"] if out.views is None else out.views.labels
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
        if self.val_routing is not None and batch.get("skill_labels") is not None:
            self.val_routing.update(out.routes, batch["skill_labels"], keep)
        if self.val_view_routing is not None:
            self.val_view_routing.update(out.views.decision, keep)
        return {"routes": out.routes, "expert_counts": out.expert_counts}

    def on_validation_epoch_end(self) -> None:
        if self.val_view_routing is not None:
            self._log_view_routing()
        if self.val_routing is None:
            return
        # Summed over ranks by the metric (every rank takes part, labelled batches or not).
        result = self.val_routing.compute()
        self.val_routing.reset()
        for level, acc in result["levels"].items():
            if acc is not None:
                self.log(f"val/router_acc/{level}", acc, rank_zero_only=True)
        for layer, acc in result["layers"].items():
            if acc is not None:
                self.log(f"val/router_acc_layer/{layer}", acc, rank_zero_only=True)

    # ---- logging ----------------------------------------------------------------------------------------
    def _log_view_routing(self) -> None:
        """View-router accuracy and macro-F1 (summed over ranks), and its confusion matrix as a TensorBoard image."""
        result = self.val_view_routing.compute()
        self.val_view_routing.reset()
        for key in ("accuracy", "macro_f1"):
            if result[key] is not None:
                self.log(f"val/view_router_{'acc' if key == 'accuracy' else key}", result[key], rank_zero_only=True)
        writer = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if writer is not None and self.trainer.is_global_zero and result["labelled"]:
            from mose_lightning.evaluation.plots import view_confusion_figure

            writer.add_figure("views/confusion", view_confusion_figure(result["confusion"], result["classes"]),
                              self.global_step)

    def _log_throughput(self, batch: Dict[str, Any], out=None) -> None:
        now = time.perf_counter()
        if self._tick is not None:
            dt = max(now - self._tick, 1e-9)
            mask = batch["attention_mask"] if out is None or out.views is None else out.views.attention_mask
            self.log("perf/samples_per_s", len(batch["meta"]) / dt, batch_size=1)
            self.log("perf/tokens_per_s", float(mask.sum()) / dt, batch_size=1)
        self._tick = now

    def _log_skipped(self, batch: Dict[str, Any], stage: str) -> None:
        for reason, count in (batch.get("skipped") or {}).items():
            self.log(f"{stage}/skipped_{reason.replace(' ', '_')}", float(count), reduce_fx="sum", batch_size=1)

    def _log_batch_routing(self, routes, batch: Dict[str, Any]) -> None:
        """Training batches' routing accuracy per level and per layer (the routes the step took)."""
        labels = batch.get("skill_labels")
        if not routes or labels is None:
            return
        labels = labels.to(self.device)
        per_level: Dict[str, list] = {}
        for route in routes:
            target = labels[:, self.level_names.index(route.level)]
            mask = target >= 0
            if not bool(mask.any()):
                continue
            correct = (route.expert == target)[mask].float().mean()
            # Not synced across ranks: whether a batch carries labels is data-dependent, and a collective that
            # only some ranks enter would hang.
            self.log(f"train/router_acc_layer/{route.layer}", correct, batch_size=int(mask.sum()))
            per_level.setdefault(route.level, []).append(correct)
        for level, values in per_level.items():
            self.log(f"train/router_acc/{level}", torch.stack(values).mean(), batch_size=int(labels.shape[0]))
