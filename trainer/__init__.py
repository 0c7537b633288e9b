"""rgfusion's trainer: model, loss, metrics, DeepSpeed engine, loop, checkpoints, tracking.

``from rgfusion.trainer import train`` is the one entry launchers and sweeps call; it is
resolved lazily so importing the package (e.g. for the model alone) never imports DeepSpeed.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "train":
        from rgfusion.trainer.loop import train

        return train
    if name in ("RunConfig", "load_config"):
        from rgfusion.trainer import config

        return getattr(config, name)
    raise AttributeError(f"module 'rgfusion.trainer' has no attribute {name!r}")


__all__ = ["RunConfig", "load_config", "train"]
