"""Save a trained model to a directory and load it back.

A model directory holds
  config.yaml          the full resolved experiment config the model was built from;
  weights.safetensors  every parameter that differs from the backbone it was built on: the MoE blocks (experts,
                       shared expert, routers) and anything else that was trainable;
  model.json           what was saved, parameter counts and a fingerprint of the frozen backbone.
The frozen backbone is not copied (4 GB for Qwen2-VL-2B): it is rebuilt from `backbone.path` (or the toy seed,
or `backbone.init_checkpoint`) and the fingerprint proves it is the same one. The directory is written to a
temporary sibling and renamed, so a killed save never leaves a half-written model that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from mose_lightning.config import ConfigError, ExperimentConfig, config_to_dict, load_config, resolve_path, save_config
from mose_lightning.io import apply_umask, temp_dir

WEIGHTS = "weights.safetensors"
# The view router and view embeddings of a model with views.enabled (they live beside the backbone).
VIEW_WEIGHTS = "views.safetensors"
META = "model.json"
# 2: the shared expert lives in the MoE block's experts module (`mlp.experts.shared.*`, was `mlp.shared.*`) and
# skill routers store their input standardisation (`input_shift`, `input_scale`; folded into the classifier in 1).
FORMAT = 2
# Config sections that define the architecture: a checkpoint only loads into a model built the same way.
MODEL_DEFINING = ("backbone", "moe", "skills", "views")
# The keys of `views` that define the architecture (the rest says how it trains and evaluates).
VIEW_DEFINING = ("enabled", "names", "kept", "fallback", "marker", "commands", "router_heads", "router_hidden")


# Module wrappers that FSDP and activation checkpointing insert into parameter names; state dicts leave them out.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_parameter_name(name: str) -> str:
    """A parameter name as the unwrapped model and its state dict spell it."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _named_tensors(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    out = {clean_parameter_name(name): p for name, p in module.named_parameters()}
    out.update({clean_parameter_name(name): b for name, b in module.named_buffers()})
    return out


def saved_tensor_names(model) -> set:
    """Backbone tensor names a checkpoint keeps: everything trainable and everything inside an MoE block (its
    parameters and buffers, e.g. the skill routers' input standardisation). The rest is the frozen backbone,
    rebuilt from its source when a model or a run is loaded. Names are those of the unwrapped model, also while
    FSDP or activation checkpointing wrap its layers."""
    block_ids = set(map(id, model.layout.blocks))
    moe_prefixes = tuple(f"{clean_parameter_name(name)}." for name, module in model.backbone.named_modules()
                         if id(module) in block_ids)
    trainable = {clean_parameter_name(name) for name, p in model.backbone.named_parameters() if p.requires_grad}
    # A block's reference FFN (moe.router_input=frozen_backbone) is the dense FFN it replaced: rebuilt by surgery.
    return trainable | {name for name in _named_tensors(model.backbone)
                        if name.startswith(moe_prefixes) and ".reference_ffn." not in name}


