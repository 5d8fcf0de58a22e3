"""`make reproduce-toy`: the paper's comparisons in miniature, with controls and statistics (docs/miniature.md has
the design: what the tasks are, why they leave room, why skills could matter).

What it measures, over seeds: Table 1 (SFT, MoE 4x1, MoE 8x1, MoSE, MoSE + expert groups) beside four controls of
skill routing (MoSE evaluated with shuffled and with oracle routes, MoSE without router pretraining, MoSE on gray
images), with the eval-time routing accuracy per level and paired per-seed differences; the learning curves of
every trained row; Figure 8 (data scaling, MoE 4x1 vs MoSE), Table 2 (router-pretraining data size, and MoSE
trained with the smallest size's routers) and Figure 7 (expert weight similarity of the last MoE layer, MoE 4x1 vs
MoSE); and the prepared backbone before any fine-tuning, the starting point of every row.

On a CPU it runs the toy (configs/experiment/mini_*.yaml, whose backbone is prepared on the synthetic set's
perception-only questions and cached); on a GPU the same command takes the CODA-LM configs (coda_*.yaml), with the
backbone and data the user names on the command line.

How it runs: a plan of jobs, each one trained model with its evaluations (or one router pretraining, or one
evaluation), each in its own process (`python -m mose_lightning.miniature job ROOT NAME`), up to `--workers` at
once (the toy trains on one thread: two processes use two cores). A finished job leaves `result.json` and is
reused by the next invocation; an interrupted one starts again where its stages stopped (training from its last
checkpoint). The report (table.md, results.json, plots) is written from the result files alone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mose_lightning.config import PROJECT_ROOT, ConfigError, ExperimentConfig, load_config
from mose_lightning.io import atomic_write_json, atomic_write_text

EXPERIMENTS = PROJECT_ROOT / "configs" / "experiment"
# Table 1 rows: label, config suffix (configs/experiment/<prefix><suffix>.yaml).
TABLE1_ROWS = [("SFT", "sft"), ("MoE 4x1", "moe_4x1"), ("MoE 8x1", "moe_8x1"), ("MoSE", "mose"),
               ("MoSE + expert groups", "mose_expert_group")]
CONFIG_PREFIX = {"toy": "mini_", "coda": "coda_"}
# Evaluation-time routing of the trained MoSE model: its routers, the samples' skill labels, a derangement.
ROUTE_LABELS = {"router": "MoSE", "labels": "MoSE, oracle routes at evaluation",
                "shuffled": "MoSE, shuffled routes at evaluation"}
CONTROL_ROWS = ["MoSE, shuffled routes at evaluation", "MoSE, oracle routes at evaluation",
                "MoSE, untrained routers", "MoSE, gray images"]
CURVE_METRICS = [("val/loss", "validation loss (answer tokens)"), ("val/answer_token_acc", "validation answer-token accuracy")]


@dataclass(frozen=True)
class Settings:
    """How much of the plan a mode runs."""

    seeds: Tuple[int, ...]
    scaling_fractions: Tuple[float, ...]  # below 1 (the full data are Table 1's runs)
    scaling_seeds: Tuple[int, ...]
    router_fractions: Tuple[float, ...]  # of the annotated training samples router pretraining may use
    router_sft_seeds: Tuple[int, ...]  # MoSE trained with the smallest size's routers


MODES = {
    "default": Settings(seeds=(0, 1, 2), scaling_fractions=(0.25, 0.5), scaling_seeds=(0, 1, 2),
                        router_fractions=(0.25, 0.5, 1.0), router_sft_seeds=(0, 1, 2)),
    "quick": Settings(seeds=(0,), scaling_fractions=(0.25,), scaling_seeds=(0,),
                      router_fractions=(0.25, 1.0), router_sft_seeds=()),
}


@dataclass
class Job:
    name: str
    group: str  # the table row or figure point it feeds
    config: str  # experiment YAML, relative to the project root
    seed: int
    overrides: List[str] = field(default_factory=list)
    stage: str = "sft"  # sft | expert_group | router_pretrain | backbone_eval
    routers: str = "pretrain"  # MoSE: pretrain (router pretraining first) | none (untrained routers)
    router_samples: int = 0  # annotated samples router pretraining uses (0: as the config says)
    fraction: float = 1.0  # of the training data (data.train_limit)
    evals: Tuple[str, ...] = ("router",)
    after: Optional[str] = None  # job whose trained model this one starts from (expert groups)
    # Phase 0 fills the shared router-input caches (one at a time); jobs that pretrain routers read them and
    # start after the whole phase, the others at any time.
    phase: int = 1
    reads_router_cache: bool = False

    def spec(self) -> Dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


# --- which configs -------------------------------------------------------------------------------------------------


def choose_configs(requested: str) -> str:
    """toy | coda; auto: the CODA-LM configs where CUDA is available, the toy elsewhere."""
    if requested not in ("auto", "toy", "coda"):
        raise ConfigError(f"--configs: expected auto, toy or coda, got {requested!r}")
    if requested != "auto":
        return requested
    import torch

    return "coda" if torch.cuda.is_available() else "toy"


def check_coda_inputs(cfg: ExperimentConfig) -> None:
    """The CODA-LM configs need a local backbone and the user's shards: a ConfigError naming every missing key."""
    from mose_lightning.data.shards import ShardError, expand_shards

    missing = []
    if not cfg.backbone.path or not Path(cfg.backbone.path).is_dir():
        missing.append(f"backbone.path (a local Qwen2-VL-2B-Instruct directory; now {cfg.backbone.path!r})")
    what = {"train": "skill-annotated CODA-LM training shards (`mose data coda-lm`, then `mose skills annotate`)",
            "val": "validation shards", "test": "test shards with answers"}
    for split, text in what.items():
        spec = getattr(cfg.data, f"{split}_shards")
        try:
            ok = bool(spec) and bool(expand_shards(spec))
        except ShardError:
            ok = False
        if not ok:
            missing.append(f"data.{split}_shards ({text}; now {spec!r})")
    if missing:
        raise ConfigError("reproduce-toy on a GPU runs the CODA-LM configs (configs/experiment/coda_*.yaml) and needs "
                          "these keys as key=value overrides: " + "; ".join(missing)
                          + ". To run the toy miniature instead: --configs toy")


