"""Stage: supervised fine-tuning of the trainable part (MoSE SFT, and the dense / top-k baselines), and the
expert-group scaling stage that continues from a MoSE SFT model. Read top to bottom: build, fit, save."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Tuple

import lightning.pytorch as pl

from mose_lightning.checkpoint import check_compatible, load_model, model_dir_of, model_from_config, save_model
from mose_lightning.config import ConfigError, ExperimentConfig
from mose_lightning.data.datamodule import DriveDataModule
from mose_lightning.model import MoEVisionLanguageModel
from mose_lightning.stages.callbacks import RoutingVisualisation
from mose_lightning.stages.common import FineTuneModule, backbone_tensors
from mose_lightning.surgery import convert_to_expert_groups, set_trainable
from mose_lightning.training import (
    finish_run, make_trainer, record_final_metrics, resume_path, scalar_metrics, start_run,
)

FINAL_KEYS = ("train/loss", "val/loss", "val/answer_token_acc", "train/aux_loss", "train/aux/router_skill")


def fine_tune(cfg: ExperimentConfig, model: MoEVisionLanguageModel, stage: str) -> Tuple[Path, Dict[str, float]]:
    run_dir = start_run(cfg, stage)
    datamodule = DriveDataModule(cfg.data, model.adapter, model.processor, model.taxonomy, cfg.views)
    if model.views is not None:
        set_view_class_weights(model, datamodule)
    module = FineTuneModule(model, cfg)
    trainer = make_trainer(cfg, run_dir, model, callbacks=[RoutingVisualisation()], validate=bool(cfg.data.val_shards))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(run_dir))
    metrics = {k: v for k, v in scalar_metrics(trainer).items()
               if k in FINAL_KEYS or k.startswith(("val/router_acc", "val/view_router", "train/view_router"))}
    metrics["steps"] = trainer.global_step
    metrics = record_final_metrics(run_dir, metrics)  # before the save: a kill during it must not lose them
    # Collective under FSDP (gathers the full state on rank 0); a plain state dict otherwise.
    full = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        state = backbone_tensors(full)
        save_model(model, run_dir / "model", full_state=state if len(state) else None)
    trainer.strategy.barrier()
    return run_dir, finish_run(run_dir, metrics)


def run_sft(cfg: ExperimentConfig) -> Tuple[Path, Dict[str, float]]:
    """MoSE SFT (pretrained routers from moe.router_checkpoint), or a baseline by moe.kind."""
    if cfg.moe.kind == "expert_group":
        raise ConfigError("moe.kind=expert_group starts from a MoSE SFT model: run `mose expert-group` instead")
    if cfg.moe.kind == "mose" and not cfg.moe.router_checkpoint and not cfg.moe.teacher_forcing:
        print("note: moe.router_checkpoint is not set: MoSE routers start untrained (run `mose pretrain-router` first)")
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)  # before the build: untrained routers
    if cfg.views.enabled and cfg.init_from:
        return fine_tune(cfg, continue_view_model(cfg), "sft")
    return fine_tune(cfg, model_from_config(cfg), "sft")


def continue_view_model(cfg: ExperimentConfig) -> MoEVisionLanguageModel:
    """A trained view-routed model (init_from) to fine-tune further under `cfg`, e.g. DriveMoE's stage 2
    (views.train_mode=gumbel) after stage 1 (teacher_forcing): same architecture, the new training settings."""
    source = model_dir_of(cfg.init_from)
    model = load_model(source)
    check_compatible(model.cfg, cfg, str(source))
    model.cfg = cfg
    set_trainable(model.backbone, model.layout, cfg.moe)
    model.views.requires_grad_(cfg.views.router_trainable)
    return model


def set_view_class_weights(model: MoEVisionLanguageModel, datamodule: DriveDataModule) -> Dict[str, int]:
    """The focal loss's alpha from the training set's view-label counts (views.class_weights=inverse_frequency)."""
    from mose_lightning.data.view_encode import count_view_targets

    info = datamodule.split_info("train")
    if info is None:
        raise ConfigError("data.train_shards is empty; expected the training shards")
    counts = count_view_targets(info.shards, model.cfg.views)
    model.views.set_class_weights([counts[name] for name in model.views.classes])
    print("view labels (training set): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def run_expert_group(cfg: ExperimentConfig) -> Tuple[Path, Dict[str, float]]:
    """Scale a trained MoSE model: each skill expert becomes an image/text pair; routers are reused as trained."""
    if cfg.moe.kind != "expert_group":
        raise ConfigError(f"mose expert-group expects moe.kind=expert_group, got {cfg.moe.kind!r}")
    if not cfg.init_from:
        raise ConfigError("init_from: expected the MoSE SFT run (or its model/ directory) to start from")
    source = model_dir_of(cfg.init_from)
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
    model = load_model(source)
    if model.cfg.moe.kind != "mose":
        raise ConfigError(f"init_from={cfg.init_from}: expected a MoSE model, got moe.kind={model.cfg.moe.kind!r}")
    mose_view = copy.deepcopy(cfg)
    mose_view.moe.kind = "mose"
    check_compatible(model.cfg, mose_view, str(source))
    convert_to_expert_groups(model.backbone, model.adapter, model.layout)
    model.cfg = cfg
    set_trainable(model.backbone, model.layout, cfg.moe)
    return fine_tune(cfg, model, "expert_group")
