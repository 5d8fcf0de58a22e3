"""The toy backbone: a tiny, randomly initialised Qwen2-VL (the real architecture class) for CPU runs and tests.

Built from `backbone.toy` with a seeded generator, so every machine gets the same weights, and cached under
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

from mose_lightning.backbones.base import BackboneError, instantiate_on_meta, torch_dtype
from mose_lightning.backbones.qwen2_vl import Qwen2VLAdapter, image_text_processor_class, load_processor
from mose_lightning.backbones.toy_tokenizer import (
    DEFAULT_BPE_VOCAB,
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    build_toy_tokenizer,
    special_token_ids,
)
from mose_lightning.config import BackboneConfig, ToyBackboneConfig, resolve_path
from mose_lightning.io import apply_umask, temp_dir

# Bump when the toy's construction changes in a way a cached copy would not reflect.
TOY_FORMAT_VERSION = 1
FINGERPRINT_FILE = "mose_toy.json"

# Image processor limits: Qwen2-VL resizes to multiples of 28 within [min, max] pixels. 40 merged 28x28 cells at
# most: a 224x126 image (and an 800x450 one) becomes 112x224 = 128 patches = 32 image tokens.
TOY_MIN_PIXELS = 56 * 56
TOY_MAX_PIXELS = 28 * 28 * 40


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
    if len(toy.mrope_section) != 3 or sum(toy.mrope_section) != half_head:
        raise bad("mrope_section", f"3 sections (temporal, height, width) summing to head_dim/2 = {half_head}",
                  list(toy.mrope_section))
    if toy.vision_embed_dim % toy.vision_heads or (toy.vision_embed_dim // toy.vision_heads) % 4:
        # The vision rotary embedding splits each head into 2D (height, width) halves of even size.
        raise bad("vision_heads", f"a divisor of vision_embed_dim ({toy.vision_embed_dim}) leaving a head dim "
                  "divisible by 4", toy.vision_heads)


def toy_model_config(toy: ToyBackboneConfig, tokenizer) -> Any:
    """A Qwen2VLConfig of the toy's sizes whose special token ids are the toy tokenizer's."""
    from transformers import Qwen2VLConfig

    validate_toy(toy)
    ids = special_token_ids(tokenizer)
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=toy.hidden_size,
            intermediate_size=toy.intermediate_size,
            num_hidden_layers=toy.num_layers,
            num_attention_heads=toy.num_heads,
            num_key_value_heads=toy.num_kv_heads,
            hidden_act="silu",
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": list(toy.mrope_section)},
            bos_token_id=None,
            eos_token_id=ids[IM_END],
            pad_token_id=ids[ENDOFTEXT],
        ),
        vision_config=dict(
            depth=toy.vision_depth,
            embed_dim=toy.vision_embed_dim,
            num_heads=toy.vision_heads,
            mlp_ratio=4,
            # The merger projects into the language model's width.
            hidden_size=toy.hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        # As in Qwen2-VL-2B: the LM head shares the embedding (and halves the toy's parameter count).
        tie_word_embeddings=True,
    )


def toy_processor(tokenizer) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # The PIL backend: identical output, and it needs no torchvision.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=TOY_MIN_PIXELS, max_pixels=TOY_MAX_PIXELS)
    return image_text_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def build_toy(toy: ToyBackboneConfig) -> Tuple[nn.Module, Any]:
    """(model, processor) in memory, float32; the same `toy` gives the same weights on every machine."""
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration

    tokenizer = build_toy_tokenizer(DEFAULT_BPE_VOCAB)
    config = toy_model_config(toy, tokenizer)
    # A private RNG stream: building the toy must not shift the caller's random state (or depend on it).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(toy.seed)
        model = Qwen2VLForConditionalGeneration(config)
    ids = special_token_ids(tokenizer)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids[IM_END], ids[ENDOFTEXT]], pad_token_id=ids[ENDOFTEXT], bos_token_id=None
    )
    return model.eval(), toy_processor(tokenizer)


def _fingerprint(toy: ToyBackboneConfig) -> Dict[str, Any]:
    return {"format": TOY_FORMAT_VERSION, "bpe_vocab": DEFAULT_BPE_VOCAB, "toy": dataclasses.asdict(toy)}


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


class ToyAdapter(Qwen2VLAdapter):
    name = "toy"

    def load(self, cfg: BackboneConfig) -> Tuple[nn.Module, Any]:
        path = ensure_toy_dir(cfg)
        # Always from disk, also right after building: the toy goes through the real checkpoint's code path.
        model = self.model_class().from_pretrained(
            str(path), dtype=torch_dtype(cfg), attn_implementation=cfg.attn_implementation, local_files_only=True
        )
        processor = load_processor(path, "backbone.toy_dir")
        self.check_pair(model, processor, f"backbone.toy_dir ({path})")
        return model.eval(), processor

    def build_meta(self, cfg: BackboneConfig) -> nn.Module:
        # The tokenizer fixes vocab size and special ids; training it takes milliseconds.
        config = toy_model_config(cfg.toy, build_toy_tokenizer(DEFAULT_BPE_VOCAB))
        return instantiate_on_meta(self.model_class(), config, cfg)
