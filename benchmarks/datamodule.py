"""Samples/s of the DataModule's input path per DataLoader worker count, at the paper's 800x450 images.

    python -m benchmarks.datamodule [--json] [--workers 0,1,2] [--samples N] [--batch-size B] [--tiny]
                                    [--config YAML] [--shards DIR] [--stream train|eval] [--split train|val|test]

What is timed: one full pass of `DriveDataModule.train_dataloader()` (default; `--stream eval`: the validation
loader `loader(eval_stream(split, with_answer=True), batch, "right")`) end to end: WebDataset shard read, JPEG
decode, resize to data.image_width x data.image_height, the backbone processor (chat template, tokenisation,
image patches) and collation, exactly what a training step consumes, DataLoader worker start-up included (workers
are not persistent in this DataModule). No model runs.
Each worker count runs in the same process, interleaved round by round (common.time_interleaved); samples/s of
a worker count divided by that of num_workers=0 says how much each extra worker buys on this machine, and
`samples_per_s_per_worker` how many samples one worker process delivers: a reader divides a GPU step's
samples/s by it to get the workers that keep the GPU fed. Also reported: image tokens, text tokens and
sequence length per sample (from the same batches), and the batch tensors' bytes per sample.

This module also holds the set-up helpers the other model benchmarks share (`synthetic_data`, `toy_config`).
"""

from __future__ import annotations

import atexit
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.common import base_parser, emit, format_table, log, machine_info, setup, time_interleaved

NAME = "datamodule"
PROJECT = Path(__file__).resolve().parent.parent
TOY_YAML = PROJECT / "configs" / "experiment" / "toy_mose.yaml"

# Toy backbone architectures: "toy" is the shipped default (backbone.toy); the bigger ones keep the toy's
# tokenizer and vision tower but widen / deepen the language model so that FFN and expert costs dominate.
TOY_SIZES: Dict[str, List[str]] = {
    "toy": [],
    "medium": ["backbone.toy.hidden_size=512", "backbone.toy.intermediate_size=1536", "backbone.toy.num_layers=4",
               "backbone.toy.num_heads=8", "backbone.toy.num_kv_heads=4", "backbone.toy.mrope_section=[8,12,12]"],
    "large": ["backbone.toy.hidden_size=1024", "backbone.toy.intermediate_size=4096", "backbone.toy.num_layers=4",
              "backbone.toy.num_heads=8", "backbone.toy.num_kv_heads=4", "backbone.toy.mrope_section=[16,24,24]"],
}


# --------------------------------------------------------------------------------------------------- set-up helpers


def temp_dir(prefix: str) -> Path:
    """A temporary folder removed at interpreter exit."""
    path = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def synthetic_data(num_train: int, num_val: int, num_test: int, width: int = 224, height: int = 126, seed: int = 0,
                   maxcount: int = 64, out: Optional[Path] = None) -> Path:
    """Generate the synthetic driving set (OUT/{train,val,test}) into a temporary folder; returns OUT."""
    from data_recipes.synthetic import generate_synthetic

    out = out or temp_dir("synthetic")
    start = time.perf_counter()
    generate_synthetic(out, num_train, num_val, num_test, seed, width, height, overwrite=True, maxcount=maxcount,
                       show_progress=False)
    log(f"synthetic set {num_train}/{num_val}/{num_test} at {width}x{height} in {time.perf_counter() - start:.1f}s: {out}")
    return out


