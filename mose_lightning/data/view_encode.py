"""Samples for camera-view routing: every view preprocessed, the prompt left in pieces for the model to assemble.

With `views.enabled` the prompt depends on what the view router chooses, so the DataModule cannot lay it out. Per
sample (in the DataLoader workers) this encoder
  * decodes and resizes the views the configuration knows (`views.names`; others are ignored), and runs the image
    processor on each: pixels are cheap to prepare, and only the views the model chooses reach the vision tower;
  * tokenises the chat prompt around the images (prefix, suffix, answer; see `BackboneAdapter.view_prompt_pieces`)
    and the question alone (the router's context token);
  * turns the sample's `view_labels` into router targets over `views.classes`: the labelled candidate views, or,
    where the question names none of them, the fallback (NONE or a candidate view); a sample without
    `view_labels` has no target (the router decides for it even under teacher forcing).
Collation keeps one entry per sample (`view_items`) and stacks what has a fixed shape.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from mose_lightning.config import VIEW_NONE, ViewsConfig
from mose_lightning.data.encode import EncodeSettings, Overlong
from mose_lightning.data.sample import Sample, SampleError, decode_images
from mose_lightning.skills import SkillTaxonomy


def view_targets(sample: Sample, views: ViewsConfig) -> Optional[List[bool]]:
    """Multi-hot router target over `views.classes` (None: the sample carries no view labels).

    A label naming a view the sample lacks is an error (the sample format checks it too); labelled views outside
    `views.names` cannot be shown and are left out."""
    if sample.view_labels is None:
        return None
    missing = [v for v in sample.view_labels if v not in sample.views]
    if missing:
        raise SampleError(f"sample {sample.key!r}: view_labels {missing} name views the sample does not have "
                          f"(its views: {sample.views})")
    classes = views.classes
    hot = [name in sample.view_labels for name in classes]
    if not any(hot):
        fallback = views.fallback
        if fallback != VIEW_NONE and fallback not in sample.views:
            return None  # the fallback view is missing from this sample: no target rather than a wrong one
        hot[classes.index(fallback)] = True
    return hot


class ViewSampleEncoder:
    """Callable sample -> dict with `view_item` (per-sample tensors) + `meta`; picklable for DataLoader workers."""

    def __init__(self, adapter, processor, taxonomy: SkillTaxonomy, settings: EncodeSettings, views: ViewsConfig,
                 max_shown: int, kept_only: bool = False) -> None:
        self.adapter = adapter
        # Preprocess the kept views only (what the router reads): for router pretraining, which shows no other view.
        self.kept_only = kept_only
        self.processor = processor
        self.taxonomy = taxonomy
        self.settings = settings
        self.views = views
        self.max_shown = max_shown
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.commands = list(views.commands)

    def _tokens_per_image(self, grid: torch.Tensor) -> torch.Tensor:
        merge = getattr(getattr(self.processor, "image_processor", None), "merge_size", 2)
        return grid.prod(dim=-1) // (merge * merge)

    def __call__(self, sample: Sample) -> Dict[str, Any]:
        s, v = self.settings, self.views
        if s.with_answer and not sample.answer:
            raise ValueError(f"sample {sample.key!r}: no answer to train on")
        missing = [name for name in v.kept if name not in sample.views]
        if missing:
            raise SampleError(f"sample {sample.key!r}: lacks the kept view(s) {missing} of views.kept "
                              f"(its views: {sample.views})")
        targets = view_targets(sample, v)
        present = [name for name in v.names if name in sample.views]
        processed = [name for name in present if name in v.kept] if self.kept_only else present
        record = {"__key__": sample.key, **{f"{j}.jpg": sample.images[sample.views.index(name)]
                                            for j, name in enumerate(processed)}}
        images = [img.resize((s.image_width, s.image_height)) for img in decode_images(record)]
        if s.blank_images:
            images = [Image.new("RGB", img.size, (128, 128, 128)) for img in images]
        vision = self.processor.image_processor(images=images, return_tensors="pt")
        grid = vision["image_grid_thw"]
        pieces = self.adapter.view_prompt_pieces(self.processor, sample.question, s.system_prompt,
                                                 sample.answer if s.with_answer else None)
        per_image = self._tokens_per_image(grid)
        text = len(pieces["prefix"]) + len(pieces["suffix"]) + len(pieces["answer"])
        image_block = len(pieces["image_start"]) + len(pieces["image_end"])
        # The longest prompt this sample can get: the kept views plus the most candidates a forward may show.
        shown = sorted(per_image.tolist(), reverse=True)[: self.max_shown]
        longest = text + sum(shown) + image_block * len(shown) + 8 * len(shown)  # 8: room for a camera name
        if longest > s.max_length:
            raise Overlong(f"sample {sample.key!r}: up to {longest} tokens with {len(shown)} views > "
                           f"data.max_length={s.max_length}")
        command = 0
        if sample.command is not None and sample.command in self.commands:
            command = self.commands.index(sample.command) + 1
        item = {
            "pixel_values": vision["pixel_values"],
            "grid_thw": grid,
            "view_index": torch.tensor([v.names.index(name) for name in processed], dtype=torch.long),
            "prefix_ids": torch.tensor(pieces["prefix"], dtype=torch.long),
            "suffix_ids": torch.tensor(pieces["suffix"], dtype=torch.long),
            "answer_ids": torch.tensor(pieces["answer"], dtype=torch.long),
            "question_ids": torch.tensor(self.tokenizer(sample.question)["input_ids"], dtype=torch.long),
        }
        classes = v.classes
        available = [name == VIEW_NONE or name in present for name in classes]
        return {
            "view_item": item,
            "view_targets": torch.tensor(targets if targets is not None else [False] * len(classes)),
            "view_available": torch.tensor(available),
            "command": torch.tensor(command, dtype=torch.long),
            "skill_labels": torch.tensor(self.taxonomy.label_vector(sample.skills), dtype=torch.long),
            "meta": {
                "key": sample.key, "dataset": sample.dataset, "task": sample.task, "question": sample.question,
                "answer": sample.answer, "category": sample.category, "skills": sample.skills,
                "views": present, "view_labels": sample.view_labels, "command": sample.command,
                "frame": sample.source.get("frame_token"),
                "truncated_words": 0,
                "thumbnail": np.asarray(images[0].resize((96, 54))) if images else None,
                "view_thumbnails": {name: np.asarray(img.resize((96, 54))) for name, img in zip(processed, images)},
            },
        }


def collate_views(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One batch of view samples: per-sample items as a list, fixed-shape fields stacked."""
    if not items:
        raise ValueError("collate got an empty batch")
    return {
        "view_items": [item["view_item"] for item in items],
        "view_targets": torch.stack([item["view_targets"] for item in items]),
        "view_available": torch.stack([item["view_available"] for item in items]),
        "command": torch.stack([item["command"] for item in items]),
        "skill_labels": torch.stack([item["skill_labels"] for item in items]),
        "meta": [item["meta"] for item in items],
    }