def config_path(configs: str, suffix: str) -> str:
    return f"configs/experiment/{CONFIG_PREFIX[configs]}{suffix}.yaml"


# --- the plan --------------------------------------------------------------------------------------------------------


def _fraction_tag(fraction: float) -> str:
    return f"{fraction:g}".replace(".", "p")


def build_plan(configs: str, mode: str, overrides: Sequence[str], train_samples: int, router_samples: int) -> List[Job]:
    """Every job of a mode, in the order they should run (what the main table needs first, seed by seed).
    `train_samples`: the size of the training split; `router_samples`: the annotated samples router pretraining
    uses with the config's settings (its router_pretrain.max_samples, or all)."""
    if mode not in MODES:
        raise ConfigError(f"mode: expected one of {sorted(MODES)}, got {mode!r}")
    s = MODES[mode]
    user = list(overrides)
    cfg = lambda suffix: config_path(configs, suffix)  # noqa: E731
    jobs: List[Job] = []
    sizes = sorted({max(1, int(round(router_samples * f))) for f in s.router_fractions})
    # 0 keeps the config's own setting, so the full size shares its router-input cache with the main rows.
    param = lambda n: 0 if n >= router_samples else n  # noqa: E731
    # Phase 0 fills the router-input caches the later jobs read (one process writing each cache file).
    for n in sizes:
        jobs.append(Job(f"routers_n{n}_s{s.seeds[0]}", "router pretraining size", cfg("mose"), s.seeds[0], user,
                        stage="router_pretrain", router_samples=param(n), phase=0))
    jobs.append(Job(f"routers_gray_s{s.seeds[0]}", "router pretraining, gray images", cfg("mose"), s.seeds[0],
                    user + ["data.blank_images=true"], stage="router_pretrain", phase=0))
    jobs.append(Job("backbone_before_sft", "backbone before SFT", cfg("sft"), s.seeds[0], user, stage="backbone_eval"))
    for seed in s.seeds:
        for label, suffix in TABLE1_ROWS:
            if suffix == "mose_expert_group":
                jobs.append(Job(f"{suffix}_s{seed}", label, cfg(suffix), seed, user, stage="expert_group",
                                after=f"mose_s{seed}"))
            elif suffix == "mose":
                jobs.append(Job(f"mose_s{seed}", label, cfg(suffix), seed, user, evals=("router", "shuffled", "labels")))
            else:
                jobs.append(Job(f"{suffix}_s{seed}", label, cfg(suffix), seed, user))
        jobs.append(Job(f"mose_untrained_routers_s{seed}", "MoSE, untrained routers", cfg("mose"), seed, user,
                        routers="none"))
        jobs.append(Job(f"mose_gray_s{seed}", "MoSE, gray images", cfg("mose"), seed, user + ["data.blank_images=true"]))
    for seed in s.scaling_seeds:
        for fraction in s.scaling_fractions:
            n = max(1, int(train_samples * fraction))
            for label, suffix in (("MoE 4x1", "moe_4x1"), ("MoSE", "mose")):
                # Annotations come from the data at hand: the routers learn from the same fraction.
                jobs.append(Job(f"{suffix}_frac{_fraction_tag(fraction)}_s{seed}", f"data scaling: {label}", cfg(suffix),
                                seed, user, fraction=fraction, router_samples=param(n)))
    if s.router_sft_seeds and sizes[0] < router_samples:
        for seed in s.router_sft_seeds:
            jobs.append(Job(f"mose_rp{sizes[0]}_s{seed}", f"MoSE, routers from {sizes[0]} annotated samples",
                            cfg("mose"), seed, user, router_samples=param(sizes[0])))
    for seed in s.seeds:
        for n in sizes:
            if seed != s.seeds[0]:
                jobs.append(Job(f"routers_n{n}_s{seed}", "router pretraining size", cfg("mose"), seed, user,
                                stage="router_pretrain", router_samples=param(n)))
    for job in jobs:
        job.reads_router_cache = job.phase == 1 and (job.stage == "router_pretrain" or (
            job.stage == "sft" and job.config.endswith("mose.yaml") and job.routers == "pretrain"))
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise AssertionError(f"duplicate job names in the plan: {names}")
    return jobs


