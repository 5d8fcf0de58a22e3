"""PaliGemma (SigLIP vision tower + Gemma, the base of pi0 / DriveMoE's Drive-pi0), and its toy.

Gemma's FFN is a GeGLU with tanh-approximated GELU, so the experts take `gelu_pytorch_tanh` from its config.
PaliGemma has no chat template: a prompt is the image tokens, <bos>, the prefix (system text, then the question)
and a newline; the answer (the "suffix") follows and ends with <eos>. The prefix attends bidirectionally, the
suffix causally; the forward tells them apart by token_type_ids (0 prefix, 1 suffix), which `model_inputs`
derives from the prompt mask, so a training forward and generation (whose new tokens transformers marks 1) see
the same attention.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from mose_lightning.backbones.base import BackboneAdapter
from mose_lightning.backbones.toy_tokenizer import ToyTokenizerSpec, special_token_ids

IMAGE_TOKEN = "<image>"
# The toy's vision tower reads 56x56 images in 14-pixel patches: 16 image tokens.
TOY_IMAGE_SIZE = 56


class PaliGemmaAdapter(BackboneAdapter):
    name = "paligemma"
    model_type = "paligemma"
    model_class_name = "PaliGemmaForConditionalGeneration"
    input_keys = ("input_ids", "attention_mask", "pixel_values", "token_type_ids")
    box_format = "loc1024"

    toy_tokens = ToyTokenizerSpec(("<pad>", "<eos>", "<bos>", IMAGE_TOKEN), eos="<eos>", pad="<pad>", bos="<bos>",
                                  stop_tokens=("<eos>",))

    def processor_class(self):
        from mose_lightning.backbones.processor import PaliGemmaImageTextProcessor

        return PaliGemmaImageTextProcessor

    def model_inputs(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        inputs = super().model_inputs(batch)
        prompt_mask = batch.get("prompt_mask")
        if prompt_mask is not None:
            inputs["token_type_ids"] = (~prompt_mask.bool()).long()
        return inputs

    def build_prompt(self, processor: Any, question: str, num_images: int, system: Optional[str] = None,
                     answer: Optional[str] = None) -> Tuple[str, Optional[str]]:
        if num_images < 0:
            raise ValueError(f"num_images: expected >= 0, got {num_images}")
        tokenizer = processor.tokenizer
        prefix = question if system is None else f"{system}\n{question}"
        prompt = f"{processor.image_token * num_images}{tokenizer.bos_token}{prefix}\n"
        if answer is None:
            return prompt, None
        return prompt, prompt + answer.strip() + tokenizer.eos_token

    def toy_processor(self, tokenizer) -> Any:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        side = TOY_IMAGE_SIZE
        image_processor = SiglipImageProcessorPil(size={"height": side, "width": side},
                                                  image_seq_length=(side // 14) ** 2)
        # The processor adds PaliGemma's 1024 location and 128 segmentation tokens to the tokenizer.
        return self.processor_class()(image_processor=image_processor, tokenizer=tokenizer)

    def toy_config(self, toy, tokenizer) -> Any:
        ids = special_token_ids(tokenizer, self.toy_tokens.special_tokens)
        vocab = len(tokenizer)
        return self.model_class().config_class(
            text_config=dict(
                model_type="gemma", vocab_size=vocab, hidden_size=toy.hidden_size,
                intermediate_size=toy.intermediate_size, num_hidden_layers=toy.num_layers,
                num_attention_heads=toy.num_heads, num_key_value_heads=toy.num_kv_heads,
                head_dim=toy.hidden_size // toy.num_heads, hidden_act="gelu_pytorch_tanh",
                bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"],
            ),
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=toy.vision_embed_dim,
                intermediate_size=4 * toy.vision_embed_dim, num_hidden_layers=toy.vision_depth,
                num_attention_heads=toy.vision_heads, patch_size=14, image_size=TOY_IMAGE_SIZE,
                vision_use_head=False,
            ),
            projection_dim=toy.hidden_size, hidden_size=toy.hidden_size, image_token_index=ids[IMAGE_TOKEN],
            vocab_size=vocab, pad_token_id=ids["<pad>"],
        )
