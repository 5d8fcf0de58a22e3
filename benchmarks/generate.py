"""Generation throughput: MoSE with routing reuse (KV cache) vs the dense backbone vs MoSE re-routing every step.

    python -m benchmarks.generate [--json] [--layout paper|every_layer] [--max-new-tokens T] [--batch-size B]
                                  [--batches K] [--config YAML] [--shards DIR] [--device cpu|cuda] [--repeats N]
                                  [--threads N] [--tiny]

Variants (all built by `build_model` from the same backbone weights; MoSE experts are upcycled copies of the dense
FFNs, routers untrained: cost does not depend on the weights' values):
  dense            moe.kind=dense: the backbone as it is, KV cache on: the reference of the goal
  dense_activated  the dense backbone with the FFNs of the MoE layers widened to what a MoSE block activates per
                   token (shared expert + one skill expert: twice the FFN width), computing the same function: the
                   cost of MoSE's activated parameters without any routing, the floor for `mose`
  mose             moe.kind=mose, routing decided once on the prompt and reused for every new token (KV cache on)
  mose_reroute     moe.kind=mose, `generate(..., reroute_every_step=True)`: no KV cache, every step re-runs the
                   whole sequence and its routers (the reference the cached path is tested against)
  expert_group     moe.kind=expert_group (one image and one text expert per skill), routing reused like mose
  topk             moe.kind=topk, the token-level baseline: every token of every step routed anew
Layouts: `paper` (default) puts MoSE blocks in every other decoder layer, as MoSE does in Qwen2-VL-2B (a 6-layer
toy, MoSE in layers 0, 2, 4, one per skill level); `every_layer` is the toy MoSE experiment as configured (MoSE in
all 4 layers), the worst case. With `--config` the config's own layout is used.
Each variant generates `max_new_tokens` greedy tokens for the same K left-padded prompt batches (the DataModule's
generation loader), with `min_new_tokens=max_new_tokens` passed through `MoEVisionLanguageModel.generate`'s
**kwargs so that no sequence stops early and every variant produces exactly B x T tokens per batch (checked).
tokens/s = new tokens / wall time of the K generate calls; variants run interleaved (common.time_interleaved).
Goal: ratio_vs_dense (time) of `mose` <= 1.10. Correctness facts: `mose` and `mose_reroute` produce the same
tokens (routing reuse is exact), and at initialisation MoSE and the widened dense model compute the dense FFNs'
function, so their tokens agree with `dense` (up to float ties); so do the upcycled expert-group and top-k models.
"""

from __future__ import annotations

import gc
import sys
from typing import Dict, List

import torch

from benchmarks.common import base_parser, emit, format_table, log, machine_info, setup, synchronize, time_interleaved
from benchmarks.datamodule import synthetic_data, temp_dir, toy_config

NAME = "generate"
GOAL_RATIO = 1.10
VARIANTS = ("dense", "dense_activated", "mose", "mose_reroute", "expert_group", "topk")
# Overrides of the toy MoSE experiment per layout (none for `every_layer`: the experiment as configured).
LAYOUTS = {
    "paper": ["backbone.toy.num_layers=6", "moe.layers=even", "moe.level_allocation=[1,1,1]"],
    "every_layer": [],
}


