"""The `mose` command line: one subcommand per job. Stages take `--config FILE` and `key=value` overrides.

  mose params --config F [--json]              parameter counts (meta device: no weights needed)
  mose data coda-lm|drivelm|synthetic ...      dataset converters (data_recipes/)
  mose skills annotate --shards S --out DIR --annotator rule|gpt
  mose pretrain-router | sft | expert-group | eval | plan | plan-eval --config F [key=value ...]
  mose pretrain-view-router --config F [key=value ...]   view router on cached vision features (views.enabled)
  mose predict --checkpoint DIR --image IMG [--image IMG2] --question "..." [--box x,y,w,h]
  mose report RUN_DIR [RUN_DIR ...]
  mose demo [--config F] [key=value ...]
  mose reproduce-toy [--quick] [--configs auto|toy|coda] [--workers N] [--root DIR] [key=value ...]
  mose plan-compare [--seeds 0,1,2] [--out DIR] [key=value ...]

Bad input and configuration errors print one line, `error: ...`, and exit with code 2; `--debug` (anywhere on
the command line, or MOSE_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

from mose_lightning.config import PROJECT_ROOT, ConfigError, load_config, run_dir_for

# command -> (what the toy pipeline prepares for it, module, function); modules load lazily, so `mose params` and
# `mose data` start without importing Lightning.
STAGE_RUNNERS = {
    "pretrain-router": ("pretrain_router", "mose_lightning.stages.router_pretrain", "run_router_pretrain"),
    "sft": ("sft", "mose_lightning.stages.sft", "run_sft"),
    "expert-group": ("expert_group", "mose_lightning.stages.sft", "run_expert_group"),
    "eval": ("eval", "mose_lightning.stages.evaluate", "run_eval"),
    "plan": ("plan", "mose_lightning.stages.plan", "run_plan"),
    "plan-eval": ("plan_eval", "mose_lightning.stages.plan", "run_plan_eval"),
    "pretrain-view-router": ("pretrain_view_router", "mose_lightning.stages.view_pretrain", "run_view_pretrain"),
}
STAGES = tuple(STAGE_RUNNERS)
_TOY_MOSE = Path(__file__).resolve().parent.parent / "configs" / "experiment" / "toy_mose.yaml"


def _overrides(values: List[str]) -> List[str]:
    # `checkpoint=PATH` reads better on an eval command line than init_from=PATH.
    return [("init_from=" + v.split("=", 1)[1]) if v.startswith("checkpoint=") else v for v in values]


def _seeds(text: str) -> List[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise ConfigError("--seeds: expected at least one seed")
    return seeds


def _quiet_known_warnings() -> None:
    """Lightning and transformers notices that say nothing about the user's run."""
    for pattern in (".*LeafSpec.*", ".*IterableDataset.*has `__len__` defined.*", ".*module\\(s\\) in eval mode.*",
                    ".*does not have many workers.*", ".*predict returned None.*",
                    ".*infer the batch indices fetched from your dataloader.*"):
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("LITLOGGER_DISABLE_TIP", "1")


@contextmanager
def _one_rank_at_a_time(cfg):
    """Serialise the toy pipeline's preparation across the processes a launcher started, so that two ranks never
    generate the same data or train the same routers at once: the first does the work, the others find it done."""
    from mose_lightning.locks import taking_turns

    with taking_turns(Path(cfg.data.synthetic.out_dir).parent / ".prepare.lock"):
        yield


def apply_cpu_training_settings(cfg) -> None:
    """The CPU allocator settings (`trainer.cpu_allocator_tuning`) for a training command on a CPU, before any
    model is built: PyTorch reads the huge-page switch at its first large allocation."""
    from mose_lightning.cpu_memory import trains_on_cpu, tune_cpu_allocator

    if cfg.trainer.cpu_allocator_tuning and trains_on_cpu(cfg.trainer.accelerator):
        tune_cpu_allocator()


