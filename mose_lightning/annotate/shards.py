"""`mose skills annotate`: read shards, set each sample's `skills` by rules or by an LLM, write new shards.

Samples keep their previous skills (e.g. the synthetic set's ground truth) under `skills_reference`, so the
annotator's agreement with them is measured and reported. With `annotate.sample=N` only a seeded subset of N
samples is annotated (the paper finds ~2000 enough); the others are written with `skills: null`, which router
pretraining ignores and SFT routes by the router.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Dict

from mose_lightning.annotate.gpt import annotate_gpt, select_subset
from mose_lightning.annotate.rules import annotate_rule
from mose_lightning.config import AnnotateConfig
from mose_lightning.data.sample import decode_images
from mose_lightning.data.shards import ShardWriter, iter_samples, prepare_output_dirs
from mose_lightning.locks import holds_lock
from mose_lightning.skills import SkillTaxonomy


@holds_lock("out_dir", "mose skills annotate")
def annotate_shards(shards: str, out_dir: str | Path, taxonomy: SkillTaxonomy, cfg: AnnotateConfig,
                    maxcount: int = 200) -> Dict[str, Any]:
    samples = list(iter_samples(shards))
    chosen = select_subset(len(samples), cfg.sample, cfg.seed) if cfg.sample else list(range(len(samples)))
    if cfg.annotator == "rule":
        results = [annotate_rule(samples[i].to_json(), taxonomy) for i in chosen]
        summary: Dict[str, Any] = {"annotator": "rule", "n_annotated": len(results), "n_failed": 0}
    else:
        dicts = [samples[i].to_json() for i in chosen]
        images = [decode_images(samples[i]) for i in chosen] if cfg.use_image else None
        results, gpt_summary = annotate_gpt(dicts, taxonomy, cfg, images=images)
        summary = {"annotator": "gpt", "model": cfg.client.model, **gpt_summary.to_dict()}
    by_index = dict(zip(chosen, results))
    agreement: Dict[str, Counter] = {level: Counter() for level in taxonomy.level_names}
    distribution: Dict[str, Counter] = {level: Counter() for level in taxonomy.level_names}
    prepare_output_dirs([out_dir], overwrite=True)
    with ShardWriter(out_dir, prefix="shard", maxcount=maxcount) as writer:
        for i, sample in enumerate(samples):
            previous = sample.skills
            if previous is not None:
                sample.extra["skills_reference"] = previous
            skills = by_index.get(i)
            sample.skills = skills  # None: not annotated (outside the subset, or the LLM failed)
            if skills is not None:
                for level in taxonomy.level_names:
                    distribution[level][skills[level]] += 1
                    if previous is not None:
                        agreement[level]["agree" if previous.get(level) == skills[level] else "disagree"] += 1
            writer.write(sample)
    summary["n_samples"] = len(samples)
    summary["distribution"] = {level: dict(c) for level, c in distribution.items()}
    summary["agreement_with_reference"] = {
        level: (c["agree"] / (c["agree"] + c["disagree"]) if (c["agree"] + c["disagree"]) else None)
        for level, c in agreement.items()
    }
    return summary
