"""Turn one sample into model inputs, and a list of encoded samples into a batch.

Per sample (in the DataLoader workers): decode and resize the views, lay out the chat prompt with the backbone
adapter, run the backbone's processor, and derive
  labels       the input ids with -100 on every prompt and padding position (the loss covers the answer only);
  prompt_mask  True on the prompt tokens (image + question) the MoSE routers pool over;
  skill_labels the expert index of the sample's skill per level (-1: not annotated).
The prompt length is found without running the processor twice: the prompt text is tokenised alone (one
placeholder per image) and credited with every token the processor's expansion of the image placeholders added
to the full sequence (image tokens and whatever the backbone frames them with: tile markers, <img> ... </img>).
A question holding `<region>` gets the sample's region written in, in the coordinates the backbone reads
(mose_lightning/backbones/boxes.py).

Collation pads the per-token tensors (right for training, left for generation) and concatenates the vision
tensors, which every supported processor keys per image (Qwen: flattened patches + grid; LLaVA, PaliGemma:
images; InternVL: tiles; SmolVLM: images x tiles, the same tile count for all, as every image has the same size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
from PIL import Image
import torch

from mose_lightning.backbones.boxes import REGION_PLACEHOLDER
from mose_lightning.data.sample import Sample, decode_images
from mose_lightning.skills import SkillTaxonomy

TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "prompt_mask", "mm_token_type_ids", "token_type_ids")
PAD_VALUES = {"input_ids": None, "labels": -100}


class Overlong(ValueError):
    """The sample does not fit `data.max_length` even after the configured truncation."""


class BadSkill(ValueError):
    """The sample's skill labels name a level or skill the taxonomy does not have."""


@dataclass
class EncodeSettings:
    image_width: int
    image_height: int
    max_length: int
    overlong: str  # skip | truncate_prompt
    system_prompt: Optional[str]
    with_answer: bool  # training/validation loss: prompt + answer; generation: prompt only
    blank_images: bool = False