def run_stage_command(stage: str, config: str, overrides: List[str]):
    from mose_lightning.locks import lock_run_dir

    _quiet_known_warnings()
    cfg = load_config(config, _overrides(overrides))
    if stage not in STAGE_RUNNERS:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {STAGES}")
    prepared_as, module_name, function = STAGE_RUNNERS[stage]
    # Before any preparation (and before importing torch): a config error or a run directory in use is reported at
    # once, not after minutes of set-up.
    lock_run_dir(run_dir_for(cfg, prepared_as), prepared_as)
    if stage not in ("eval", "plan-eval"):
        apply_cpu_training_settings(cfg)
    from mose_lightning import pipeline

    with _one_rank_at_a_time(cfg):
        cfg = pipeline.prepare(cfg, prepared_as)
    run = getattr(importlib.import_module(module_name), function)
    run_dir, metrics = run(cfg)
    from mose_lightning.training import is_global_zero

    if is_global_zero():
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if shown:
            print(json.dumps(shown, indent=2, sort_keys=True))
        print(f"run dir: {run_dir}")
    return run_dir, metrics


def _cmd_params(args) -> None:
    from mose_lightning.model import build_model
    from mose_lightning.params import format_count, parameter_report

    cfg = load_config(args.config, _overrides(args.overrides))
    report = parameter_report(build_model(cfg, meta=True))
    if args.json:
        print(json.dumps(report))
        return
    print(f"config:            {args.config}")
    print(f"model variant:     {report['kind']}")
    print(f"total params:      {format_count(report['total'])} ({report['total']:,})")
    print(f"trainable params:  {format_count(report['trainable'])} ({report['trainable']:,})")
    print(f"activated / token: {format_count(report['activated'])} ({report['activated']:,})")
    print(f"MoE layers:        {report['moe_layers']} at decoder layers {report['moe_layer_indices']}")
    print(f"level allocation:  {report['levels']}")
    if report["reference_ffn"]:
        print(f"routing pass:      {format_count(report['reference_ffn'])} frozen dense FFN weights beside the model "
              "(moe.router_input=frozen_backbone)")


def _cmd_data(args, rest: List[str]) -> None:
    modules = {"coda-lm": "data_recipes.coda_lm", "drivelm": "data_recipes.drivelm", "synthetic": "data_recipes.synthetic",
               "nuscenes-ego": "data_recipes.nuscenes_ego"}
    if not rest or rest[0] not in modules:
        raise ConfigError(f"mose data: expected one of {sorted(modules)}, got {rest[:1]}")
    importlib.import_module(modules[rest[0]]).main(rest[1:])


def _cmd_skills(args) -> None:
    from mose_lightning.annotate.shards import annotate_shards
    from mose_lightning.skills import load_taxonomy

    cfg = load_config(args.config, _overrides(args.overrides + [f"annotate.annotator={args.annotator}"]
                                              + ([f"annotate.sample={args.sample}"] if args.sample is not None else [])))
    summary = annotate_shards(args.shards, args.out, load_taxonomy(cfg.skills.taxonomy), cfg.annotate)
    print(json.dumps(summary, indent=2, sort_keys=True))


def _cmd_predict(args) -> None:
    from mose_lightning.predict import predict_one

    box = [float(v) for v in args.box.split(",")] if args.box else None
    if box is not None and len(box) != 4:
        raise ConfigError(f"--box: expected x,y,w,h, got {args.box!r}")
    views: dict = {}
    answer, chain = predict_one(args.checkpoint, args.image, args.question, box, args.max_new_tokens, views)
    print(f"answer: {answer}")
    if views:
        print(f"views shown: {', '.join(views['shown'])}")
        print("view router: " + ", ".join(f"{name} {p:.2f}" for name, p in views["choice"]))
    print("skill chain:")
    for step in chain:
        print(f"  layer {step['layer']:>2}  {step['level']:<11} {step['skill']:<20} p={step['prob']:.2f}")
    if not chain:
        print("  (this model has no skill routers)")


