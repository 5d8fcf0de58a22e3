"""The toy backbones' tokenizer: a byte-level BPE trained offline on a small driving corpus shipped in the package.

Byte-level so that any text encodes (no unknown token), split with Qwen2's pre-tokenizer pattern (digits one by
one, a newline never merges with the word after it), and given the special tokens and chat template of the real
backbone a toy stands in for (a `ToyTokenizerSpec` per family), so that prompts, labels and image placeholders are
built by the same code for the toy and the real backbone. Training takes milliseconds and is deterministic (the
BPE trainer breaks count ties by token ids, not by hash order); `tests/test_backbones.py` checks it across
processes. Every family shares the learned vocabulary; only the special tokens appended after it differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# Qwen2's split pattern (public in its tokenizer.json): contractions, letter runs with one optional leading
# non-letter, single digits, punctuation runs, newlines, other whitespace.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VISION_PAD = "<|vision_pad|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Same order as in Qwen2-VL's vocabulary, appended after the learned tokens as Qwen2-VL does.
SPECIAL_TOKENS: List[str] = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD]


@dataclass(frozen=True)
class ToyTokenizerSpec:
    """What a toy tokenizer carries of the real one: special tokens (appended after the learned vocabulary, in
    this order), the eos / pad / bos roles, the chat template (a file of resources/backbones/, or None for a
    backbone without one) and named special tokens the real tokenizer exposes as attributes (InternVL's
    `context_image_token`, ...)."""

    special_tokens: Tuple[str, ...]
    eos: str
    pad: str
    bos: Optional[str] = None
    chat_template: Optional[str] = None
    named_tokens: Dict[str, str] = field(default_factory=dict)
    # Tokens that end generation, as the real model's generation_config lists them.
    stop_tokens: Tuple[str, ...] = ()


# Qwen2-VL-Instruct ends a turn (and generation) with <|im_end|> and pads with <|endoftext|>; no BOS.
QWEN2_VL_TOKENS = ToyTokenizerSpec(tuple(SPECIAL_TOKENS), eos=IM_END, pad=ENDOFTEXT,
                                   chat_template="qwen2_vl_chat_template.jinja", stop_tokens=(IM_END, ENDOFTEXT))

# Upper bound on the learned vocabulary (256 byte symbols + merges; the specials come on top). The shipped corpus
# runs out of pairs seen twice first: 834 learned + 8 special = 842 ids. Small on purpose: the embedding (tied
# with the LM head) is most of a 64-wide toy model.
DEFAULT_BPE_VOCAB = 1024

RESOURCE_DIR = Path(__file__).resolve().parent.parent / "resources" / "backbones"
CORPUS_FILE = "toy_corpus.txt"


def read_resource(name: str) -> str:
    try:
        return (RESOURCE_DIR / name).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"mose_lightning/resources/backbones/{name} is missing: the package was installed without its "
            "resources (reinstall it; pyproject's package-data must include resources/**/*)"
        ) from err


def train_toy_tokenizer(vocab_size: int = DEFAULT_BPE_VOCAB, special_tokens=tuple(SPECIAL_TOKENS)) -> Tokenizer:
    """A raw `tokenizers.Tokenizer`; same corpus, vocab_size and specials give the same tokenizer, byte for byte."""
    corpus = [line for line in read_resource(CORPUS_FILE).splitlines() if line.strip()]
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        # The full byte alphabet up front: any UTF-8 text encodes even if the corpus never showed its bytes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tok


def build_toy_tokenizer(vocab_size: int = DEFAULT_BPE_VOCAB, spec: ToyTokenizerSpec = QWEN2_VL_TOKENS):
    """The transformers tokenizer (fast backend) with `spec`'s special tokens and chat template (Qwen2-VL's by
    default)."""
    from transformers import PreTrainedTokenizerFast

    named = {"extra_special_tokens": dict(spec.named_tokens)} if spec.named_tokens else {}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_toy_tokenizer(vocab_size, spec.special_tokens),
        eos_token=spec.eos,
        pad_token=spec.pad,
        bos_token=spec.bos,
        unk_token=None,
        model_max_length=32768,
        # Left padding so batched generation appends right after each prompt.
        padding_side="left",
        clean_up_tokenization_spaces=False,
        **named,
    )
    if spec.chat_template:
        tok.chat_template = read_resource(spec.chat_template)
    return tok


def special_token_ids(tokenizer, tokens=tuple(SPECIAL_TOKENS)) -> Dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"toy tokenizer lacks the special tokens {missing}")
    return ids
