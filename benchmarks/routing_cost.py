"""What each way of keeping skill routing on its skills costs: one SFT step and one prompt prefill of the toy MoSE
model, per routing mechanism, against the default (routers frozen, reading their own layer's input).

    python -m benchmarks.routing_cost [--json] [--repeats N] [--warmup N] [--batch-size B] [--tiny]

Variants (all MoSE on the same toy backbone and batch; `moe.*` overrides of the experiment config):
  own_layer_frozen     routers frozen, each reading T_mean entering its own layer (the reference)
  skill_loss           routers trainable with the skill cross-entropy on labelled samples (router_skill_loss=1)
  first_moe_layer      every router reads T_mean entering the first MoSE layer
  frozen_backbone      routers read T_mean entering their layer in the frozen backbone: a no-grad reference pass
  teacher_forcing      experts chosen by the skill labels during training (the step only; inference routes)
Timed: a training step (forward with the aux losses, backward into every trainable parameter) on one DataModule
batch, and a generation prefill (a 1-token `generate`) on one prompt batch, interleaved in one process
(benchmarks/common.py); ratios against own_layer_frozen.
"""

from __future__ import annotations

import gc
import sys
from typing import Dict

import torch

from benchmarks.common import base_parser, emit, format_table, log, machine_info, setup, time_interleaved
from benchmarks.datamodule import synthetic_data, temp_dir, toy_config

NAME = "routing_cost"
OWN = "moe.router_input=own_layer"
VARIANTS: Dict[str, list] = {
    "own_layer_frozen": [OWN],
    "skill_loss": [OWN, "moe.router_trainable=true", "moe.router_skill_loss=1.0"],
    "first_moe_layer": ["moe.router_input=first_moe_layer"],
    "frozen_backbone": ["moe.router_input=frozen_backbone"],
    "teacher_forcing": [OWN, "moe.teacher_forcing=true"],
}
REFERENCE = "own_layer_frozen"


def build_parser():
    parser = base_parser("SFT step and prefill cost of the skill-routing mechanisms (toy MoSE).", 7, 2)
    parser.add_argument("--batch-size", type=int, default=8, help="training and prompt batch (the toy config's)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (the reference always runs)")
    return parser


def run(args) -> dict:
    device, dtype = setup(args)
    from mose_lightning.data.datamodule import DriveDataModule
    from mose_lightning.model import build_model

    batch_size = 2 if args.tiny else args.batch_size
    repeats, warmup = (1, 0) if args.tiny else (args.repeats, args.warmup)
    wanted = [REFERENCE] + [v for v in args.variants.split(",") if v and v != REFERENCE]
    unknown = set(wanted) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    shards = synthetic_data(4 * batch_size, 0, batch_size, seed=args.seed, maxcount=32)
    toy_dir = temp_dir("toy") / "toy"
    common = [f"data.batch_size={batch_size}", f"data.eval_batch_size={batch_size}", "data.shuffle_buffer=4"]
    models, steps, prefills = {}, {}, {}
    for name in wanted:
        torch.manual_seed(args.seed)
        models[name] = build_model(toy_config(None, str(shards), common + VARIANTS[name], toy_dir=toy_dir)).to(device)
    first = models[REFERENCE]
    dm = DriveDataModule(first.cfg.data, first.adapter, first.processor, first.taxonomy)
    batch = next(iter(dm.train_dataloader()))
    prompts = next(iter(dm.generation_dataloader("test")))
    log(f"[{NAME}] batch {batch_size}, {int(batch['attention_mask'].sum())} training tokens, "
        f"{int(prompts['attention_mask'].sum())} prompt tokens, variants {wanted}")

    for name, model in models.items():
        source = "labels" if model.cfg.moe.teacher_forcing else "router"
        params = [p for p in model.parameters() if p.requires_grad]

        def step(model=model, source=source, params=params):
            model.train()
            model(batch, route_source=source, recentre_routers=True).training_loss.backward()
            for p in params:
                p.grad = None

        def prefill(model=model):
            model.eval()
            model.generate(prompts, 1)

        steps[f"{name}/step"] = step
        prefills[f"{name}/prefill"] = prefill
    timings = time_interleaved({**steps, **prefills}, repeats, warmup, device)
    results = {}
    for name in wanted:
        step, prefill = timings[f"{name}/step"], timings[f"{name}/prefill"]
        results[name] = {
            "step_median_s": step["median_s"], "prefill_median_s": prefill["median_s"],
            "step_ratio": step["median_s"] / timings[f"{REFERENCE}/step"]["median_s"],
            "prefill_ratio": prefill["median_s"] / timings[f"{REFERENCE}/prefill"]["median_s"],
            "overrides": VARIANTS[name],
        }
    del models
    gc.collect()
    return {
        "benchmark": NAME,
        "machine": machine_info(device, dtype),
        "config": {"batch_size": batch_size, "repeats": repeats, "warmup": warmup, "reference": REFERENCE,
                   "timed": "training step (forward + aux losses + backward) and a 1-token generate (prefill)"},
        "results": results,
    }


def table(result: dict) -> str:
    rows = [{"variant": k, "step_ms": 1e3 * r["step_median_s"], "step_ratio": r["step_ratio"],
             "prefill_ms": 1e3 * r["prefill_median_s"], "prefill_ratio": r["prefill_ratio"]}
            for k, r in result["results"].items()]
    m = result["machine"]
    head = f"{NAME}: {m['cpu_model']} ({m['torch_threads']} threads), batch {result['config']['batch_size']}"
    return f"{head}\n{format_table(rows, ['variant', 'step_ms', 'step_ratio', 'prefill_ms', 'prefill_ratio'])}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    emit(run(args), args.json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
