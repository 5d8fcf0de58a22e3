"""mose_lightning: skill-routed mixture-of-experts vision-language models (MoSE) on PyTorch Lightning."""

import os

__version__ = "0.1.0"

# CPU training writes fresh gradient buffers every step (zero_grad(set_to_none=True)), and an MoE layer holds all
# its experts' gradients: backing PyTorch's CPU allocations of 2 MB and more with transparent huge pages (its own
# switch, read at the first large allocation, so it is set before any) cuts their page faults ~500-fold; measured
# on a 2B-size MoSE layer: 1.29x -> 1.10x a dense layer's time (benchmarks/README.md). An explicit setting wins
# (THP_MEM_ALLOC_ENABLE=0 turns it off). No effect on CUDA memory.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _reuse_freed_cpu_memory() -> None:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    glibc serves every allocation above 32 MB with its own mmap and unmaps it on free, so each step's fresh
    gradients (165 MB per expert at 2B size) are new pages again: page faults and kernel zeroing every step, in
    proportion to the gradient bytes, which an MoE layer has several times more of than a dense one. Serving
    everything from the heap (no mmap) and not trimming it lets later steps reuse earlier steps' memory, as the
    CUDA caching allocator does on a GPU. Measured at 2B size (benchmarks/README.md): the dense layer 20% faster,
    expert groups 1.67x -> 1.39x the dense layer's time. Not from the first step on, always: glibc pads aligned
    requests (page-aligned with the huge-page setting above, 64-byte without), so a freed chunk can be a little too
    small for the same request until its neighbours are free too; a busy machine saw up to seven 64 MB
    allocations in a row take fresh memory before reuse set in (tests/test_model.py). MOSE_REUSE_FREED_CPU_MEMORY=0
    turns it off; a C library without mallopt (macOS, musl) is left alone.
    """
    if os.environ.get("MOSE_REUSE_FREED_CPU_MEMORY", "1") == "0":
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)


_reuse_freed_cpu_memory()
