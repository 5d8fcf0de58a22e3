"""Router pretraining with the pooled-feature cache vs re-running the frozen backbone every epoch.

    python -m benchmarks.router_pretrain [--json] [--epochs E] [--train N --val M] [--batch-size B]
                                         [--config YAML] [--shards DIR] [--repeats N] [--threads N] [--tiny]

Both paths train the same routers (same initial weights, same seed, same samples, same epochs, same batch size
and optimiser: `RouterPretrainModule` under a Lightning Trainer, as `run_router_pretrain` does):
  cached    `cached_features` into an empty cache folder: one frozen-backbone forward per training sample
            (`extract_pooled_features`), written to disk; then E epochs of router training on the cached (N, L, H)
            features (`DataLoader(TensorDataset)`), as the stage does; here unshuffled, in the uncached loader's
            order and batches, so that both paths run the same optimisation (the stage shuffles, and also
            standardises the inputs, which the uncached path could not do without an extra pass: both train on
            raw inputs here).
  uncached  E epochs over the DataModule's prompt-only loader; every training step reads, decodes and encodes its
            samples, runs the frozen backbone (no grad) and trains the routers on the pooled inputs of that batch.
Timed: everything from "features needed" to "routers trained" (data reading and encoding included in both; the
model build and the held-out features are not). Backbone forwards are counted with a forward hook on the backbone
module (samples = rows of `input_ids` per call) and compared with the expected N and N x E; the code's own count
(`PooledFeatures.backbone_forwards`) is reported beside it. Also reported: `cache_hit` (a second `cached_features`
call on the filled cache: no forward at all), and the router accuracy per level on held-out val features after each
path (the same features for both), which must be the same.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Dict, List

import torch

from benchmarks.common import base_parser, emit, format_table, log, machine_info, setup, time_interleaved
from benchmarks.datamodule import synthetic_data, temp_dir, toy_config

NAME = "router_pretrain"
# Both paths see the same batches in the same order, so they train the same routers: accuracies agree up to one
# held-out sample (a borderline logit flipped by float reassociation), checked as `accuracy_equal`.


class ForwardCounter:
    """Forward hook on a module: calls, rows (samples) and seconds spent inside it."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = self.samples = 0
        self.seconds = 0.0
        self._t = None
        self._pre = module.register_forward_pre_hook(self._start, with_kwargs=True)
        self._post = module.register_forward_hook(self._stop, with_kwargs=True)

    def _start(self, module, args, kwargs):
        self._t = time.perf_counter()

    def _stop(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.samples += int(ids.shape[0]) if ids is not None else 0
        self.seconds += time.perf_counter() - self._t

    def reset(self) -> None:
        self.calls = self.samples = 0
        self.seconds = 0.0

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()


def _router_module_classes():
    import lightning.pytorch as pl  # noqa: F401
    from mose_lightning.stages.router_pretrain import RouterPretrainModule

    class UncachedRouterModule(RouterPretrainModule):
        """Router training whose every step runs the frozen backbone on a DataModule batch (no feature cache)."""

        def __init__(self, model, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.__dict__["frozen"] = model  # not a submodule: Lightning must not train() it or optimise it

        def training_step(self, batch, batch_idx):
            model = self.__dict__["frozen"]
            keep = [i for i, m in enumerate(batch["meta"]) if not m.get("pad", False)]
            with torch.no_grad():
                out = model(batch, with_loss=False)
                pooled = torch.stack([route.pooled for route in out.routes], dim=1)
            feats = pooled[keep].float()
            labels = batch["skill_labels"][keep]
            return super().training_step((feats, labels), batch_idx)

    return RouterPretrainModule, UncachedRouterModule


def _trainer(epochs: int):
    import lightning.pytorch as pl

    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                      limit_val_batches=0, log_every_n_steps=1)


@torch.no_grad()
def router_accuracy(module, feats: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    pred, target = module._logits(feats.float()).argmax(-1), module._targets(labels)
    accs: Dict[str, List[float]] = {}
    for j, level in enumerate(module.level_of_layer):
        ok = target[:, j] >= 0
        if ok.any():
            accs.setdefault(module.level_names[level], []).append(float((pred[:, j][ok] == target[:, j][ok]).float().mean()))
    out = {level: statistics.mean(v) for level, v in accs.items()}
    out["mean"] = statistics.mean(out.values())
    return out


def build_parser():
    parser = base_parser("Router pretraining: pooled-feature cache vs re-running the frozen backbone per epoch.", 3, 0)
    parser.add_argument("--config", default=None, help="experiment YAML (default: the toy MoSE config)")
    parser.add_argument("--shards", default=None, help="folder with train/val shard folders (default: synthetic)")
    parser.add_argument("--train", type=int, default=128, help="synthetic training samples")
    parser.add_argument("--val", type=int, default=64, help="synthetic held-out samples (accuracy)")
    parser.add_argument("--epochs", type=int, default=20, help="router training epochs (both paths; the schema default)")
    parser.add_argument("--batch-size", type=int, default=32, help="router batch = data batch (both paths)")
    return parser


def run(args) -> dict:
    device, dtype = setup(args)
    if device.type != "cpu":
        raise SystemExit("router pretraining runs on CPU in this framework (RouterPretrainModule's Trainer); use --device cpu")
    import lightning.pytorch as pl
    from mose_lightning.data.datamodule import DriveDataModule
    from mose_lightning.model import build_model
    from mose_lightning.stages.router_pretrain import cached_features
    from mose_lightning.surgery import skill_routers

    n_train, n_val, epochs, batch = (16, 8, 2, 8) if args.tiny else (args.train, args.val, args.epochs, args.batch_size)
    repeats = 1 if args.tiny else args.repeats
    warmup = 0 if args.tiny else args.warmup
    shards = args.shards or synthetic_data(n_train, n_val, 0, seed=args.seed, maxcount=32)
    cfg = toy_config(args.config, str(shards), [
        "moe.kind=mose", f"router_pretrain.epochs={epochs}", f"router_pretrain.batch_size={batch}",
        f"data.eval_batch_size={batch}", "router_pretrain.max_samples=0", f"seed={args.seed}",
    ])
    pl.seed_everything(args.seed, workers=True, verbose=False)
    model = build_model(cfg)
    dm = DriveDataModule(cfg.data, model.adapter, model.processor, model.taxonomy)
    routers = skill_routers(model.layout)
    for router in routers.values():
        router.float().requires_grad_(True)
    init_state = {i: copy.deepcopy(r.state_dict()) for i, r in routers.items()}
    levels = model.taxonomy.level_names
    level_of_layer = [levels.index(b.level_name) for b in model.layout.sequence_routed]
    num_skills = model.layout.sequence_routed[0].num_skills
    RouterPretrainModule, UncachedRouterModule = _router_module_classes()
    counter = ForwardCounter(model.backbone)

    # Held-out features (untimed, shared by both paths): accuracy is measured on exactly the same inputs.
    cfg.router_pretrain.cache_dir = str(temp_dir("router-cache-val"))
    val = cached_features(model, cfg, dm, "val")
    n_train_samples = dm.split_info("train").total
    log(f"[{NAME}] {n_train_samples} train / {len(val.keys)} val samples, {epochs} epochs, batch {batch}, "
        f"{len(routers)} MoSE layers")

    facts: Dict[str, dict] = {}

    def reset_routers():
        for i, r in routers.items():
            r.load_state_dict(init_state[i])

    def cached_path():
        reset_routers()
        counter.reset()
        cfg.router_pretrain.cache_dir = str(temp_dir("router-cache"))  # empty: a cache miss, as on a first run
        train = cached_features(model, cfg, dm, "train")
        extract = {"forward_samples": counter.samples, "forward_calls": counter.calls, "backbone_s": counter.seconds,
                   "code_reported_forwards": train.backbone_forwards}
        module = RouterPretrainModule(routers, level_of_layer, levels, num_skills, cfg)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train.features, train.labels),
                                             batch_size=batch, shuffle=False)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        _trainer(epochs).fit(module, loader)
        facts["cached"] = {**extract, "forward_samples_total": counter.samples, "train_samples": len(train.keys),
                           "accuracy": router_accuracy(module, val.features, val.labels)}
        # A second run of the stage on the same data hits the cache: no backbone forward at all.
        counter.reset()
        start = time.perf_counter()
        hit = cached_features(model, cfg, dm, "train")
        facts["cache_hit"] = {"forward_samples": counter.samples, "load_s": time.perf_counter() - start,
                              "code_reported_forwards": hit.backbone_forwards,
                              "same_features": bool(torch.equal(hit.features, train.features))}

    def uncached_path():
        reset_routers()
        counter.reset()
        module = UncachedRouterModule(model, routers, level_of_layer, levels, num_skills, cfg)
        loader = dm.loader(dm.eval_stream("train", with_answer=False), batch, "left")
        model.eval()
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        _trainer(epochs).fit(module, loader)
        facts["uncached"] = {"forward_samples": counter.samples, "forward_calls": counter.calls,
                             "backbone_s": counter.seconds,
                             "accuracy": router_accuracy(module, val.features, val.labels)}

    # Silence the stage's "cache hit" print (stdout must hold only the JSON object).
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):
        acc_init = None
        reset_routers()
        probe = RouterPretrainModule(routers, level_of_layer, levels, num_skills, cfg)
        acc_init = router_accuracy(probe, val.features, val.labels)
        timings = time_interleaved({"cached": cached_path, "uncached": uncached_path}, repeats, warmup)
    counter.remove()

    cached_s, uncached_s = timings["cached"]["median_s"], timings["uncached"]["median_s"]
    expected = {"cached": n_train_samples, "uncached": n_train_samples * epochs}
    results = {
        "cached": {**timings["cached"], "ratio_vs_uncached": cached_s / uncached_s,
                   "backbone_forward_samples": facts["cached"]["forward_samples"],
                   "expected_forward_samples": expected["cached"],
                   "code_reported_forwards": facts["cached"]["code_reported_forwards"],
                   "backbone_s": facts["cached"]["backbone_s"], "accuracy": facts["cached"]["accuracy"]},
        "uncached": {**timings["uncached"], "ratio_vs_uncached": 1.0,
                     "backbone_forward_samples": facts["uncached"]["forward_samples"],
                     "expected_forward_samples": expected["uncached"],
                     "backbone_s": facts["uncached"]["backbone_s"], "accuracy": facts["uncached"]["accuracy"]},
    }
    acc_c, acc_u = facts["cached"]["accuracy"], facts["uncached"]["accuracy"]
    diff = {k: abs(acc_c[k] - acc_u[k]) for k in acc_c}
    checks = {
        "cached_forwards_equal_samples": facts["cached"]["forward_samples"] == expected["cached"],
        "uncached_forwards_equal_samples_x_epochs": facts["uncached"]["forward_samples"] == expected["uncached"],
        "code_count_matches_hook": facts["cached"]["code_reported_forwards"] == facts["cached"]["forward_samples"],
        "cache_hit_runs_no_forward": facts["cache_hit"]["forward_samples"] == 0 and facts["cache_hit"]["same_features"],
        "accuracy_equal": max(diff.values()) <= 1.0 / len(val.keys) + 1e-9,
    }
    return {
        "benchmark": NAME,
        "machine": machine_info(device, dtype),
        "config": {
            "config": args.config or "configs/experiment/toy_mose.yaml", "backbone": cfg.backbone.name,
            "shards": args.shards or "synthetic (generated)", "train_samples": n_train_samples,
            "val_samples": len(val.keys), "epochs": epochs, "batch_size": batch, "lr": cfg.router_pretrain.lr,
            "moe_layers": len(routers), "repeats": repeats, "warmup": warmup, "seed": args.seed,
            "image_size": [cfg.data.image_width, cfg.data.image_height],
            "timed": "features (cache miss: extraction + write) + E epochs of router training (Lightning Trainer)",
        },
        "results": results,
        "speedup_cached": uncached_s / cached_s,
        "cache_hit": facts["cache_hit"],
        "accuracy_untrained": acc_init,
        "accuracy_abs_diff": diff,
        "checks": checks,
    }


def table(result: dict) -> str:
    rows = []
    for name, r in result["results"].items():
        rows.append({"path": name, "median_s": r["median_s"], "ratio_vs_uncached": r["ratio_vs_uncached"],
                     "forward samples": r["backbone_forward_samples"], "expected": r["expected_forward_samples"],
                     "backbone_s": r["backbone_s"], "acc mean": r["accuracy"]["mean"]})
    c, m = result["config"], result["machine"]
    head = (f"{NAME}: {m['cpu_model']} ({m['torch_threads']} threads), {c['train_samples']} samples x "
            f"{c['epochs']} epochs, batch {c['batch_size']}, {c['moe_layers']} MoSE layers")
    checks = ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in result["checks"].items())
    cols = ["path", "median_s", "ratio_vs_uncached", "forward samples", "expected", "backbone_s", "acc mean"]
    return f"{head}\n{format_table(rows, cols)}\nspeed-up of the cache: {result['speedup_cached']:.2f}x; {checks}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    emit(result, args.json, table)
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