# --- one job (in its own process) ------------------------------------------------------------------------------------


def job_dir(root: Path, name: str) -> Path:
    return root / "jobs" / name


def _job_config(job: Job) -> ExperimentConfig:
    s = job.seed
    return load_config(PROJECT_ROOT / job.config, [f"seed={s}", f"trainer.seed={s}", f"data.seed={s}", *job.overrides])


def _done(model_dir: Path) -> bool:
    return (model_dir / "weights.safetensors").is_file()


def read_curve(tb_dir: Path, step_offset: int = 0) -> Dict[str, Dict[int, float]]:
    """Validation scalars of a run's TensorBoard log: {tag: {step: value}} (the last value where a resumed run
    wrote a step twice)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not tb_dir.is_dir():
        return {}
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: Dict[str, Dict[int, float]] = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith("val/"):
            out[tag] = {int(e.step) + step_offset: float(e.value) for e in acc.Scalars(tag)}
    return out


def _scores(eval_dir: Path) -> Dict[str, Any]:
    data = json.loads((eval_dir / "scores.json").read_text())
    local = data["scores"]["local"]
    routing = data["scores"].get("routing") or {}
    usage: Dict[str, Dict[str, int]] = {}
    for line in (eval_dir / "predictions.jsonl").read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        for entry in record.get("skill_chain") or []:
            level = usage.setdefault(f"L{entry['layer']}", {})
            level[str(entry["expert"])] = level.get(str(entry["expert"]), 0) + 1
    return {
        "token_f1": {task: v["token_f1"] for task, v in local.items() if isinstance(v, dict) and "token_f1" in v},
        "local": local,
        "routing": routing.get("levels"),
        "routing_layers": routing.get("layers"),
        "expert_usage": usage,  # per MoE layer: samples each expert took while generating
        "activated": data["meta"]["activated_params"],
        "total": data["meta"]["total_params"],
        "n_samples": data["meta"]["n_samples"],
    }


def _evaluate(cfg: ExperimentConfig, model, jdir: Path, sources: Sequence[str], seed: int) -> Dict[str, Any]:
    from mose_lightning.stages.evaluate import run_eval

    out = {}
    for source in sources:
        eval_dir = jdir / f"eval_{source}"
        if not (eval_dir / "metrics.json").is_file():
            ev = copy.deepcopy(cfg)
            ev.run_dir = str(eval_dir)
            ev.eval.route_source = source
            ev.eval.shuffle_seed = seed
            model.cfg.eval = ev.eval
            run_eval(ev, model=model)
        out[source] = _scores(eval_dir)
    return out


def _router_pretrain(cfg: ExperimentConfig, run_dir: Path, samples: int) -> Dict[str, float]:
    from mose_lightning.stages.router_pretrain import run_router_pretrain

    if (run_dir / "routers.pt").is_file() and (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text())
    routers = copy.deepcopy(cfg)
    routers.moe.kind = "mose"
    routers.run_dir = str(run_dir)
    if samples:
        routers.router_pretrain.max_samples = samples
    return run_router_pretrain(routers)[1]


def run_job(root: Path, job: Job) -> Dict[str, Any]:
    """Run (or finish) one job and write its result.json; returns the result."""
    from mose_lightning import pipeline
    from mose_lightning.checkpoint import load_model, model_from_config
    from mose_lightning.data.datamodule import count_samples
    from mose_lightning.data.shards import expand_shards
    from mose_lightning.evaluation.plots import experts_similarity, last_layer_experts

    jdir = job_dir(root, job.name)
    start, cpu0 = time.time(), _cpu_seconds()
    cfg = _job_config(job)
    pipeline.ensure_synthetic_data(cfg)
    pipeline.ensure_toy_backbone(cfg)
    if job.fraction < 1.0:
        cfg.data.train_limit = max(1, int(count_samples(expand_shards(cfg.data.train_shards)) * job.fraction))
    result: Dict[str, Any] = {"spec": job.spec()}
    if job.stage == "router_pretrain":
        metrics = _router_pretrain(cfg, jdir / "pretrain_router", job.router_samples)
        result["router_pretrain"] = {k: v for k, v in metrics.items() if k.startswith("router/acc/") or k.endswith("_samples")}
    elif job.stage == "backbone_eval":
        model = model_from_config(cfg)
        result["evals"] = _evaluate(cfg, model, jdir, ("router",), job.seed)
    else:
        train_dir, offset = jdir / "train", 0
        if job.stage == "expert_group":
            from mose_lightning.stages.sft import run_expert_group

            source = job_dir(root, job.after) / "train"
            if not _done(source / "model"):
                raise RuntimeError(f"{job.name}: starts from {job.after}, which has not finished")
            cfg.init_from = str(source / "model")
            offset = json.loads((source / "metrics.json").read_text()).get("steps", 0)
            if not _done(train_dir / "model"):
                cfg.run_dir = str(train_dir)
                run_expert_group(cfg)
        else:
            from mose_lightning.stages.sft import run_sft

            if cfg.moe.kind == "mose" and job.routers == "pretrain":
                metrics = _router_pretrain(cfg, jdir / "pretrain_router", job.router_samples)
                result["router_pretrain"] = {k: v for k, v in metrics.items() if k.startswith("router/acc/") or k.endswith("_samples")}
                cfg.moe.router_checkpoint = str(jdir / "pretrain_router" / "routers.pt")
            elif cfg.moe.kind == "mose":
                cfg.moe.router_checkpoint = None
            if not _done(train_dir / "model"):
                cfg.run_dir = str(train_dir)
                run_sft(cfg)
        result["train"] = json.loads((train_dir / "metrics.json").read_text())
        result["curve"] = {k: {str(s): v for s, v in d.items()} for k, d in read_curve(train_dir / "tb", offset).items()}
        model = load_model(train_dir / "model")
        experts = last_layer_experts(model)
        result["similarity"] = experts_similarity(experts).tolist() if experts is not None else None
        result["evals"] = _evaluate(cfg, model, jdir, job.evals, job.seed)
    result["seconds"] = round(time.time() - start, 1)
    result["cpu_seconds"] = round(_cpu_seconds() - cpu0, 1)
    atomic_write_json(jdir / "result.json", result)
    return result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_result(root: Path, job: Job) -> Optional[Dict[str, Any]]:
    path = job_dir(root, job.name) / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("spec") == job.spec() else None


# --- running the plan ------------------------------------------------------------------------------------------------


def _check_specs(root: Path, jobs: Sequence[Job]) -> None:
    """A job directory made with other settings is never mixed into this plan's results."""
    stale = []
    for job in jobs:
        spec_file = job_dir(root, job.name) / "spec.json"
        if spec_file.is_file() and json.loads(spec_file.read_text()) != job.spec():
            stale.append(str(job_dir(root, job.name)))
    if stale:
        raise ConfigError(f"{len(stale)} job directories under {root} were made with other settings (e.g. {stale[0]}): "
                          "remove them, or give another --root")


