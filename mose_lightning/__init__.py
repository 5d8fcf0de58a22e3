"""mose_lightning: skill-routed mixture-of-experts vision-language models (MoSE) on PyTorch Lightning.

Importing the package changes nothing in the process; the command-line entry points apply the CPU allocator
settings of `mose_lightning.cpu_memory` explicitly (config `trainer.cpu_allocator_tuning`).
"""

__version__ = "0.1.0"
