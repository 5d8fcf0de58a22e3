"""CPU allocator settings for training on a CPU, applied by the command-line entry points before the first large
allocation (config `trainer.cpu_allocator_tuning`, on by default for CPU training; never on import).

CPU training writes fresh gradient buffers every step (zero_grad(set_to_none=True)), and an MoE layer holds all
its experts' gradients, so how the allocator hands out and takes back large blocks shows in the step time:

* Transparent huge pages for PyTorch's CPU allocations of 2 MB and more (THP_MEM_ALLOC_ENABLE, read by PyTorch
  at its first large allocation): about 500 times fewer page faults on those buffers. Cost: memory is taken in
  2 MB pages, so a process's resident size can grow by up to 2 MB per live large tensor.
* glibc's malloc keeps freed memory for reuse instead of unmapping it (M_MMAP_MAX = 0, M_TRIM_THRESHOLD at its
  maximum): glibc serves every allocation above 32 MB with its own mmap and unmaps it on free, so each step's
  gradients would be fresh pages again (page faults and kernel zeroing every step), which the CUDA caching
  allocator avoids on a GPU. Cost: the process never returns freed heap memory to the system while it runs, so
  its resident size stays at its peak. Reuse sets in within a few steps, not always from the first: glibc pads
  page-aligned requests, so a freed chunk can be a little too small for the same request until its neighbours
  are free too.

Measured effects are in benchmarks/README.md. A C library without mallopt (macOS, musl) is left alone.
"""

from __future__ import annotations

import os
from typing import Dict

# <malloc.h>
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def tune_cpu_allocator() -> Dict[str, bool]:
    """Apply both settings to this process; an explicit THP_MEM_ALLOC_ENABLE in the environment wins. Returns what
    was applied."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    applied = {"huge_pages": os.environ["THP_MEM_ALLOC_ENABLE"] == "1", "keep_freed_memory": False}
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return applied
    mallopt(_M_MMAP_MAX, 0)
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    applied["keep_freed_memory"] = True
    return applied


def trains_on_cpu(accelerator: str) -> bool:
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    import torch

    return not torch.cuda.is_available()
