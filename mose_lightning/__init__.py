"""mose_lightning: skill-routed mixture-of-experts vision-language models (MoSE) on PyTorch Lightning."""

__version__ = "0.1.0"
