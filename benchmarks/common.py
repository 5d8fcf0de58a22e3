"""Shared helpers for the benchmark modules (see benchmarks/README.md for the conventions).

Every module `benchmarks/<name>.py` exposes
    build_parser() -> argparse.ArgumentParser    (start from `base_parser()` below)
    run(args) -> dict                            (the JSON-serialisable result; prints nothing on stdout)
    main(argv=None) -> int                       (parse, run, then `emit()`: one JSON object with --json, else a table)
and accepts at least --device, --dtype, --json, --repeats, --warmup and --tiny (a seconds-long size for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------------- arguments


def base_parser(description: str, default_repeats: int = 5, default_warmup: int = 1) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark accepts; modules add their own on top."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="parameter/activation dtype")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    parser.add_argument("--repeats", type=int, default=default_repeats, help="timed repeats per variant (median)")
    parser.add_argument("--warmup", type=int, default=default_warmup, help="untimed warm-up runs per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, 1 repeat: a seconds-long smoke run for tests")
    return parser


def setup(args: argparse.Namespace):
    """Apply --threads/--seed (and, on a CPU, the allocator settings CPU training runs with) and return
    (device, dtype)."""
    if args.device == "cpu":
        from mose_lightning.cpu_memory import tune_cpu_allocator

        tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return device, DTYPES[args.dtype]


# --------------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device = torch.device("cpu"),
    after_each: Optional[Callable[[str], None]] = None,
) -> Dict[str, Dict[str, object]]:
    """Time several variants side by side: warm-up each, then `repeats` rounds that run every variant once.

    Interleaving (round-robin, in a rotated order each round) spreads slow phases of a shared, noisy machine over
    all variants instead of penalising whichever ran during them. `after_each(name)` runs untimed after every call
    (e.g. to drop gradients). Returns {name: {"median_s", "min_s", "times_s"}}.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
            synchronize(device)
            if after_each is not None:
                after_each(name)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(max(1, repeats)):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if after_each is not None:
                after_each(name)
    return {
        name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": [round(v, 6) for v in t]}
        for name, t in times.items()
    }


# --------------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, dtype: Optional[torch.dtype] = None) -> dict:
    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    try:
        import transformers

        info["transformers_version"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if dtype is not None:
        info["dtype"] = str(dtype).replace("torch.", "")
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------------------------------- output


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def emit(result: dict, as_json: bool, table: Callable[[dict], str]) -> None:
    """With --json: exactly one JSON object on stdout (logs belong on stderr). Otherwise a readable table."""
    if as_json:
        json.dump(result, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        print(table(result))
    sys.stdout.flush()


def log(*parts: object) -> None:
    """Progress messages go to stderr so that --json output stays parseable."""
    print(*parts, file=sys.stderr, flush=True)


def benchmark_modules(package_dir: Optional[str] = None) -> List[str]:
    """Names of the benchmark modules in benchmarks/ (every .py except the helpers)."""
    package_dir = package_dir or os.path.dirname(os.path.abspath(__file__))
    skip = {"__init__", "common", "run_all"}
    return sorted(
        f[:-3] for f in os.listdir(package_dir) if f.endswith(".py") and not f.startswith("_") and f[:-3] not in skip
    )


def iter_sizes(requested: str, available: Iterable[str]) -> List[str]:
    available = list(available)
    if requested == "all":
        return available
    if requested not in available:
        raise SystemExit(f"unknown size {requested!r}; choose from {available + ['all']}")
    return [requested]