def _backbone_state(model, full_state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Backbone parameters and buffers by clean name: `full_state` where given (the gathered state dict of an FSDP
    run, whose live parameters are shards), else the live tensors."""
    live = _named_tensors(model.backbone)
    if full_state is None:
        return live
    return {name: full_state[name] for name in live if name in full_state}


def _saved_state(model, full_state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The tensors `saved_tensor_names` keeps."""
    source = _backbone_state(model, full_state)
    names = sorted(saved_tensor_names(model))
    missing = [name for name in names if name not in source]
    if missing:
        raise KeyError(f"cannot save the model: {len(missing)} trained tensors are missing from its state, e.g. {missing[:3]}")
    return {name: source[name].detach().to("cpu").contiguous() for name in names}


def backbone_fingerprint(model, full_state: Optional[Dict[str, torch.Tensor]] = None, bf16: bool = True) -> str:
    """Identity of the frozen backbone weights: a hash of every frozen tensor's name, shape and 64 evenly spaced
    elements. Exact element values, not sums: a reduction's rounding depends on the thread count, and the same
    weights must give the same fingerprint in every process. The elements are rounded to bf16 first, so that a
    model trained with precision=bf16-true (its backbone cast to bf16) loads into the float32 rebuild of the same
    backbone; `bf16=False` gives the exact-value fingerprint of models saved before that rounding."""
    saved = saved_tensor_names(model)
    params = {clean_parameter_name(name) for name, _ in model.backbone.named_parameters()}
    digest = hashlib.sha256()
    for name, param in sorted(_backbone_state(model, full_state).items(), key=lambda item: item[0]):
        if name in saved or name not in params or param.device.type == "meta":
            continue
        flat = param.detach().flatten()
        picked = flat[:: max(1, flat.numel() // 64)][:64]
        picked = (picked.to(torch.bfloat16) if bf16 else picked).float().cpu()
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(picked.numpy().tobytes())
    return digest.hexdigest()[:16]


def save_model(model, directory: str | os.PathLike, full_state: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(directory.parent, directory.name)
    try:
        state = _saved_state(model, full_state)
        save_file(state, str(tmp / WEIGHTS))
        if getattr(model, "views", None) is not None:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in model.views.state_dict().items()},
                      str(tmp / VIEW_WEIGHTS))
        save_config(model.cfg, tmp)
        meta = {
            "format": FORMAT,
            "kind": model.cfg.moe.kind,
            "saved_tensors": len(state),
            "saved_parameters": int(sum(t.numel() for t in state.values())),
            "backbone_fingerprint": backbone_fingerprint(model, full_state),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        apply_umask(tmp)  # safetensors writes its file private (0600)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _check_complete(directory: Path) -> None:
    missing = [name for name in (WEIGHTS, META, "config.yaml") if not (directory / name).is_file()]
    if missing:
        raise ConfigError(f"{directory}: not a saved model directory (missing {', '.join(missing)})")


def _differences(a: dict, b: dict, prefix: str = "") -> list:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(_differences(va, vb, f"{prefix}{key}."))
        elif va != vb:
            out.append(f"{prefix}{key}: checkpoint {va!r} vs config {vb!r}")
    return out


def check_compatible(saved: ExperimentConfig, expected: ExperimentConfig, source: str) -> None:
    saved_d, expected_d = config_to_dict(saved), config_to_dict(expected)
    # The router checkpoint only matters when a model is first built; a trained model carries its routers.
    for d in (saved_d, expected_d):
        # Where the backbone comes from may differ between machines; the fingerprint proves it is the same one.
        for key in ("path", "toy_dir", "arch", "init_checkpoint", "attn_implementation", "dtype"):
            d["backbone"].pop(key, None)
        d["moe"].pop("router_checkpoint", None)
        d["moe"].pop("router_trainable", None)
        d["moe"].pop("teacher_forcing", None)
        d["moe"].pop("extra_trainable", None)
        d["views"] = {k: v for k, v in d.get("views", {}).items() if k in VIEW_DEFINING}
    diffs = []
    for section in MODEL_DEFINING:
        diffs.extend(_differences(saved_d[section], expected_d[section], f"{section}."))
    if diffs:
        raise ConfigError(f"{source}: checkpoint does not match the config: " + "; ".join(diffs[:8]))


def _upgrade(state: Dict[str, torch.Tensor], fmt: int, model) -> Dict[str, torch.Tensor]:
    """A saved state of an older format in today's names (see FORMAT)."""
    if fmt >= FORMAT:
        return state
    state = {name.replace(".mlp.shared.", ".mlp.experts.shared."): value for name, value in state.items()}
    # Folded routers read raw inputs: the identity standardisation the model was built with stays.
    for name, value in _named_tensors(model.backbone).items():
        if name.endswith((".router.input_shift", ".router.input_scale")):
            state.setdefault(name, value.detach().clone())
    return state


def model_dir_of(path: str | os.PathLike) -> Path:
    """A run directory or its `model/` subdirectory -> the saved model directory."""
    path = Path(path)
    return path / "model" if (path / "model").is_dir() else path


def model_from_config(cfg: ExperimentConfig, load_routers: bool = True):
    """The model `cfg` describes, with the files it names: the dense model directory `backbone.init_checkpoint`
    overlaid on the backbone, and (for MoSE) the pretrained routers `moe.router_checkpoint`."""
    from mose_lightning.model import build_model

    backbone_state = None
    if cfg.backbone.init_checkpoint:
        backbone_state = dense_backbone_weights(cfg.backbone.init_checkpoint)
    router_state, source = None, "moe.router_checkpoint"
    if cfg.moe.router_checkpoint and load_routers and cfg.moe.kind in ("mose", "expert_group"):
        path = resolve_path(cfg.moe.router_checkpoint)
        if not path.is_file():
            raise ConfigError(f"moe.router_checkpoint: no file at {cfg.moe.router_checkpoint}")
        router_state, source = torch.load(path, map_location="cpu", weights_only=True), str(path)
    model = build_model(cfg, backbone_state=backbone_state, router_state=router_state, router_source=source)
    if cfg.views.enabled and cfg.views.router_checkpoint and load_routers:
        load_view_router(model, cfg.views.router_checkpoint)
    return model


def load_view_router(model, path: str | os.PathLike) -> None:
    """A view-router pretraining output (view_router.pt: the router's state and the class weights it trained
    with) into `model.views`; the classes must be the model's."""
    file = resolve_path(path)
    if not file.is_file():
        raise ConfigError(f"views.router_checkpoint: no file at {path}")
    data = torch.load(file, map_location="cpu", weights_only=True)
    if list(data.get("classes", [])) != model.views.classes:
        raise ConfigError(f"views.router_checkpoint={path}: trained for the classes {data.get('classes')}, the model "
                          f"routes over {model.views.classes}")
    from mose_lightning.model import load_state_into

    load_state_into(model.views.router, data["router"], "views.router_checkpoint")
    model.views.class_alpha.copy_(data["class_alpha"])


def load_model(path: str | os.PathLike, expected: Optional[ExperimentConfig] = None, overrides=()):
    """Build the model a saved model directory (or a run directory holding one in `model/`) describes and load its
    weights. With `expected`, the architecture-defining sections of both configs must agree, else a ConfigError
    lists the differences."""
    from mose_lightning.model import build_model, load_state_into

    directory = model_dir_of(path)
    _check_complete(directory)
    cfg = load_config(directory / "config.yaml", overrides)
    if expected is not None:
        check_compatible(cfg, expected, str(directory))
    # The saved weights carry the trained routers; moe.router_checkpoint stays as the record of where they started.
    backbone_state = dense_backbone_weights(cfg.backbone.init_checkpoint) if cfg.backbone.init_checkpoint else None
    model = build_model(cfg, backbone_state=backbone_state)
    meta = json.loads((directory / META).read_text())
    state = _upgrade(load_file(str(directory / WEIGHTS)), int(meta.get("format", 1)), model)
    load_state_into(model.backbone, state, str(directory))
    if model.views is not None:
        if not (directory / VIEW_WEIGHTS).is_file():
            raise ConfigError(f"{directory}: views.enabled but no {VIEW_WEIGHTS} (the view router was not saved)")
        load_state_into(model.views, load_file(str(directory / VIEW_WEIGHTS)), str(directory / VIEW_WEIGHTS))
    fingerprints = (backbone_fingerprint(model), backbone_fingerprint(model, bf16=False))
    if meta.get("backbone_fingerprint") not in fingerprints:
        raise ConfigError(
            f"{directory}: the backbone rebuilt from backbone.{('path' if cfg.backbone.path else 'toy')} is not the "
            f"one this model was trained on (fingerprint {fingerprints[0]} != {meta.get('backbone_fingerprint')})"
        )
    return model


def dense_backbone_weights(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """The saved (trained) parameters of a dense model directory, e.g. the toy backbone instruction-tuned by a dense
    stage, to overlay on a fresh backbone before MoE surgery. Only a dense model's weights fit there."""
    directory = model_dir_of(resolve_path(path))
    _check_complete(directory)
    saved_cfg = load_config(directory / "config.yaml")
    if saved_cfg.moe.kind != "dense":
        raise ConfigError(f"backbone.init_checkpoint={path}: expected a dense model, got moe.kind={saved_cfg.moe.kind!r}")
    return load_file(str(directory / WEIGHTS))
