"""Camera-view routing: what showing all views, the front view only, or the router's top-1 / top-2 costs, and what
it answers, on the multi-view synthetic set.

    python -m benchmarks.view_routing [--json] [--config YAML] [--seeds 0,1,2] [--steps N] [--samples N]
                                      [--batch-size B] [--sizes toy,medium] [--work-dir DIR] [--tiny]

One model per seed (--config, default configs/experiment/toy_view_moe.yaml: the toy, stage 1 teacher forcing with
other views shown at random beside the labelled one, so that prompts with all views are in its training
distribution) is trained on the multi-view synthetic set (generated into --work-dir if missing; trained models
are kept there and reused). Every model then answers the test split in five modes:
  all      the six views, all encoded          kept     CAM_FRONT only
  routed1  CAM_FRONT + the router's top-1       routed2  CAM_FRONT + the router's top-2
  labels   CAM_FRONT + the labelled view (an oracle router: the ceiling of routing)
Answer quality: token F1 and exact match (greedy, data.eval max_new_tokens), split by whether the question needs a
view other than CAM_FRONT; mean and sample std over seeds. Router: top-1 accuracy and macro-F1 against the labels.

Cost per mode on one prompt batch (--batch-size prompts from the test split), timed round-robin
(common.time_interleaved): the prefill = vision tower on the views the mode encodes (kept views, the router, the
chosen views) + the language model's forward on the assembled prompt; image tokens and images encoded per sample;
peak memory of one prefill (CPU: the peak of the running sum of the profiler's allocation and free events, i.e.
the tensors PyTorch allocates; CUDA: max_memory_allocated over the allocation before). Sizes: `toy` (the trained seed-0 model) and `medium` (the
same with a language model of hidden size 512 and untrained weights: timing does not depend on them), where the
language model's cost is large enough against fixed per-call costs for token counts to show.

Goals (synthetic set): routed1 uses at most 2/6 of the all-views image tokens; its prefill is at least 2x faster
than all views; on view-dependent questions its token F1 is clearly above kept (by more than 0.05 and by more than
twice the larger seed std) and within seed noise of all (|difference| <= twice the larger seed std, needs >= 2
seeds). Reported as measured, met or not.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks.common import base_parser, emit, format_table, log, machine_info, setup, time_interleaved
from benchmarks.datamodule import TOY_SIZES, temp_dir

NAME = "view_routing"
TRAINS_MODELS = True  # one toy model per seed before anything is timed: not part of a plain `make bench`
PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT / "configs" / "experiment" / "toy_view_moe.yaml"
# mode -> (view source of generate / forward, views.top_k)
MODES = {"all": ("all", 1), "kept": ("kept", 1), "routed1": ("router", 1), "routed2": ("router", 2),
         "labels": ("labels", 1)}
MiB = 1024 * 1024


def build_parser():
    parser = base_parser("Cost and answer quality of camera-view routing: all views, front only, routed top-1/2.", 5, 1)
    parser.add_argument("--config", default=None, help="a views.enabled experiment YAML (default: toy_view_moe)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--steps", type=int, default=0, help="training steps per model (0: the config's)")
    parser.add_argument("--samples", type=int, default=150, help="test samples answered per mode")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts in the timed batch")
    parser.add_argument("--sizes", default="toy,medium", help="model sizes timed: toy (trained), medium (untrained)")
    parser.add_argument("--work-dir", default=str(PROJECT / "artifacts" / "bench_view_routing"),
                        help="where the data and the trained models are kept (reused when present)")
    return parser


def peak_memory(fn, device: torch.device) -> Optional[float]:
    """MiB one call of `fn` allocates at its peak, beyond what was allocated before (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MiB
    # CPU: the profiler's allocation and free events in time order; their running sum peaks at the call's peak.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for _, delta in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                           if e.self_cpu_memory_usage):
        running += delta
        peak = max(peak, running)
    return peak / MiB


def _config(args, work: Path, seed: int, data: Path, extra: List[str]):
    from mose_lightning.config import load_config

    overrides = [f"data.train_shards={data / 'train'}", f"data.val_shards={data / 'val'}",
                 f"data.test_shards={data / 'test'}", f"backbone.toy_dir={work / 'toy'}", f"seed={seed}",
                 f"trainer.seed={seed}", f"data.seed={seed}"] + extra
    if args.steps:
        overrides.append(f"trainer.max_steps={args.steps}")
    return load_config(args.config or DEFAULT_CONFIG, overrides)


def _data(args, work: Path) -> Path:
    from data_recipes.synthetic import generate_synthetic_multiview
    from mose_lightning.config import load_config
    from mose_lightning.data.shards import is_complete

    cfg = load_config(args.config or DEFAULT_CONFIG)
    s = cfg.views.synthetic
    sizes = (16, 4, 8) if args.tiny else (s.num_train, s.num_val, max(s.num_test, args.samples))
    out = work / ("data_tiny" if args.tiny else "data")
    if not all(is_complete(out / split) for split in ("train", "val", "test")):
        log(f"[{NAME}] multi-view synthetic set {sizes} -> {out}")
        generate_synthetic_multiview(out, *sizes, seed=0, width=s.image_width, height=s.image_height,
                                     cameras=cfg.views.names, overwrite=True, maxcount=max(1, sizes[0] // 8),
                                     show_progress=False)
    return out


def _trained(args, work: Path, seed: int, data: Path):
    """The seed's model: trained once into work/, loaded after."""
    from mose_lightning.checkpoint import load_model
    from mose_lightning.stages.sft import run_sft

    from mose_lightning import pipeline

    steps = 2 if args.tiny else args.steps
    run_dir = work / f"{'tiny_' if args.tiny else ''}seed{seed}{f'_steps{steps}' if steps else ''}"
    extra = [f"run_dir={run_dir}"] + (["trainer.max_steps=2", "trainer.val_every_n_steps=2", "data.batch_size=4",
                                       "backbone.init_checkpoint=null"] if args.tiny else [])
    cfg = _config(args, work, seed, data, extra)
    cfg = pipeline.prepare(cfg, "sft")  # the toy's instruction tuning, when the config starts from it and it is missing
    if not (run_dir / "model" / "weights.safetensors").is_file():
        log(f"[{NAME}] training seed {seed} ({cfg.trainer.max_steps} steps) -> {run_dir}")
        start = time.perf_counter()
        run_sft(cfg)
        log(f"[{NAME}]   trained in {time.perf_counter() - start:.0f}s")
    return load_model(run_dir / "model"), cfg


def _loader(model, cfg, split: str, batch_size: int):
    import dataclasses

    from mose_lightning.data.datamodule import DriveDataModule

    views = dataclasses.replace(model.cfg.views, eval_mode="all")  # every sample must fit with all its views
    data = dataclasses.replace(cfg.data, eval_batch_size=batch_size)
    return DriveDataModule(data, model.adapter, model.processor, model.taxonomy, views).generation_dataloader(split)


def _answer_quality(model, cfg, samples: int, batch_size: int, device) -> Dict[str, Dict[str, object]]:
    """Per mode: token F1 / exact match split by view need, router accuracy and macro-F1."""
    from mose_lightning.evaluation.local_metrics import normalize_answer, token_f1
    from mose_lightning.evaluation.view_metrics import ViewRoutingAccuracy
    from mose_lightning.stages.evaluate import decode_new_tokens

    model.eval()
    out = {}
    batches = []
    for batch in _loader(model, cfg, "test", batch_size):
        batches.append(batch)
        if sum(len(b["meta"]) for b in batches) >= samples:
            break
    for mode, (source, k) in MODES.items():
        model.cfg.views.top_k = k
        scores = {"needs_other_view": [], "kept_views_suffice": []}
        metric = ViewRoutingAccuracy(model.views.classes)
        tokens = 0.0
        for batch in batches:
            batch = _to(batch, device)
            generated = model.generate(batch, cfg.eval.max_new_tokens, view_source=source)
            texts = decode_new_tokens(model, generated.tokens)
            for text, meta in zip(texts, batch["meta"]):
                if meta.get("pad"):
                    continue
                need = any(v not in cfg.views.kept for v in meta["view_labels"] or [])
                scores["needs_other_view" if need else "kept_views_suffice"].append(
                    (token_f1(text, meta["answer"]), float(normalize_answer(text) == normalize_answer(meta["answer"]))))
            metric.update(generated.views.decision)
            tokens += float(generated.views.image_tokens.float().sum())
        n = sum(len(v) for v in scores.values())
        routing = metric.compute()
        out[mode] = {part: {"n": len(v), "token_f1": sum(f for f, _ in v) / max(1, len(v)),
                            "exact_match": sum(e for _, e in v) / max(1, len(v))} for part, v in scores.items()}
        out[mode].update(router_acc=routing["accuracy"], router_macro_f1=routing["macro_f1"],
                         image_tokens_per_sample=tokens / max(1, n))
        log(f"[{NAME}]   {mode}: F1 view-dependent {out[mode]['needs_other_view']['token_f1']:.3f}, "
            f"front-only {out[mode]['kept_views_suffice']['token_f1']:.3f}, router acc {routing['accuracy']}")
    model.cfg.views.top_k = cfg.views.top_k
    return out


def _to(batch: dict, device) -> dict:
    if device.type == "cpu":
        return batch
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


def _efficiency(model, cfg, batch_size: int, repeats: int, warmup: int, device) -> Dict[str, Dict[str, object]]:
    model.eval()
    batch = _to(next(iter(_loader(model, cfg, "test", batch_size))), device)
    size = len(batch["meta"])
    info = {}

    def make(source: str, k: int):
        def step():
            model.cfg.views.top_k = k
            with torch.no_grad():
                out = model(batch, with_loss=False, view_source=source)
            info[(source, k)] = out.views
        return step

    fns = {mode: make(source, k) for mode, (source, k) in MODES.items()}
    timings = time_interleaved(fns, repeats, warmup, device)
    results = {}
    for mode, (source, k) in MODES.items():
        views = info[(source, k)]
        results[mode] = {**timings[mode], "image_tokens_per_sample": float(views.image_tokens.float().mean()),
                         "images_encoded_per_sample": views.images_encoded / size,
                         "peak_memory_mib": peak_memory(fns[mode], device)}
    all_s = results["all"]["median_s"]
    for r in results.values():
        r["speedup_vs_all"] = all_s / r["median_s"]
    model.cfg.views.top_k = cfg.views.top_k
    return results


def _mean_std(values: List[float]) -> Dict[str, object]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "per_seed": values}


def run(args) -> dict:
    device, dtype = setup(args)
    from mose_lightning.model import build_model

    work = Path(args.work_dir) if not args.tiny else temp_dir("view_routing")
    work.mkdir(parents=True, exist_ok=True)
    seeds = [0] if args.tiny else [int(s) for s in args.seeds.split(",") if s != ""]
    samples, bsz = (8, 4) if args.tiny else (args.samples, args.batch_size)
    repeats, warmup = (1, 0) if args.tiny else (args.repeats, args.warmup)
    sizes = ["toy"] if args.tiny else [s for s in args.sizes.split(",") if s]
    data = _data(args, work)
    per_seed, efficiency, cfg0 = {}, {}, None
    for seed in seeds:
        model, cfg = _trained(args, work, seed, data)
        model = model.to(device)
        log(f"[{NAME}] seed {seed}: answering {samples} test samples in {len(MODES)} modes")
        per_seed[seed] = _answer_quality(model, cfg, samples, bsz, device)
        if seed == seeds[0] and "toy" in sizes:
            cfg0 = cfg
            efficiency["toy"] = _efficiency(model, cfg, bsz, repeats, warmup, device)
    if "medium" in sizes:
        cfg = _config(args, work, seeds[0], data, TOY_SIZES["medium"] + [f"backbone.toy_dir={work / 'toy_medium'}",
                                                                          "backbone.init_checkpoint=null"])
        torch.manual_seed(args.seed)
        efficiency["medium"] = _efficiency(build_model(cfg).to(device), cfg, bsz, repeats, warmup, device)
    quality = {}
    for mode in MODES:
        quality[mode] = {}
        for part in ("needs_other_view", "kept_views_suffice"):
            quality[mode][part] = {metric: _mean_std([per_seed[s][mode][part][metric] for s in seeds])
                                   for metric in ("token_f1", "exact_match")}
            quality[mode][part]["n"] = per_seed[seeds[0]][mode][part]["n"]
        for key in ("router_acc", "router_macro_f1", "image_tokens_per_sample"):
            values = [per_seed[s][mode][key] for s in seeds if per_seed[s][mode][key] is not None]
            quality[mode][key] = _mean_std(values) if values else None
    goals = _goals(quality, efficiency, len(seeds))
    cfg0 = cfg0 or _config(args, work, seeds[0], data, [])
    return {
        "benchmark": NAME,
        "machine": machine_info(device, dtype),
        "config": {"file": str(args.config or DEFAULT_CONFIG.relative_to(PROJECT)), "seeds": seeds,
                   "train_steps": 2 if args.tiny else (args.steps or cfg0.trainer.max_steps), "test_samples": samples,
                   "batch_size": bsz, "sizes": sizes,
                   "views": {"names": cfg0.views.names, "kept": cfg0.views.kept, "fallback": cfg0.views.fallback,
                             "marker": cfg0.views.marker, "extra_view_prob": cfg0.views.extra_view_prob}},
        "quality": quality,
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "results": efficiency,
        "goals_met": goals,
    }


def _goals(quality: dict, efficiency: dict, num_seeds: int) -> Dict[str, Optional[bool]]:
    goals: Dict[str, Optional[bool]] = {}
    for size, r in efficiency.items():
        goals[f"{size}/routed1_tokens_at_most_2_of_6"] = (r["routed1"]["image_tokens_per_sample"]
                                                        <= r["all"]["image_tokens_per_sample"] * 2 / 6 + 1e-9)
        goals[f"{size}/routed1_prefill_2x_faster_than_all"] = r["routed1"]["speedup_vs_all"] >= 2.0
    f1 = {mode: quality[mode]["needs_other_view"]["token_f1"] for mode in ("routed1", "kept", "all")}
    stds = [f1[m]["std"] for m in f1 if f1[m]["std"] is not None]
    noise = 2 * max(stds) if len(stds) == len(f1) else None
    margin = f1["routed1"]["mean"] - f1["kept"]["mean"]
    goals["routed1_clearly_above_kept_on_view_dependent"] = margin > 0.05 and (noise is None or margin > noise)
    goals["routed1_within_seed_noise_of_all_on_view_dependent"] = (
        None if noise is None or num_seeds < 2 else abs(f1["routed1"]["mean"] - f1["all"]["mean"]) <= noise)
    return goals


def table(result: dict) -> str:
    rows = []
    for mode, q in result["quality"].items():
        f1 = q["needs_other_view"]["token_f1"]
        front = q["kept_views_suffice"]["token_f1"]
        row = {"mode": mode, "F1 view-dep": f"{f1['mean']:.3f}" + (f" ± {f1['std']:.3f}" if f1["std"] is not None else ""),
               "F1 front-only": f"{front['mean']:.3f}",
               "router acc": "-" if not q["router_acc"] else f"{q['router_acc']['mean']:.3f}"}
        for size, r in result["results"].items():
            row[f"{size} tokens"] = f"{r[mode]['image_tokens_per_sample']:.0f}"
            row[f"{size} prefill ms"] = f"{1e3 * r[mode]['median_s']:.1f}"
            row[f"{size} x vs all"] = f"{r[mode]['speedup_vs_all']:.2f}"
        rows.append(row)
    lines = [format_table(rows, list(rows[0]))]
    lines += [f"{k}: {v}" for k, v in result["goals_met"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Training prints (progress bars, label counts) go to stderr: stdout holds the one JSON object.
    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    emit(result, args.json, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