def _class_counts(label_sets: Dict[str, int], sample_views: List[str], views: ViewsConfig) -> Dict[str, int]:
    """Router-class counts from a manifest's label-set counts (see data_recipes/view_labels.py)."""
    counts = {name: 0 for name in views.classes}
    for key, n in label_sets.items():
        sample = Sample(key="manifest", dataset="synthetic", task="general", question="?", answer=None,
                        views=list(sample_views), images=[], view_labels=[v for v in key.split("|") if v])
        for name, hot in zip(views.classes, view_targets(sample, views) or []):
            counts[name] += int(hot) * int(n)
    return counts


def count_view_targets(shards: List[str], views: ViewsConfig) -> Dict[str, int]:
    """Samples per router class in `shards` (a multi-label sample counts for each of its classes): the
    training-set frequencies behind the focal loss's inverse-frequency alpha. From the manifests' label-set
    counts where every shard folder has them and the shards are all of its shards; else from the records' JSON
    (a pass over the data)."""
    from pathlib import Path

    from mose_lightning.data.shards import ShardError, iter_records, read_manifest

    folders: Dict[str, List[str]] = {}
    for shard in shards:
        folders.setdefault(str(Path(shard).parent), []).append(Path(shard).name)
    total = {name: 0 for name in views.classes}
    try:
        for folder, names in folders.items():
            manifest = read_manifest(folder)
            sets = manifest.get("view_label_sets")
            listed = sorted(e["name"] for e in manifest["shards"])
            if not sets or not sets.get("views") or sorted(names) != listed:
                raise ShardError("no usable label-set counts")
            for name, n in _class_counts(sets["sets"], sets["views"], views).items():
                total[name] += n
        return total
    except (ShardError, KeyError, TypeError, ValueError):
        pass
    counts = {name: 0 for name in views.classes}
    for record in iter_records(shards, on_error="skip"):
        sample = Sample.from_record(record, where=record.get("__url__", "?"))
        targets = view_targets(sample, views)
        for name, hot in zip(views.classes, targets or []):
            counts[name] += int(hot)
    return counts
