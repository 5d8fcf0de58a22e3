"""InternVL in transformers' format (InternVL3 / 2.5 "-hf" checkpoints: InternViT + a Qwen2.5 language model),
and its toy. An image is cut into 448-pixel tiles plus a thumbnail; each tile becomes <img>, image_seq_length
<IMG_CONTEXT> tokens and </img>.
"""

from __future__ import annotations

from typing import Any

from mose_lightning.backbones.base import BackboneAdapter
from mose_lightning.backbones.toy_tokenizer import ENDOFTEXT, IM_END, IM_START, ToyTokenizerSpec, special_token_ids

CONTEXT_TOKEN = "<IMG_CONTEXT>"
# The toy reads 56-pixel tiles in 14-pixel patches, pixel-shuffled 2x2: 4 tokens per tile, at most 4 tiles.
TOY_TILE = 56


class InternVLAdapter(BackboneAdapter):
    name = "internvl"
    model_type = "internvl"
    model_class_name = "InternVLForConditionalGeneration"
    # InternVL grounds boxes as <box>[[x1, y1, x2, y2]]</box> in 0-1000 of the image.
    box_format = "norm1000"

    toy_tokens = ToyTokenizerSpec(
        (ENDOFTEXT, IM_START, IM_END, "<img>", "</img>", CONTEXT_TOKEN, "<video>"), eos=IM_END, pad=ENDOFTEXT,
        chat_template="internvl_chat_template.jinja",
        named_tokens={"context_image_token": CONTEXT_TOKEN, "start_image_token": "<img>",
                      "end_image_token": "</img>", "video_token": "<video>"},
        stop_tokens=(IM_END, ENDOFTEXT),
    )

    def processor_class(self):
        from mose_lightning.backbones.processor import InternVLImageTextProcessor

        return InternVLImageTextProcessor

    def toy_processor(self, tokenizer) -> Any:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        image_processor = GotOcr2ImageProcessorPil(size={"height": TOY_TILE, "width": TOY_TILE},
                                                   crop_to_patches=True, min_patches=1, max_patches=4)
        return self.processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                      chat_template=tokenizer.chat_template, image_seq_length=(TOY_TILE // 28) ** 2)

    def toy_config(self, toy, tokenizer) -> Any:
        ids = special_token_ids(tokenizer, self.toy_tokens.special_tokens)
        return self.model_class().config_class(
            vision_config=dict(
                hidden_size=toy.vision_embed_dim, num_hidden_layers=toy.vision_depth,
                num_attention_heads=toy.vision_heads, intermediate_size=4 * toy.vision_embed_dim,
                image_size=[TOY_TILE, TOY_TILE], patch_size=[14, 14],
            ),
            text_config=dict(
                model_type="qwen2", vocab_size=len(tokenizer), hidden_size=toy.hidden_size,
                intermediate_size=toy.intermediate_size, num_hidden_layers=toy.num_layers,
                num_attention_heads=toy.num_heads, num_key_value_heads=toy.num_kv_heads, hidden_act="silu",
                rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
                tie_word_embeddings=False,
            ),
            image_token_id=ids[CONTEXT_TOKEN], image_seq_length=(TOY_TILE // 28) ** 2, downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
