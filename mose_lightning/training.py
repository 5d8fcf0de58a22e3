"""Trainer construction shared by the stages: strategy, precision, run directory, atomic checkpoints, resume.

A run directory holds config.yaml (resolved), tb/ (TensorBoard), checkpoints/ (Lightning, for resume),
model/ (the saved model, see mose_lightning.checkpoint), metrics.json and, when samples were skipped,
skipped.jsonl. Started again with the same command after a kill, a run resumes from checkpoints/last.ckpt;
checkpoints are written to a temporary file and renamed, so a kill during a save leaves the previous good
checkpoint in place. One run at a time per run directory: a run holds the directory's lock (mose_lightning.locks)
from `start_run` to `finish_run`, and removes the temporaries a killed run left there once it has the lock.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.precision import FSDPPrecision, HalfPrecision
from lightning.pytorch.strategies import FSDPStrategy

from mose_lightning import locks
from mose_lightning.config import ExperimentConfig, run_dir_for, save_config  # noqa: F401 (run_dir_for: stages)
from mose_lightning.data import skips
from mose_lightning.io import atomic_write_json, torch_save
from mose_lightning.locks import lock_run_dir
from mose_lightning.moe.routing import SequenceSkillRouter
from mose_lightning.moe.view_routing import ViewRouter

# The final metrics of a fit, recorded before the model is saved: a run killed during the save (whose rerun resumes
# at its last step and trains nothing) still finishes with them.
FINAL_METRICS = "final_metrics.json"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, then an atomic rename."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A run killed in the middle of a save leaves its temporary file behind; the next save clears it.
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        torch_save(checkpoint, path)


def is_global_zero() -> bool:
    return locks.launcher_rank() == 0 and (
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
        wrap = model.adapter.fsdp_wrap_classes(model.backbone)
        return _FSDPStrategy(
            auto_wrap_policy=wrap,
            activation_checkpointing_policy=wrap if cfg.trainer.activation_checkpointing else None,
            mixed_precision=_fsdp_mixed_precision(cfg.trainer.precision),
            # A decoder layer mixes frozen and trainable parameters: FSDP needs the original parameters kept.
            use_orig_params=True,
            state_dict_type="full",
        )
    return name


def _fsdp_mixed_precision(precision: str):
    """Lightning's FSDP mixed-precision policy for `precision`, with the skill routers exempt.

    Routers are kept in float32 (see SequenceSkillRouter): under this policy torch's FSDP wraps each router as its
    own unit, outside its decoder layer's flat parameter (which holds one dtype), and never casts it to the
    compute dtype; its gradients are reduced in float32 too. Without it, bf16-mixed would compute the routers from
    bf16 copies of their weights, and the routers would have to take their layer's dtype."""
    policy = FSDPPrecision("32-true" if precision == "32" else precision).mixed_precision_config
    ignored = tuple(policy._module_classes_to_ignore) + (SequenceSkillRouter, ViewRouter)
    return dataclasses.replace(policy, _module_classes_to_ignore=ignored)


class _FSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy, also in CPU processes (gloo), for tests and debugging of the FSDP path without a
    GPU. torch's FSDP runs on a CPU given `device_id=torch.device("cpu")`, but Lightning passes the root device's
    index, None on a CPU, which torch refuses without an accelerator; on a CPU the model is wrapped here instead,
    with the same arguments, and Lightning finds it wrapped (it then only adds activation checkpointing). The
    "fsdp" strategy flag itself is refused by Lightning on a CPU accelerator, an instance of this class is not."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self.root_device.type == "cpu" and not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=self.root_device, **self.kwargs,
            )
            # Applied already: Lightning would warn that a wrapped model ignores it.
            self.kwargs.pop("auto_wrap_policy", None)
        return super()._setup_model(model)

    def lightning_module_state_dict(self) -> Dict[str, Any]:
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        # Lightning gathers with offload_to_cpu, whose "move" of the gathered parameters to the CPU is a no-op on a
        # CPU, after which torch frees them as if copied: the state dict would read freed memory (a crash).
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
            return self.model.state_dict()


