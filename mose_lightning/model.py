"""The model every stage trains and evaluates: a backbone after MoE surgery, and what routing needs per forward.

`build_model(cfg)` assembles it: backbone adapter -> backbone (weights from its source) -> (optional) backbone
weights overlaid from a dense model directory -> surgery for `moe.kind` -> freezing -> (optional) pretrained
routers. Reading those files is `mose_lightning.checkpoint`'s job (`model_from_config`, `load_model`); this module
only builds.

Every forward returns a `MoEOutput`: the language-model loss and logits, the auxiliary losses computed at the top
from what the MoE blocks recorded (as transformers' Qwen2-MoE computes its aux loss from recorded router logits),
and the routing itself: the skill route of every sequence-routed layer and the expert usage of every MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from mose_lightning.backbones import get_adapter
from mose_lightning.config import ConfigError, ExperimentConfig
from mose_lightning.moe import RouteDecision, RoutingRecord, skill_routing_loss
from mose_lightning.moe.routing import ReferencePassComplete
from mose_lightning.moe.view_routing import ViewMoE
from mose_lightning.skills import SkillTaxonomy, load_taxonomy
from mose_lightning.surgery import MoELayout, apply_moe, load_router_state, set_trainable
from mose_lightning.views import ViewPromptBuilder, ViewRouting, graph_anchor, view_inputs, view_loss

# What picks the shown views, by views.train_mode (training) and views.eval_mode (generation).
TRAIN_VIEW_SOURCE = {"teacher_forcing": "labels", "gumbel": "gumbel", "router": "router"}
EVAL_VIEW_SOURCE = {"routed": "router", "all": "all", "kept": "kept", "labels": "labels"}


@dataclass
class MoEOutput:
    """What one forward of the model produced."""

    loss: Optional[torch.Tensor]  # autoregressive loss on the answer tokens (None without labels)
    logits: torch.Tensor
    # The weighted sum of the auxiliary losses below (None when there is none); training adds it to `loss`.
    aux_loss: Optional[torch.Tensor]
    # Unweighted auxiliary losses by name: "load_balancing" and "z_loss" (summed over top-k layers),
    # "router_skill" (mean skill cross-entropy of the skill routers, when moe.router_skill_loss > 0).
    aux_losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    routes: List[RouteDecision] = field(default_factory=list)  # one per sequence-routed layer, in layer order
    # Rows each expert received, per MoE layer in layer order (None for dense layers).
    expert_counts: List[Optional[torch.Tensor]] = field(default_factory=list)
    # With forward(output_hidden_states=True): the embeddings and every decoder layer's output (the last after the
    # final norm), as transformers returns them; heads that read the language model (the planner) take them here.
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    # Camera-view routing (views.enabled): what the view router chose and which views the prompt showed.
    views: Optional[ViewRouting] = None

    @property
    def training_loss(self) -> torch.Tensor:
        """What fine-tuning minimises: the answer loss plus the weighted auxiliary losses."""
        return self.loss if self.aux_loss is None else self.loss + self.aux_loss


@dataclass
class GenerationOutput:
    """New tokens of a single-round generation and the routing decided on its prompt."""

    tokens: torch.Tensor  # (B, new tokens)
    routes: List[RouteDecision]
    expert_counts: List[Optional[torch.Tensor]]
    views: Optional[ViewRouting] = None


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
        # Camera-view routing (views.enabled): the view router and view embeddings, and the prompt assembly.
        self.views: Optional[ViewMoE] = None
        self.view_prompts: Optional[ViewPromptBuilder] = None

    @property
    def moe_blocks(self) -> List[nn.Module]:
        return self.layout.blocks

    @property
    def level_names(self) -> List[str]:
        return self.taxonomy.level_names if self.taxonomy is not None else []

    def _begin(self, batch: Mapping, prompt_mask: Optional[torch.Tensor], route_source: str,
               prompt_length: Optional[int] = None, shuffle: Optional[torch.Tensor] = None) -> RoutingRecord:
        return self.layout.context.begin(prompt_mask, batch.get("skill_labels"), prompt_length, route_source, shuffle)

    def _routing(self, record: RoutingRecord):
        routes = [record.routes[b.layer_index] for b in self.layout.sequence_routed if b.layer_index in record.routes]
        counts = [record.expert_counts(i) for i in self.layout.layer_indices] if self.layout.kind != "dense" else []
        return routes, counts

    def _reference_pass(self, inputs: Mapping) -> Mapping:
        """With moe.router_input=frozen_backbone: run the backbone with the dense FFNs the MoE blocks replaced (no
        gradient, no cache) up to the input of the last sequence-routed layer, recording T_mean entering every
        sequence-routed layer for the routers. Returns the inputs for the pass that follows: with the images
        encoded once for both passes, where the vision tower is frozen."""
        ctx = self.layout.context
        if not ctx.routers_read_reference:
            return inputs
        vision_trains = any(p.requires_grad for layer in self.adapter.vision_layers(self.backbone)
                            for p in layer.parameters())
        with torch.no_grad():
            if not vision_trains:
                inputs = self.adapter.encode_images(self.backbone, dict(inputs))
            ctx.reference_pass = True
            try:
                self.adapter.inner_model(self.backbone)(**inputs, use_cache=False)
            except ReferencePassComplete:
                pass
            finally:
                ctx.reference_pass = False
        return inputs

    def _view_batch(self, batch: Mapping, source: str, with_answer: bool, padding_side: str):
        """With views.enabled: the assembled backbone batch and its ViewRouting (see mose_lightning/views.py)."""
        if self.views is None:
            return batch, None
        if "view_items" not in batch:
            raise ValueError("views.enabled: the batch has no view_items; build it with the DataModule of this config")
        extra = self.cfg.views.extra_view_prob if (self.training and source == "labels") else 0.0
        return view_inputs(self, batch, source, with_answer, padding_side, extra)

    def forward(self, batch: Mapping, with_loss: bool = True, route_source: str = "router",
                shuffle: Optional[torch.Tensor] = None, recentre_routers: bool = False,
                output_hidden_states: bool = False, view_source: str = "router") -> MoEOutput:
        """Teacher-forced forward on prompt + answer. `route_source`: what picks the skill experts (router | labels |
        shuffled; training with moe.teacher_forcing passes "labels"). `recentre_routers`: a fine-tuning step, where
        the routers' input shift follows the batch (moe.router_recentre_momentum). `output_hidden_states`: also
        return the language model's hidden states. `view_source` (views.enabled): what picks the shown views
        (router | labels | gumbel | all | kept; training passes TRAIN_VIEW_SOURCE)."""
        moe = self.cfg.moe
        batch, views = self._view_batch(batch, view_source, with_answer=True, padding_side="right")
        inputs = self.adapter.model_inputs(batch)
        if views is not None:
            inputs.update({k: batch[k] for k in ("mm_encoder_outputs", "image_grid_thw")})
        labels = batch.get("labels") if with_loss else None
        record = self._begin(batch, batch.get("prompt_mask"), route_source, shuffle=shuffle)
        inputs = self._reference_pass(inputs)
        self.layout.context.recentre_momentum = moe.router_recentre_momentum if recentre_routers else 0.0
        out = self.backbone(**inputs, labels=labels, use_cache=False, output_hidden_states=output_hidden_states)
        routes, counts = self._routing(record)
        aux_losses: Dict[str, torch.Tensor] = {}
        if record.aux:
            aux_losses["load_balancing"] = torch.stack([a["load_balancing"] for a in record.aux.values()]).sum()
            aux_losses["z_loss"] = torch.stack([a["z_loss"] for a in record.aux.values()]).sum()
        weighted = []
        if "load_balancing" in aux_losses:
            weighted += [moe.aux_loss_coef * aux_losses["load_balancing"], moe.z_loss_coef * aux_losses["z_loss"]]
        if moe.router_skill_loss > 0 and routes and batch.get("skill_labels") is not None and torch.is_grad_enabled():
            aux_losses["router_skill"] = skill_routing_loss(routes, batch["skill_labels"], self.level_names)
            weighted.append(moe.router_skill_loss * aux_losses["router_skill"])
        if views is not None:
            router_loss = view_loss(self, views)
            if router_loss is not None:
                aux_losses["view_router"] = router_loss
                if self.cfg.views.loss_coef > 0:
                    weighted.append(self.cfg.views.loss_coef * router_loss)
            anchor = graph_anchor(self.views) if torch.is_grad_enabled() else None
            if anchor is not None:
                weighted.append(anchor)
        aux_loss = torch.stack(weighted).sum() if weighted else None
        return MoEOutput(getattr(out, "loss", None), out.logits, aux_loss, aux_losses, routes, counts,
                         hidden_states=out.hidden_states if output_hidden_states else None, views=views)

    @torch.no_grad()
    def generate(self, batch: Mapping, max_new_tokens: int, reroute_every_step: bool = False,
                 route_source: str = "router", shuffle: Optional[torch.Tensor] = None,
                 view_source: Optional[str] = None, **generate_kwargs) -> GenerationOutput:
        """Greedy single-round generation from a left-padded prompt batch; returns only the new tokens, with the
        routes decided on the prompt.

        MoSE routing is decided once on the prompt and reused for every generated token. With
        `reroute_every_step` the KV cache is off and every step re-runs the whole sequence through the routers
        (prompt tokens only, as in training): the reference the cached path is tested against.
        The routers decide, also for a model trained with `moe.teacher_forcing`: the batch's skill labels are
        ground truth that inference must not see. `route_source="labels"` routes by them (oracle routing),
        "shuffled" takes sample `shuffle[i]`'s route for sample i (a control).
        With views.enabled, `view_source` (default: views.eval_mode's) picks the shown views; "router" encodes only
        the kept views and the router's top-k.
        """
        view_source = EVAL_VIEW_SOURCE[self.cfg.views.eval_mode] if view_source is None else view_source
        batch, views = self._view_batch(batch, view_source, with_answer=False, padding_side="left")
        inputs = self.adapter.model_inputs(batch)
        if views is not None:
            inputs.update({k: batch[k] for k in ("mm_encoder_outputs", "image_grid_thw")})
        prompt_length = inputs["input_ids"].shape[1]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        # Without a processor (random weights of an architecture) the backbone's generation config decides.
        special = {} if tokenizer is None else {"pad_token_id": tokenizer.pad_token_id,
                                                "eos_token_id": tokenizer.eos_token_id}
        record = self._begin(batch, None, route_source, prompt_length, shuffle)
        inputs = self._reference_pass(inputs)
        sequences = self.backbone.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=not reroute_every_step,
            **special,
            **generate_kwargs,
        )
        routes, counts = self._routing(record)
        return GenerationOutput(sequences[:, prompt_length:], routes, counts, views)


def build_model(cfg: ExperimentConfig, meta: bool = False, backbone_state: Optional[Mapping] = None,
                router_state: Optional[Mapping] = None, router_source: str = "routers",
                random_weights_on: Optional[torch.device] = None) -> MoEVisionLanguageModel:
    """Backbone + surgery + freezing for `cfg`. `meta=True`: shapes only, no weights. `random_weights_on`: the
    architecture with randomly initialised weights on that device and no processor (benchmarks of a real size
    without its weights). `backbone_state`: backbone parameters (by name) to overlay before surgery (an
    instruction-tuned dense model); `router_state`: pretrained skill routers (`routers.pt`), loaded after surgery."""
    adapter = get_adapter(cfg.backbone)
    taxonomy = load_taxonomy(cfg.skills.taxonomy)
    if meta or random_weights_on is not None:
        backbone, processor = adapter.build_meta(cfg.backbone), None
        if random_weights_on is not None:
            with torch.device(random_weights_on):
                backbone = type(backbone)._from_config(backbone.config, dtype=backbone.dtype,
                                                       attn_implementation=cfg.backbone.attn_implementation)
    else:
        backbone, processor = adapter.load(cfg.backbone)
    if backbone_state is not None:
        load_state_into(backbone, backbone_state, "backbone.init_checkpoint")
    layout = apply_moe(backbone, adapter, cfg.moe, taxonomy)
    set_trainable(backbone, layout, cfg.moe)
    if router_state is not None:
        load_router_state(layout, router_state, router_source)
    model = MoEVisionLanguageModel(backbone, processor, adapter, layout, cfg, taxonomy)
    if cfg.views.enabled:
        attach_views(model, meta)
    return model


def attach_views(model: MoEVisionLanguageModel, meta: bool = False) -> None:
    """The view router and view embeddings (views.enabled), float32, trainable by views.router_trainable; and the
    prompt assembly (not on the meta device: it needs the tokenizer)."""
    v = model.cfg.views
    hidden = int(model.adapter.text_config(model.backbone).hidden_size)
    try:
        views = ViewMoE(v.names, v.kept, v.classes, hidden, v.router_heads, v.router_hidden, v.router_dropout,
                        len(v.commands))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if meta:
        views = views.to("meta")
    views.requires_grad_(v.router_trainable)
    model.views = views
    if not meta:
        model.view_prompts = ViewPromptBuilder(model.adapter, model.processor, v)


def load_state_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `state` (parameter or buffer name -> tensor) into `module`, each name and shape checked first."""
    own = dict(module.named_parameters())
    own.update(module.named_buffers())
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ConfigError(f"{source}: checkpoint has tensors this model lacks: {unknown[:5]}")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ConfigError(
                f"{source}: {name} has shape {tuple(tensor.shape)} in the checkpoint, {tuple(own[name].shape)} in the model"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor.to(own[name].dtype))