def _cmd_report(args) -> None:
    from mose_lightning.evaluation.report import main as report_main

    raise SystemExit(report_main(args.run_dirs + (["--out", args.out] if args.out else [])))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mose", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of a bad-input or config error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="parameter counts of an experiment config")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*")
    sub.add_parser("data", help="convert a dataset to shards: coda-lm | drivelm | synthetic | nuscenes-ego", add_help=False)
    p = sub.add_parser("skills", help="skill annotation")
    p.add_argument("action", choices=["annotate"])
    p.add_argument("--shards", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--annotator", choices=["rule", "gpt"], default="rule")
    p.add_argument("--sample", type=int, default=None, help="annotate only this many samples")
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        p.add_argument("--config", required=True)
        p.add_argument("overrides", nargs="*")
    p = sub.add_parser("predict", help="answer one question with its skill chain")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", action="append", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--box", default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p = sub.add_parser("report", help="put several runs side by side")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default=None)
    p = sub.add_parser("demo")
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    from mose_lightning.miniature import build_parser as miniature_parser

    sub.add_parser("reproduce-toy", parents=[miniature_parser(add_help=False)],
                   help="the paper's comparisons in miniature (docs/miniature.md)")
    p = sub.add_parser("plan-compare", help="the planner variants on the synthetic set, several seeds, one table")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--out", default="runs/plan_compare")
    p.add_argument("overrides", nargs="*")
    return parser


def user_errors() -> tuple:
    """Exceptions that report bad input or configuration (their messages name the file, key or sample), as
    opposed to bugs."""
    from data_recipes.common import BadInputError
    from mose_lightning.backbones.base import BackboneError
    from mose_lightning.data.sample import SampleError
    from mose_lightning.data.shards import IncompleteData, ShardError
    from mose_lightning.locks import FolderBusy

    return (ConfigError, BadInputError, BackboneError, SampleError, ShardError, IncompleteData, FolderBusy,
            FileNotFoundError)


def _take_debug_flag(argv: List[str]) -> tuple:
    debug = "--debug" in argv or os.environ.get("MOSE_DEBUG", "") not in ("", "0")
    return [a for a in argv if a != "--debug"], debug


@contextmanager
def errors_as_one_line(debug: bool):
    """Turn a user error into `error: <message>` on stderr and exit code 2 (the traceback with debug)."""
    try:
        yield
    except user_errors() as err:
        if debug:
            raise
        text = str(err)
        if "Original Traceback" in text:  # raised in a DataLoader worker: torch prepends the worker's traceback
            text = text.strip().splitlines()[-1].split(": ", 1)[-1]
        message = " ".join(text.split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Optional[List[str]] = None) -> None:
    argv, debug = _take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    _quiet_known_warnings()
    with errors_as_one_line(debug):
        _dispatch(argv)


def _dispatch(argv: List[str]) -> None:
    if argv and argv[0] == "data":
        _cmd_data(None, argv[1:])
        return
    args = build_parser().parse_args(argv)
    if args.command == "params":
        _cmd_params(args)
    elif args.command == "skills":
        _cmd_skills(args)
    elif args.command in STAGES:
        run_stage_command(args.command, args.config, args.overrides)
    elif args.command == "predict":
        _cmd_predict(args)
    elif args.command == "report":
        _cmd_report(args)
    elif args.command == "demo":
        from mose_lightning.demo import run_demo

        apply_cpu_training_settings(load_config(args.config or _TOY_MOSE, _overrides(args.overrides)))
        run_demo(args.config, _overrides(args.overrides))
    elif args.command == "reproduce-toy":
        from mose_lightning.miniature import choose_configs, config_path, run_reproduce

        configs = choose_configs(args.configs)
        # The main process trains only the toy's one-time preparation; every job applies them in its own.
        apply_cpu_training_settings(load_config(PROJECT_ROOT / config_path(configs, "mose"), _overrides(args.overrides)))
        run_reproduce(_overrides(args.overrides), args.quick, configs, args.workers, args.root)
    elif args.command == "plan-compare":
        from mose_lightning.plan_compare import EXPERIMENTS, VARIANTS, run_plan_compare

        # Every variant trains in this process on the same base settings: the first one's config decides.
        apply_cpu_training_settings(load_config(EXPERIMENTS / f"{VARIANTS[0][1]}.yaml", _overrides(args.overrides)))
        run_plan_compare(_overrides(args.overrides), _seeds(args.seeds), args.out)


if __name__ == "__main__":
    main()
