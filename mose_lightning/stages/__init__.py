"""One LightningModule per stage: router pretraining, fine-tuning (MoSE SFT, baselines, expert groups)."""
