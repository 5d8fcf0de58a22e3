"""Stage: a planner head on a vision-language model (`mose plan`), and its open-loop evaluation (`mose plan-eval`).

Read top to bottom: the VLM (a trained model from `init_from`, else built from the config, e.g. the toy MoSE model
with pretrained routers), checks that the config fits it, training-set statistics (which also validate every
training sample's planning fields), the planner head, then Lightning's fit with the usual run directory (resume
from checkpoints/last.ckpt, DDP, TensorBoard), the saved head in `planner/`, and the evaluation of `eval.split` in
`eval/` (scores.json, results.md, report.html, bird's-eye sketches, expert usage per scenario class, latency).

The VLM is frozen (`plan.train_vlm=false`: only the head trains; with `plan.cache_features` its hidden states are
computed once per sample and cached) or trains jointly (what the MoE surgery left trainable, the MoSE blocks,
with the planner loss and optionally the answer-token loss). Routing of the VLM is always its routers' own.
The evaluation runs on global rank zero after training; every other rank stops after the fit. The feature cache
lives in plan_features.py, the evaluation in plan_eval.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
import torch
from safetensors.torch import load_file, save_file

from mose_lightning.checkpoint import load_model, model_dir_of, model_from_config, save_model, saved_tensor_names
from mose_lightning.config import ConfigError, ExperimentConfig, load_config, run_dir_for
from mose_lightning.data.planning import PlanningDataModule, PlanStatistics, PlanTargetSpec, check_split, plan_statistics
from mose_lightning.io import atomic_save, atomic_write_json
from mose_lightning.moe.losses import inverse_frequency_alpha
from mose_lightning.planning.flow_matching import FlowMatching
from mose_lightning.planning.planner import PlannerHead, PlannerSpec
from mose_lightning.planning.vlm import VLMFeatures, vlm_features
from mose_lightning.stages.common import build_optimizer, finite_or_skip
from mose_lightning.stages.plan_eval import evaluate_planner, headline, noise_for
from mose_lightning.stages.plan_features import CachedPlanData, cached_features
from mose_lightning.training import apply_threads, finish_run, make_trainer, resume_path, scalar_metrics, start_run

PLANNER_DIR = "planner"
PLANNER_WEIGHTS = "planner.safetensors"
PLANNER_META = "planner.json"


# ---- the VLM and the checks ------------------------------------------------------------------------------------
def build_vlm(cfg: ExperimentConfig):
    """The VLM the planner reads: the trained model of `init_from`, else the one the config builds."""
    model = load_model(cfg.init_from) if cfg.init_from else model_from_config(cfg)
    if not cfg.plan.train_vlm:
        for param in model.parameters():
            param.requires_grad_(False)
    return model


def context_size(model) -> int:
    return int(model.adapter.text_config(model.backbone).hidden_size)


def check_plan_setup(cfg: ExperimentConfig, model, classes: Sequence[str]) -> None:
    p = cfg.plan
    if cfg.trainer.strategy == "fsdp":
        raise ConfigError("trainer.strategy=fsdp: the plan stage runs with ddp (every rank holds the VLM and the "
                          "small planner head); use trainer.strategy=ddp")
    layers = int(model.adapter.text_config(model.backbone).num_hidden_layers)
    if not -(layers + 1) <= p.vlm_layer <= layers:
        raise ConfigError(f"plan.vlm_layer: expected an index into the {layers + 1} hidden states (-{layers + 1} .. "
                          f"{layers}), got {p.vlm_layer}")
    if p.routing == "mose_chain":
        levels = [b.level_name for b in model.layout.sequence_routed]
        if p.chain_level not in levels:
            raise ConfigError(f"plan.routing=mose_chain: the VLM has no MoSE layer of level {p.chain_level!r} "
                              f"(moe.kind={model.cfg.moe.kind}, levels {sorted(set(levels))}); use a MoSE model")
        if p.num_experts != model.cfg.moe.num_experts:
            raise ConfigError(f"plan.num_experts={p.num_experts}: plan.routing=mose_chain gives planner expert i the "
                              f"samples of skill expert i, so it must equal moe.num_experts ({model.cfg.moe.num_experts})")
    if p.routing in ("token", "trajectory") and p.router_loss_coef > 0 and p.num_experts != len(classes):
        raise ConfigError(f"plan.num_experts={p.num_experts}: the focal loss supervises one class per expert and "
                          f"plan.scenario_labels={p.scenario_labels} has {len(classes)} classes {list(classes)}; set "
                          f"plan.num_experts={len(classes)}, or plan.router_loss_coef=0 for an unsupervised router")
    if p.train_vlm and not any(param.requires_grad for param in model.parameters()):
        raise ConfigError("plan.train_vlm=true, but the VLM has no trainable parameter (moe.kind / moe.extra_trainable)")


def flow_of(cfg: ExperimentConfig) -> FlowMatching:
    p = cfg.plan
    return FlowMatching(p.sigma_min, p.time_beta[0], p.time_beta[1], p.time_max, p.euler_steps)


def build_planner(cfg: ExperimentConfig, model, stats: PlanStatistics) -> PlannerHead:
    planner = PlannerHead(PlannerSpec.from_config(cfg.plan, context_size(model)))
    alpha = None
    if planner.router is not None and any(stats.class_counts):
        alpha = inverse_frequency_alpha(stats.class_counts)
    planner.set_statistics(stats.action_low, stats.action_high, stats.state_mean, stats.state_std, alpha)
    return planner


# ---- the LightningModule -------------------------------------------------------------------------------------
class PlanModule(pl.LightningModule):
    """Flow-matching loss (+ focal router loss, + load balancing, + answer-token loss when the VLM trains)."""

    # Checkpoints hold the planner and the VLM's trained tensors only (the frozen VLM is rebuilt on resume).
    strict_loading = False

    def __init__(self, planner: PlannerHead, vlm, cfg: ExperimentConfig, classes: Sequence[str]) -> None:
        super().__init__()
        self.planner = planner
        self.cfg = cfg
        self.flow = flow_of(cfg)
        self.classes = list(classes)
        if cfg.plan.train_vlm:
            self.model = vlm
        else:
            # Not a submodule: DDP, the optimiser and the checkpoints never see the frozen VLM.
            self.__dict__["_frozen_vlm"] = vlm
        self._shown: List[Dict[str, Any]] = []
        self._tick: Optional[float] = None

    @property
    def vlm(self):
        return self.model if self.cfg.plan.train_vlm else self.__dict__["_frozen_vlm"]

    def on_fit_start(self) -> None:
        if not self.cfg.plan.train_vlm:
            self.vlm.to(self.device)

    # ---- features and losses ------------------------------------------------------------------------------
    def features(self, batch: Dict[str, Any], with_lm_loss: bool = False) -> VLMFeatures:
        if "vlm_hidden" in batch:
            chain = batch.get("chain_expert")
            if self.cfg.plan.routing == "mose_chain" and chain is not None and bool((chain < 0).any()):
                raise ConfigError("plan.routing=mose_chain: the cached features have no MoSE planning-level route")
            return VLMFeatures(batch["vlm_hidden"].to(self.planner.context_proj.weight.dtype), batch["vlm_mask"], chain)
        p = self.cfg.plan
        if p.train_vlm:
            return vlm_features(self.vlm, batch, p.vlm_layer, p.chain_level, with_lm_loss=with_lm_loss)
        self.vlm.eval()
        with torch.no_grad():
            return vlm_features(self.vlm, batch, p.vlm_layer, p.chain_level)

    def _losses(self, batch: Dict[str, Any], feats: Optional[VLMFeatures] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        p = self.cfg.plan
        with_lm = p.train_vlm and p.lm_loss_coef > 0 and "labels" in batch and feats is None
        feats = feats if feats is not None else self.features(batch, with_lm_loss=with_lm)
        losses = self.planner.losses(feats.hidden, feats.mask, batch["plan_state"], batch["plan_trajectory"],
                                     batch["plan_valid"], self.flow,
                                     scenario=batch["plan_scenario"] if p.router_loss_coef > 0 else None,
                                     chain_expert=feats.chain_expert, focal_gamma=p.focal_gamma)
        total = losses["flow"] + p.router_loss_coef * losses["router"] + p.aux_loss_coef * losses["balance"]
        if with_lm and feats.lm_loss is not None:
            losses["lm"] = feats.lm_loss
            total = total + p.lm_loss_coef * feats.lm_loss
        return total, losses

    def _check_finite(self, loss: torch.Tensor, batch: Dict[str, Any]) -> torch.Tensor:
        return finite_or_skip(self, loss, batch, self.parameters(), "planner loss")

    def training_step(self, batch: Dict[str, Any], batch_idx: int):
        raw, losses = self._losses(batch)
        loss = self._check_finite(raw, batch)
        size = len(batch["meta"])
        self.log("train/skipped_nonfinite", float(loss is not raw), on_step=True, reduce_fx="sum", batch_size=1)
        self.log("train/loss", raw.detach(), prog_bar=True, batch_size=size)
        for name, value in losses.items():
            self.log(f"train/{name}_loss", value.detach(), batch_size=size)
        self.log("train/with_trajectory", batch["plan_valid"].float().mean(), batch_size=size)
        for reason, count in (batch.get("skipped") or {}).items():
            self.log(f"train/skipped_{reason.replace(' ', '_')}", float(count), reduce_fx="sum", batch_size=1)
        now = time.perf_counter()
        if self._tick is not None:
            self.log("perf/samples_per_s", size / max(now - self._tick, 1e-9), batch_size=1)
        self._tick = now
        return loss

    def validation_step(self, batch: Dict[str, Any], batch_idx: int):
        keep = torch.tensor([not m.get("pad", False) for m in batch["meta"]], device=batch["plan_valid"].device)
        valid = batch["plan_valid"].bool() & keep
        n = int(valid.sum())
        feats = self.features(batch)
        with torch.random.fork_rng(devices=[]):  # validation must not shift the training run's random stream
            torch.manual_seed(self.cfg.plan.eval_seed + batch_idx)
            _, losses = self._losses(batch, feats)
        keys = [m["key"] for m in batch["meta"]]
        sampled = self.planner.sample(feats.hidden, feats.mask, batch["plan_state"], self.flow, feats.chain_expert,
                                      noise_for(keys, self.cfg.plan.horizon, self.cfg.plan.eval_seed, self.device))
        pred, route = sampled.trajectory, sampled.route
        errors = (pred - batch["plan_trajectory"]).norm(dim=-1)  # (B, H)
        size = max(1, n)
        weight = valid.float()
        self.log("val/flow_loss", losses["flow"], sync_dist=True, batch_size=size, prog_bar=True)
        self.log("val/ade", (errors.mean(1) * weight).sum() / size, sync_dist=True, batch_size=size)
        self.log("val/fde", (errors[:, -1] * weight).sum() / size, sync_dist=True, batch_size=size)
        labels = batch["plan_scenario"]
        labelled = valid & (labels >= 0)
        if route is not None and route.logits is not None and bool(labelled.any()):
            # Not synced: whether a batch carries labels is data-dependent, and a collective only some ranks enter
            # would hang.
            top1 = route.trajectory_experts()[:, 0]
            self.log("val/router_acc", (top1 == labels)[labelled].float().mean(), batch_size=int(labelled.sum()))
        if batch_idx == 0 and self.trainer.is_global_zero:
            self._shown = []
            for i, meta in enumerate(batch["meta"][:4]):
                if valid[i]:
                    planning = meta.get("planning") or {}
                    self._shown.append({"key": meta["key"], "reference": batch["plan_trajectory"][i].tolist(),
                                        "prediction": pred[i].tolist(), "history": planning.get("history"),
                                        "obstacles": planning.get("obstacles"), "scenario": planning.get("scenario")})

    def on_validation_epoch_end(self) -> None:
        writer = getattr(self.logger, "experiment", None) if self.logger is not None else None
        if writer is None or not self.trainer.is_global_zero:
            return
        from mose_lightning.evaluation.planning_plots import bev_figure

        for record in self._shown:
            title = f"{record['key']} ({record.get('scenario')})"
            writer.add_figure(f"plan/bev/{record['key']}", bev_figure(record, title), self.global_step)
        self._shown = []

    # ---- optimisation and checkpoints -----------------------------------------------------------------------
    def configure_optimizers(self):
        params = [param for param in self.parameters() if param.requires_grad]
        return build_optimizer(params, self.cfg, self.cfg.trainer.max_steps)

    def _kept_keys(self, state: Dict[str, Any]) -> set:
        keep = {k for k in state if k.startswith("planner.")}
        if self.cfg.plan.train_vlm:
            keep |= {f"model.backbone.{name}" for name in saved_tensor_names(self.vlm)}
        return keep

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in self._kept_keys(state)}

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        expected = {f"planner.{k}" for k in self.planner.state_dict()}
        missing = expected - set(checkpoint["state_dict"])
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} planner tensors, e.g. {sorted(missing)[:3]}")


# ---- saving and loading the head -----------------------------------------------------------------------------
def save_planner(planner: PlannerHead, directory: Path, cfg: ExperimentConfig, classes: Sequence[str],
                 stats: PlanStatistics, vlm_dir: Optional[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in planner.state_dict().items()}
    atomic_save(directory / PLANNER_WEIGHTS, lambda tmp: save_file(state, tmp))
    atomic_write_json(directory / PLANNER_META, {
        "format": 1, "spec": planner.spec.to_dict(), "classes": list(classes), "scenario_labels": cfg.plan.scenario_labels,
        "statistics": stats.to_dict(), "vlm": vlm_dir, "parameters": count_parameters(planner)})
    return directory


def load_planner(directory: Path) -> Tuple[PlannerHead, Dict[str, Any]]:
    meta_path, weights = directory / PLANNER_META, directory / PLANNER_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise ConfigError(f"{directory}: not a saved planner (expected {PLANNER_META} and {PLANNER_WEIGHTS})")
    meta = json.loads(meta_path.read_text())
    planner = PlannerHead(PlannerSpec.from_dict(meta["spec"]))
    planner.load_state_dict(load_file(str(weights)))
    return planner, meta


def count_parameters(planner: PlannerHead) -> Dict[str, int]:
    """Total parameters of the head and those one token runs through (shared + top-k of the skill experts)."""
    total = sum(p.numel() for p in planner.parameters())
    idle = 0
    spec = planner.spec
    active = 1 if spec.routing == "mose_chain" else spec.top_k
    for layer in planner.layers:
        if layer.is_moe:
            per_expert = layer.ffn.experts.gate_up_proj[0].numel() + layer.ffn.experts.down_proj[0].numel()
            idle += (spec.num_experts - active) * per_expert
    return {"total": total, "activated": total - idle}


# ---- the stage ---------------------------------------------------------------------------------------------------
def _datasets(cfg: ExperimentConfig, model, datamodule: PlanningDataModule):
    """(LightningDataModule for the fit, cached test items or None)."""
    if not cfg.plan.cache_features:
        return datamodule, None
    train = cached_features(cfg, model, datamodule, "train")
    val = cached_features(cfg, model, datamodule, "val") if cfg.data.val_shards else None
    test = cached_features(cfg, model, datamodule, cfg.eval.split) if getattr(cfg.data, f"{cfg.eval.split}_shards") else None
    return CachedPlanData(train, val, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.trainer.seed), test


def run_plan(cfg: ExperimentConfig, model=None) -> Tuple[Path, Dict[str, Any]]:
    """Train the planner head (and, with plan.train_vlm, the VLM's MoE blocks), save it, evaluate eval.split."""
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    model = model if model is not None else build_vlm(cfg)
    spec = PlanTargetSpec.from_config(cfg, model.taxonomy)
    check_plan_setup(cfg, model, spec.classes)
    run_dir = start_run(cfg, "plan")
    stats = plan_statistics(cfg.data.train_shards, spec, cfg.plan.percentiles, cfg.plan.normalization)
    for split in ("val", "test"):
        if getattr(cfg.data, f"{split}_shards"):
            check_split(getattr(cfg.data, f"{split}_shards"), spec, split)
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)  # the head's initialisation
    planner = build_planner(cfg, model, stats)
    datamodule = PlanningDataModule(cfg, model.adapter, model.processor, model.taxonomy)
    fit_data, test_items = _datasets(cfg, model, datamodule)
    module = PlanModule(planner, model, cfg, spec.classes)
    trainer = make_trainer(cfg, run_dir, model, validate=bool(cfg.data.val_shards))
    trainer.fit(module, datamodule=fit_data, ckpt_path=resume_path(run_dir))
    keys = ("train/loss", "train/flow_loss", "train/router_loss", "val/flow_loss", "val/ade", "val/fde", "val/router_acc")
    metrics: Dict[str, Any] = {k: v for k, v in scalar_metrics(trainer).items() if k in keys}
    metrics["steps"] = trainer.global_step
    vlm_dir = None
    if cfg.plan.train_vlm:
        full = trainer.strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            prefix = "model.backbone."
            save_model(model, run_dir / "model", full_state={k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)})
        vlm_dir = "model"
    elif cfg.init_from:
        vlm_dir = str(model_dir_of(cfg.init_from))
    if trainer.is_global_zero:
        save_planner(planner, run_dir / PLANNER_DIR, cfg, spec.classes, stats, vlm_dir)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return run_dir, metrics
    meta = json.loads((run_dir / PLANNER_DIR / PLANNER_META).read_text())
    scores = evaluate_planner(module, datamodule, cfg, run_dir / "eval", meta, test_items)
    metrics.update(headline(scores))
    return run_dir, finish_run(run_dir, metrics)


