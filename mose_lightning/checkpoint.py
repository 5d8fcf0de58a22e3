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

from mose_lightning.config import ConfigError, ExperimentConfig, config_to_dict, load_config, save_config
from mose_lightning.io import apply_umask, temp_dir

WEIGHTS = "weights.safetensors"
META = "model.json"
# Config sections that define the architecture: a checkpoint only loads into a model built the same way.
MODEL_DEFINING = ("backbone", "moe", "skills")


# Module wrappers that FSDP and activation checkpointing insert into parameter names; state dicts leave them out.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_parameter_name(name: str) -> str:
    """A parameter name as the unwrapped model and its state dict spell it."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def saved_parameter_names(model) -> set:
    """Backbone parameter names a checkpoint keeps: everything trainable and everything inside an MoE block.
    The rest is the frozen backbone, rebuilt from its source when a model or a run is loaded. Names are those of
    the unwrapped model, also while FSDP or activation checkpointing wrap its layers."""
    block_ids = set(map(id, model.layout.blocks))
    moe_prefixes = tuple(f"{name}." for name, module in model.backbone.named_modules() if id(module) in block_ids)
    return {clean_parameter_name(name) for name, param in model.backbone.named_parameters()
            if param.requires_grad or name.startswith(moe_prefixes)}


def _backbone_state(model, full_state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Backbone parameters by clean name: `full_state` where given (the gathered state dict of an FSDP run, whose
    live parameters are shards), else the live parameters."""
    live = {clean_parameter_name(name): param for name, param in model.backbone.named_parameters()}
    if full_state is None:
        return live
    # Parameters only (a state dict also holds buffers), each taken from the gathered state.
    return {name: full_state[name] for name in live if name in full_state}


def _saved_state(model, full_state: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """The parameters `saved_parameter_names` keeps."""
    source = _backbone_state(model, full_state)
    names = sorted(saved_parameter_names(model))
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
    saved = saved_parameter_names(model)
    digest = hashlib.sha256()
    for name, param in sorted(_backbone_state(model, full_state).items(), key=lambda item: item[0]):
        if name in saved or param.device.type == "meta":
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
        save_config(model.cfg, tmp)
        meta = {
            "format": 1,
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
    diffs = []
    for section in MODEL_DEFINING:
        diffs.extend(_differences(saved_d[section], expected_d[section], f"{section}."))
    if diffs:
        raise ConfigError(f"{source}: checkpoint does not match the config: " + "; ".join(diffs[:8]))


def _load_state_into(backbone, state: Dict[str, torch.Tensor], source: str, strict_keys: bool = True) -> None:
    params = dict(backbone.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise ConfigError(f"{source}: checkpoint has parameters this model lacks: {unknown[:5]}")
    for name, tensor in state.items():
        if params[name].shape != tensor.shape:
            raise ConfigError(
                f"{source}: parameter {name} has shape {tuple(tensor.shape)} in the checkpoint, "
                f"{tuple(params[name].shape)} in the model"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].dtype))


def load_model(directory: str | os.PathLike, expected: Optional[ExperimentConfig] = None, overrides=()):
    """Build the model from the saved config and load its weights. With `expected`, the architecture-defining
    sections of both configs must agree, else a ConfigError lists the differences."""
    from mose_lightning.model import build_model

    directory = Path(directory)
    _check_complete(directory)
    cfg = load_config(directory / "config.yaml", overrides)
    if expected is not None:
        check_compatible(cfg, expected, str(directory))
    cfg.moe.router_checkpoint = None  # the saved weights carry the trained routers
    model = build_model(cfg, load_routers=False)
    _load_state_into(model.backbone, load_file(str(directory / WEIGHTS)), str(directory))
    meta = json.loads((directory / META).read_text())
    fingerprints = (backbone_fingerprint(model), backbone_fingerprint(model, bf16=False))
    if meta.get("backbone_fingerprint") not in fingerprints:
        raise ConfigError(
            f"{directory}: the backbone rebuilt from backbone.{('path' if cfg.backbone.path else 'toy')} is not the "
            f"one this model was trained on (fingerprint {fingerprints[0]} != {meta.get('backbone_fingerprint')})"
        )
    return model


def load_backbone_weights(backbone, directory: str | os.PathLike) -> None:
    """Overlay the saved (trained) parameters of a model directory onto a fresh backbone, e.g. a toy backbone
    instruction-tuned by a dense stage, before MoE surgery. Only a dense model's weights fit here."""
    directory = Path(directory)
    _check_complete(directory)
    saved_cfg = load_config(directory / "config.yaml")
    if saved_cfg.moe.kind != "dense":
        raise ConfigError(f"backbone.init_checkpoint={directory}: expected a dense model, got moe.kind={saved_cfg.moe.kind!r}")
    _load_state_into(backbone, load_file(str(directory / WEIGHTS)), str(directory))
