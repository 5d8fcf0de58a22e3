"""Trainer construction shared by the stages: strategy, precision, run directory, atomic checkpoints, resume.

A run directory holds config.yaml (resolved), tb/ (TensorBoard), checkpoints/ (Lightning, for resume),
model/ (the saved model, see mose_lightning.checkpoint) and metrics.json. Started again with the same command
after a kill, a run resumes from checkpoints/last.ckpt; checkpoints are written to a temporary file and renamed,
so a kill during a save leaves the previous good checkpoint in place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import HalfPrecision

from mose_lightning.config import ExperimentConfig, save_config
from mose_lightning.io import atomic_write_json


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, then an atomic rename."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A run killed in the middle of a save leaves its temporary file behind; the next save clears it.
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(checkpoint, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def run_dir_for(cfg: ExperimentConfig, stage: str) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name / stage


def is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 and (
        not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    )


def _strategy(cfg: ExperimentConfig, model):
    name = cfg.trainer.strategy
    if name in ("ddp", "ddp_spawn"):
        from lightning.pytorch.strategies import DDPStrategy

        # Stacked experts are one parameter each, so every trainable parameter takes part in every step and
        # the unused-parameter search can stay off.
        return DDPStrategy(start_method="spawn" if name == "ddp_spawn" else "popen", find_unused_parameters=False)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        wrap = model.adapter.fsdp_wrap_classes(model.backbone)
        # FSDP flattens a wrapped decoder layer into one dtype: the float32 skill routers join their layer's dtype.
        # Under bf16-mixed, Lightning's FSDP policy also computes them from bf16 copies (param_dtype=bf16); DDP and
        # single-device runs keep them in float32 (README, Multi-GPU).
        for block in model.layout.sequence_routed:
            block.router.to(block.experts.gate_up_proj.dtype)
        return FSDPStrategy(
            auto_wrap_policy=wrap,
            activation_checkpointing_policy=wrap if cfg.trainer.activation_checkpointing else None,
            # A decoder layer mixes frozen and trainable parameters: FSDP needs the original parameters kept.
            use_orig_params=True,
            state_dict_type="full",
        )
    return name


class _BF16TrueFloat32Routers(HalfPrecision):
    """Lightning's "bf16-true" casts the whole model; the skill routers go back to float32 right after (before DDP
    wraps the model and the optimiser sees them), as the model keeps them (see SequenceSkillRouter)."""

    def __init__(self, routers: List[torch.nn.Module]) -> None:
        super().__init__("bf16-true")
        self._routers = routers

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        module = super().convert_module(module)
        for router in self._routers:
            router.to(torch.float32)
        return module


def precision_and_plugins(cfg: ExperimentConfig, model) -> tuple:
    """(the Trainer's precision argument, extra plugins). FSDP flattens routers into their layer (see _strategy)."""
    t = cfg.trainer
    if t.precision == "bf16-true" and t.strategy != "fsdp" and model is not None:
        return None, [_BF16TrueFloat32Routers([block.router for block in model.layout.sequence_routed])]
    return t.precision, []


def devices_arg(value: str):
    value = str(value)
    if value == "auto" or value.startswith("[") or "," in value:
        return value
    return int(value)


def make_trainer(cfg: ExperimentConfig, run_dir: Path, model=None, callbacks: Optional[List] = None,
                 max_steps: Optional[int] = None, validate: bool = True) -> pl.Trainer:
    t = cfg.trainer
    if t.activation_checkpointing and t.strategy != "fsdp" and model is not None:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_last=True,
        save_top_k=0,
    )
    # A plain tqdm bar: readable in a terminal and in a log file alike (the rich bar shows nothing in a pipe).
    progress = TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps))
    all_callbacks = [checkpoint, LearningRateMonitor(logging_interval="step"), progress] + list(callbacks or [])
    precision, precision_plugins = precision_and_plugins(cfg, model)
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=devices_arg(t.devices),
        num_nodes=t.num_nodes,
        strategy=_strategy(cfg, model) if model is not None else t.strategy,
        precision=precision,
        max_steps=max_steps or t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_every_n_steps if validate else None,
        check_val_every_n_epoch=None,
        limit_val_batches=(t.limit_val_batches or 1.0) if validate else 0,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(str(run_dir), name="tb", version=""),
        callbacks=all_callbacks,
        plugins=[AtomicCheckpointIO()] + precision_plugins,
        default_root_dir=str(run_dir),
        enable_model_summary=False,
    )


def resume_path(run_dir: Path) -> Optional[str]:
    last = run_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


def apply_threads(cfg: ExperimentConfig) -> None:
    if cfg.trainer.num_threads > 0:
        torch.set_num_threads(cfg.trainer.num_threads)


def start_run(cfg: ExperimentConfig, stage: str) -> Path:
    apply_threads(cfg)
    run_dir = run_dir_for(cfg, stage)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_global_zero():
        save_config(cfg, run_dir)
    return run_dir


def finish_run(run_dir: Path, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Write the run's final metrics and return them. Rerunning a finished run resumes at its last step and trains
    nothing, so its trainer has no training metrics: the values recorded at that same step are kept."""
    path = run_dir / "metrics.json"
    if "steps" in metrics and path.is_file():
        previous = json.loads(path.read_text())
        if previous.get("steps") == metrics["steps"]:
            metrics = {**previous, **metrics}
    if is_global_zero():
        atomic_write_json(path, metrics)
    return metrics


def scalar_metrics(trainer: pl.Trainer) -> Dict[str, float]:
    out = {}
    for name, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out