def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s"


def run_plan(root: Path, jobs: Sequence[Job], workers: int, env: Optional[Mapping[str, str]] = None,
             launcher: Optional[Sequence[str]] = None, loads: Optional[List[float]] = None) -> Dict[str, Dict[str, Any]]:
    """Run the jobs without a result, up to `workers` at once (phase 0 jobs one at a time, a job after the one it
    starts from), each in its own process logging to its job folder; print progress. Returns every job's result.
    `loads`: the machine's 1-minute load average is appended to it every 30 s (what else ran beside the jobs)."""
    _check_specs(root, jobs)
    atomic_write_json(root / "plan.json", [j.spec() for j in jobs])
    results = {j.name: r for j in jobs if (r := load_result(root, j)) is not None}
    todo = [j for j in jobs if j.name not in results]
    total, reused = len(jobs), len(results)
    if reused:
        print(f"[reproduce] {reused} of {total} jobs finished in an earlier run: reused", flush=True)
    launcher = list(launcher or [sys.executable, "-m", "mose_lightning.miniature", "job"])
    jobs_by_name = {j.name: j for j in jobs}
    running: Dict[str, Tuple[subprocess.Popen, float, Any]] = {}
    durations: List[float] = []
    start = last_load = time.time()
    failed: List[str] = []

    def ready(job: Job) -> bool:
        # Phase 0 writes the router-input caches: one such job at a time, and no job that reads them meanwhile.
        filling = [n for n in running if jobs_by_name[n].phase == 0]
        if job.phase == 0:
            return not filling
        if job.reads_router_cache and (filling or any(j.phase == 0 for j in todo)):
            return False
        return job.after is None or job.after in results

    while todo or running:
        while not failed and len(running) < workers:
            job = next((j for j in todo if ready(j)), None)
            if job is None:
                break
            todo.remove(job)
            jdir = job_dir(root, job.name)
            jdir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(jdir / "spec.json", job.spec())
            log = open(jdir / "log.txt", "a")
            proc = subprocess.Popen([*launcher, str(root), job.name], stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})}, cwd=os.getcwd())
            running[job.name] = (proc, time.time(), log)
            print(f"[reproduce] start {job.name} ({job.group}, seed {job.seed}); log: {jdir / 'log.txt'}", flush=True)
        if not running:
            break
        time.sleep(0.5)
        if loads is not None and time.time() - last_load >= 30:
            loads.append(os.getloadavg()[0])
            last_load = time.time()
        for name, (proc, began, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            took = time.time() - began
            if proc.returncode != 0:
                failed.append(name)
                tail = (job_dir(root, name) / "log.txt").read_text(errors="replace").splitlines()[-25:]
                print(f"[reproduce] FAILED {name} (exit {proc.returncode}); the end of its log:\n  " + "\n  ".join(tail),
                      flush=True)
                continue
            result = load_result(root, jobs_by_name[name])
            if result is None:
                failed.append(name)
                print(f"[reproduce] FAILED {name}: it exited without a result.json", flush=True)
                continue
            results[name] = result
            durations.append(took)
            done = len(results)
            left = total - done
            rate = sum(durations) / len(durations) / max(1, workers)
            print(f"[reproduce] done {name} in {_format_duration(took)}: {done}/{total} jobs, "
                  f"{_format_duration(time.time() - start)} elapsed, about {_format_duration(left * rate)} left",
                  flush=True)
    if failed:
        raise SystemExit(f"[reproduce] {len(failed)} job(s) failed ({', '.join(failed)}); the finished ones are kept: "
                         "run the same command again to go on")
    return results


# --- the report ------------------------------------------------------------------------------------------------------


def _overall(evaluation: Mapping[str, Any]) -> Optional[float]:
    return evaluation["token_f1"].get("overall")


def _row_evals(jobs: Sequence[Job], results: Mapping[str, Dict], group: str, source: str = "router") -> Dict[int, Dict]:
    return {j.seed: results[j.name]["evals"][source] for j in jobs
            if j.group == group and j.fraction == 1.0 and j.name in results and source in results[j.name].get("evals", {})}


def table_rows(jobs: Sequence[Job], results: Mapping[str, Dict]) -> List[Tuple[str, Dict[int, Dict]]]:
    """(label, {seed: evaluation}) of Table 1 and its controls, in table order."""
    rows = [(label, _row_evals(jobs, results, label)) for label, _ in TABLE1_ROWS]
    rows += [(ROUTE_LABELS["shuffled"], _row_evals(jobs, results, "MoSE", "shuffled")),
             (ROUTE_LABELS["labels"], _row_evals(jobs, results, "MoSE", "labels")),
             ("MoSE, untrained routers", _row_evals(jobs, results, "MoSE, untrained routers")),
             ("MoSE, gray images", _row_evals(jobs, results, "MoSE, gray images"))]
    return [(label, evals) for label, evals in rows if evals]


def paired_comparisons(rows: Mapping[str, Dict[int, Dict]]) -> List[Tuple[str, Dict[str, Any]]]:
    from mose_lightning.evaluation.statistics import paired_difference

    pairs = [("MoSE", "MoE 4x1"), ("MoSE", ROUTE_LABELS["shuffled"]), (ROUTE_LABELS["labels"], "MoSE"),
             ("MoSE", "MoSE, untrained routers"), ("MoSE + expert groups", "MoSE"), ("MoSE", "SFT")]
    out = []
    for a, b in pairs:
        if a in rows and b in rows:
            diff = paired_difference({s: _overall(e) for s, e in rows[a].items()}, {s: _overall(e) for s, e in rows[b].items()})
            out.append((f"{a} − {b}", diff))
    return out


def _curves(jobs: Sequence[Job], results: Mapping[str, Dict]) -> Dict[str, Dict[str, Dict[int, Tuple[float, Optional[float]]]]]:
    from mose_lightning.evaluation.statistics import summary

    groups: Dict[str, Dict[str, Dict[int, List[float]]]] = {}
    for job in jobs:
        result = results.get(job.name)
        if not result or "curve" not in result or job.fraction != 1.0 or job.name.startswith("mose_rp"):
            continue
        for tag, points in result["curve"].items():
            for step, value in points.items():
                groups.setdefault(job.group, {}).setdefault(tag, {}).setdefault(int(step), []).append(value)
    return {g: {tag: {step: (summary(v)["mean"], summary(v)["std"]) for step, v in sorted(pts.items())}
                for tag, pts in by_tag.items()} for g, by_tag in groups.items()}


def _levels(rows: Mapping[str, Dict[int, Dict]]) -> List[str]:
    for evals in rows.values():
        for e in evals.values():
            if e.get("routing"):
                return list(e["routing"])
    return []


def write_report(root: Path, out: Path, jobs: Sequence[Job], results: Mapping[str, Dict], settings: Settings,
                 configs: str, wall_seconds: Optional[float] = None, main_cpu_seconds: float = 0.0,
                 loads: Sequence[float] = (), workers: int = 1) -> str:
    """table.md, results.json and the plots under `out`, from the jobs' results; returns the table text."""
    from mose_lightning.evaluation.plots import (
        plot_data_scaling, plot_learning_curves, plot_weight_similarity_panels,
    )
    from mose_lightning.evaluation.statistics import format_mean_std, summary

    out.mkdir(parents=True, exist_ok=True)
    rows = dict(table_rows(jobs, results))
    tasks = sorted({t for evals in rows.values() for e in evals.values() for t in e["token_f1"] if t != "overall"})
    levels = _levels(rows)
    seeds = sorted({s for evals in rows.values() for s in evals})
    lines: List[str] = []
    add = lines.append
    add(f"Table 1 in miniature ({configs} configs): token F1 (0-1) on the test split, mean ± std over seeds {seeds}; "
        "routing = eval-time routing accuracy per level of the evaluated model's routes against the skill labels")
    add("")
    add("| Method | Activated | Total | " + " | ".join(tasks) + " | Overall | Routing " + " / ".join(levels) + " | seeds |")
    add("|---" * (len(tasks) + 6) + "|")
    before = results.get("backbone_before_sft")
    if before:
        e = before["evals"]["router"]
        add(f"| Backbone before SFT (every row's start) | {e['activated']:,} | {e['total']:,} | "
            + " | ".join(f"{e['token_f1'].get(t, float('nan')):.3f}" for t in tasks)
            + f" | {_overall(e):.3f} | - | 1 |")
    for label, evals in rows.items():
        first = next(iter(evals.values()))
        cells = [format_mean_std(summary(e["token_f1"].get(t) for e in evals.values())) for t in tasks + ["overall"]]
        routing = "-"
        if levels and first.get("routing"):
            routing = " / ".join(format_mean_std(summary((e.get("routing") or {}).get(lv) for e in evals.values()), 2)
                                 for lv in levels)
        add(f"| {label} | {first['activated']:,} | {first['total']:,} | " + " | ".join(cells) + f" | {routing} | {len(evals)} |")
    pairs = paired_comparisons(rows)
    if pairs:
        add("")
        add("Paired differences of overall token F1, seed by seed (same seed = same data order and initialisation); "
            "95% CI: t interval of the mean difference")
        add("")
        add("| Difference | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | 95% CI | seeds > 0 |")
        add("|---" * (len(seeds) + 4) + "|")
        for name, diff in pairs:
            by_seed = diff["by_seed"]
            cells = [f"{by_seed[s]:+.3f}" if s in by_seed else "-" for s in seeds]
            ci = (f"[{diff['mean'] - diff['ci95']:+.3f}, {diff['mean'] + diff['ci95']:+.3f}]"
                  if diff.get("ci95") is not None else "-")
            add(f"| {name} | " + " | ".join(cells) + f" | {format_mean_std(diff, signed=True)} | {ci} | "
                f"{diff['positive']}/{diff['n']} |")
    # Learning curves: the table of validation answer-token accuracy by step, and the plot.
    curves = _curves(jobs, results)
    if curves:
        plot_learning_curves(curves, CURVE_METRICS, out / "learning_curves.png")
        acc = {g: c.get("val/answer_token_acc", {}) for g, c in curves.items()}
        steps = sorted({s for pts in acc.values() for s in pts})
        add("")
        add("Learning curves: validation answer-token accuracy (teacher-forced) by optimiser step, mean over seeds "
            "(learning_curves.png also shows the validation loss)")
        add("")
        add("| Run | " + " | ".join(str(s) for s in steps) + " |")
        add("|---" * (len(steps) + 1) + "|")
        for group, pts in acc.items():
            add(f"| {group} | " + " | ".join(f"{pts[s][0]:.3f}" if s in pts else "" for s in steps) + " |")
    # Figure 8: data scaling.
    scaling: Dict[str, Dict[float, Tuple[float, float]]] = {}
    scaling_rows: Dict[str, Dict[float, Dict[str, Any]]] = {}
    for label in ("MoE 4x1", "MoSE"):
        points: Dict[float, List[float]] = {}
        for job in jobs:
            if job.name in results and (job.group == f"data scaling: {label}" or (job.group == label and job.fraction == 1.0)):
                if job.group == label and job.seed not in settings.scaling_seeds:
                    continue
                points.setdefault(job.fraction, []).append(_overall(results[job.name]["evals"]["router"]))
        if len(points) > 1:
            stats = {f: summary(v) for f, v in sorted(points.items())}
            scaling[label] = {f: (st["mean"], st["std"] or 0.0) for f, st in stats.items()}
            scaling_rows[label] = stats
    if scaling:
        plot_data_scaling(scaling, out / "data_scaling.png", metric="overall token F1 (test)")
        fractions = sorted({f for pts in scaling.values() for f in pts})
        add("")
        add(f"Data scaling (Figure 8 in miniature): overall token F1 on the test split, mean ± std over seeds "
            f"{list(settings.scaling_seeds)}; the same number of optimiser steps at every size; routers pretrained "
            "on the same fraction")
        add("")
        add("| training data | " + " | ".join(scaling_rows) + " | MoSE − MoE 4x1 (paired) |")
        add("|---" * (len(scaling_rows) + 2) + "|")
        for fraction in fractions:
            cells = [format_mean_std(scaling_rows[label].get(fraction, {})) for label in scaling_rows]
            diff = "-"
            if len(scaling_rows) == 2:
                from mose_lightning.evaluation.statistics import paired_difference

                per = {}
                for label in scaling_rows:
                    per[label] = {j.seed: _overall(results[j.name]["evals"]["router"]) for j in jobs
                                  if j.name in results and j.fraction == fraction and j.seed in settings.scaling_seeds
                                  and j.group in (label, f"data scaling: {label}")}
                diff = format_mean_std(paired_difference(per["MoSE"], per["MoE 4x1"]), signed=True)
            add(f"| {fraction:g} | " + " | ".join(cells) + f" | {diff} |")
    # Table 2: router-pretraining data size.
    sizes: Dict[int, List[Dict[str, float]]] = {}
    for job in jobs:
        if job.stage == "router_pretrain" and job.group == "router pretraining size" and job.name in results:
            metrics = results[job.name]["router_pretrain"]
            sizes.setdefault(int(metrics["train_samples"]), []).append(metrics)
    if sizes:
        keys = [k for k in next(iter(sizes.values()))[0] if k.startswith("router/acc/")]
        add("")
        add("Router pretraining data size (Table 2 in miniature): held-out (validation split) router accuracy, "
            "mean ± std over router-pretraining seeds")
        add("")
        add("| annotated samples | " + " | ".join(k.split("/")[-1] for k in keys) + " | seeds |")
        add("|---" * (len(keys) + 2) + "|")
        for n, runs in sorted(sizes.items()):
            add(f"| {n} | " + " | ".join(format_mean_std(summary(r.get(k) for r in runs)) for k in keys) + f" | {len(runs)} |")
        rp_jobs = [j for j in jobs if j.name.startswith("mose_rp") and j.name in results]
        if rp_jobs and "MoSE" in rows:
            n = int(results[rp_jobs[0].name]["router_pretrain"]["train_samples"])
            small = {j.seed: results[j.name]["evals"]["router"] for j in rp_jobs}
            full = {s: e for s, e in rows["MoSE"].items() if s in small}
            from mose_lightning.evaluation.statistics import paired_difference

            diff = paired_difference({s: _overall(e) for s, e in small.items()}, {s: _overall(e) for s, e in full.items()})
            add("")
            add(f"MoSE trained with routers from {n} annotated samples: overall token F1 "
                f"{format_mean_std(summary(_overall(e) for e in small.values()))} (routing "
                + " / ".join(format_mean_std(summary((e.get('routing') or {}).get(lv) for e in small.values()), 2)
                             for lv in levels)
                + f"), against {format_mean_std(summary(_overall(e) for e in full.values()))} with all of them; "
                f"paired difference {format_mean_std(diff, signed=True)} over seeds {sorted(small)}")
    # Figure 7: expert similarity of the last MoE layer, MoE 4x1 vs MoSE.
    panels = {}
    sim_stats = {}
    for label in ("MoE 4x1", "MoSE"):
        sims = [(j.seed, results[j.name].get("similarity")) for j in jobs
                if j.group == label and j.fraction == 1.0 and j.name in results and results[j.name].get("similarity")]
        if sims:
            import numpy as np

            seed, first = min(sims, key=lambda t: t[0])
            panels[f"{label} (seed {seed})"] = (first, [f"E{i}" for i in range(len(first))])
            offdiag = [float(np.asarray(m)[~np.eye(len(m), dtype=bool)].mean()) for _, m in sims]
            sim_stats[label] = summary(offdiag)
    if panels:
        plot_weight_similarity_panels(panels, out / "expert_similarity.png", transform="log")
        add("")
        add("Expert weight similarity of the last MoE layer (Figure 7 in miniature, expert_similarity.png): mean "
            "off-diagonal cosine similarity of the routed experts' weights, mean ± std over seeds (the experts start "
            "as copies of one FFN, cosine 1)")
        add("")
        add("| model | mean off-diagonal cosine |")
        add("|---|---|")
        for label, st in sim_stats.items():
            add(f"| {label} | {format_mean_std(st, 4)} |")
    if wall_seconds is not None:
        cpu = sum(r.get("cpu_seconds", 0.0) for r in results.values())
        add("")
        add(f"Wall time of this invocation: {_format_duration(wall_seconds)} ({workers} job(s) at a time on "
            f"{os.cpu_count()} CPUs); CPU time: {_format_duration(main_cpu_seconds)} in the main process "
            f"(preparation), {_format_duration(cpu)} in the jobs (reused ones included)"
            + (f"; the machine's 1-minute load average during the jobs: mean {sum(loads) / len(loads):.1f}, "
               f"max {max(loads):.1f}" if loads else ""))
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "table.md", table)
    atomic_write_json(out / "results.json", {
        "configs": configs, "settings": dataclasses.asdict(settings),
        "table1": {label: {str(s): e for s, e in evals.items()} for label, evals in rows.items()},
        "paired": {name: diff for name, diff in pairs},
        "backbone_before_sft": before["evals"]["router"] if before else None,
        "curves": {g: {tag: {str(s): v for s, v in pts.items()} for tag, pts in c.items()} for g, c in curves.items()},
        "data_scaling": {label: {str(f): st for f, st in stats.items()} for label, stats in scaling_rows.items()},
        "router_sizes": {str(n): runs for n, runs in sizes.items()},
        "similarity": {name: m for name, (m, _) in panels.items()},
        "jobs": {name: {"seconds": r.get("seconds"), "cpu_seconds": r.get("cpu_seconds")} for name, r in results.items()},
    })
    return table


