"""A full-size fine-tuning step and generation of a real architecture with random weights (nothing downloaded):
MoSE against dense SFT of the same trainable layers, and MoSE under FSDP on one device.

    python -m benchmarks.train_step [--config configs/experiment/coda_mose.yaml] [--device cuda] [--dtype bfloat16]
                                    [--batch 8 --seq 2048] [--new-tokens 32] [--no-fsdp] [--json] [--tiny]

Variants (one model each, built from the config's architecture, `backbone.path` not needed):
  dense      moe.kind=dense: the FFNs of the config's MoE layers are the trainable part (the SFT row)
  mose       the config as it is (MoSE in its layers, its router input)
  mose_fsdp  the MoSE model wrapped by the training strategy's FSDP wrap and precision policy, one device (only on
             CUDA, where FSDP runs with NCCL; world size 1)
Timed: a training step on B x T text tokens (first half prompt, routed on; the loss on the second half): forward,
backward, AdamW step, `zero_grad`; tokens/s of the step and its peak memory (CUDA: max_memory_allocated). And a
greedy generation of --new-tokens tokens from the prompt half: time per new token. Weights are cast to --dtype
(bf16 on a GPU: the bf16-true setting; FSDP uses the strategy's bf16-mixed policy on float32 master weights).
`--tiny`: the toy architecture on the CPU, one repeat.
"""

from __future__ import annotations

import gc
import sys
import time
from typing import Dict

import torch

from benchmarks.common import base_parser, emit, format_table, log, machine_info, setup, synchronize

NAME = "train_step"
GPU_ONLY = True  # full-size models: `make bench` on a CPU skips it (`--tiny` runs the toy)
DEFAULT_CONFIG = "configs/experiment/coda_mose.yaml"


def build_parser():
    parser = base_parser("Full-size SFT step and generation, MoSE vs dense, random weights of a real architecture.", 5, 2)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="experiment YAML giving the architecture and MoE")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (time per token)")
    parser.add_argument("--no-fsdp", action="store_true", help="skip the FSDP variant")
    return parser


def _config(args, kind: str):
    from mose_lightning.config import load_config

    if args.tiny:
        from benchmarks.datamodule import temp_dir, toy_config

        return toy_config(None, None, [f"moe.kind={kind}"], toy_dir=temp_dir("toy") / "toy")
    overrides = ["moe.router_checkpoint=null", "backbone.init_checkpoint=null"]
    return load_config(args.config, overrides + ([f"moe.kind={kind}"] if kind == "dense" else []))


def _batch(model, batch: int, seq: int, device) -> Dict[str, torch.Tensor]:
    vocab = model.backbone.config.get_text_config().vocab_size
    special = {model.adapter.image_token_id(model.backbone)}
    ids = torch.randint(0, min(vocab, 32000), (batch, seq), generator=torch.Generator().manual_seed(0))
    ids[torch.isin(ids, torch.tensor(sorted(special)))] = 1
    prompt = torch.zeros(batch, seq, dtype=torch.bool)
    prompt[:, : seq // 2] = True
    labels = ids.clone()
    labels[prompt] = -100
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "prompt_mask": prompt,
           "skill_labels": torch.full((batch, 3), -1, dtype=torch.long)}
    return {k: v.to(device) for k, v in out.items()}


def _peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _time(fn, repeats: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _fsdp_wrap(cfg, model, device):
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from mose_lightning import training

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    cfg.trainer.strategy, cfg.trainer.precision = "fsdp", "bf16-mixed"
    strategy = training._strategy(cfg, model)
    return FSDP(model.float(), auto_wrap_policy=strategy.kwargs["auto_wrap_policy"],
                mixed_precision=strategy.mixed_precision, use_orig_params=True, device_id=device)


def run(args) -> dict:
    device, dtype = setup(args)
    from mose_lightning.model import build_model

    batch_size, seq = (2, 64) if args.tiny else (args.batch, args.seq)
    new_tokens = 4 if args.tiny else args.new_tokens
    repeats, warmup = (1, 0) if args.tiny else (args.repeats, args.warmup)
    variants = ["dense", "mose"] + ([] if args.no_fsdp or device.type != "cuda" else ["mose_fsdp"])
    results: Dict[str, dict] = {}
    for name in variants:
        cfg = _config(args, "dense" if name == "dense" else "mose")
        torch.manual_seed(args.seed)
        model = build_model(cfg, random_weights_on=device).to(dtype)
        for block in model.layout.sequence_routed:  # routers compute in float32 in a bf16 model
            block.router.float()
        trainable = [p for p in model.parameters() if p.requires_grad]
        batch = _batch(model, batch_size, seq, device)
        module = _fsdp_wrap(cfg, model, device) if name == "mose_fsdp" else model
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        module.train()

        def step():
            out = module(batch)
            out.training_loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _peak_reset(device)
        step_s = _time(step, repeats, warmup, device)
        peak = _peak(device)
        result = {"step_median_s": step_s, "tokens_per_s": batch_size * seq / step_s, "peak_memory_bytes": peak,
                  "trainable_params": sum(p.numel() for p in trainable),
                  "moe_layers": list(model.layout.layer_indices) if model.layout.kind != "dense" else [],
                  "router_input": cfg.moe.router_input}
        if name != "mose_fsdp":
            del optimizer
            gc.collect()
            model.eval()
            prompts = {k: v[:, : seq // 2] for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            prompts["skill_labels"] = batch["skill_labels"]

            def generate():
                model.generate(prompts, new_tokens, min_new_tokens=new_tokens)

            result["generate_median_s"] = _time(generate, repeats, min(warmup, 1), device)
            result["seconds_per_new_token"] = result["generate_median_s"] / new_tokens
        results[name] = result
        log(f"[{NAME}] {name}: {result['tokens_per_s']:.0f} tokens/s"
            + (f", peak {peak / 2**30:.1f} GiB" if peak else ""))
        del model, module, batch
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dense = results["dense"]
    for name, r in results.items():
        r["step_ratio_vs_dense"] = r["step_median_s"] / dense["step_median_s"]
        if "seconds_per_new_token" in r:
            r["per_token_ratio_vs_dense"] = r["seconds_per_new_token"] / dense["seconds_per_new_token"]
        if r["peak_memory_bytes"] and dense["peak_memory_bytes"]:
            r["peak_memory_ratio_vs_dense"] = r["peak_memory_bytes"] / dense["peak_memory_bytes"]
    return {
        "benchmark": NAME,
        "machine": machine_info(device, dtype),
        "config": {"config": "toy" if args.tiny else args.config, "batch": batch_size, "seq": seq,
                   "new_tokens": new_tokens, "repeats": repeats, "warmup": warmup,
                   "timed": "forward + backward + AdamW step on text tokens; greedy generation from the prompt half"},
        "results": results,
    }


def table(result: dict) -> str:
    rows = []
    for name, r in result["results"].items():
        rows.append({"variant": name, "tokens/s": r["tokens_per_s"], "step_ratio": r["step_ratio_vs_dense"],
                     "peak_GiB": (r["peak_memory_bytes"] or 0) / 2**30,
                     "s/token": r.get("seconds_per_new_token", float("nan")),
                     "token_ratio": r.get("per_token_ratio_vs_dense", float("nan"))})
    c, m = result["config"], result["machine"]
    head = f"{NAME}: {m.get('gpu', m['cpu_model'])}, torch {m['torch_version']}, {c['config']}, {c['batch']}x{c['seq']}"
    return f"{head}\n{format_table(rows, ['variant', 'tokens/s', 'step_ratio', 'peak_GiB', 's/token', 'token_ratio'])}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    emit(run(args), args.json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