class _Float32Routers:
    """For a precision plugin that casts the whole model ("bf16-true"): the skill routers go back to float32 right
    after (before DDP or FSDP wraps the model and the optimiser sees them), as the model keeps them (see
    SequenceSkillRouter)."""

    def __init__(self, precision: str, routers: List[torch.nn.Module]) -> None:
        super().__init__(precision)
        self._routers = routers

    def convert_module(self, module: torch.nn.Module) -> torch.nn.Module:
        module = super().convert_module(module)
        for router in self._routers:
            router.to(torch.float32)
        return module


class _BF16TrueFloat32Routers(_Float32Routers, HalfPrecision):
    pass


class _FSDPBF16TrueFloat32Routers(_Float32Routers, FSDPPrecision):
    pass


def precision_and_plugins(cfg: ExperimentConfig, model) -> tuple:
    """(the Trainer's precision argument, extra plugins)."""
    t = cfg.trainer
    if t.precision == "bf16-true" and model is not None:
        plugin = _FSDPBF16TrueFloat32Routers if t.strategy == "fsdp" else _BF16TrueFloat32Routers
        routers = [block.router for block in model.layout.sequence_routed]
        if getattr(model, "views", None) is not None:  # the view router computes in float32 too
            routers.append(model.views)
        return None, [plugin("bf16-true", routers)]
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
    all_callbacks = [checkpoint, LearningRateMonitor(logging_interval="step"), progress,
                     skips.SkippedSamples(run_dir)] + list(callbacks or [])
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


def cached_features_trainer(run_dir: Path, epochs: int) -> pl.Trainer:
    """The Trainer of a router-pretraining stage: epochs over cached features in one CPU process (the backbone ran
    once per sample before), the held-out split validated five times along the way, TensorBoard in run_dir/tb."""
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, enable_checkpointing=False,
                      logger=TensorBoardLogger(str(run_dir), name="tb", version=""), enable_model_summary=False,
                      num_sanity_val_steps=0, log_every_n_steps=1, check_val_every_n_epoch=max(1, epochs // 5))


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
    lock_run_dir(run_dir, stage)
    if is_global_zero():
        save_config(cfg, run_dir)
    return run_dir


def _with_recorded(run_dir: Path, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """`metrics` completed with what the run recorded at the same step: a rerun of a finished run (or of one killed
    after training) resumes at its last step and trains nothing, so its trainer has no training metrics."""
    if "steps" not in metrics:
        return metrics
    for path in (run_dir / "checkpoints" / FINAL_METRICS, run_dir / "metrics.json"):
        if path.is_file():
            try:
                previous = json.loads(path.read_text())
            except ValueError:
                continue
            if isinstance(previous, dict) and previous.get("steps") == metrics["steps"]:
                metrics = {**previous, **metrics}
    return metrics


def record_final_metrics(run_dir: Path, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Keep a fit's final metrics beside its checkpoints before the model is saved; returns them completed as
    `_with_recorded` does."""
    metrics = _with_recorded(run_dir, metrics)
    if is_global_zero():
        atomic_write_json(run_dir / "checkpoints" / FINAL_METRICS, metrics)
    return metrics


def finish_run(run_dir: Path, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Write the run's final metrics (completed with the ones recorded at the same step, see `_with_recorded`),
    list the samples its readers skipped (skipped.jsonl, a summary printed), release the run directory; returns
    the metrics."""
    metrics = _with_recorded(run_dir, metrics)
    if is_global_zero():
        skipped = skips.merge_parts(run_dir)
        if len(skipped):
            metrics["skipped"] = skipped.counts()
            print(f"note: {skipped.summary(run_dir / skips.SKIPPED_FILE)}")
        atomic_write_json(run_dir / "metrics.json", metrics)
    locks.release(run_dir)
    return metrics


def scalar_metrics(trainer: pl.Trainer) -> Dict[str, float]:
    out = {}
    for name, value in trainer.callback_metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[name] = float(value)
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out