def toy_config(config: Optional[str], shards: Optional[str], overrides: Sequence[str] = (), size: str = "toy",
               toy_dir: Optional[Path] = None):
    """The experiment config the model benchmarks run: `config` (default: the toy MoSE experiment) with no
    instruction-tuned init checkpoint and no pretrained routers, data from `shards` (a folder holding
    train/val/test shard folders), and the toy backbone cached in a temporary folder (built once, seconds)."""
    from mose_lightning.config import load_config

    base: List[str] = []
    path = Path(config) if config else TOY_YAML
    if not config:
        toy_dir = toy_dir or temp_dir("toy") / "toy"
        base += [f"backbone.toy_dir={toy_dir}", "backbone.init_checkpoint=null"] + TOY_SIZES[size]
    base += ["moe.router_checkpoint=null", "data.num_workers=0"]
    if shards:
        root = Path(shards)
        for split in ("train", "val", "test"):
            if (root / split).is_dir():
                base.append(f"data.{split}_shards={root / split}")
    return load_config(path, base + list(overrides))


# --------------------------------------------------------------------------------------------------- benchmark


def build_parser():
    parser = base_parser("Samples/s of the DataModule path (shard read, JPEG decode, resize, processor, collate).", 3, 1)
    parser.add_argument("--config", default=None, help="experiment YAML (default: the toy MoSE config)")
    parser.add_argument("--shards", default=None, help="folder with train/val/test shard folders (default: synthetic)")
    parser.add_argument("--split", default="train", choices=["train", "val", "test"])
    parser.add_argument("--workers", default="0,1,2", help="comma-separated num_workers values")
    parser.add_argument("--samples", type=int, default=256, help="synthetic samples generated (and read per pass)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--width", type=int, default=800, help="image width (synthetic and data.image_width)")
    parser.add_argument("--height", type=int, default=450, help="image height (synthetic and data.image_height)")
    parser.add_argument("--stream", default="train", choices=["train", "eval"],
                        help="train: the training stream SFT reads (workers split the shards, shuffle buffer); "
                             "eval: the evaluation stream of --split (every worker reads all records, encodes its share)")
    return parser