def run_plan_eval(cfg: ExperimentConfig) -> Tuple[Path, Dict[str, Any]]:
    """Evaluate a trained planner run (`checkpoint=RUN_DIR`) on eval.split of this config's data."""
    if not cfg.init_from:
        raise ConfigError("checkpoint: expected a `mose plan` run directory to evaluate")
    source = Path(cfg.init_from)
    planner, meta = load_planner(source / PLANNER_DIR)
    trained = load_config(source / "config.yaml")
    apply_threads(cfg)
    if trained.plan.train_vlm:
        model = load_model(source / "model")
    else:
        model = build_vlm(trained)
    for param in model.parameters():
        param.requires_grad_(False)
    # The trained run's planner settings, with this command's evaluation settings (sampling seed, Euler steps,
    # latency samples, rare-class threshold); the VLM is only read.
    cfg = dataclasses.replace(cfg, plan=dataclasses.replace(
        trained.plan, train_vlm=False, lm_loss_coef=0.0, cache_features=False, eval_seed=cfg.plan.eval_seed,
        euler_steps=cfg.plan.euler_steps, latency_samples=cfg.plan.latency_samples, rare_below=cfg.plan.rare_below))
    run_dir = run_dir_for(cfg, "plan_eval")
    datamodule = PlanningDataModule(cfg, model.adapter, model.processor, model.taxonomy)
    module = PlanModule(planner, model, cfg, meta["classes"])
    scores = evaluate_planner(module, datamodule, cfg, run_dir, meta)
    metrics = headline(scores)
    atomic_write_json(run_dir / "headline.json", metrics)
    return run_dir, metrics