def build_parser():
    parser = base_parser("Tokens/s of MoSE generation (routing reuse) vs dense vs re-routing every step.", 5, 1)
    parser.add_argument("--config", default=None, help="experiment YAML (default: the toy MoSE config)")
    parser.add_argument("--shards", default=None, help="folder with a test shard folder (default: synthetic)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=2, help="prompt batches per timed call")
    parser.add_argument("--layout", default="paper", choices=sorted(LAYOUTS),
                        help="MoSE layers of the toy: every other layer as in the paper (default), or every layer")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (dense always runs)")
    return parser


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def run(args) -> dict:
    device, dtype = setup(args)
    from mose_lightning.data.datamodule import DriveDataModule
    from mose_lightning.model import build_model

    tokens, bsz, nbatches = (4, 2, 1) if args.tiny else (args.max_new_tokens, args.batch_size, args.batches)
    repeats, warmup = (1, 0) if args.tiny else (args.repeats, args.warmup)
    wanted = ["dense"] + [v for v in args.variants.split(",") if v and v != "dense"]
    shards = args.shards or synthetic_data(0, 0, bsz * nbatches, seed=args.seed, maxcount=32)
    layout = None if args.config else args.layout
    toy_dir = temp_dir("toy") / f"toy_{layout}"  # one toy per layer count (the cache checks its sizes)
    overrides = [f"data.eval_batch_size={bsz}", f"backbone.dtype={args.dtype}"] + LAYOUTS.get(layout, [])
    models = {}
    for kind in ("dense", "mose", *(k for k in ("expert_group", "topk") if k in wanted)):
        cfg = toy_config(args.config, str(shards), overrides + [f"moe.kind={kind}"], toy_dir=toy_dir)
        torch.manual_seed(args.seed)
        models[kind] = build_model(cfg).to(device).eval()
    if "dense_activated" in wanted:
        torch.manual_seed(args.seed)
        models["dense_activated"] = build_model(models["dense"].cfg).to(device).eval()
        widen_to_activated_width(models["dense_activated"], models["mose"].cfg.moe)
    cfg = models["mose"].cfg
    dm = DriveDataModule(cfg.data, models["mose"].adapter, models["mose"].processor, models["mose"].taxonomy)
    loader = dm.generation_dataloader("test")
    batches = [_to(b, device) for _, b in zip(range(nbatches), loader)]
    prompt_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    new_tokens = sum(b["input_ids"].shape[0] for b in batches) * tokens
    log(f"[{NAME}] {len(batches)} batch(es) of {bsz} prompts (mean prompt {prompt_tokens / (len(batches) * bsz):.0f} "
        f"tokens), {tokens} new tokens, device {device}, dtype {dtype}")

    outputs: Dict[str, List[torch.Tensor]] = {}

    def make(kind: str, reroute: bool, name: str):
        model = models[kind]

        def step():
            outs = [model.generate(b, tokens, reroute_every_step=reroute, min_new_tokens=tokens).tokens for b in batches]
            outputs[name] = [o.cpu() for o in outs]

        return step

    # variant -> (model kind, re-route every step)
    specs = {"dense": ("dense", False), "dense_activated": ("dense_activated", False), "mose": ("mose", False),
             "mose_reroute": ("mose", True), "expert_group": ("expert_group", False), "topk": ("topk", False)}
    fns = {name: make(kind, reroute, name) for name, (kind, reroute) in specs.items() if name in wanted}
    timings = time_interleaved(fns, repeats, warmup, device)
    synchronize(device)

    dense_s = timings["dense"]["median_s"]
    results = {}
    for name, t in timings.items():
        produced = sum(o.numel() for o in outputs[name])
        results[name] = {**t, "ratio_vs_dense": t["median_s"] / dense_s, "new_tokens": produced,
                         "tokens_per_s": produced / t["median_s"]}

    def agreement(a: str, b: str):
        if a not in outputs or b not in outputs:
            return None
        same = sum(int((x == y).sum()) for x, y in zip(outputs[a], outputs[b]))
        return same / sum(x.numel() for x in outputs[a])

    checks = {
        "every_variant_made_all_tokens": all(r["new_tokens"] == new_tokens for r in results.values()),
        "routing_reuse_matches_reroute": agreement("mose", "mose_reroute") in (None, 1.0),
    }
    mose_ratio = results.get("mose", {}).get("ratio_vs_dense")
    if "dense_activated" in results and "mose" in results:
        results["mose"]["ratio_vs_dense_activated"] = results["mose"]["median_s"] / results["dense_activated"]["median_s"]
    result = {
        "benchmark": NAME,
        "machine": machine_info(device, dtype),
        "config": {
            "config": args.config or "configs/experiment/toy_mose.yaml", "backbone": cfg.backbone.name,
            "layout": layout or "from the config", "num_layers": len(models["mose"].adapter.decoder_layers(models["mose"].backbone)),
            "moe_layers": list(models["mose"].layout.layer_indices), "num_experts": cfg.moe.num_experts,
            "ffn_width": models["dense"].layout.blocks[0].gate_proj.out_features,
            "dense_activated_ffn_width": (models["dense_activated"].layout.blocks[0].gate_proj.out_features
                                          if "dense_activated" in models else None),
            "batches": len(batches), "batch_size": bsz, "max_new_tokens": tokens, "min_new_tokens": tokens,
            "mean_prompt_tokens": prompt_tokens / (len(batches) * bsz), "greedy": True,
            "repeats": repeats, "warmup": warmup,
            "timed": "model.generate over all prompt batches (prefill + decode), tokens moved to CPU",
        },
        "results": results,
        "token_agreement": {"mose_vs_mose_reroute": agreement("mose", "mose_reroute"),
                            "mose_vs_dense": agreement("mose", "dense"),
                            "dense_activated_vs_dense": agreement("dense_activated", "dense"),
                            "expert_group_vs_dense": agreement("expert_group", "dense"),
                            "topk_vs_dense": agreement("topk", "dense")},
        "goal": {"mose_ratio_vs_dense_max": GOAL_RATIO,
                 "met": None if mose_ratio is None else mose_ratio <= GOAL_RATIO},
        "checks": checks,
    }
    del models, batches
    gc.collect()
    return result


@torch.no_grad()
def widen_to_activated_width(model, moe) -> None:
    """Widen the FFNs of `model`'s MoE layers (a moe.kind=dense model: its layout's blocks are those FFNs) to the
    width a MoSE block activates per token, shared expert + one skill expert, keeping their function: gate and up
    rows duplicated, the down projection's two halves weighted by the MoSE combination (`moe.combine`,
    `moe.shared_weight`). Nothing to widen without a shared expert: a MoSE block then activates one expert of the
    FFN's own width."""
    if not moe.shared_expert:
        return
    # "sum": shared(x) + a skill expert that starts as a zero delta; "weighted": w * shared(x) + (1 - w) * expert(x).
    shared_w, routed_w = (1.0, 0.0) if moe.combine == "sum" else (moe.shared_weight, 1.0 - moe.shared_weight)
    for mlp in model.layout.blocks:
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, 2 * old.out_features, bias=False).to(old.weight)
            new.weight.copy_(torch.cat([old.weight, old.weight], dim=0))
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = torch.nn.Linear(2 * old.in_features, old.out_features, bias=False).to(old.weight)
        new.weight.copy_(torch.cat([shared_w * old.weight, routed_w * old.weight], dim=1))
        mlp.down_proj = new