class SampleEncoder:
    """Callable sample -> dict of tensors + `meta`; picklable so DataLoader workers can run it."""

    def __init__(self, adapter, processor, taxonomy: SkillTaxonomy, settings: EncodeSettings) -> None:
        self.adapter = adapter
        self.processor = processor
        self.taxonomy = taxonomy
        self.settings = settings
        self.tokenizer = getattr(processor, "tokenizer", processor)

    def _texts(self, question: str, num_images: int, answer: Optional[str]):
        s = self.settings
        return self.adapter.build_prompt(self.processor, question, num_images, s.system_prompt,
                                         answer if s.with_answer else None)

    def _encode(self, images, question: str, answer: Optional[str]) -> Dict[str, Any]:
        prompt_text, full_text = self._texts(question, len(images), answer)
        text = full_text if (self.settings.with_answer and full_text is not None) else prompt_text
        out = self.processor(text=[text], images=images or None, return_tensors="pt")
        ids = out["input_ids"][0]
        # Same special-token handling as the processor call, so a BOS token is counted on both sides. The images
        # all sit in the prompt, so all the tokens their expansion added belong to it.
        expanded = ids.shape[0] - len(self.tokenizer(text)["input_ids"])
        prompt_len = len(self.tokenizer(prompt_text)["input_ids"]) + expanded
        return {"out": out, "prompt_len": prompt_len, "length": ids.shape[0]}

    def _question(self, sample: Sample, original_size, encoded_size) -> str:
        if REGION_PLACEHOLDER not in sample.question:
            return sample.question
        if sample.region is None:
            raise ValueError(
                f"sample {sample.key!r}: the question holds {REGION_PLACEHOLDER} but the sample has no region"
            )
        # `region` is in pixels of the original image, which a converter may have stored resized.
        size = tuple(sample.source.get("image_size") or original_size)
        text = self.adapter.region_text(self.processor, sample.region, size, encoded_size)
        return sample.question.replace(REGION_PLACEHOLDER, text)

    def skill_labels(self, sample: Sample) -> List[int]:
        skills = sample.skills
        unknown = [level for level in (skills or {}) if level not in self.taxonomy.level_names]
        try:
            if unknown:
                raise KeyError(f"unknown level(s) {unknown}; known: {self.taxonomy.level_names}")
            return self.taxonomy.label_vector(skills)
        except KeyError as err:
            raise BadSkill(f"sample {sample.key!r}: skills {skills}: {err.args[0]}") from None

    def __call__(self, sample: Sample) -> Dict[str, Any]:
        s = self.settings
        if s.with_answer and not sample.answer:
            raise ValueError(f"sample {sample.key!r}: no answer to train on")
        skill_labels = self.skill_labels(sample)
        decoded = decode_images(sample)
        images = [img.resize((s.image_width, s.image_height)) for img in decoded]
        if s.blank_images:
            images = [Image.new("RGB", img.size, (128, 128, 128)) for img in images]
        question = self._question(sample, decoded[0].size, (s.image_width, s.image_height))
        enc = self._encode(images, question, sample.answer)
        truncated = 0
        if enc["length"] > s.max_length and s.overlong == "truncate_prompt":
            # Documented rule: drop words from the *start* of the question (its end usually holds the actual ask)
            # until the sequence fits; never touch the answer or the image tokens.
            words = question.split()
            while enc["length"] > s.max_length and len(words) > 1:
                excess = enc["length"] - s.max_length
                cut = max(1, min(len(words) - 1, excess))
                words = words[cut:]
                truncated += cut
                enc = self._encode(images, " ".join(words), sample.answer)
        if enc["length"] > s.max_length:
            raise Overlong(
                f"sample {sample.key!r}: {enc['length']} tokens > data.max_length={s.max_length}"
                + (" after truncating the question" if truncated else "")
            )
        out = enc["out"]
        ids = out["input_ids"][0]
        length = ids.shape[0]
        positions = torch.arange(length)
        item: Dict[str, Any] = {k: v[0] for k, v in out.items() if k in TOKEN_KEYS}
        item["prompt_mask"] = positions < enc["prompt_len"]
        if s.with_answer:
            labels = ids.clone()
            labels[: enc["prompt_len"]] = -100
            item["labels"] = labels
        for key, value in out.items():
            if key not in TOKEN_KEYS:
                item[key] = value
        item["skill_labels"] = torch.tensor(skill_labels, dtype=torch.long)
        item["meta"] = {
            "key": sample.key,
            "dataset": sample.dataset,
            "task": sample.task,
            "question": sample.question,
            "answer": sample.answer,
            "category": sample.category,
            "skills": sample.skills,
            "views": list(sample.views),
            "truncated_words": truncated,
            # Small first view for TensorBoard's skill-chain panel.
            "thumbnail": np.asarray(images[0].resize((96, 54))) if images else None,
        }
        return item


def collate(items: List[Dict[str, Any]], pad_token_id: int, padding_side: str = "right") -> Dict[str, Any]:
    """Pad token tensors to the longest sample, concatenate vision tensors, keep metas as a list."""
    if not items:
        raise ValueError("collate got an empty batch")
    batch: Dict[str, Any] = {}
    longest = max(item["input_ids"].shape[0] for item in items)
    for key in TOKEN_KEYS:
        if key not in items[0]:
            continue
        pad = PAD_VALUES.get(key, 0)
        pad = pad_token_id if key == "input_ids" else pad
        rows = []
        for item in items:
            value = item[key]
            fill = torch.full((longest - value.shape[0],), pad, dtype=value.dtype)
            rows.append(torch.cat([value, fill]) if padding_side == "right" else torch.cat([fill, value]))
        batch[key] = torch.stack(rows)
    for key in items[0]:
        if key in TOKEN_KEYS or key in ("meta", "skill_labels"):
            continue
        batch[key] = torch.cat([item[key] for item in items], dim=0)
    batch["skill_labels"] = torch.stack([item["skill_labels"] for item in items])
    batch["meta"] = [item["meta"] for item in items]
    return batch
