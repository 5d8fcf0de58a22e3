"""Backbone surgery: put MoE blocks in place of chosen decoder-layer FFNs, wire their routing, freeze the rest.

The same `moe` config section yields the four model variants of the paper's Table 1:
  dense         the FFNs of the chosen layers stay dense and are the trainable part (the SFT baseline);
  topk          token-level top-k MoE blocks (MoE 4x1, 8x1 baselines);
  mose          MoSE blocks, consecutive MoE layers assigned to hierarchy levels by `level_allocation`;
  expert_group  MoSE blocks scaled to one image and one text expert per skill.

Routing inputs travel through a `RoutingContext` shared by the blocks of one model:
  * a forward pre-hook on the vision-language model under the LM head (every forward and decode step passes it)
    records the attention mask, the image-token positions and whether the forward is a cached decode step, and (when the caller did not set one) takes the prompt mask from the
    attention mask: a generation prefill is all prompt;
  * a forward pre-hook on each MoSE decoder layer hands the hidden states *entering the layer* (the previous
    layer's output, T_mean in the paper) to the block's router before attention runs.
Hooks are not state: `apply_moe` reinstalls them whenever a model is built or loaded.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from mose_lightning.config import ConfigError, MoEConfig
from mose_lightning.moe import ExpertGroupBlock, MoSEBlock, RoutingContext, TopKMoEBlock, is_sequence_routed
from mose_lightning.skills import SkillTaxonomy, level_of_layers, split_evenly


def select_layers(spec: str, num_layers: int) -> List[int]:
    """`even` | `odd` | `all` | comma-separated indices -> sorted decoder-layer indices."""
    spec = str(spec).strip()
    if spec == "even":
        return list(range(0, num_layers, 2))
    if spec == "odd":
        return list(range(1, num_layers, 2))
    if spec == "all":
        return list(range(num_layers))
    try:
        indices = sorted({int(part) for part in spec.replace(" ", "").split(",") if part})
    except ValueError:
        raise ConfigError(f"moe.layers: expected even|odd|all or comma-separated integers, got {spec!r}") from None
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad or not indices:
        raise ConfigError(f"moe.layers: layer indices {bad or spec} outside 0..{num_layers - 1}")
    return indices


@dataclass
class MoELayout:
    """Where the MoE blocks sit and which hierarchy level each one serves."""

    kind: str
    layer_indices: List[int]
    levels: List[str]  # level name per MoE layer (empty for dense / topk)
    allocation: List[int]
    context: RoutingContext = field(default_factory=RoutingContext, repr=False)
    blocks: List[nn.Module] = field(default_factory=list, repr=False)
    hooks: list = field(default_factory=list, repr=False)

    @property
    def sequence_routed(self) -> List[nn.Module]:
        return [b for b in self.blocks if is_sequence_routed(b)]


def level_layout(moe: MoEConfig, num_moe_layers: int, taxonomy: Optional[SkillTaxonomy]) -> tuple:
    if moe.kind not in ("mose", "expert_group") or taxonomy is None:
        return [], []
    allocation = list(moe.level_allocation) or split_evenly(num_moe_layers, len(taxonomy.levels))
    if sum(allocation) != num_moe_layers:
        raise ConfigError(
            f"moe.level_allocation {allocation} sums to {sum(allocation)} but moe.layers={moe.layers!r} selects "
            f"{num_moe_layers} decoder layers; expected the counts to add up to {num_moe_layers}"
        )
    return allocation, level_of_layers(allocation, taxonomy.level_names)


def _install_model_hook(model: nn.Module, layout: MoELayout, image_token_id: Optional[int]):
    ctx = layout.context

    def before_forward(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        cached = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        ctx.decoding = bool(cached) and cached > 0
        ctx.attention_mask = attention_mask if attention_mask is not None and input_ids is not None and attention_mask.shape == input_ids.shape else None
        if input_ids is not None and image_token_id is not None:
            ctx.image_mask = input_ids == image_token_id
        if not ctx.decoding and not ctx.explicit_prompt_mask:
            # A forward without an explicit prompt mask is a generation prefill (or a full re-run when routing is
            # recomputed every step): the prompt is the first `prompt_length` tokens, padding excluded.
            if attention_mask is not None and input_ids is not None:
                mask = attention_mask.bool().clone()
                if ctx.prompt_length is not None and mask.shape[1] > ctx.prompt_length:
                    mask[:, ctx.prompt_length:] = False
                ctx.prompt_mask = mask
            else:
                ctx.prompt_mask = None
        return None

    return model.register_forward_pre_hook(before_forward, with_kwargs=True)


def _install_layer_hook(layer: nn.Module, block: nn.Module):
    block.routed_by_layer_hook = True

    def before_layer(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        block.route(hidden)
        return None

    return layer.register_forward_pre_hook(before_layer, with_kwargs=True)


def apply_moe(
    model: nn.Module,
    adapter,
    moe: MoEConfig,
    taxonomy: Optional[SkillTaxonomy],
) -> MoELayout:
    """Replace the FFNs of the selected decoder layers with `moe.kind` blocks and install the routing hooks."""
    layers = adapter.decoder_layers(model)
    indices = select_layers(moe.layers, len(layers))
    if moe.kind in ("mose", "expert_group"):
        if taxonomy is None:
            raise ConfigError("moe.kind=mose needs a skill taxonomy (skills.taxonomy)")
        taxonomy.validate_for(moe.num_experts)
    allocation, levels = level_layout(moe, len(indices), taxonomy)
    layout = MoELayout(moe.kind, indices, levels, allocation)
    activation = adapter.mlp_activation(model)
    ctx = layout.context
    for position, layer_index in enumerate(indices):
        layer = layers[layer_index]
        dense = layer.mlp
        if moe.kind == "dense":
            layout.blocks.append(dense)
            continue
        if moe.kind == "topk":
            block = TopKMoEBlock.upcycle(
                dense, moe.num_experts, moe.top_k, activation, ctx, layer_index, moe.shared_expert, moe.combine,
                moe.shared_weight, moe.dispatch,
            )
        else:
            level_name = levels[position]
            block = MoSEBlock.upcycle(
                dense, moe.num_experts, activation, ctx, taxonomy.level_names.index(level_name), level_name,
                layer_index, moe.shared_expert, moe.combine, moe.shared_weight, moe.dispatch,
            )
            if moe.router_input == "frozen_backbone":
                block.reference_ffn = copy.deepcopy(dense).requires_grad_(False)
            if moe.kind == "expert_group":
                block = ExpertGroupBlock.from_mose(block)
            layout.hooks.append(_install_layer_hook(layer, block))
        layer.mlp = block
        layout.blocks.append(block)
    ctx.routers_read_reference = moe.kind in ("mose", "expert_group") and moe.router_input == "frozen_backbone"
    if moe.kind in ("mose", "expert_group") and moe.router_input == "first_moe_layer":
        # Every router reads T_mean entering the first MoSE layer: only MoE blocks train, so nothing before that
        # layer changes during fine-tuning, and the routers see the inputs they were pretrained on.
        ctx.router_input_layer = indices[0]
    ctx.reference_last_layer = max((b.layer_index for b in layout.sequence_routed), default=None)
    layout.hooks.append(_install_model_hook(adapter.inner_model(model), layout, adapter.image_token_id(model)))
    return layout


def convert_to_expert_groups(model: nn.Module, adapter, layout: MoELayout) -> MoELayout:
    """Turn the MoSE blocks of a (trained) model into expert-group blocks in place; routers are reused."""
    if layout.kind != "mose":
        raise ConfigError(f"expert groups are built from a MoSE model, got moe.kind={layout.kind!r}")
    layers = adapter.decoder_layers(model)
    for handle in layout.hooks:
        handle.remove()
    layout.hooks = []
    new_blocks = []
    for layer_index, block in zip(layout.layer_indices, layout.blocks):
        group = ExpertGroupBlock.from_mose(block)
        layers[layer_index].mlp = group
        layout.hooks.append(_install_layer_hook(layers[layer_index], group))
        new_blocks.append(group)
    layout.blocks = new_blocks
    layout.kind = "expert_group"
    layout.hooks.append(_install_model_hook(adapter.inner_model(model), layout, adapter.image_token_id(model)))
    return layout


def set_trainable(model: nn.Module, layout: MoELayout, moe: MoEConfig) -> Dict[str, int]:
    """Freeze everything but the MoE blocks (routers only if `router_trainable`) and `extra_trainable` patterns."""
    for param in model.parameters():
        param.requires_grad_(False)
    for block in layout.blocks:
        for name, param in block.named_parameters():
            if name.startswith("reference_ffn."):
                continue  # the frozen dense FFN of the reference pass
            is_skill_router = name.startswith("router.") and is_sequence_routed(block)
            param.requires_grad_(moe.router_trainable or not is_skill_router)
    if moe.extra_trainable:
        matched = 0
        for name, param in model.named_parameters():
            if any(fnmatch.fnmatch(name, pattern) for pattern in moe.extra_trainable):
                matched += 1
                # A pattern over the whole language model still leaves the reference FFNs frozen: the reference
                # pass runs without gradient, so the optimiser would only move them by weight decay.
                if ".reference_ffn." not in f".{name}":
                    param.requires_grad_(True)
        if matched == 0:
            raise ConfigError(f"moe.extra_trainable {list(moe.extra_trainable)} matched no parameter name")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def skill_routers(layout: MoELayout) -> Dict[int, nn.Module]:
    """Decoder-layer index -> the skill router of that MoSE layer (what router pretraining trains and saves)."""
    return {block.layer_index: block.router for block in layout.sequence_routed}


def router_state(layout: MoELayout) -> Dict[str, torch.Tensor]:
    """The skill routers' tensors as `routers.pt` stores them (keys `layer{idx}.<name>`)."""
    return {f"layer{idx}.{name}": value.detach().cpu() for idx, router in skill_routers(layout).items()
            for name, value in router.state_dict().items()}