def run(args) -> dict:
    device, dtype = setup(args)
    workers = [int(w) for w in args.workers.split(",") if w != ""]
    samples = 16 if args.tiny else args.samples
    repeats, warmup = (1, 0) if args.tiny else (args.repeats, args.warmup)
    if args.tiny:
        workers = [0]
    shards = args.shards or synthetic_data(samples, 4, 4, args.width, args.height, args.seed, maxcount=16)
    cfg = toy_config(args.config, str(shards), [f"data.image_width={args.width}", f"data.image_height={args.height}",
                                                f"data.batch_size={args.batch_size}",
                                                f"data.eval_batch_size={args.batch_size}", "data.shuffle_buffer=16"])
    from mose_lightning.backbones import get_adapter
    from mose_lightning.data.datamodule import DriveDataModule
    from mose_lightning.skills import load_taxonomy

    adapter = get_adapter(cfg.backbone)
    if cfg.backbone.name == "toy":
        from mose_lightning.backbones.toy import ensure_toy_dir
        from mose_lightning.backbones.qwen2_vl import load_processor

        processor = load_processor(ensure_toy_dir(cfg.backbone), "backbone.toy_dir")
    else:
        _, processor = adapter.load(cfg.backbone)  # a real backbone: the processor is what matters here
    taxonomy = load_taxonomy(cfg.skills.taxonomy)

    stats: Dict[int, dict] = {}

    def make_pass(num_workers: int):
        def one_pass():
            cfg.data.num_workers = num_workers
            dm = DriveDataModule(cfg.data, adapter, processor, taxonomy)
            if args.stream == "train":
                loader = dm.train_dataloader()
            else:
                loader = dm.loader(dm.eval_stream(args.split, with_answer=True), cfg.data.batch_size, "right")
            n, image_tokens, lengths, text_tokens, nbytes, first = 0, [], [], [], 0, None
            start = time.perf_counter()
            for batch in loader:
                if first is None:
                    first = time.perf_counter() - start
                n += len(batch["meta"])
                image_ids = batch["input_ids"] == image_token_id
                per_sample_img = image_ids.sum(1)
                per_sample_len = batch["attention_mask"].sum(1)
                image_tokens += per_sample_img.tolist()
                lengths += per_sample_len.tolist()
                text_tokens += (per_sample_len - per_sample_img).tolist()
                nbytes += sum(v.numel() * v.element_size() for v in batch.values() if isinstance(v, torch.Tensor))
            total = time.perf_counter() - start
            stats[num_workers] = {"samples": n, "image_tokens": image_tokens, "lengths": lengths,
                                  "text_tokens": text_tokens, "bytes": nbytes, "first_batch_s": first, "pass_s": total}

        return one_pass

    image_token_id = adapter.image_token_id(processor)
    log(f"[{NAME}] {samples} samples at {args.width}x{args.height}, batch {args.batch_size}, workers {workers}")
    timings = time_interleaved({f"workers={w}": make_pass(w) for w in workers}, repeats, warmup, device)
    base = timings[f"workers={workers[0]}"]["median_s"]
    results = {}
    for w in workers:
        t = timings[f"workers={w}"]
        n = stats[w]["samples"]
        sps = n / t["median_s"]
        results[f"workers={w}"] = {
            "num_workers": w, "samples": n, "median_s": t["median_s"], "min_s": t["min_s"], "times_s": t["times_s"],
            "samples_per_s": sps, f"ratio_vs_workers={workers[0]}": t["median_s"] / base,
            "samples_per_s_per_worker": sps / max(1, w),
            "first_batch_s": stats[w]["first_batch_s"],
        }
    any_stats = stats[workers[0]]
    img, lens, txt = any_stats["image_tokens"], any_stats["lengths"], any_stats["text_tokens"]
    return {
        "benchmark": NAME,
        "machine": machine_info(device),
        "config": {
            "config": args.config or str(TOY_YAML.relative_to(PROJECT)), "backbone": cfg.backbone.name,
            "shards": args.shards or "synthetic (generated)", "stream": args.stream, "split": "train" if args.stream == "train" else args.split,
            "samples": samples, "batch_size": args.batch_size, "image_size": [args.width, args.height],
            "repeats": repeats, "warmup": warmup, "workers": workers,
            "timed": "shard read + JPEG decode + resize + processor + collate (prompt + answer), whole pass incl. worker start-up",
        },
        "per_sample": {
            "image_tokens": statistics.mean(img), "image_tokens_min": min(img), "image_tokens_max": max(img),
            "text_tokens": statistics.mean(txt), "sequence_length": statistics.mean(lens),
            "batch_bytes": any_stats["bytes"] / max(1, any_stats["samples"]),
        },
        "results": results,
    }


def table(result: dict) -> str:
    rows = []
    for name, r in result["results"].items():
        rows.append({"workers": r["num_workers"], "samples": r["samples"], "median_s": r["median_s"],
                     "samples/s": r["samples_per_s"], "samples/s/worker": r["samples_per_s_per_worker"],
                     "first batch s": r["first_batch_s"]})
    c, p, m = result["config"], result["per_sample"], result["machine"]
    head = (f"{NAME}: {m['cpu_model']} ({m['cpu_count']} cpus), {c['samples']} samples at {c['image_size'][0]}x"
            f"{c['image_size'][1]}, batch {c['batch_size']}, backbone {c['backbone']}")
    foot = (f"per sample: {p['image_tokens']:.1f} image tokens ({p['image_tokens_min']}-{p['image_tokens_max']}), "
            f"{p['text_tokens']:.1f} text tokens, {p['batch_bytes'] / 1024:.1f} KiB of batch tensors")
    return f"{head}\n{format_table(rows, ['workers', 'samples', 'median_s', 'samples/s', 'samples/s/worker', 'first batch s'])}\n{foot}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    emit(result, args.json, table)
    # Every worker count must deliver the same samples (the eval stream: each sample exactly once).
    counts = {r["samples"] for r in result["results"].values()}
    return 0 if len(counts) == 1 and min(counts) > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
