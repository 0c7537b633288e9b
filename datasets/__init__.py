"""rgfusion's data layer: shard schema, writer, synthetic scenes, streaming reader, caption text.

The trainer uses ``load_manifest``, ``DataConfig``, ``build_text_processor``, ``train_loader``,
``eval_loader``, ``Batch`` and ``skip_stats``; converters use ``Sample``, ``ShardWriter``,
``write_manifest`` and ``write_vocab``. Names resolve lazily so that writing shards (converter
processes) never imports torch or webdataset.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "schema": ("MANIFEST_NAME", "SCHEMA_VERSION", "VOCAB_NAME", "Manifest", "Sample", "SchemaError",
               "SplitInfo", "sanitize_key"),
    "storage": ("DatasetNotFound",),
    "writer": ("ShardWriter", "complete_prefix", "existing_shards", "shard_name", "write_manifest",
               "write_vocab"),
    "text": ("TextProcessor", "Vocab", "build_text_processor", "tokenize"),
    "reader": ("Batch", "DataConfig", "SkipStats", "eval_loader", "load_manifest", "skip_stats",
               "train_loader"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'rgfusion.datasets' has no attribute {name!r}")
    return getattr(importlib.import_module(f"rgfusion.datasets.{_MODULE_OF[name]}"), name)
