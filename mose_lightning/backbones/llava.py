"""LLaVA with a StableLM-2-1.6B language model (MoSE's DriveLM extension, as in MoE-LLaVA-StableLM).

The weights must be a transformers `LlavaForConditionalGeneration` directory (CLIP vision tower, projector,
StableLM text model) with a processor whose tokenizer maps `<image>` to the config's image_token_index.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from torch import nn

from mose_lightning.backbones.base import (
    BackboneAdapter,
    BackboneError,
    instantiate_on_meta,
    read_config_dict,
    submodule,
)
from mose_lightning.config import BackboneConfig

# MoE-LLaVA's "stablelm" conversation (Vicuna v1 layout): used when the processor carries no chat template.
STABLELM_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TOKEN = "<image>"


class LlavaAdapter(BackboneAdapter):
    name = "llava"
    model_type = "llava"
    input_keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes")

    def model_class(self):
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def load(self, cfg: BackboneConfig) -> Tuple[nn.Module, Any]:
        from transformers import AutoProcessor

        model, path = self.from_local_weights(cfg)
        try:
            processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise BackboneError(f"backbone.path: cannot load a LLaVA processor from {path}: {err}") from err
        model_id, proc_id = self.image_token_id(model), self.image_token_id(processor)
        if model_id != proc_id:
            raise BackboneError(
                f"backbone.path ({path}): the tokenizer maps {IMAGE_TOKEN} to {proc_id} but the model config's "
                f"image_token_index is {model_id}; add the token to the tokenizer or fix the config"
            )
        return model.eval(), processor

    def build_meta(self, cfg: BackboneConfig) -> nn.Module:
        from transformers import LlavaConfig

        data, source = read_config_dict(cfg)
        if data.get("model_type") != self.model_type:
            raise BackboneError(f"{source}: model_type is {data.get('model_type')!r}, expected {self.model_type!r}")
        return instantiate_on_meta(self.model_class(), LlavaConfig.from_dict(data), cfg)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return submodule(model, ["model.language_model.layers", "language_model.model.layers"], "LLaVA decoder layers")

    def vision_layers(self, model: nn.Module) -> nn.ModuleList:
        return submodule(
            model,
            ["model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers"],
            "LLaVA vision encoder layers",
        )

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
        if getattr(processor, "chat_template", None):
            return self._templated(processor, question, num_images, system, answer)
        image_token = getattr(processor, "image_token", IMAGE_TOKEN)
        user = f"{image_token}\n" * num_images + question
        prompt = f"{system if system is not None else STABLELM_SYSTEM} USER: {user} ASSISTANT:"
        if answer is None:
            return prompt, None
        eos = processor.tokenizer.eos_token
        return prompt, f"{prompt} {answer.strip()}{eos}"

    def _templated(self, processor, question, num_images, system, answer) -> Tuple[str, Optional[str]]:
        messages = [{"role": "system", "content": system}] if system is not None else []
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if answer is None:
            return prompt, None
        reply = {"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]}
        full = processor.apply_chat_template(messages + [reply], tokenize=False, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise BackboneError(
                "llava: the processor's chat template renders the answer turn without the generation prompt as its "
                "prefix, so prompt tokens cannot be masked by length; remove chat_template to use the StableLM layout"
            )
        return prompt, full
