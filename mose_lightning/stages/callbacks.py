"""TensorBoard views of what the routers and experts do: expert usage per layer, skill chains of validation
samples, and the expert weight-similarity matrix of the last MoE layer (the paper's Figure 7)."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from mose_lightning.evaluation.routing_metrics import skill_chains
from mose_lightning.evaluation.plots import (
    expert_usage_figure, experts_similarity, last_layer_experts, weight_similarity_figure,
)


class RoutingVisualisation(pl.Callback):
    """Accumulates expert usage from the steps' outputs and shows it, the skill chains of the first validation
    batch and the last layer's expert similarity in TensorBoard at every validation and at the end of training."""

    def __init__(self, chains_to_show: int = 4) -> None:
        self.chains_to_show = chains_to_show
        self._chains = []
        self._usage: Optional[torch.Tensor] = None

    def _experiment(self, trainer):
        logger = trainer.logger
        return getattr(logger, "experiment", None) if logger is not None else None

    def _add_usage(self, outputs) -> None:
        counts = [c for c in (outputs or {}).get("expert_counts") or [] if c is not None]
        if counts and len({c.numel() for c in counts}) == 1:
            usage = torch.stack([c.float() for c in counts])  # summed on the device: no sync per step
            self._usage = usage if self._usage is None else self._usage + usage

    def _emit(self, trainer: pl.Trainer, module) -> None:
        writer = self._experiment(trainer)
        similarity = _last_layer_similarity(trainer, module)  # a collective under FSDP: every rank takes part
        usage, self._usage = self._usage, None
        if writer is None or not trainer.is_global_zero:
            return
        usage = None if usage is None else usage.cpu()
        step = trainer.global_step
        if usage is not None:
            labels = [f"L{i}" for i in module.model.layout.layer_indices][: usage.shape[0]]
            fig = expert_usage_figure(usage.numpy(), labels)
            writer.add_figure("routing/expert_usage", fig, step)
        if similarity is not None:
            fig = weight_similarity_figure(similarity, [f"E{i}" for i in range(similarity.shape[0])])
            writer.add_figure("routing/expert_weight_similarity_last_layer", fig, step)
        if self._chains:
            rows = ["| key | task | question | skill chain (layer: skill p) |", "|---|---|---|---|"]
            for key, task, question, chain, thumb in self._chains:
                rows.append(f"| {key} | {task} | {question[:80]} | {chain} |")
                if thumb is not None:
                    writer.add_image(f"skill_chains/{key}", thumb, step, dataformats="HWC")
            writer.add_text("skill_chains/validation", "\n".join(rows), step)
            self._chains = []

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._add_usage(outputs)
        if batch_idx != 0 or not trainer.is_global_zero:
            return
        taxonomy = module.model.taxonomy
        chains = skill_chains((outputs or {}).get("routes") or [], taxonomy)
        for i, meta in enumerate(batch["meta"][: self.chains_to_show]):
            parts = [f"{step['layer']}: {step['skill']} {step['prob']:.2f}" for step in (chains[i] if chains else [])]
            thumb = meta.get("thumbnail")
            self._chains.append((meta["key"], meta["task"], meta["question"], ", ".join(parts) or "-", thumb))

    def on_validation_epoch_end(self, trainer, module) -> None:
        self._emit(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._add_usage(outputs)

    def on_train_end(self, trainer, module) -> None:
        self._emit(trainer, module)


def _last_layer_similarity(trainer: pl.Trainer, module) -> Optional[np.ndarray]:
    """The weight similarity of the last MoE layer's experts on global rank zero (None on the others, and where no
    block has experts). Under FSDP each rank holds a flat shard of them: the FSDP unit holding the layer is gathered
    for the read (a collective, so every rank must call this; only that one unit, to rank 0 only)."""
    last = last_layer_experts(module.model)
    if last is None:
        return None
    root = trainer.strategy.model
    if not isinstance(root, FSDP):
        return experts_similarity(last) if trainer.is_global_zero else None
    # The innermost unit whose module holds the experts (modules() lists outer units before inner ones).
    unit = [m for m in FSDP.fsdp_modules(root) if any(sub is last for sub in m.module.modules())][-1]
    with FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True):
        # Computed inside: the similarity copies the weights before the gathered parameters are freed.
        return experts_similarity(last) if trainer.is_global_zero else None
