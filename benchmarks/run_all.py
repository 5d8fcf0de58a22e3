"""Run every benchmark module in benchmarks/ at its default sizes; write benchmarks/results/<name>.json.

    python -m benchmarks.run_all [--only a,b] [--tiny] [--results-dir DIR] [-- extra args for every module]

A module with `GPU_ONLY = True` (full-size models) runs only with `-- --device cuda` (or --tiny); one with
`TRAINS_MODELS = True` (it trains what it measures) only when named in --only (or with --tiny). Each module runs
in its own process (`python -m benchmarks.<name> --json ...`), so one benchmark's memory or a
crash does not affect the next; its stdout must be exactly one JSON object (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks.common import benchmark_modules, format_table

HERE = os.path.dirname(os.path.abspath(__file__))


def summarise(result: dict) -> list:
    """Rows for the summary: any {"median_s", "ratio_vs_dense"|...} leaves under result["results"]."""
    rows = []

    def walk(prefix, node):
        if isinstance(node, dict) and "median_s" in node:
            ratio = next((v for k, v in node.items() if k.startswith("ratio")), "")
            rows.append({"case": prefix, "median_ms": 1e3 * node["median_s"], "ratio": ratio})
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}" if prefix else k, v)

    walk("", result.get("results", {}))
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated module names (default: all)")
    parser.add_argument("--tiny", action="store_true", help="pass --tiny to every module (smoke run)")
    parser.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    names = benchmark_modules(HERE)
    if args.only:
        wanted = [n for n in args.only.split(",") if n]
        missing = sorted(set(wanted) - set(names))
        if missing:
            raise SystemExit(f"unknown benchmark(s) {missing}; available: {names}")
        names = wanted
    os.makedirs(args.results_dir, exist_ok=True)
    device = extra[extra.index("--device") + 1] if "--device" in extra[:-1] else "cpu"
    failures = []
    for name in names:
        module = __import__(f"benchmarks.{name}", fromlist=["NAME"])
        if getattr(module, "GPU_ONLY", False) and not device.startswith("cuda") and not args.tiny:
            print(f"== {name}: skipped (measures full-size models on a GPU: make bench-gpu)", flush=True)
            continue
        if getattr(module, "TRAINS_MODELS", False) and not args.only and not args.tiny:
            print(f"== {name}: skipped (trains its models first, an hour or more on a CPU: --only {name} runs it)",
                  flush=True)
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--json"] + (["--tiny"] if args.tiny else []) + extra
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, cwd=os.path.dirname(HERE), text=True)
        elapsed = time.perf_counter() - start
        try:
            result = json.loads(proc.stdout)
        except json.JSONDecodeError:
            result = None
        if result is None:
            failures.append(name)
            print(f"   FAILED (exit {proc.returncode}, no JSON on stdout) after {elapsed:.0f}s", flush=True)
            continue
        result.setdefault("command", "python -m " + " ".join(cmd[1:]))
        path = os.path.join(args.results_dir, f"{name}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        rows = summarise(result)
        if rows:
            print(format_table(rows, ["case", "median_ms", "ratio"]))
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        print(f"   {status}, {elapsed:.0f}s -> {os.path.relpath(path)}", flush=True)
        if proc.returncode != 0:
            failures.append(name)
    if failures:
        print(f"failed: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
