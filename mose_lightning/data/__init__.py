"""Data format and shard I/O shared by the converters (data_recipes/) and the training data pipeline."""

from mose_lightning.data.sample import (
    CATEGORIES,
    DATASETS,
    TASKS,
    Sample,
    SampleError,
    decode_images,
    encode_jpeg,
    make_key,
    validate,
)
from mose_lightning.data.shards import (
    MANIFEST_NAME,
    ReadStats,
    ShardError,
    ShardWriter,
    expand_shards,
    is_complete,
    iter_records,
    iter_samples,
    prepare_output_dirs,
    read_manifest,
)

__all__ = [
    "CATEGORIES",
    "DATASETS",
    "MANIFEST_NAME",
    "ReadStats",
    "Sample",
    "SampleError",
    "ShardError",
    "ShardWriter",
    "TASKS",
    "decode_images",
    "encode_jpeg",
    "expand_shards",
    "is_complete",
    "iter_records",
    "iter_samples",
    "make_key",
    "prepare_output_dirs",
    "read_manifest",
    "validate",
]
