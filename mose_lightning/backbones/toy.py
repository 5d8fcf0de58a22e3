"""The toy backbones: a tiny, randomly initialised copy of a real architecture class, for CPU runs and tests.

`backbone.name=toy` with `backbone.toy.of` naming the family (qwen2_vl, the default, qwen2_5_vl, qwen3_vl,
paligemma, internvl, smolvlm). The toy is the family's own transformers class at `backbone.toy`'s sizes, with a
tokenizer trained offline that carries the real one's special tokens and chat template and the real processor
class around it, so the toy runs the same adapter code (discovery, prompts, processor, model inputs) as the real
checkpoint. Built with a seeded generator, so every machine gets the same weights, and cached under
`backbone.toy_dir` in the ordinary `save_pretrained` layout, so it loads through exactly the same code path as a
real checkpoint. The cache is written to a temporary sibling folder and renamed into place: a killed run never
leaves half a toy behind, and two ranks building at once both end up reading one complete copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import nn

from mose_lightning.backbones.base import BackboneAdapter, BackboneError, instantiate_on_meta, torch_dtype
from mose_lightning.backbones.toy_tokenizer import DEFAULT_BPE_VOCAB, build_toy_tokenizer
from mose_lightning.config import BackboneConfig, ToyBackboneConfig, resolve_path
from mose_lightning.io import apply_umask, temp_dir

# Bump when the toy's construction changes in a way a cached copy would not reflect.
TOY_FORMAT_VERSION = 1
FINGERPRINT_FILE = "mose_toy.json"


def family_of(toy: ToyBackboneConfig) -> BackboneAdapter:
    """The adapter of the architecture `backbone.toy.of` names."""
    from mose_lightning.backbones import ADAPTERS

    family = ADAPTERS.get(toy.of)
    if family is None or family.toy_tokens is None:
        toys = sorted(n for n, a in ADAPTERS.items() if a.toy_tokens is not None)
        raise BackboneError(f"backbone.toy.of: expected one of {toys}, got {toy.of!r}")
    return family


def validate_toy(toy: ToyBackboneConfig) -> None:
    def bad(key: str, expected: str, got: Any) -> BackboneError:
        return BackboneError(f"backbone.toy.{key}: expected {expected}, got {got!r}")

    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vision_depth",
                "vision_embed_dim", "vision_heads"):
        if getattr(toy, key) <= 0:
            raise bad(key, "a positive integer", getattr(toy, key))
    if toy.hidden_size % toy.num_heads:
        raise bad("num_heads", f"a divisor of hidden_size ({toy.hidden_size})", toy.num_heads)
    if toy.num_heads % toy.num_kv_heads:
        raise bad("num_kv_heads", f"a divisor of num_heads ({toy.num_heads})", toy.num_kv_heads)
    half_head = toy.hidden_size // toy.num_heads // 2
    if family_of(toy).toy_mrope and (len(toy.mrope_section) != 3 or sum(toy.mrope_section) != half_head):
        raise bad("mrope_section", f"3 sections (temporal, height, width) summing to head_dim/2 = {half_head}",
                  list(toy.mrope_section))
    if toy.vision_embed_dim % toy.vision_heads or (toy.vision_embed_dim // toy.vision_heads) % 4:
        # The vision rotary embedding splits each head into 2D (height, width) halves of even size.
        raise bad("vision_heads", f"a divisor of vision_embed_dim ({toy.vision_embed_dim}) leaving a head dim "
                  "divisible by 4", toy.vision_heads)


def toy_tokenizer(toy: ToyBackboneConfig):
    return build_toy_tokenizer(DEFAULT_BPE_VOCAB, family_of(toy).toy_tokens)


def toy_processor(tokenizer, toy: ToyBackboneConfig) -> Any:
    return family_of(toy).toy_processor(tokenizer)


def toy_model_config(toy: ToyBackboneConfig, processor) -> Any:
    """The family's config at the toy's sizes whose special token ids are the toy tokenizer's."""
    validate_toy(toy)
    # From the processor's tokenizer: PaliGemma's processor adds its location tokens to the vocabulary.
    return family_of(toy).toy_config(toy, processor.tokenizer)