def table(result: dict) -> str:
    rows = [{"variant": k, "median_s": r["median_s"], "tokens/s": r["tokens_per_s"], "ratio_vs_dense": r["ratio_vs_dense"],
             "new tokens": r["new_tokens"]} for k, r in result["results"].items()]
    c, m = result["config"], result["machine"]
    head = (f"{NAME}: {m['cpu_model']} ({m['torch_threads']} threads), device {m['device']}, {c['batches']}x"
            f"{c['batch_size']} prompts, {c['max_new_tokens']} new tokens, backbone {c['backbone']}")
    goal = result["goal"]
    head += f", layout {c['layout']} (MoE layers {c['moe_layers']} of {c['num_layers']})"
    floor = result["results"].get("mose", {}).get("ratio_vs_dense_activated")
    foot = (f"goal mose <= {goal['mose_ratio_vs_dense_max']:.2f}x dense: {'met' if goal['met'] else 'MISSED'}; "
            + (f"mose vs dense_activated {floor:.2f}x; " if floor else "") +
            f"token agreement {result['token_agreement']}; checks {result['checks']}")
    return f"{head}\n{format_table(rows, ['variant', 'median_s', 'tokens/s', 'ratio_vs_dense', 'new tokens'])}\n{foot}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    emit(result, args.json, table)
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
