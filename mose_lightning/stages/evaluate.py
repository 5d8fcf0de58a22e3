"""Stage: single-round generation on a test split, then scores, tables, plots and the HTML report.

Generation runs as Lightning's predict loop, so `trainer.devices=N trainer.strategy=ddp` spreads it over ranks;
the DataModule hands every sample to exactly one rank, each rank appends its records to its own part file, and
rank 0 merges the parts (dropping the padding copies) into predictions.jsonl. MoSE routing is decided once per
sample from the prompt and reused for every generated token; the chosen skill per MoE layer is written with the
prediction as its skill chain.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from mose_lightning import locks
from mose_lightning.checkpoint import load_model
from mose_lightning.config import ConfigError, ExperimentConfig
from mose_lightning.data import skips
from mose_lightning.data.datamodule import DriveDataModule
from mose_lightning.data.shards import IncompleteData
from mose_lightning.evaluation.local_metrics import local_scores
from mose_lightning.evaluation.report import write_results
from mose_lightning.evaluation.routing_metrics import derangement, routing_scores, skill_chains
from mose_lightning.io import atomic_write_json, atomic_write_text
from mose_lightning.params import parameter_report
from mose_lightning.training import (
    apply_threads, devices_arg, is_global_zero, lock_run_dir, precision_and_plugins, run_dir_for,
)


def decode_new_tokens(model, tokens: torch.Tensor) -> List[str]:
    tokenizer = getattr(model.processor, "tokenizer", model.processor)
    return [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]


class GenerationModule(pl.LightningModule):
    """predict_step: one batch of prompts -> its prediction records and expert usage (for `PredictionWriter`)."""

    def __init__(self, model, cfg: ExperimentConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg

    def predict_step(self, batch: Dict[str, Any], batch_idx: int):
        source = self.cfg.eval.route_source
        # A seed per batch, so the shuffled control is the same however the batches are spread over ranks.
        shuffle = (derangement(len(batch["meta"]), self.cfg.eval.shuffle_seed * 1_000_003 + batch_idx)
                   if source == "shuffled" else None)
        generated = self.model.generate(batch, self.cfg.eval.max_new_tokens, route_source=source, shuffle=shuffle)
        texts = decode_new_tokens(self.model, generated.tokens)
        chains = skill_chains(generated.routes, self.model.taxonomy)
        views = view_records(generated.views, batch["meta"], self.cfg.views) if generated.views is not None else None
        records = []
        for i, meta in enumerate(batch["meta"]):
            if meta.get("pad"):
                continue
            record = {
                "key": meta["key"], "dataset": meta["dataset"], "task": meta["task"], "question": meta["question"],
                "reference": meta["answer"], "prediction": texts[i], "category": meta["category"],
                "skills": meta["skills"], "skill_chain": chains[i] if chains else [],
                "thumbnail": meta.get("thumbnail"),
            }
            if views is not None:
                record.update(views[i])
            records.append(record)
        return {"records": records, "expert_counts": generated.expert_counts}


def view_records(routing, metas: List[Dict[str, Any]], views_cfg) -> List[Dict[str, Any]]:
    """Per sample what view routing chose: the views in the prompt (with their image tokens), every class with the
    router's probability (highest first), its top-1, the sample's labels and targets, and whether the question
    needs a view beyond the kept ones. `view_thumbnails` (the shown views' small images) is for the writer."""
    decision = routing.decision
    probs = decision.probs.tolist()
    predicted = decision.predicted.tolist()
    targets = decision.targets.tolist() if decision.targets is not None else [[] for _ in metas]
    out = []
    for i, meta in enumerate(metas):
        labels = meta.get("view_labels")
        target_names = [c for c, hot in zip(decision.classes, targets[i]) if hot]
        choice = sorted(({"view": c, "prob": round(p, 4)} for c, p, ok in
                         zip(decision.classes, probs[i], decision.available[i].tolist()) if ok),
                        key=lambda e: -e["prob"])
        thumbs = meta.get("view_thumbnails") or {}
        out.append({
            "views_shown": routing.shown[i], "view_source": decision.source,
            "image_tokens": int(routing.image_tokens[i]), "view_choice": choice,
            "view_predicted": decision.classes[predicted[i]], "view_labels": labels,
            "view_targets": target_names,
            "needs_other_view": None if labels is None else any(v not in views_cfg.kept for v in labels),
            "view_thumbnails": {name: thumbs[name] for name in routing.shown[i] if name in thumbs},
        })
    return out


class PredictionWriter(BasePredictionWriter):
    """Appends each batch's records to this rank's part file (thumbnails as JPEGs beside them) and sums the
    expert usage; rank 0 merges the parts after the loop."""

    def __init__(self, parts_dir: Path) -> None:
        super().__init__(write_interval="batch")
        self.parts_dir = parts_dir
        self.usage: Optional[torch.Tensor] = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        counts = [c for c in prediction["expert_counts"] if c is not None]
        if counts and len({c.numel() for c in counts}) == 1:
            usage = torch.stack([c.float().cpu() for c in counts])
            self.usage = usage if self.usage is None else self.usage + usage
        lines = []
        for record in prediction["records"]:
            thumbnail = record.pop("thumbnail", None)
            view_thumbnails = record.pop("view_thumbnails", None)
            record["images"] = []
            if view_thumbnails:
                # A view-routed prompt: every view it showed, labelled, in prompt order.
                (self.parts_dir.parent / "images").mkdir(parents=True, exist_ok=True)
                record["view_images"] = []
                for name, thumb in view_thumbnails.items():
                    rel = f"images/{record['key']}_{name}.jpg"
                    Image.fromarray(thumb).save(self.parts_dir.parent / rel)
                    record["view_images"].append({"view": name, "path": rel})
                    record["images"].append(rel)
            elif thumbnail is not None:
                rel = f"images/{record['key']}.jpg"
                (self.parts_dir.parent / "images").mkdir(parents=True, exist_ok=True)
                Image.fromarray(thumbnail).save(self.parts_dir.parent / rel)
                record["images"].append(rel)
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        with open(self.parts_dir / f"rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.writelines(lines)


def _merge_parts(parts_dir: Path) -> List[Dict[str, Any]]:
    records: Dict[str, Dict[str, Any]] = {}
    for part in sorted(parts_dir.glob("rank*.jsonl")):
        for line in part.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["key"]] = record
    return [records[k] for k in sorted(records)]


def score_records(records: List[Dict[str, Any]], cfg: ExperimentConfig, taxonomy=None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Local metrics and the routing accuracy of the evaluated model's routes (against the samples' skill labels)
    always; the LLM judge (CODA-LM protocol / DriveLM score) when eval.judge.enabled."""
    scores: Dict[str, Any] = {"local": local_scores(records)}
    routing = routing_scores(records, taxonomy)
    if routing is not None:
        scores["routing"] = routing
    if cfg.views.enabled:
        from mose_lightning.evaluation.view_metrics import split_by_view_need, view_scores

        view_routing = view_scores(records, cfg.views.classes)
        if view_routing is not None:
            scores["view_routing"] = view_routing
            scores["local_by_view_need"] = {part: local_scores(subset)["overall"]
                                            for part, subset in split_by_view_need(records).items() if subset}
    ratings: Dict[str, Any] = {}
    datasets = {r["dataset"] for r in records}
    if "drivelm" in datasets:
        from mose_lightning.evaluation.drivelm_metrics import drivelm_scores, needs_judge

        drivelm = [r for r in records if r["dataset"] == "drivelm"]
        chatgpt = None
        if cfg.eval.judge.enabled:
            from mose_lightning.evaluation.judge import judge_drivelm

            items = [r for r in drivelm if needs_judge(r)]
            report = judge_drivelm(items, cfg.eval.judge)
            chatgpt = {r.key: r.rating for r in report.ratings}
            ratings.update(chatgpt)
            scores["drivelm_judge"] = {k: v for k, v in report.to_dict().items() if k != "ratings"}
        scores["drivelm"] = drivelm_scores(drivelm, chatgpt)
        scores["drivelm"]["notes"] += scores.get("drivelm_judge", {}).get("notes", [])
    coda_like = [r for r in records if r["dataset"] in ("coda_lm", "synthetic") and r.get("reference")]
    if coda_like and cfg.eval.judge.enabled:
        from mose_lightning.evaluation.judge import judge_coda

        report = judge_coda(coda_like, cfg.eval.judge)
        ratings.update({r.key: r.rating for r in report.ratings})
        scores["coda"] = report.coda_scores()
    return scores, ratings


def router_pretrain_accuracy(model) -> Optional[Dict[str, float]]:
    """Held-out accuracy per level of the router pretraining the model's routers started from (the metrics.json
    beside the `moe.router_checkpoint` it was trained with), or None where that is not known."""
    checkpoint = model.cfg.moe.router_checkpoint
    if not checkpoint:
        return None
    path = Path(checkpoint).parent / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    return {key.split("/")[-1]: value for key, value in metrics.items() if key.startswith("router/acc/")}


def run_meta(model, cfg: ExperimentConfig, records: List[Dict[str, Any]]) -> Dict[str, Any]:
    counts = parameter_report(model)
    return {
        "name": cfg.name, "moe_kind": cfg.moe.kind, "num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
        "activated_params": counts["activated"], "total_params": counts["total"], "seed": cfg.seed,
        "dataset": sorted({r["dataset"] for r in records}), "split": cfg.eval.split, "n_samples": len(records),
        "router_pretrain_accuracy": router_pretrain_accuracy(model), "route_source": cfg.eval.route_source,
        **({"views": {"names": cfg.views.names, "kept": cfg.views.kept, "top_k": cfg.views.top_k,
                      "fallback": cfg.views.fallback, "eval_mode": cfg.views.eval_mode}} if cfg.views.enabled else {}),
    }


def coverage(records: List[Dict[str, Any]], expected: Optional[int], skipped: skips.SkipLog) -> Optional[Dict[str, Any]]:
    """What the evaluation did not score: None when it scored every sample the split's manifests list (`expected`;
    None with eval.limit, where only skipped samples count), else the counts with the skipped keys and shards."""
    missing = None if expected is None else expected - len(records)
    if not len(skipped) and not missing:
        return None
    keys: Dict[str, List[str]] = {}
    for r in skipped.samples:
        if r.get("key"):
            keys.setdefault(str(r["reason"]), []).append(str(r["key"]))
    return {
        "expected": expected, "scored": len(records), "missing": missing, "skipped": skipped.counts(),
        "missing_keys": {reason: sorted(set(k)) for reason, k in sorted(keys.items())},
        "damaged_shards": [{"shard": r.get("shard"), "samples_lost": r.get("samples"), "detail": r.get("detail")}
                           for r in skipped.damaged_shards],
        "skipped_file": skips.SKIPPED_FILE,
    }


def _shortfall_message(partial: Dict[str, Any], cfg: ExperimentConfig, run_dir: Path, limit: int = 8) -> str:
    split = f"data.{cfg.eval.split}_shards"
    if partial["expected"] is not None:
        head = f"evaluation scored {partial['scored']} of the {partial['expected']} samples the manifests of {split} list"
    else:
        head = f"evaluation of {split} skipped samples"
    parts = []
    if partial["damaged_shards"]:
        shards = [Path(str(d["shard"])).name + (f" ({d['samples_lost']} samples lost)" if d["samples_lost"] else "")
                  for d in partial["damaged_shards"]]
        parts.append("damaged shard(s) " + ", ".join(shards[:limit]) + (" ..." if len(shards) > limit else ""))
    keys = [k for reason_keys in partial["missing_keys"].values() for k in reason_keys]
    if keys:
        parts.append(f"{len(keys)} skipped sample(s) " + ", ".join(keys[:limit]) + (" ..." if len(keys) > limit else ""))
    detail = f": {'; '.join(parts)}" if parts else ""
    return (f"{head}{detail} (listed in {run_dir / skips.SKIPPED_FILE}; the predictions made are in "
            f"{run_dir / 'predictions.jsonl'}); set eval.allow_partial=true to score them as a partial evaluation")


def write_plots(run_dir: Path, records, usage, model) -> List[str]:
    from mose_lightning.evaluation.plots import (
        experts_similarity, last_layer_experts, plot_expert_usage, plot_skill_chain_frequency, plot_weight_similarity,
    )

    written = []
    if any(r["skill_chain"] for r in records):
        written.append(str(plot_skill_chain_frequency(records, run_dir / "skill_chains.png")))
    if model.views is not None and any(r.get("view_targets") for r in records):
        from mose_lightning.evaluation.plots import plot_view_confusion
        from mose_lightning.evaluation.view_metrics import view_scores

        result = view_scores(records, model.views.classes)
        written.append(str(plot_view_confusion(result["confusion"], result["classes"], run_dir / "view_confusion.png")))
    if usage is not None:
        labels = [f"L{i}" for i in model.layout.layer_indices][: usage.shape[0]]
        written.append(str(plot_expert_usage(usage.numpy(), labels, run_dir / "expert_usage.png")))
    last = last_layer_experts(model)
    if last is not None:
        matrix = experts_similarity(last)
        written.append(str(plot_weight_similarity(matrix, [f"E{i}" for i in range(matrix.shape[0])],
                                                  run_dir / "expert_similarity.png", transform="log")))
    return written


def run_eval(cfg: ExperimentConfig, model=None) -> Tuple[Path, Dict[str, Any]]:
    if model is None:
        if not cfg.init_from:
            raise ConfigError("checkpoint: expected a trained run directory (or its model/) to evaluate")
        model = load_model(cfg.init_from)
        model.cfg.eval = cfg.eval
    apply_threads(cfg)
    run_dir = run_dir_for(cfg, "eval")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_run_dir(run_dir, "eval")
    parts_dir = run_dir / "parts"
    if is_global_zero():
        for old in parts_dir.glob("rank*.jsonl"):
            old.unlink()
        skips.clear(run_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    data_cfg = cfg.data
    if model.views is not None:
        # What evaluation shows is an evaluation setting: this command's views.eval_mode and views.top_k.
        model.cfg.views = dataclasses.replace(model.cfg.views, eval_mode=cfg.views.eval_mode, top_k=cfg.views.top_k)
        cfg = dataclasses.replace(cfg, views=model.cfg.views)
    datamodule = DriveDataModule(data_cfg, model.adapter, model.processor, model.taxonomy, model.cfg.views)
    loader = datamodule.generation_dataloader(cfg.eval.split)
    module = GenerationModule(model, cfg)
    writer = PredictionWriter(parts_dir)
    t = cfg.trainer
    if t.strategy == "fsdp":
        # Generation runs data-parallel: a model that fits one device gains nothing from sharding, and sharded it
        # would gather every layer again for every generated token (and Lightning's own FSDP would compute the
        # routers from bf16 copies under bf16-mixed). Every rank holds the whole model, as under DDP.
        if is_global_zero():
            print("eval: trainer.strategy=fsdp generates data-parallel (ddp): every rank holds the whole model")
        t = dataclasses.replace(t, strategy="ddp")
        cfg = dataclasses.replace(cfg, trainer=t)
    precision, plugins = precision_and_plugins(cfg, model)
    trainer = pl.Trainer(accelerator=t.accelerator, devices=devices_arg(t.devices), strategy=t.strategy,
                         precision=precision, plugins=plugins, logger=False, enable_checkpointing=False,
                         callbacks=[writer, skips.SkippedSamples(run_dir)],
                         enable_model_summary=False, limit_predict_batches=(-(-cfg.eval.limit // cfg.data.eval_batch_size)
                                                                            if cfg.eval.limit else 1.0))
    trainer.predict(module, loader, return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return run_dir, {}
    records = _merge_parts(parts_dir)
    atomic_write_text(run_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    skipped = skips.merge_parts(run_dir)
    if len(skipped):
        print(f"note: {skipped.summary(run_dir / skips.SKIPPED_FILE)}")
    expected = None if cfg.eval.limit else datamodule.split_info(cfg.eval.split).total
    partial = coverage(records, expected, skipped)
    if partial is not None and not cfg.eval.allow_partial:
        # An earlier evaluation's scores beside these predictions would read as this one's.
        for name in ("scores.json", "results.md", "metrics.json", "report.html"):
            (run_dir / name).unlink(missing_ok=True)
        locks.release(run_dir)
        raise IncompleteData(_shortfall_message(partial, cfg, run_dir))
    scores, ratings = score_records(records, cfg, model.taxonomy)
    meta = run_meta(model, cfg, records)
    meta["n_expected"] = expected
    if partial is not None:
        meta["partial"] = partial
    write_results(run_dir, scores, meta)
    plots = write_plots(run_dir, records, writer.usage, model)
    from mose_lightning.evaluation.html_report import write_html_report

    write_html_report(run_dir, records, scores, ratings, max_samples=cfg.eval.html_samples, meta=meta)
    atomic_write_json(run_dir / "metrics.json", {"scores": scores, "meta": meta, "plots": plots})
    locks.release(run_dir)
    return run_dir, scores