# --- entry points ------------------------------------------------------------------------------------------------------


def _prepare(configs: str, overrides: Sequence[str]) -> Tuple[int, int]:
    """Shared inputs before any job: on the toy the synthetic set and the prepared backbone (one process each,
    once); the training-set size and the annotated samples router pretraining may use."""
    from mose_lightning import pipeline
    from mose_lightning.data.datamodule import count_samples
    from mose_lightning.data.shards import expand_shards

    cfg = load_config(EXPERIMENTS / f"{CONFIG_PREFIX[configs]}mose.yaml", list(overrides))
    if configs == "coda":
        check_coda_inputs(cfg)
    else:
        pipeline.ensure_synthetic_data(cfg)
        pipeline.ensure_toy_backbone(cfg)
    n = count_samples(expand_shards(cfg.data.train_shards))
    return n, min(n, cfg.router_pretrain.max_samples) if cfg.router_pretrain.max_samples else n


def run_reproduce(overrides: Sequence[str] = (), quick: bool = False, configs: str = "auto",
                  workers: Optional[int] = None, root: Optional[str] = None) -> Path:
    configs = choose_configs(configs)
    mode = "quick" if quick else "default"
    root_dir = Path(root or f"runs/reproduce_{'toy' if configs == 'toy' else 'coda'}{'_quick' if quick else ''}")
    workers = workers or (2 if configs == "toy" else 1)
    start = time.time()
    print(f"[reproduce] {mode} plan on the {configs} configs, {workers} job(s) at a time, in {root_dir}", flush=True)
    train_samples, router_samples = _prepare(configs, overrides)
    jobs = build_plan(configs, mode, overrides, train_samples, router_samples)
    # One intra-op thread per toy process: two processes on two cores beat one process on two threads.
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if configs == "toy" else {}
    loads: List[float] = []
    results = run_plan(root_dir, jobs, workers, env, loads=loads)
    table = write_report(root_dir, root_dir, jobs, results, MODES[mode], configs, time.time() - start,
                         _cpu_seconds(), loads, workers)
    print()
    print(table)
    print(f"plots: {', '.join(str(p) for p in sorted(root_dir.glob('*.png')))}")
    print(f"run dir: {root_dir}")
    return root_dir


