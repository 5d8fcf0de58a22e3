"""The Qwen-VL family: Qwen2-VL (MoSE's backbone), Qwen2.5-VL and Qwen3-VL, and the toy version of each.

All three place image tokens with multimodal rope (M-RoPE), for which transformers 5.23's forward needs
mm_token_type_ids (1 at image tokens) whenever image_grid_thw is given; the processor returns it. They resize an
image to a multiple of patch_size * merge_size within [min, max] pixels ("smart resize"), which is also the
frame Qwen2.5-VL's absolute box coordinates refer to.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from mose_lightning.backbones.base import BackboneAdapter, BackboneError
from mose_lightning.backbones.toy_tokenizer import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    QWEN2_VL_TOKENS,
    SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    ToyTokenizerSpec,
    special_token_ids,
)

END_OF_TURN = IM_END


def load_processor(path, key: str = "backbone.path") -> Any:
    return Qwen2VLAdapter().load_processor(path, key)


class Qwen2VLAdapter(BackboneAdapter):
    name = "qwen2_vl"
    model_type = "qwen2_vl"
    model_class_name = "Qwen2VLForConditionalGeneration"
    input_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    # Qwen2-VL grounds boxes as (x1,y1),(x2,y2) in 0-1000 of the image.
    box_format = "norm1000"

    # ---- the toy: Qwen2-VL-Instruct's special tokens and chat template; 14-pixel patches merged 2x2 -------------
    toy_tokens: ToyTokenizerSpec = QWEN2_VL_TOKENS
    toy_patch_size = 14
    toy_rope_theta = 1e6
    # M-RoPE splits head_dim/2 into (temporal, height, width) sections: backbone.toy.mrope_section.
    toy_mrope = True

    def processor_class(self):
        # Imported on use: importing the adapters should not pull in transformers' vision stack.
        from mose_lightning.backbones.processor import Qwen2VLImageTextProcessor

        return Qwen2VLImageTextProcessor

    def model_inputs(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        inputs = super().model_inputs(batch)
        if "pixel_values" in inputs and "mm_token_type_ids" not in inputs:
            raise BackboneError(
                f"{self.name}: batch has pixel_values but no mm_token_type_ids; keep the processor's "
                "mm_token_type_ids (pad it like input_ids) so the model can place the multimodal rope positions"
            )
        return inputs

    def input_image_size(self, processor: Any, width: int, height: int) -> Tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = processor.image_processor
        size = ip.size
        h, w = smart_resize(height, width, factor=ip.patch_size * ip.merge_size,
                            min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        return w, h

    def toy_processor(self, tokenizer) -> Any:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        # 40 merged cells at most: a 224x126 image becomes 112x224 pixels = 32 image tokens with 14-pixel patches.
        cell = 2 * self.toy_patch_size
        image_processor = Qwen2VLImageProcessorPil(  # the PIL backend: identical output, no torchvision
            patch_size=self.toy_patch_size, merge_size=2, temporal_patch_size=2,
            min_pixels=4 * cell * cell, max_pixels=40 * cell * cell,
        )
        return self.processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                      chat_template=tokenizer.chat_template)

    def toy_text_config(self, toy, tokenizer) -> Dict[str, Any]:
        ids = special_token_ids(tokenizer)
        return dict(
            vocab_size=len(tokenizer), hidden_size=toy.hidden_size, intermediate_size=toy.intermediate_size,
            num_hidden_layers=toy.num_layers, num_attention_heads=toy.num_heads,
            num_key_value_heads=toy.num_kv_heads, hidden_act="silu", max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": self.toy_rope_theta,
                             "mrope_section": list(toy.mrope_section)},
            bos_token_id=None, eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
        )

    def toy_vision_config(self, toy) -> Dict[str, Any]:
        return dict(depth=toy.vision_depth, embed_dim=toy.vision_embed_dim, num_heads=toy.vision_heads, mlp_ratio=4,
                    # The merger projects into the language model's width.
                    hidden_size=toy.hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)

    def toy_config(self, toy, tokenizer) -> Any:
        """The family's config at the toy's sizes, its special token ids the toy tokenizer's."""
        ids = special_token_ids(tokenizer)
        return self.model_class().config_class(
            text_config=self.toy_text_config(toy, tokenizer),
            vision_config=self.toy_vision_config(toy),
            image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
            vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
            # As in Qwen2-VL-2B (and the 2B-3B sizes of its successors): the LM head shares the embedding.
            tie_word_embeddings=True,
        )


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


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
    model_type = "qwen2_5_vl"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    # Qwen2.5-VL grounds boxes in absolute pixels of the image as its processor resized it.
    box_format = "input_pixels"

    def processor_class(self):
        from mose_lightning.backbones.processor import Qwen2_5_VLImageTextProcessor

        return Qwen2_5_VLImageTextProcessor

    def toy_vision_config(self, toy) -> Dict[str, Any]:
        # A SwiGLU vision MLP and window attention (one window of 2x2 merged cells), the last block attending fully.
        return dict(depth=toy.vision_depth, hidden_size=toy.vision_embed_dim,
                    intermediate_size=4 * toy.vision_embed_dim, num_heads=toy.vision_heads,
                    out_hidden_size=toy.hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                    window_size=56, fullatt_block_indexes=[toy.vision_depth - 1])


class Qwen3VLAdapter(Qwen2VLAdapter):
    name = "qwen3_vl"
    model_type = "qwen3_vl"
    model_class_name = "Qwen3VLForConditionalGeneration"
    # Qwen3-VL grounds boxes as [x1, y1, x2, y2] in 0-1000 of the image.
    box_format = "norm1000"

    # Qwen3-VL-Instruct: no system turn unless one is given; 16-pixel patches.
    toy_tokens = ToyTokenizerSpec(tuple(SPECIAL_TOKENS), eos=IM_END, pad=ENDOFTEXT,
                                  chat_template="qwen3_vl_chat_template.jinja", stop_tokens=(IM_END, ENDOFTEXT))
    toy_patch_size = 16
    toy_rope_theta = 5e6

    def processor_class(self):
        from mose_lightning.backbones.processor import Qwen3VLImageTextProcessor

        return Qwen3VLImageTextProcessor

    def toy_text_config(self, toy, tokenizer) -> Dict[str, Any]:
        text = super().toy_text_config(toy, tokenizer)
        text["head_dim"] = toy.hidden_size // toy.num_heads
        text["rope_parameters"]["mrope_interleaved"] = True
        return text

    def toy_vision_config(self, toy) -> Dict[str, Any]:
        # Deepstack: the first vision block's features also enter the first decoder layer, as in Qwen3-VL.
        return dict(depth=toy.vision_depth, hidden_size=toy.vision_embed_dim,
                    intermediate_size=4 * toy.vision_embed_dim, num_heads=toy.vision_heads,
                    out_hidden_size=toy.hidden_size, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                    num_position_embeddings=64, deepstack_visual_indexes=[0])
