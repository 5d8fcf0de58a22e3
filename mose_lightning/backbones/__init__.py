"""Backbone adapters by `backbone.name`: qwen2_vl (MoSE's backbone), qwen2_5_vl, qwen3_vl, paligemma, internvl,
smolvlm, llava (StableLM LLaVA), and toy (a tiny copy of one of them, `backbone.toy.of`)."""

from __future__ import annotations

from typing import Dict, Union

from mose_lightning.backbones.base import BackboneAdapter, BackboneError
from mose_lightning.backbones.internvl import InternVLAdapter
from mose_lightning.backbones.llava import LlavaAdapter
from mose_lightning.backbones.paligemma import PaliGemmaAdapter
from mose_lightning.backbones.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter
from mose_lightning.backbones.smolvlm import SmolVLMAdapter

ADAPTERS: Dict[str, BackboneAdapter] = {
    a.name: a
    for a in (Qwen2VLAdapter(), Qwen2_5_VLAdapter(), Qwen3VLAdapter(), PaliGemmaAdapter(), InternVLAdapter(),
              SmolVLMAdapter(), LlavaAdapter())
}
TOY = "toy"


def get_adapter(backbone: Union[str, "BackboneConfig"]) -> BackboneAdapter:  # noqa: F821
    """The adapter for a `backbone` config section (or a backbone.name; "toy" is then the Qwen2-VL toy)."""
    from mose_lightning.backbones.toy import toy_adapter
    from mose_lightning.config import ToyBackboneConfig

    name, toy_of = (backbone, ToyBackboneConfig.of) if isinstance(backbone, str) else (backbone.name, backbone.toy.of)
    if name == TOY:
        return toy_adapter(toy_of)
    try:
        return ADAPTERS[name]
    except KeyError:
        raise BackboneError(f"backbone.name: expected one of {sorted(ADAPTERS) + [TOY]}, got {name!r}") from None


__all__ = ["ADAPTERS", "BackboneAdapter", "BackboneError", "get_adapter"]
