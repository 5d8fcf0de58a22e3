"""Backbone adapters by `backbone.name`: qwen2_vl (MoSE's backbone), llava (StableLM LLaVA), toy (tiny Qwen2-VL)."""

from __future__ import annotations

from typing import Dict

from mose_lightning.backbones.base import BackboneAdapter, BackboneError
from mose_lightning.backbones.llava import LlavaAdapter
from mose_lightning.backbones.qwen2_vl import Qwen2VLAdapter
from mose_lightning.backbones.toy import ToyAdapter

ADAPTERS: Dict[str, BackboneAdapter] = {a.name: a for a in (Qwen2VLAdapter(), LlavaAdapter(), ToyAdapter())}


def get_adapter(name: str) -> BackboneAdapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise BackboneError(f"backbone.name: expected one of {sorted(ADAPTERS)}, got {name!r}") from None


__all__ = ["ADAPTERS", "BackboneAdapter", "BackboneError", "get_adapter"]
