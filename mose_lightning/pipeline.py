"""What the toy default creates when it is missing, so every make target runs on a fresh clone:
synthetic shards with rule-based skills, the toy backbone briefly instruction-tuned by a dense stage (cached),
the previous stage's output (routers for SFT, a MoSE model for expert groups, a trained model for eval).

Only the toy backbone gets this help: with a real backbone a missing input is a clear error, never a surprise
multi-hour job.
"""

from __future__ import annotations

import copy
from pathlib import Path

from mose_lightning.config import PROJECT_ROOT, AnnotateConfig, ConfigError, ExperimentConfig, load_config, resolve_path
from mose_lightning.data.shards import is_complete
from mose_lightning.skills import load_taxonomy
from mose_lightning.training import run_dir_for

SPLITS = ("train", "val", "test")
TOY_INSTRUCT_CONFIG = PROJECT_ROOT / "configs" / "experiment" / "toy_instruct.yaml"
TOY_MOSE_CONFIG = PROJECT_ROOT / "configs" / "experiment" / "toy_mose.yaml"


def _is_toy(cfg: ExperimentConfig) -> bool:
    return cfg.backbone.name == "toy"


def ensure_synthetic_data(cfg: ExperimentConfig) -> None:
    """Empty shard settings on the toy default -> the synthetic set, annotated by the rule-based annotator (the
    perception family has no skills to annotate: its raw shards are used as they are)."""
    if cfg.data.train_shards or not _is_toy(cfg):
        return
    from data_recipes.synthetic import generate_synthetic
    from mose_lightning.annotate.shards import annotate_shards

    s = cfg.data.synthetic
    root = resolve_path(s.out_dir)
    raw, rule = root / "raw", root / "rule"
    if not all(is_complete(raw / split) for split in SPLITS):
        print(f"[toy] generating the synthetic driving set ({s.family} questions) in {raw}"
              + (" (with trajectories)" if s.trajectories else ""))
        generate_synthetic(raw, s.num_train, s.num_val, s.num_test, s.seed, s.image_width, s.image_height,
                           family=s.family, trajectories=s.trajectories)
    if s.family != "driving":
        cfg.data.train_shards = str(raw / "train")
        cfg.data.val_shards = cfg.data.val_shards or str(raw / "val")
        cfg.data.test_shards = cfg.data.test_shards or str(raw / "test")
        return
    taxonomy = load_taxonomy(cfg.skills.taxonomy)
    for split in SPLITS:
        if not is_complete(rule / split):
            print(f"[toy] annotating skills of {split} with the rule-based annotator")
            # At least 8 shards per split (up to 200 samples each): every DDP rank needs its own training shard.
            size = {"train": s.num_train, "val": s.num_val, "test": s.num_test}[split]
            summary = annotate_shards(str(raw / split), rule / split, taxonomy, AnnotateConfig(annotator="rule"),
                                      maxcount=max(1, min(200, -(-size // 8))))
            agreement = {k: (round(v, 3) if v is not None else None) for k, v in summary["agreement_with_reference"].items()}
            print(f"[toy]   agreement with the generator's skills: {agreement}")
    cfg.data.train_shards = str(rule / "train")
    cfg.data.val_shards = cfg.data.val_shards or str(rule / "val")
    cfg.data.test_shards = cfg.data.test_shards or str(rule / "test")


def ensure_synthetic_views(cfg: ExperimentConfig) -> None:
    """Empty shard settings on a toy config with views.enabled -> the multi-view synthetic set (labels by
    construction, no annotation step), cameras = views.names."""
    if not cfg.views.enabled or cfg.data.train_shards or not _is_toy(cfg):
        return
    from data_recipes.synthetic import generate_synthetic_multiview

    s = cfg.views.synthetic
    root = resolve_path(s.out_dir)
    if not all(is_complete(root / split) for split in SPLITS):
        print(f"[toy] generating the multi-view synthetic set in {root}")
        # At least 8 shards per split: every DDP rank needs its own training shard.
        generate_synthetic_multiview(root, s.num_train, s.num_val, s.num_test, s.seed, s.image_width, s.image_height,
                                     cfg.views.names, overwrite=True, maxcount=max(1, min(200, -(-s.num_train // 8))))
    cfg.data.train_shards = str(root / "train")
    cfg.data.val_shards = cfg.data.val_shards or str(root / "val")
    cfg.data.test_shards = cfg.data.test_shards or str(root / "test")


def ensure_toy_backbone(cfg: ExperimentConfig) -> None:
    """The toy backbone's brief dense instruction tuning (backbone.init_config, default toy_instruct.yaml), run
    once and cached at backbone.init_checkpoint."""
    target = cfg.backbone.init_checkpoint
    if not _is_toy(cfg) or not target or (resolve_path(target) / "weights.safetensors").is_file():
        return
    from mose_lightning.stages.sft import run_sft

    instruct = load_config(resolve_path(cfg.backbone.init_config) if cfg.backbone.init_config else TOY_INSTRUCT_CONFIG)
    family = instruct.data.synthetic.family
    plain_data = instruct.data
    instruct.data = copy.deepcopy(cfg.data)
    # The preparation is the backbone's, not the experiment's: it sees the images and all its training data, also
    # when the experiment is a gray-image control or trains on a fraction of the data.
    instruct.data.blank_images = False
    instruct.data.train_limit = 0
    if family != cfg.data.synthetic.family:
        # Another question family of the same scenes (same sizes and seed): its own shards beside the experiment's.
        instruct.data.synthetic.family = family
        instruct.data.synthetic.out_dir = f"{cfg.data.synthetic.out_dir}_{family}"
        instruct.data.synthetic.trajectories = False
    if cfg.views.enabled or family != cfg.data.synthetic.family:
        # A view config's shards are the multi-view set; the toy learns to read the scenes (the same objects) from
        # the single-view synthetic set, as for every other toy config.
        instruct.data.train_shards = instruct.data.val_shards = instruct.data.test_shards = ""
        ensure_synthetic_data(instruct)
    elif cfg.data.synthetic.trajectories:
        # One toy backbone serves every toy config: it is always tuned on the set without trajectories, whose
        # detour texts follow the image alone (with trajectories they follow the navigation command).
        instruct.data = plain_data
        ensure_synthetic_data(instruct)
    instruct.backbone.toy = copy.deepcopy(cfg.backbone.toy)
    instruct.backbone.toy_dir = cfg.backbone.toy_dir
    instruct.run_dir = str(Path(target).parent)
    if Path(target).name != "model":
        raise ConfigError(f"backbone.init_checkpoint={target}: expected a path ending in /model (a run's model dir)")
    print(f"[toy] instruction-tuning the toy backbone (dense, all weights, {instruct.name}) into {target}")
    run_sft(instruct)


def ensure_router_checkpoint(cfg: ExperimentConfig) -> None:
    if cfg.moe.kind != "mose" or cfg.moe.router_checkpoint or cfg.moe.teacher_forcing or not _is_toy(cfg):
        return
    from mose_lightning.stages.router_pretrain import run_router_pretrain

    routers_cfg = copy.deepcopy(cfg)
    routers_cfg.run_dir = str(run_dir_for(cfg, "pretrain_router")) if not cfg.run_dir else str(Path(cfg.run_dir).parent / "pretrain_router")
    path = Path(routers_cfg.run_dir) / "routers.pt"
    if not path.is_file():
        print(f"[toy] pretraining the routers first ({routers_cfg.run_dir})")
        run_router_pretrain(routers_cfg)
    cfg.moe.router_checkpoint = str(path)


def ensure_trained_model(cfg: ExperimentConfig, kind_for_source: str = "") -> None:
    """init_from for expert groups (a MoSE SFT model) and for eval (the model of this experiment)."""
    if cfg.init_from or not _is_toy(cfg):
        return
    from mose_lightning.stages.sft import run_expert_group, run_sft

    if kind_for_source == "mose":
        source = load_config(TOY_MOSE_CONFIG)
        source.data = copy.deepcopy(cfg.data)
    else:
        source = copy.deepcopy(cfg)
        source.run_dir = ""
    stage = "expert_group" if source.moe.kind == "expert_group" else "sft"
    model_dir = run_dir_for(source, stage) / "model"
    if not (model_dir / "weights.safetensors").is_file():
        print(f"[toy] training {source.name} first ({model_dir.parent})")
        source = prepare(source, stage)
        (run_expert_group if stage == "expert_group" else run_sft)(source)
    cfg.init_from = str(model_dir)


def prepare(cfg: ExperimentConfig, stage: str) -> ExperimentConfig:
    """What `stage` needs on the toy default, created where missing: returns the config with the shard lists, the
    router checkpoint and the trained model filled in (the given config is left as it is). Other configs come
    back unchanged: with a real backbone a missing input is the stage's error to report."""
    cfg = copy.deepcopy(cfg)
    ensure_synthetic_views(cfg)
    ensure_synthetic_data(cfg)
    if stage == "eval" and cfg.init_from:
        # A saved model is rebuilt from its own config (backbone included): the eval config's toy backbone and
        # its instruction tuning play no part.
        return cfg
    ensure_toy_backbone(cfg)
    if stage == "sft":
        ensure_router_checkpoint(cfg)
    elif stage == "expert_group":
        ensure_trained_model(cfg, "mose")
    elif stage == "eval":
        ensure_trained_model(cfg)
    elif stage == "plan" and not cfg.init_from:
        # The planner reads the toy MoSE model itself: upcycled experts compute the instruction-tuned function,
        # and the pretrained routers give the skill chain that plan.routing=mose_chain follows.
        ensure_router_checkpoint(cfg)
    return cfg
