"""SmolVLM (SmolVLM2: a SigLIP vision tower, pixel shuffle, a SmolLM2 / Llama language model), and its toy.

An image is split into tiles plus a global view, each tile written as <fake_token_around_image><row_r_col_c>
and image_seq_len <image> tokens. SmolVLM has no box format of its own, so boxes stay in the data's pixels.
"""

from __future__ import annotations

from typing import Any

from mose_lightning.backbones.base import BackboneAdapter
from mose_lightning.backbones.toy_tokenizer import ENDOFTEXT, IM_END, IM_START, ToyTokenizerSpec, special_token_ids

END_OF_UTTERANCE = "<end_of_utterance>"
TILE_TOKENS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
# The toy's tiles are 56 pixels in 14-pixel patches, pixel-shuffled 2x2: 4 tokens per tile.
TOY_TILE = 56


class SmolVLMAdapter(BackboneAdapter):
    name = "smolvlm"
    model_type = "smolvlm"
    model_class_name = "SmolVLMForConditionalGeneration"
    input_keys = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    box_format = "pixels"

    # SmolVLM2-Instruct: <|im_start|> opens the conversation, <end_of_utterance> ends a turn (and generation).
    toy_tokens = ToyTokenizerSpec(
        (ENDOFTEXT, IM_START, IM_END, END_OF_UTTERANCE, "<fake_token_around_image>", "<global-img>", "<image>")
        + TILE_TOKENS,
        eos=END_OF_UTTERANCE, pad=IM_END, bos=IM_START, chat_template="smolvlm_chat_template.jinja",
        stop_tokens=(END_OF_UTTERANCE,),
    )

    def processor_class(self):
        from mose_lightning.backbones.processor import SmolVLMImageTextProcessor

        return SmolVLMImageTextProcessor

    def toy_processor(self, tokenizer) -> Any:
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

        # Longest edge 2 tiles: a 224x126 image becomes 2x2 tiles and the global view, 20 image tokens.
        image_processor = SmolVLMImageProcessorPil(do_image_splitting=True, max_image_size={"longest_edge": TOY_TILE},
                                                   size={"longest_edge": 2 * TOY_TILE})
        return self.processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                      chat_template=tokenizer.chat_template, image_seq_len=(TOY_TILE // 28) ** 2)

    def toy_config(self, toy, tokenizer) -> Any:
        ids = special_token_ids(tokenizer, self.toy_tokens.special_tokens)
        return self.model_class().config_class(
            text_config=dict(
                model_type="llama", vocab_size=len(tokenizer), hidden_size=toy.hidden_size,
                intermediate_size=toy.intermediate_size, num_hidden_layers=toy.num_layers,
                num_attention_heads=toy.num_heads, num_key_value_heads=toy.num_kv_heads,
                head_dim=toy.hidden_size // toy.num_heads, hidden_act="silu", rms_norm_eps=1e-5,
                bos_token_id=ids[IM_START], eos_token_id=ids[END_OF_UTTERANCE], pad_token_id=ids[IM_END],
                tie_word_embeddings=False,
            ),
            vision_config=dict(
                model_type="smolvlm_vision", hidden_size=toy.vision_embed_dim,
                intermediate_size=4 * toy.vision_embed_dim, num_hidden_layers=toy.vision_depth,
                num_attention_heads=toy.vision_heads, patch_size=14, image_size=TOY_TILE,
            ),
            scale_factor=2, image_token_id=ids["<image>"], pad_token_id=ids[IM_END], tie_word_embeddings=False,
        )