# Router tensors that files written before routers kept their input standardisation lack; they default to the
# identity (the standardisation was folded into the classifier then).
_OPTIONAL_ROUTER_KEYS = ("input_shift", "input_scale")


def load_router_state(layout: MoELayout, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load `routers.pt` written by router pretraining (keys `layer{idx}.<name>`), checking it fits."""
    routers = skill_routers(layout)
    expected = {f"layer{idx}.{name}" for idx, r in routers.items() for name in r.state_dict()}
    optional = {key for key in expected if key.rsplit(".", 1)[-1] in _OPTIONAL_ROUTER_KEYS}
    missing, unexpected = expected - set(state) - optional, set(state) - expected
    if missing or unexpected:
        raise ConfigError(
            f"{source}: router checkpoint does not fit this model (moe.layers / num_experts / backbone differ?): "
            f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )
    for idx, router in routers.items():
        own = router.state_dict()
        sub = {name: state.get(f"layer{idx}.{name}", own[name]) for name in own}
        for name, value in sub.items():
            if value.shape != own[name].shape:
                raise ConfigError(
                    f"{source}: layer{idx}.{name} has shape {tuple(value.shape)}, expected {tuple(own[name].shape)}"
                )
        if f"layer{idx}.input_shift" not in state:
            sub["input_shift"], sub["input_scale"] = torch.zeros_like(own["input_shift"]), torch.ones_like(own["input_scale"])
        router.load_state_dict(sub)
