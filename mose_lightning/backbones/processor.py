"""The backbones' processors for images and text only: the stock transformers processors without their video
processor (the toys' and the real models').

transformers 5.x type-checks every sub-processor of a processor, and the video processors need torchvision; this
framework feeds images only. Dropping the video slot lets a processor work with or without torchvision, and it
still reads a stock model directory (tokenizer, image processor, chat template). The classes are module level
(not built on use) so that DataLoader workers and spawned ranks can pickle them.
"""

from __future__ import annotations

from transformers import (
    InternVLProcessor,
    PaliGemmaProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
    SmolVLMProcessor,
)
from transformers.models.smolvlm import processing_smolvlm
from transformers.processing_utils import ProcessorMixin


def _without_video(base: type, name: str) -> type:
    """`base` whose video processor is None. The stock processors take (image, tokenizer, video) positionally and
    hand them to ProcessorMixin, which pairs them with get_attributes() (read from this __init__'s signature:
    image_processor, tokenizer), so the None video drops out."""

    # Every other parameter of the base's __init__ must be spelled out here too: from_pretrained passes on only the
    # saved settings this function's code names, and save_pretrained writes only those its signature names.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})


Qwen2VLImageTextProcessor = _without_video(Qwen2VLProcessor, "Qwen2VLImageTextProcessor")
Qwen2_5_VLImageTextProcessor = _without_video(Qwen2_5_VLProcessor, "Qwen2_5_VLImageTextProcessor")
Qwen3VLImageTextProcessor = _without_video(Qwen3VLProcessor, "Qwen3VLImageTextProcessor")


class InternVLImageTextProcessor(InternVLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)


class SmolVLMImageTextProcessor(SmolVLMProcessor):
    # SmolVLM's own apply_chat_template only adds video sampling defaults (read from the video processor).
    apply_chat_template = ProcessorMixin.apply_chat_template

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        # SmolVLMProcessor refuses to start without num2words, which only spells the frame count of videos.
        spell = processing_smolvlm.num2words
        processing_smolvlm.num2words = spell or str
        try:
            SmolVLMProcessor.__init__(self, image_processor, tokenizer, None, image_seq_len=image_seq_len,
                                      chat_template=chat_template, **kwargs)
        finally:
            processing_smolvlm.num2words = spell


class PaliGemmaImageTextProcessor(PaliGemmaProcessor):
    """PaliGemma's processor taking the text as laid out (`PaliGemmaAdapter.build_prompt` writes the image tokens,
    <bos> and the newline ending the prefix itself): the stock one inserts <bos> after the last image token and a
    newline at the end of *every* text, the answer included. Labels and token types come from the encoder."""

    def prepare_inputs_layout(self, images=None, text=None, **kwargs):
        return ProcessorMixin.prepare_inputs_layout(self, images=images, text=text, **kwargs)

    def __call__(self, images=None, text=None, **kwargs):
        out = super().__call__(images=images, text=text, **kwargs)
        out.pop("labels", None)
        return out
