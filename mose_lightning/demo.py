"""`make demo` and `make reproduce-toy`: the framework's main job end to end on a CPU, and the paper's comparisons
in miniature. Both only chain the stages; every number they print comes from the runs' own output files."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mose_lightning import pipeline
from mose_lightning.config import PROJECT_ROOT, load_config
from mose_lightning.evaluation.routing_metrics import format_accuracies
from mose_lightning.io import atomic_write_json, atomic_write_text

EXPERIMENTS = PROJECT_ROOT / "configs" / "experiment"
TABLE1_ROWS = [("SFT", "toy_sft"), ("MoE 4x1", "toy_moe_4x1"), ("MoE 8x1", "toy_moe_8x1"), ("MoSE", "toy_mose"),
               ("MoSE + expert groups", "toy_mose_expert_group")]
BLIND_ROW = "MoSE, gray images (control)"


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


def _quality(eval_dir: Path) -> Dict[str, float]:
    scores = json.loads((eval_dir / "scores.json").read_text())["scores"]["local"]
    return {task: values["token_f1"] for task, values in scores.items() if isinstance(values, dict) and "token_f1" in values}


def _train_and_eval(name: str, seed: int, root: Path, fraction: float = 1.0, overrides: Sequence[str] = (),
                    tag: str = "") -> Dict:
    from mose_lightning.params import parameter_report
    from mose_lightning.stages.evaluate import run_eval
    from mose_lightning.stages.sft import run_expert_group, run_sft

    cfg = load_config(EXPERIMENTS / f"{name}.yaml", [f"seed={seed}", f"trainer.seed={seed}", f"data.seed={seed}", *overrides])
    pipeline.ensure_synthetic_data(cfg)
    pipeline.ensure_toy_backbone(cfg)
    if fraction < 1.0:
        cfg.data.train_limit = max(1, int(cfg.data.synthetic.num_train * fraction))
        cfg.router_pretrain.max_samples = cfg.data.train_limit
    run = root / f"{name}{tag}_frac{fraction:g}_seed{seed}"
    done = run / "result.json"
    if done.is_file():  # finished in an earlier (interrupted) invocation: reproduce-toy resumes where it stopped
        print(f"[reproduce] {run.name}: done earlier, reusing {done}")
        return json.loads(done.read_text())
    cfg.run_dir = str(run / "train")
    router_acc = None
    if cfg.moe.kind in ("mose", "expert_group"):
        from mose_lightning.stages.router_pretrain import run_router_pretrain

        routers = copy.deepcopy(cfg)
        routers.moe.kind = "mose"
        routers.run_dir = str(run / "pretrain_router")
        _, metrics = run_router_pretrain(routers)
        router_acc = metrics.get("router/acc/mean")
        cfg.moe.router_checkpoint = str(run / "pretrain_router" / "routers.pt")
    if cfg.moe.kind == "expert_group":
        mose = copy.deepcopy(cfg)
        mose.moe.kind = "mose"
        mose.run_dir = str(run / "mose_sft")
        run_sft(mose)
        cfg.init_from = str(run / "mose_sft" / "model")
        train_dir, _ = run_expert_group(cfg)
    else:
        train_dir, _ = run_sft(cfg)
    ev = copy.deepcopy(cfg)
    ev.run_dir = str(run / "eval")
    ev.init_from = str(train_dir / "model")
    eval_dir, _ = run_eval(ev)
    meta = json.loads((eval_dir / "scores.json").read_text())["meta"]
    result = {"quality": _quality(eval_dir), "router_acc": router_acc, "activated": meta["activated_params"],
              "total": meta["total_params"]}
    atomic_write_json(done, result)
    return result


def _mean_std(values: List[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def run_reproduce_toy(overrides: Sequence[str] = (), seeds: Sequence[int] = (0, 1, 2),
                      fractions: Sequence[float] = (0.25, 0.5, 1.0)) -> Path:
    """Table 1 (5 rows x seeds), Figure 8 (data scaling, MoE 4x1 vs MoSE) and Table 2 (router-pretraining data
    size) in miniature, at equal training budget (the same max_steps and batch size for every row)."""
    root = Path("runs/reproduce_toy")
    results: Dict[str, List[Dict]] = {}
    for label, name in TABLE1_ROWS:
        for seed in seeds:
            _banner(f"Table 1: {label}, seed {seed}")
            results.setdefault(label, []).append(_train_and_eval(name, seed, root, 1.0, overrides))
    # The control the synthetic task is built to pass: the same MoSE recipe with every image replaced by gray.
    for seed in seeds:
        _banner(f"control: MoSE without images (gray views), seed {seed}")
        results.setdefault(BLIND_ROW, []).append(
            _train_and_eval("toy_mose", seed, root, 1.0, [*overrides, "data.blank_images=true"], tag="_blind"))
    tasks = sorted({t for rows in results.values() for r in rows for t in r["quality"] if t != "overall"})
    lines = ["Table 1 in miniature: token F1 (0-1) per task on the synthetic test split, mean ± std over seeds "
             f"{list(seeds)}; router acc = mean held-out router-pretraining accuracy over levels", "",
             "| Method | Activated | Total | " + " | ".join(tasks) + " | Overall | Router acc |",
             "|---" * (len(tasks) + 5) + "|"]
    for label, rows in results.items():
        cells = [_mean_std([r["quality"].get(t) for r in rows]) for t in tasks + ["overall"]]
        lines.append(f"| {label} | {rows[0]['activated']:,} | {rows[0]['total']:,} | " + " | ".join(cells)
                     + f" | {_mean_std([r['router_acc'] for r in rows])} |")
    scaling: Dict[str, Dict[float, tuple]] = {}
    for label, name in (("MoE 4x1", "toy_moe_4x1"), ("MoSE", "toy_mose")):
        for fraction in fractions:
            _banner(f"data scaling: {label}, {fraction:g} of the training data")
            runs = [_train_and_eval(name, s, root, fraction, overrides) for s in seeds[:1]]
            values = [r["quality"].get("overall") for r in runs]
            scaling.setdefault(label, {})[fraction] = (statistics.mean(values), 0.0)
    from mose_lightning.evaluation.plots import plot_data_scaling

    plot_data_scaling(scaling, root / "data_scaling.png", metric="token F1 (overall)")
    lines += ["", "Data scaling (Figure 8 in miniature, seed 0): overall token F1 on the test split", "",
              "| training data | " + " | ".join(scaling) + " |", "|---" * (1 + len(scaling)) + "|"]
    for fraction in fractions:
        lines.append(f"| {fraction:g} | " + " | ".join(f"{scaling[label][fraction][0]:.3f}" for label in scaling) + " |")
    router_sizes = []
    for fraction in fractions:
        cfg = load_config(EXPERIMENTS / "toy_mose.yaml", list(overrides))
        pipeline.ensure_synthetic_data(cfg)
        pipeline.ensure_toy_backbone(cfg)
        cfg.router_pretrain.max_samples = max(1, int(cfg.data.synthetic.num_train * fraction))
        cfg.run_dir = str(root / f"router_size_{cfg.router_pretrain.max_samples}")
        from mose_lightning.stages.router_pretrain import run_router_pretrain

        _, metrics = run_router_pretrain(cfg)
        router_sizes.append((cfg.router_pretrain.max_samples, metrics))
    lines += ["", "Router pretraining data size (Table 2 in miniature): held-out router accuracy", "",
              "| annotated samples | " + " | ".join(k for k in router_sizes[0][1] if k.startswith("router/acc/")) + " |",
              "|---" * (1 + sum(1 for k in router_sizes[0][1] if k.startswith("router/acc/"))) + "|"]
    for size, metrics in router_sizes:
        lines.append(f"| {size} | " + " | ".join(f"{v:.3f}" for k, v in metrics.items() if k.startswith("router/acc/")) + " |")
    table = "\n".join(lines) + "\n"
    atomic_write_text(root / "table.md", table)
    atomic_write_json(root / "results.json", {"table1": results, "scaling": {k: {str(f): v for f, v in d.items()} for k, d in scaling.items()},
                                              "router_sizes": router_sizes})
    print(table)
    print(f"run dir: {root}")
    return root
