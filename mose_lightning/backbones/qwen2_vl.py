"""Qwen2-VL (MoSE's backbone): loading, meta builds, and where its parts live in transformers 5.x."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from mose_lightning.backbones.base import (
    BackboneAdapter,
    BackboneError,
    instantiate_on_meta,
    read_config_dict,
    submodule,
)
from mose_lightning.config import BackboneConfig

END_OF_TURN = "<|im_end|>"


def image_text_processor_class():
    # Imported on use: importing the adapters should not pull in transformers' vision stack.
    from mose_lightning.backbones.processor import Qwen2VLImageTextProcessor

    return Qwen2VLImageTextProcessor


def load_processor(path, key: str = "backbone.path") -> Any:
    try:
        return image_text_processor_class().from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise BackboneError(
            f"{key}: cannot load a Qwen2-VL processor (tokenizer + image processor) from {path}: {err}"
        ) from err


class Qwen2VLAdapter(BackboneAdapter):
    name = "qwen2_vl"
    model_type = "qwen2_vl"
    # transformers 5.23's Qwen2-VL forward needs mm_token_type_ids (1 at image tokens) to compute M-RoPE positions
    # whenever image_grid_thw is given; the processor returns it.
    input_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")

    def model_class(self):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def load(self, cfg: BackboneConfig) -> Tuple[nn.Module, Any]:
        model, path = self.from_local_weights(cfg)
        processor = load_processor(path)
        self.check_pair(model, processor, f"backbone.path ({path})")
        return model.eval(), processor

    def check_pair(self, model: nn.Module, processor: Any, source: str) -> None:
        model_id, proc_id = self.image_token_id(model), self.image_token_id(processor)
        if model_id != proc_id:
            raise BackboneError(
                f"{source}: the processor's image token id {proc_id} differs from the model config's {model_id}; "
                "the tokenizer does not belong to these weights"
            )

    def config_from_dict(self, data: Dict[str, Any], source: str):
        from transformers import Qwen2VLConfig

        if data.get("model_type") != self.model_type:
            raise BackboneError(f"{source}: model_type is {data.get('model_type')!r}, expected {self.model_type!r}")
        return Qwen2VLConfig.from_dict(data)

    def build_meta(self, cfg: BackboneConfig) -> nn.Module:
        data, source = read_config_dict(cfg)
        return instantiate_on_meta(self.model_class(), self.config_from_dict(data, source), cfg)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return submodule(model, ["model.language_model.layers", "model.layers"], "Qwen2-VL decoder layers")

    def vision_layers(self, model: nn.Module) -> nn.ModuleList:
        return submodule(model, ["model.visual.blocks", "visual.blocks"], "Qwen2-VL vision blocks")

    def model_inputs(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        inputs = super().model_inputs(batch)
        if "pixel_values" in inputs and "mm_token_type_ids" not in inputs:
            raise BackboneError(
                "qwen2_vl: batch has pixel_values but no mm_token_type_ids; keep the processor's mm_token_type_ids "
                "(pad it like input_ids) so the model can place the multimodal rope positions"
            )
        return inputs

    def build_prompt(
        self,
        processor: Any,
        question: str,
        num_images: int,
        system: Optional[str] = None,
        answer: Optional[str] = None,
    ) -> Tuple[str, Optional[str]]:
        if num_images < 0:
            raise ValueError(f"num_images: expected >= 0, got {num_images}")
        messages = []
        if system is not None:
            messages.append({"role": "system", "content": system})
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if answer is None:
            return prompt, None
        # The prompt ends with "assistant\n"; an answer starting with a newline would merge with it into one
        # "\n\n" token and break the prefix property that label masking relies on. Leading blanks carry nothing.
        return prompt, prompt + answer.lstrip() + END_OF_TURN

    # ---- camera-view routing ----------------------------------------------------------------------------------
    def image_tokens_per_image(self, model: nn.Module, pixel_values: torch.Tensor,
                               grid_thw: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(model.model.get_image_features(pixel_values, grid_thw).pooler_output)

    def view_prompt_pieces(self, processor: Any, question: str, system: Optional[str] = None,
                           answer: Optional[str] = None) -> Dict[str, list]:
        tokenizer = getattr(processor, "tokenizer", processor)
        prompt, full = self.build_prompt(processor, question, 1, system, answer)
        ids = tokenizer(prompt)["input_ids"]
        start, pad, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"))
        if ids.count(pad) != 1 or start not in ids or end not in ids:
            raise BackboneError(f"{self.name}: the chat template did not lay out one image as vision_start, image_pad, "
                                f"vision_end (prompt {prompt!r})")
        i, j = ids.index(start), ids.index(end)
        pieces = {"prefix": ids[:i], "suffix": ids[j + 1:], "answer": [], "image_start": [start], "image_pad": pad,
                  "image_end": [end]}
        if full is not None:
            full_ids = tokenizer(full)["input_ids"]
            if full_ids[: len(ids)] != ids:
                raise BackboneError(f"{self.name}: the prompt's tokens are not a prefix of prompt + answer "
                                    f"(question {question[:60]!r}); label masking would cut in the wrong place")
            pieces["answer"] = full_ids[len(ids):]
        return pieces

    def precomputed_image_inputs(self, features: Tuple[torch.Tensor, ...], grid_thw: torch.Tensor) -> Dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=tuple(features))},
                "image_grid_thw": grid_thw}

