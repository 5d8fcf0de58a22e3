"""`make demo`: the framework's main job end to end on a CPU. It only chains the stages; every number it prints
comes from the runs' own output files. (`make reproduce-toy`, the paper's comparisons in miniature, is
mose_lightning/miniature.py.)"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional, Sequence

from mose_lightning import pipeline
from mose_lightning.config import PROJECT_ROOT, load_config
from mose_lightning.evaluation.routing_metrics import format_accuracies

EXPERIMENTS = PROJECT_ROOT / "configs" / "experiment"


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(config: Optional[str] = None, overrides: Sequence[str] = ()) -> Path:
    from mose_lightning.stages.evaluate import run_eval
    from mose_lightning.stages.router_pretrain import run_router_pretrain
    from mose_lightning.stages.sft import run_sft

    config = config or str(EXPERIMENTS / "toy_mose.yaml")
    cfg = load_config(config, list(overrides))
    root = Path(cfg.run_dir or f"runs/demo_{cfg.name}")
    _banner("1/5 synthetic driving set + rule-based skill annotation")
    pipeline.ensure_synthetic_data(cfg)
    _banner("2/5 toy backbone (brief dense instruction tuning, cached)")
    pipeline.ensure_toy_backbone(cfg)
    _banner("3/5 router pretraining")
    routers = copy.deepcopy(cfg)
    routers.run_dir = str(root / "pretrain_router")
    router_dir, router_metrics = run_router_pretrain(routers)
    _banner("4/5 MoSE SFT")
    sft = copy.deepcopy(cfg)
    sft.run_dir = str(root / "sft")
    sft.moe.router_checkpoint = str(router_dir / "routers.pt")
    sft_dir, sft_metrics = run_sft(sft)
    _banner("5/5 evaluation (single-round generation with skill chains)")
    ev = copy.deepcopy(sft)
    ev.run_dir = str(root / "eval")
    ev.init_from = str(sft_dir / "model")
    eval_dir, _ = run_eval(ev)
    print()
    print((eval_dir / "results.md").read_text())
    routing = json.loads((eval_dir / "scores.json").read_text())["scores"].get("routing") or {}
    print("routing accuracy of the evaluated model (test split, per level): "
          + ", ".join(format_accuracies(routing.get("levels") or {})))
    print("  per MoE layer: " + ", ".join(format_accuracies({f"L{k}": v for k, v in (routing.get("layers") or {}).items()})))
    print("router pretraining accuracy (held-out, before SFT): " + ", ".join(
        f"{k.split('/')[-1]} {v:.3f}" for k, v in router_metrics.items() if k.startswith("router/acc/")))
    print(f"SFT final train loss: {sft_metrics.get('train/loss', float('nan')):.4f}")
    print(f"TensorBoard:  .venv/bin/tensorboard --logdir {root}")
    print(f"checkpoints:  {sft_dir / 'checkpoints'}  model: {sft_dir / 'model'}  routers: {router_dir / 'routers.pt'}")
    print(f"plots:        {', '.join(str(p) for p in sorted(eval_dir.glob('*.png')))}")
    print(f"HTML report:  {eval_dir / 'report.html'}")
    print(f"run dir: {root}")
    return root