def _job_main(argv: Sequence[str]) -> None:
    from mose_lightning.cli import _quiet_known_warnings, apply_cpu_training_settings

    root, name = Path(argv[0]), argv[1]
    plan = {spec["name"]: spec for spec in json.loads((root / "plan.json").read_text())}
    spec = dict(plan[name])
    spec["evals"] = tuple(spec["evals"])
    job = Job(**spec)
    _quiet_known_warnings()
    apply_cpu_training_settings(_job_config(job))
    run_job(root, job)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mose reproduce-toy", description=__doc__.split("\n\n")[0], add_help=add_help)
    p.add_argument("--quick", action="store_true", help="one seed and fewer extras (about a quarter of the default)")
    p.add_argument("--configs", default="auto", choices=["auto", "toy", "coda"],
                   help="toy (mini_*.yaml) or CODA-LM (coda_*.yaml); auto: CODA-LM where CUDA is available")
    p.add_argument("--workers", type=int, default=None, help="jobs at once (default: 2 on the toy, 1 on CODA-LM)")
    p.add_argument("--root", default=None, help="where jobs and the report go (default runs/reproduce_<configs>[_quick])")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every job")
    return p


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "job":
        _job_main(sys.argv[2:])
    else:
        args = build_parser().parse_args()
        run_reproduce(args.overrides, args.quick, args.configs, args.workers, args.root)