def build_toy(toy: ToyBackboneConfig) -> Tuple[nn.Module, Any]:
    """(model, processor) in memory, float32; the same `toy` gives the same weights on every machine."""
    from transformers import GenerationConfig

    family = family_of(toy)
    processor = toy_processor(toy_tokenizer(toy), toy)
    config = toy_model_config(toy, processor)
    # A private RNG stream: building the toy must not shift the caller's random state (or depend on it).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(toy.seed)
        model = family.model_class()(config)
    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids(t) for t in family.toy_tokens.stop_tokens],
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
    )
    return model.eval(), processor


def _fingerprint(toy: ToyBackboneConfig) -> Dict[str, Any]:
    sizes = dataclasses.asdict(toy)
    if sizes["of"] == ToyBackboneConfig.of:
        # Qwen2-VL toys cached before toys of other families existed stay valid.
        del sizes["of"]
    return {"format": TOY_FORMAT_VERSION, "bpe_vocab": DEFAULT_BPE_VOCAB, "toy": sizes}


def _check_cached(path: Path, toy: ToyBackboneConfig) -> None:
    marker = path / FINGERPRINT_FILE
    try:
        found = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BackboneError(
            f"backbone.toy_dir: {path} exists but is not a toy backbone built by mose_lightning ({marker}: {err}); "
            "delete it or point backbone.toy_dir elsewhere"
        ) from err
    expected = _fingerprint(toy)
    if found != expected:
        raise BackboneError(
            f"backbone.toy_dir: the toy cached in {path} was built from {found} but backbone.toy is {expected}; "
            "delete the folder to rebuild it, or set backbone.toy_dir to another folder for these sizes"
        )


def ensure_toy_dir(cfg: BackboneConfig) -> Path:
    """The toy's cache folder, built (atomically) on first use and checked against `backbone.toy` after."""
    path = resolve_path(cfg.toy_dir)
    if path.exists():
        _check_cached(path, cfg.toy)
        return path
    validate_toy(cfg.toy)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(path.parent, f"{path.name}.building")
    try:
        model, processor = build_toy(cfg.toy)
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        (tmp / FINGERPRINT_FILE).write_text(json.dumps(_fingerprint(cfg.toy), indent=2, sort_keys=True) + "\n")
        apply_umask(tmp)  # safetensors writes its file private (0600)
        try:
            os.rename(tmp, path)
        except OSError:
            # Another process renamed its (identical, deterministic) copy first; use that one.
            if not path.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _check_cached(path, cfg.toy)
    return path


class ToyBackbone:
    """Mixed in before a family adapter: the toy of that family, built and cached instead of read from
    `backbone.path`; everything else is the family's. `toy_adapter(family_name)` makes the instances."""

    name = "toy"
    family: str = ""

    def load(self, cfg: BackboneConfig) -> Tuple[nn.Module, Any]:
        self._check_family(cfg)
        path = ensure_toy_dir(cfg)
        # Always from disk, also right after building: the toy goes through the real checkpoint's code path.
        model = self.model_class().from_pretrained(
            str(path), dtype=torch_dtype(cfg), attn_implementation=cfg.attn_implementation, local_files_only=True
        )
        processor = self.load_processor(path, "backbone.toy_dir")
        self.check_pair(model, processor, f"backbone.toy_dir ({path})")
        return model.eval(), processor

    def build_meta(self, cfg: BackboneConfig) -> nn.Module:
        self._check_family(cfg)
        # The tokenizer fixes vocab size and special ids; training it takes milliseconds.
        config = toy_model_config(cfg.toy, toy_processor(toy_tokenizer(cfg.toy), cfg.toy))
        return instantiate_on_meta(self.model_class(), config, cfg)

    def _check_family(self, cfg: BackboneConfig) -> None:
        if cfg.toy.of != self.family:
            raise BackboneError(f"backbone.toy.of is {cfg.toy.of!r} but this is the toy of {self.family!r}; "
                                "get the adapter with get_adapter(cfg.backbone)")

    def __reduce__(self):
        # Toy adapter classes are made on use, not module attributes: pickle (DataLoader workers, spawned
        # ranks) rebuilds them by family.
        return toy_adapter, (self.family,)


_TOY_ADAPTERS: Dict[str, BackboneAdapter] = {}


def toy_adapter(family_name: str) -> BackboneAdapter:
    """The shared toy adapter of a family."""
    if family_name not in _TOY_ADAPTERS:
        family = family_of(ToyBackboneConfig(of=family_name))
        cls = type(f"Toy{type(family).__name__}", (ToyBackbone, type(family)), {"family": family_name})
        _TOY_ADAPTERS[family_name] = cls()
    return _TOY_ADAPTERS[family_name]
