"""Shared fixtures: a small synthetic shard set, one cached toy backbone, and toy configs pointing at both.

Everything here is session-scoped and built once (a few seconds), so test files can build many small models
without re-drawing the data or re-training the toy tokenizer. Tests must not write into these folders; use
`tmp_path` for anything a test creates.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mose_lightning.config import load_config

# The toy models are tiny: intra-op threads only spin against each other (and against other test runs sharing
# the CPU), making a forward 10-30x slower than on one thread.
torch.set_num_threads(1)

PROJECT = Path(__file__).resolve().parent.parent
TOY_YAML = PROJECT / "configs" / "experiment" / "toy_mose.yaml"

# Split sizes of the shared synthetic set, and samples per shard (small, so every split has several shards).
SYNTHETIC_SIZES = {"train": 64, "val": 16, "test": 16}
SYNTHETIC_MAXCOUNT = 8


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """OUT/{train,val,test} shard directories (64/16/16 samples, 8 per shard) with manifests."""
    from data_recipes.synthetic import generate_synthetic

    out = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(out, SYNTHETIC_SIZES["train"], SYNTHETIC_SIZES["val"], SYNTHETIC_SIZES["test"], 0,
                       maxcount=SYNTHETIC_MAXCOUNT, show_progress=False)
    return out


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    """Where the toy backbone is cached (built on the first `build_model`)."""
    return tmp_path_factory.mktemp("toy_backbone") / "toy"


@pytest.fixture(scope="session")
def make_config(synthetic_dir, toy_dir):
    """make_config(*overrides, path=TOY_YAML): the toy MoSE config on the shared data and toy backbone, with no
    instruction-tuned init checkpoint and no pretrained routers (nothing outside the test session is read)."""

    def make(*overrides: str, path=TOY_YAML):
        base = [
            f"backbone.toy_dir={toy_dir}",
            "backbone.init_checkpoint=null",
            "moe.router_checkpoint=null",
            f"data.train_shards={synthetic_dir / 'train'}",
            f"data.val_shards={synthetic_dir / 'val'}",
            f"data.test_shards={synthetic_dir / 'test'}",
            "data.batch_size=4",
            "data.eval_batch_size=4",
            "data.num_workers=0",
            "data.shuffle_buffer=8",
        ]
        return load_config(path, base + list(overrides))

    return make


@pytest.fixture(scope="session")
def toy_config(make_config):
    return make_config()
