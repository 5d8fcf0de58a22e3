"""The model every stage trains and evaluates: a backbone after MoE surgery, plus what routing needs per forward.

`build_model(cfg)` is the one way to get it: backbone adapter -> (optional) instruction-tuned backbone weights ->
surgery for `moe.kind` -> freezing -> (optional) pretrained routers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from mose_lightning.backbones import get_adapter
from mose_lightning.config import ConfigError, ExperimentConfig, resolve_path
from mose_lightning.skills import SkillTaxonomy, load_taxonomy
from mose_lightning.surgery import MoELayout, apply_moe, load_router_state, set_trainable


@dataclass
class LayerRoute:
    """One MoSE layer's decision for a batch, in a form that logs and prediction files can use."""

    layer: int
    level: str
    expert: List[int]
    prob: List[float]


class MoEVisionLanguageModel(nn.Module):
    def __init__(self, backbone: nn.Module, processor, adapter, layout: MoELayout, cfg: ExperimentConfig,
                 taxonomy: Optional[SkillTaxonomy]) -> None:
        super().__init__()
        self.backbone = backbone
        self.processor = processor
        self.adapter = adapter
        self.layout = layout
        self.cfg = cfg
        self.taxonomy = taxonomy

    @property
    def context(self):
        return self.layout.context

    @property
    def moe_blocks(self) -> List[nn.Module]:
        return self.layout.blocks

    @contextmanager
    def routing(self, prompt_mask: Optional[torch.Tensor] = None, skill_labels: Optional[torch.Tensor] = None,
                prompt_length: Optional[int] = None, teacher_forcing: Optional[bool] = None):
        """Set the routers' per-forward inputs; restore a clean context afterwards. `teacher_forcing`: route by
        `skill_labels` (None: as `moe.teacher_forcing` says)."""
        ctx = self.context
        ctx.reset()
        ctx.prompt_mask = prompt_mask.bool() if prompt_mask is not None else None
        ctx.explicit_prompt_mask = prompt_mask is not None
        ctx.prompt_length = prompt_length
        ctx.skill_labels = skill_labels
        ctx.teacher_forcing = bool(self.cfg.moe.teacher_forcing if teacher_forcing is None else teacher_forcing)
        try:
            yield ctx
        finally:
            ctx.explicit_prompt_mask = False
            ctx.prompt_length = None

    def forward(self, batch: Dict[str, torch.Tensor], with_loss: bool = True):
        """Teacher-forced forward on prompt + answer. Returns the backbone output with `.aux_loss` attached."""
        inputs = self.adapter.model_inputs(batch)
        labels = batch.get("labels") if with_loss else None
        with self.routing(batch.get("prompt_mask"), batch.get("skill_labels")) as ctx:
            out = self.backbone(**inputs, labels=labels, use_cache=False)
            aux = torch.stack(ctx.aux_losses).sum() if ctx.aux_losses else None
        out.aux_loss = aux
        return out

    def skill_chain(self) -> List[LayerRoute]:
        """The routes of the last forward (or generation prefill), one entry per MoSE layer."""
        chain = []
        for block in self.layout.sequence_routed:
            route = block.last_route
            if route is None:
                continue
            chain.append(LayerRoute(block.layer_index, block.level_name, route.expert.tolist(),
                                    route.prob.detach().float().tolist()))
        return chain

    def expert_counts(self) -> List[Optional[torch.Tensor]]:
        """Rows (samples for MoSE, tokens otherwise) each expert received in the last forward, per MoE layer."""
        return [getattr(b, "last_expert_counts", None) for b in self.layout.blocks]

    @torch.no_grad()
    def generate(self, batch: Dict[str, torch.Tensor], max_new_tokens: int, reroute_every_step: bool = False,
                 teacher_forcing: bool = False, **generate_kwargs) -> torch.Tensor:
        """Greedy single-round generation from a left-padded prompt batch; returns only the new tokens.

        MoSE routing is decided once on the prompt and reused for every generated token. With
        `reroute_every_step` the KV cache is off and every step re-runs the whole sequence through the routers
        (prompt tokens only, as in training): the reference the cached path is tested against.
        The routers decide, also for a model trained with `moe.teacher_forcing`: the batch's skill labels are
        ground truth that inference must not see. `teacher_forcing=True` routes by them (oracle routing).
        """
        inputs = self.adapter.model_inputs(batch)
        prompt_length = inputs["input_ids"].shape[1]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        with self.routing(None, batch.get("skill_labels"), prompt_length=prompt_length, teacher_forcing=teacher_forcing):
            sequences = self.backbone.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=not reroute_every_step,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **generate_kwargs,
            )
        return sequences[:, prompt_length:]


def build_model(cfg: ExperimentConfig, meta: bool = False, load_routers: bool = True) -> MoEVisionLanguageModel:
    """Backbone + surgery + freezing (+ pretrained routers) for `cfg`. `meta=True`: shapes only, no weights."""
    adapter = get_adapter(cfg.backbone)
    taxonomy = load_taxonomy(cfg.skills.taxonomy)
    if meta:
        backbone, processor = adapter.build_meta(cfg.backbone), None
    else:
        backbone, processor = adapter.load(cfg.backbone)
        if cfg.backbone.init_checkpoint:
            from mose_lightning.checkpoint import load_backbone_weights

            load_backbone_weights(backbone, cfg.backbone.init_checkpoint)
    layout = apply_moe(backbone, adapter, cfg.moe, taxonomy)
    set_trainable(backbone, layout, cfg.moe)
    if cfg.moe.router_checkpoint and load_routers and not meta and cfg.moe.kind in ("mose", "expert_group"):
        path = resolve_path(cfg.moe.router_checkpoint)
        if not path.is_file():
            raise ConfigError(f"moe.router_checkpoint: no file at {cfg.moe.router_checkpoint}")
        load_router_state(layout, torch.load(path, map_location="cpu", weights_only=True), str(path))
    return MoEVisionLanguageModel(backbone, processor, adapter, layout, cfg, taxonomy)
