"""OpenAI-compatible chat access shared by the LLM judge and the GPT skill annotator."""

from mose_lightning.llm.client import (
    ClientStats,
    LLMClient,
    MissingAPIKeyError,
    Result,
    cache_key,
    image_data_url,
    user_message,
)

__all__ = [
    "ClientStats",
    "LLMClient",
    "MissingAPIKeyError",
    "Result",
    "cache_key",
    "image_data_url",
    "user_message",
]
