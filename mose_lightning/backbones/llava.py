"""LLaVA with a StableLM-2-1.6B language model (MoSE's DriveLM extension, as in MoE-LLaVA-StableLM).

The weights must be a transformers `LlavaForConditionalGeneration` directory (CLIP vision tower, projector,
StableLM text model) with a processor whose tokenizer maps `<image>` to the config's image_token_index.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from torch import nn

from mose_lightning.backbones.base import BackboneAdapter, BackboneError

# MoE-LLaVA's "stablelm" conversation (Vicuna v1 layout): used when the processor carries no chat template.
STABLELM_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TOKEN = "<image>"


class LlavaAdapter(BackboneAdapter):
    name = "llava"
    model_type = "llava"
    model_class_name = "LlavaForConditionalGeneration"
    input_keys = ("input_ids", "attention_mask", "pixel_values", "image_sizes")

    def check_pair(self, model: nn.Module, processor: Any, source: str) -> None:
        model_id, proc_id = self.image_token_id(model), self.image_token_id(processor)
        if model_id != proc_id:
            raise BackboneError(
                f"{source}: the tokenizer maps {IMAGE_TOKEN} to {proc_id} but the model config's "
                f"image_token_index is {model_id}; add the token to the tokenizer or fix the config"
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
            return super().build_prompt(processor, question, num_images, system, answer)
        image_token = getattr(processor, "image_token", IMAGE_TOKEN)
        user = f"{image_token}\n" * num_images + question
        prompt = f"{system if system is not None else STABLELM_SYSTEM} USER: {user} ASSISTANT:"
        if answer is None:
            return prompt, None
        eos = processor.tokenizer.eos_token
        return prompt, f"{prompt} {answer.strip()}{eos}"
