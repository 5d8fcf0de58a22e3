"""Peak memory of one SFT step (forward + backward + AdamW step): MoSE vs the dense model with the same frozen parts.

    python -m benchmarks.memory [--json] [--size toy|medium|large] [--batch-size B] [--variants dense,mose,topk]
                                [--config YAML] [--shards DIR] [--device cpu|cuda] [--threads N] [--tiny]

Every variant runs in a fresh subprocess (`python -m benchmarks.memory --child KIND ...`), so one variant's
allocator state cannot hide or inflate another's. In the child: build the model (`build_model`, the toy backbone
or --config's), read one training batch from the DataModule, build the SFT optimiser (`build_optimizer`: AdamW
over the trainable parameters); then
  step 1   forward (`MoEOutput.training_loss`: answer loss + MoE aux losses), backward, optimizer.step(),
           zero_grad(set_to_none=True): the first step also allocates AdamW's two state tensors per parameter;
  step 2   the same again (steady state: optimiser state already there).
CPU: the process' resident set is measured with Linux's peak counter (VmHWM in /proc/self/status, reset to the
current RSS by writing 5 to /proc/self/clear_refs before each step); `peak_rss_delta` = peak during the step -
RSS just before step 1 (what the step adds on top of the loaded model, optimiser state included). `ru_maxrss`
(getrusage, the whole process' lifetime peak) is reported too. CUDA (when the device is cuda): max_memory_allocated
after reset_peak_memory_stats, minus the allocated bytes before the step. Frozen parts are identical across
variants (`set_trainable`: everything outside the MoE blocks frozen; dense trains the same layers' FFNs).
Analytic bytes (trainable params, grads, AdamW state) come with the measurements to explain them.
--size picks a bigger synthetic toy architecture (medium: hidden 512, I 1536, 4 layers; large: hidden 1024,
I 4096) so that the trainable FFN / expert bytes dominate the step rather than activations and the allocator.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, Optional

import torch

from benchmarks.common import base_parser, emit, format_table, log, machine_info, setup
from benchmarks.datamodule import TOY_SIZES, synthetic_data, temp_dir, toy_config

NAME = "memory"
VARIANTS = ("dense", "mose", "topk")
MiB = 1024 * 1024


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def child(args) -> dict:
    """One variant in this (fresh) process; returns the measurements."""
    device, dtype = setup(args)
    from mose_lightning.data.datamodule import DriveDataModule
    from mose_lightning.model import build_model
    from mose_lightning.stages.common import build_optimizer

    cfg = toy_config(args.config, args.shards, [f"moe.kind={args.child}", f"data.batch_size={args.batch_size}",
                                                "data.shuffle_buffer=4", f"backbone.dtype={args.dtype}"],
                     size=args.size, toy_dir=args.toy_dir)
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device)
    dm = DriveDataModule(cfg.data, model.adapter, model.processor, model.taxonomy)
    batch = next(iter(dm.train_dataloader()))
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, 10)["optimizer"]
    model.train()
    trainable = sum(p.numel() * p.element_size() for p in params)
    in_blocks = {id(p) for block in model.layout.blocks for p in block.parameters()}
    frozen_outside = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_blocks)
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in in_blocks)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    cuda = device.type == "cuda"
    out = {
        "kind": args.child, "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "trainable_bytes": trainable, "total_param_bytes": total, "frozen_outside_moe_bytes": frozen_outside,
        "analytic_step_state_bytes": {"grads": trainable, "adamw_state": 2 * trainable},
        "batch": {"size": len(batch["meta"]), "tokens": int(batch["attention_mask"].sum()),
                  "seq": int(batch["input_ids"].shape[1])},
        "steps": [],
    }
    import gc

    gc.collect()
    rss_before = _status_kib("VmRSS")
    alloc_before = torch.cuda.memory_allocated(device) if cuda else None
    can_reset = _reset_peak()
    out["rss_before_bytes"] = rss_before * 1024 if rss_before is not None else None
    out["rss_peak_counter"] = "VmHWM after clear_refs" if can_reset else "ru_maxrss (no clear_refs: lifetime peak)"
    for step in (1, 2):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        _reset_peak()
        start = time.perf_counter()
        loss = model(batch).training_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        hwm = _status_kib("VmHWM") if can_reset else None
        peak = hwm * 1024 if hwm is not None else _maxrss_bytes()
        rec = {"step": step, "seconds": seconds, "loss": float(loss.detach()),
               "peak_rss_bytes": peak, "peak_rss_delta_bytes": peak - out["rss_before_bytes"],
               "rss_after_bytes": (_status_kib("VmRSS") or 0) * 1024}
        if cuda:
            rec["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            rec["cuda_peak_delta_bytes"] = torch.cuda.max_memory_allocated(device) - alloc_before
        out["steps"].append(rec)
    out["ru_maxrss_bytes"] = _maxrss_bytes()
    return out


def build_parser():
    parser = base_parser("Peak memory of one SFT step: MoSE vs dense (each variant in a fresh subprocess).", 1, 0)
    parser.add_argument("--config", default=None, help="experiment YAML (default: the toy MoSE config)")
    parser.add_argument("--shards", default=None, help="folder with a train shard folder (default: synthetic)")
    parser.add_argument("--size", default="toy", choices=sorted(TOY_SIZES), help="toy architecture (default toy)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default="dense,mose", help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--child", default=None, choices=VARIANTS, help=argparse_hidden())
    parser.add_argument("--toy-dir", default=None, help=argparse_hidden())
    return parser


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def run(args) -> dict:
    device, dtype = setup(args)
    wanted = ["dense"] + [v for v in args.variants.split(",") if v and v != "dense"]
    size = "toy" if args.tiny else args.size
    batch = 2 if args.tiny else args.batch_size
    shards = args.shards or str(synthetic_data(max(8, 2 * batch), 0, 0, seed=args.seed, maxcount=8))
    toy_dir = temp_dir("toy") / "toy"
    if not args.config:  # build the toy once, so that no child pays (or measures) the build
        from mose_lightning.backbones.toy import ensure_toy_dir

        ensure_toy_dir(toy_config(None, shards, size=size, toy_dir=toy_dir).backbone)
    children: Dict[str, dict] = {}
    for kind in wanted:
        cmd = [sys.executable, "-m", "benchmarks.memory", "--child", kind, "--size", size, "--batch-size", str(batch),
               "--shards", shards, "--toy-dir", str(toy_dir), "--device", args.device, "--dtype", args.dtype,
               "--seed", str(args.seed), "--json"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.config:
            cmd += ["--config", args.config]
        log(f"[{NAME}] {kind}: {' '.join(cmd[1:])}")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"{kind} child failed with exit code {proc.returncode}")
        children[kind] = json.loads(proc.stdout)
    dense = children["dense"]
    results = {}
    for kind, c in children.items():
        s1, s2 = c["steps"]
        r = {
            "trainable_params": c["trainable_params"], "total_params": c["total_params"],
            "rss_before_mib": c["rss_before_bytes"] / MiB,
            "step1_peak_rss_delta_mib": s1["peak_rss_delta_bytes"] / MiB,
            "step2_peak_rss_delta_mib": s2["peak_rss_delta_bytes"] / MiB,
            "step1_peak_rss_mib": s1["peak_rss_bytes"] / MiB,
            "ru_maxrss_mib": c["ru_maxrss_bytes"] / MiB,
            "analytic_grads_plus_adamw_mib": 3 * c["trainable_bytes"] / MiB,
            "ratio_step1_delta_vs_dense": s1["peak_rss_delta_bytes"] / max(1, dense["steps"][0]["peak_rss_delta_bytes"]),
            "ratio_step1_peak_vs_dense": s1["peak_rss_bytes"] / dense["steps"][0]["peak_rss_bytes"],
            "losses": [s1["loss"], s2["loss"]],
        }
        if "cuda_peak_delta_bytes" in s1:
            r["cuda_step1_peak_delta_mib"] = s1["cuda_peak_delta_bytes"] / MiB
            r["cuda_step2_peak_delta_mib"] = s2["cuda_peak_delta_bytes"] / MiB
            r["cuda_step1_max_allocated_mib"] = s1["cuda_max_allocated_bytes"] / MiB
            r["ratio_cuda_step1_peak_vs_dense"] = s1["cuda_max_allocated_bytes"] / dense["steps"][0]["cuda_max_allocated_bytes"]
        results[kind] = r
    checks = {
        "same_frozen_parts": len({c["frozen_outside_moe_bytes"] for c in children.values()}) == 1,
        "same_batch": len({json.dumps(c["batch"], sort_keys=True) for c in children.values()}) == 1,
        "first_loss_equal_at_init": all(abs(r["losses"][0] - results["dense"]["losses"][0]) < 1e-3 * max(1.0, abs(results["dense"]["losses"][0]))
                                        for k, r in results.items() if k == "mose"),
    }
    return {
        "benchmark": NAME,
        "machine": machine_info(device, dtype),
        "config": {
            "config": args.config or "configs/experiment/toy_mose.yaml", "size": size,
            "architecture": TOY_SIZES[size] if not args.config else "from --config", "batch_size": batch,
            "batch": children["dense"]["batch"], "variants": wanted,
            "measured": "one fresh subprocess per variant; peak RSS during step 1 / step 2 minus RSS before step 1",
            "rss_peak_counter": children["dense"]["rss_peak_counter"],
        },
        "results": results,
        "children": children,
        "checks": checks,
    }


def table(result: dict) -> str:
    rows = []
    for k, r in result["results"].items():
        row = {"variant": k, "trainable M": r["trainable_params"] / 1e6, "RSS before MiB": r["rss_before_mib"],
               "step1 delta MiB": r["step1_peak_rss_delta_mib"], "step2 delta MiB": r["step2_peak_rss_delta_mib"],
               "grads+AdamW MiB": r["analytic_grads_plus_adamw_mib"], "ratio vs dense": r["ratio_step1_delta_vs_dense"]}
        if "cuda_step1_peak_delta_mib" in r:
            row["cuda step1 MiB"] = r["cuda_step1_peak_delta_mib"]
        rows.append(row)
    c, m = result["config"], result["machine"]
    head = f"{NAME}: {m['cpu_model']}, device {m['device']}, size {c['size']}, batch {c['batch']}"
    return f"{head}\n{format_table(rows, list(rows[0]))}\nchecks {result['checks']}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        result = child(args)
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return 0
    result = run(args)
    emit(result, args.json, table)
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
