"""rgfusion's data layer: shard schema, writer, synthetic scenes, streaming reader, caption text.

The trainer uses ``load_manifest``, ``DataConfig``, ``build_text_processor``, ``train_loader``,
``eval_loader``, ``Batch`` and ``skip_stats``; converters use ``Sample``, ``ShardWriter``,
``write_manifest`` and ``write_vocab``.
"""

from rgfusion.datasets.schema import (
    MANIFEST_NAME, SCHEMA_VERSION, VOCAB_NAME, Manifest, Sample, SchemaError, SplitInfo, sanitize_key,
)
from rgfusion.datasets.reader import (
    Batch, DataConfig, SkipStats, eval_loader, load_manifest, skip_stats, train_loader,
)
from rgfusion.datasets.storage import DatasetNotFound
from rgfusion.datasets.text import TextProcessor, Vocab, build_text_processor, tokenize
from rgfusion.datasets.writer import (
    ShardWriter, complete_prefix, existing_shards, shard_name, write_manifest, write_vocab,
)

__all__ = [
    "Batch", "DataConfig", "SkipStats", "eval_loader", "load_manifest", "skip_stats", "train_loader",
    "MANIFEST_NAME", "SCHEMA_VERSION", "VOCAB_NAME", "DatasetNotFound", "Manifest", "Sample",
    "SchemaError", "ShardWriter", "SplitInfo", "TextProcessor", "Vocab", "build_text_processor",
    "complete_prefix", "existing_shards", "sanitize_key", "shard_name", "tokenize",
    "write_manifest", "write_vocab",
]
