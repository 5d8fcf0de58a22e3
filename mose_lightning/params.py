"""Parameter accounting: total, trainable and activated per token.

Activated = every parameter a token passes through. Per MoE layer a token uses the shared expert and
  MoSE: 1 of N skill experts;  expert groups: 1 of 2N (its skill's image or text expert);  top-k: k of N.
Everything else (vision tower, attention, embeddings, routers, the view router) is activated. With
moe.router_input=frozen_backbone the MoE blocks also hold a frozen copy of the dense FFN they replaced, which only the
routing pass over the prompt runs: counted apart (`reference_ffn`), not in total or activated.
"""

from __future__ import annotations

from typing import Dict

from mose_lightning.moe import TopKMoEBlock, is_sequence_routed


def _unique_numel(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def parameter_report(model) -> Dict[str, object]:
    """Counts for a `MoEVisionLanguageModel` (works on the meta device)."""
    reference = _unique_numel(p for b in model.layout.blocks if getattr(b, "reference_ffn", None) is not None
                              for p in b.reference_ffn.parameters())
    # The view router and view embeddings (views.enabled) run for every sample beside the backbone.
    views = list(model.views.parameters()) if getattr(model, "views", None) is not None else []
    total = _unique_numel(list(model.backbone.parameters()) + views) - reference
    trainable = _unique_numel(p for p in list(model.backbone.parameters()) + views if p.requires_grad)
    inactive = 0
    for block in model.layout.blocks:
        experts = getattr(block, "experts", None)
        if experts is None:
            continue
        per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // experts.num_experts
        if is_sequence_routed(block):
            used = 1
        elif isinstance(block, TopKMoEBlock):
            used = block.router.top_k
        else:
            used = experts.num_experts
        inactive += (experts.num_experts - used) * per_expert
    return {
        "kind": model.layout.kind,
        "total": total,
        "trainable": trainable,
        "activated": total - inactive,
        "reference_ffn": reference,
        "moe_layers": len(model.layout.layer_indices) if model.layout.kind != "dense" else 0,
        "moe_layer_indices": list(model.layout.layer_indices),
        "levels": list(model.layout.allocation),
    }


def format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
