"""Qwen2-VL's processor without its video processor (the toy's and the real Qwen2-VL's).

transformers 5.x type-checks every sub-processor of `Qwen2VLProcessor`, and its video processor needs
torchvision; this framework feeds images only. Dropping the video slot lets the processor work with or without
torchvision, and it still reads a stock Qwen2-VL directory (tokenizer, image processor, chat template).
Module level (not built in a function) so that DataLoader workers and spawned ranks can pickle it.
"""

from __future__ import annotations

from transformers import Qwen2VLProcessor


class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Qwen2VLProcessor hands (image, tokenizer, video) positionally to ProcessorMixin, which pairs them with
        # get_attributes() (read from this signature: image_processor, tokenizer), so the None video drops out.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
