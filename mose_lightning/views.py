"""Camera-view routing at the model level: encode the kept views, route, encode only the chosen views, and lay out
the multi-image prompt the language model sees.

One forward of a view-routed model (`view_inputs`):
  1. the vision tower encodes the kept views of every sample (one call): these tokens go into the prompt and are
     the router's visual input, so the front view is encoded once;
  2. the view router reads them with the question's mean token embedding (and the navigation command) and
     `choose_views` decides (router top-k, labels, Gumbel straight-through, all, kept);
  3. the vision tower encodes the chosen candidate views, and only those (one call; Gumbel training encodes every
     candidate the sample has, because each slot mixes all of them);
  4. the prompt is assembled per sample: prefix, the kept views, the chosen views (each optionally preceded by its
     camera name as text, and with its learned view embedding added to its tokens), the question, the answer.
     The language model gets the image tokens ready-made (`BackboneAdapter.precomputed_image_inputs`), never the
     pixels again.
The assembled batch has the keys every other part of the framework reads (input_ids, attention_mask, labels,
prompt_mask, mm_token_type_ids, image_grid_thw), so MoSE's skill routers pool over the prompt tokens of exactly
the views shown, and `ViewRouting` reports what was shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mose_lightning.config import ViewsConfig
from mose_lightning.moe.view_routing import ViewDecision, ViewMoE, choose_views, view_router_loss


@dataclass
class ViewRouting:
    """What a view-routed forward or generation decided and showed."""

    decision: ViewDecision
    shown: List[List[str]]  # view names in each sample's prompt, kept views first
    image_tokens: torch.Tensor  # (B,) image tokens in each sample's prompt
    images_encoded: int  # images that went through the vision tower in this forward
    labels: Optional[torch.Tensor]  # (B, T) the assembled batch's labels (None without an answer)
    attention_mask: torch.Tensor  # (B, T)
    prompt_mask: torch.Tensor  # (B, T)


class ViewPromptBuilder:
    """Token ids the assembly needs, taken once from the backbone adapter and its tokenizer."""

    def __init__(self, adapter, processor, cfg: ViewsConfig) -> None:
        pieces = adapter.view_prompt_pieces(processor, "?")
        tokenizer = getattr(processor, "tokenizer", processor)
        self.image_start, self.image_pad, self.image_end = pieces["image_start"], pieces["image_pad"], pieces["image_end"]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        names = cfg.marker in ("name", "both")
        self.name_ids = {view: (tokenizer(f"{view}: ")["input_ids"] if names else []) for view in cfg.names}

    def assemble(self, items: Sequence[Dict[str, torch.Tensor]], shown: Sequence[Sequence[Tuple[str, int]]],
                 with_answer: bool, padding_side: str, device) -> Dict[str, torch.Tensor]:
        """input_ids, attention_mask, labels, prompt_mask, mm_token_type_ids for the views `shown` per sample
        ((name, image tokens) in prompt order)."""
        rows, prompt_lengths, answers = [], [], []
        for item, views in zip(items, shown):
            ids = item["prefix_ids"].tolist()
            for name, tokens in views:
                ids += self.name_ids[name] + self.image_start + [self.image_pad] * tokens + self.image_end
            ids += item["suffix_ids"].tolist()
            prompt_lengths.append(len(ids))
            answer = item["answer_ids"].tolist() if with_answer else []
            answers.append(len(answer))
            rows.append(ids + answer)
        longest = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), longest), dtype=torch.long)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)
        prompt = torch.zeros((len(rows), longest), dtype=torch.bool)
        for b, ids in enumerate(rows):
            start = 0 if padding_side == "right" else longest - len(ids)
            span = slice(start, start + len(ids))
            input_ids[b, span] = torch.tensor(ids, dtype=torch.long)
            attention[b, span] = 1
            prompt[b, start:start + prompt_lengths[b]] = True
            if answers[b]:
                labels[b, start + prompt_lengths[b]:start + len(ids)] = input_ids[b, start + prompt_lengths[b]:start + len(ids)]
        out = {"input_ids": input_ids, "attention_mask": attention, "prompt_mask": prompt,
               "mm_token_type_ids": (input_ids == self.image_pad).long()}
        if with_answer:
            out["labels"] = labels
        return {k: v.to(device) for k, v in out.items()}


def vision_trainable(backbone: torch.nn.Module) -> bool:
    return any(p.requires_grad for name, p in backbone.named_parameters() if ".visual." in f".{name}")


def _view_slices(item: Dict[str, torch.Tensor]) -> Dict[int, Tuple[int, int, int]]:
    """View index -> (position among the sample's views, first patch row, end patch row) of its pixels."""
    patches = item["grid_thw"].prod(dim=-1).tolist()
    out, start = {}, 0
    for position, (view, n) in enumerate(zip(item["view_index"].tolist(), patches)):
        out[view] = (position, start, start + n)
        start += n
    return out


class ViewEncoder:
    """The vision tower on chosen (sample, view) pairs, one call per set, counting what it encodes."""

    def __init__(self, model, items: Sequence[Dict[str, torch.Tensor]]) -> None:
        self.model = model
        self.items = items
        self.slices = [_view_slices(item) for item in items]
        self.encoded = 0
        self.grad = torch.is_grad_enabled() and vision_trainable(model.backbone)

    def grid(self, b: int, view: int) -> torch.Tensor:
        position = self.slices[b][view][0]
        return self.items[b]["grid_thw"][position]

    def encode(self, pairs: Sequence[Tuple[int, int]]) -> Dict[Tuple[int, int], torch.Tensor]:
        if not pairs:
            return {}
        pixels = torch.cat([self.items[b]["pixel_values"][s:e] for b, v in pairs for _, s, e in [self.slices[b][v]]])
        grid = torch.stack([self.grid(b, v) for b, v in pairs])
        with torch.set_grad_enabled(self.grad):
            feats = self.model.adapter.image_tokens_per_image(self.model.backbone, pixels, grid)
        self.encoded += len(pairs)
        return dict(zip(pairs, feats))


def _pad_stack(rows: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    longest = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros((len(rows), longest, rows[0].shape[-1]))
    mask = torch.zeros((len(rows), longest), dtype=torch.bool, device=rows[0].device)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
        mask[b, : r.shape[0]] = True
    return out, mask


def view_inputs(model, batch: Dict[str, Any], source: str, with_answer: bool, padding_side: str = "right",
                extra_prob: float = 0.0) -> Tuple[Dict[str, Any], ViewRouting]:
    """The assembled backbone batch and the routing of a view batch (see the module docstring)."""
    views: ViewMoE = model.views
    cfg: ViewsConfig = model.cfg.views
    builder: ViewPromptBuilder = model.view_prompts
    items = batch["view_items"]
    device = items[0]["prefix_ids"].device
    encoder = ViewEncoder(model, items)
    kept = [views.view_index(name) for name in cfg.kept]
    kept_feats = encoder.encode([(b, v) for b in range(len(items)) for v in kept])
    visual, mask = _pad_stack([torch.cat([kept_feats[(b, v)] for v in kept]).detach() for b in range(len(items))])
    embed = model.backbone.get_input_embeddings()
    question = torch.stack([embed(item["question_ids"]).float().mean(dim=0) for item in items]).detach()
    logits = views.router(visual, mask, question, batch.get("command"))
    targets = batch.get("view_targets")
    decision = choose_views(logits, batch["view_available"], cfg.top_k, source, views.classes,
                            targets.bool() if targets is not None else None, cfg.gumbel_tau, extra_prob)
    none = decision.none_index
    chosen = decision.chosen.tolist()
    if source == "gumbel":
        needed = [(b, views.class_view(c)) for b in range(len(items)) for c in range(len(views.classes))
                  if c != none and bool(decision.available[b, c])]
    else:
        needed = [(b, views.class_view(c)) for b, row in enumerate(chosen) for c in row if c >= 0 and c != none]
    cand_feats = encoder.encode(needed)
    marker = cfg.marker in ("embedding", "both")
    features: List[torch.Tensor] = []
    grids: List[torch.Tensor] = []
    shown: List[List[Tuple[str, int]]] = []
    for b, row in enumerate(chosen):
        sample_shown = []
        for v in kept:
            features.append(kept_feats[(b, v)])
            grids.append(encoder.grid(b, v))
            sample_shown.append((views.names[v], kept_feats[(b, v)].shape[0]))
        for j, c in enumerate(row):
            if c < 0 or c == none:
                continue
            view = views.class_view(c)
            if source == "gumbel":
                mixed = 0.0
                for other in range(len(views.classes)):
                    if other == none or not bool(decision.available[b, other]):
                        continue
                    o_view = views.class_view(other)
                    feat = cand_feats[(b, o_view)]
                    if feat.shape != cand_feats[(b, view)].shape:
                        raise ValueError(f"sample {batch['meta'][b]['key']!r}: views {views.names[view]} and "
                                         f"{views.names[o_view]} give different numbers of image tokens; Gumbel "
                                         "selection mixes candidate views token by token (resize all views alike)")
                    if marker:
                        feat = feat + views.view_embedding.weight[o_view].to(feat.dtype)
                    mixed = mixed + decision.weights[b, j, other].to(feat.dtype) * feat
                feat = mixed
            else:
                feat = cand_feats[(b, view)]
                if marker:
                    feat = feat + views.view_embedding.weight[view].to(feat.dtype)
            features.append(feat)
            grids.append(encoder.grid(b, view))
            sample_shown.append((views.names[view], feat.shape[0]))
        shown.append(sample_shown)
    assembled = builder.assemble(items, shown, with_answer, padding_side, device)
    assembled.update(model.adapter.precomputed_image_inputs(tuple(features), torch.stack(grids)))
    assembled["skill_labels"] = batch.get("skill_labels")
    assembled["meta"] = batch.get("meta")
    routing = ViewRouting(
        decision=decision,
        shown=[[name for name, _ in row] for row in shown],
        image_tokens=torch.tensor([sum(n for _, n in row) for row in shown]),
        images_encoded=encoder.encoded,
        labels=assembled.get("labels"),
        attention_mask=assembled["attention_mask"],
        prompt_mask=assembled["prompt_mask"],
    )
    return assembled, routing


def view_loss(model, routing: ViewRouting) -> Optional[torch.Tensor]:
    """The router's focal loss on the batch's labelled samples (None when the batch carries no view targets)."""
    decision = routing.decision
    if decision.targets is None:
        return None
    views: ViewMoE = model.views
    alpha = views.class_alpha if model.cfg.views.class_weights == "inverse_frequency" else None
    return view_router_loss(decision.logits, decision.targets, decision.available, alpha, model.cfg.views.focal_gamma)


def graph_anchor(views: ViewMoE) -> Optional[torch.Tensor]:
    """0 * (sum of the view module's trainable parameters): keeps every one of them in the backward graph of a
    step that did not use them (no candidate shown, no label), which DDP without unused-parameter search needs."""
    params = [p for p in views.parameters() if p.requires_grad]
    return torch.stack([p.sum() for p in params]).sum() * 0.0 if params else None
