"""The retrieval model: image and caption encoders into one L2-normalised joint space."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import edge_bias, ffn, triton_attention
from .config import ModelConfig
from .image import ImageEncoder
from .streams import beside
from .text import TextEncoder


def compile_options(mode: str, *, eager_random: bool) -> dict[str, Any]:
    """Inductor options of torch.compile ``mode``, plus where dropout's random numbers come from.

    ``eager_random``: from PyTorch's own random kernels, as in eager mode, instead of inductor's
    generator inlined in the fused kernels (one Philox block per element there, four numbers per
    block in PyTorch's). The captured BERT step took 12.7-12.8 ms instead of 13.0 on an H200
    (benchmarks/RESULTS.md, session 9), and a compiled forward draws the masks an eager one
    draws from the same seed.
    """
    return {**torch._inductor.list_mode_options(mode), "fallback_random": eager_random}


class RetrievalModel(nn.Module):
    """Written for one device; parallelism and precision are the trainer's business."""

    def __init__(
        self, cfg: ModelConfig, *, region_dim: int, grid_dim: int, grid_size: tuple[int, int], vocab_size: int
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        if cfg.attention == "triton" and importlib.util.find_spec("triton") is not None:
            triton_attention.ops()  # see LazyOps there
            edge_bias.ops()
            ffn.ops()
        self.image = ImageEncoder(cfg, region_dim, grid_dim, self.grid_size)
        self.text = TextEncoder(cfg, vocab_size)
        self.side_streams = False
        self._towers: tuple[nn.Module, nn.Module] | None = None

    def compile_towers(self, mode: str, *, eager_random: bool) -> None:
        """torch.compile each tower's training forward on its own, so side streams can run the two
        at once. Parameter names, and so checkpoints, stay those of eager runs; evaluation
        (``embed_*``) stays eager, as its batch shapes vary. ``eager_random``: see
        :func:`compile_options`."""
        options = compile_options(mode, eager_random=eager_random)
        self._towers = (torch.compile(self.image, options=options), torch.compile(self.text, options=options))

    def use_side_streams(self, on: bool) -> None:
        """Run the caption tower beside the image tower, and the BiGRU's directions beside each
        other, on CUDA side streams (model/streams.py). The results are the same either way."""
        self.side_streams = on
        if self.text.encoder == "bigru":
            self.text.gru.side_streams = on

    def embed_images(self, regions: Tensor, boxes: Tensor, region_mask: Tensor, grids: Tensor) -> Tensor:
        """(B, width) L2-normalised image embeddings."""
        return F.normalize(self.image(regions, boxes, region_mask, grids), dim=-1)

    def embed_captions(self, tokens: Tensor, lengths: Tensor, attention_mask: Tensor) -> Tensor:
        """(C, width) L2-normalised caption embeddings."""
        return F.normalize(self.text(tokens, lengths, attention_mask), dim=-1)

    def forward(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(img_emb, cap_emb)`` of a :class:`rgfusion.datasets.Batch` (or anything with its fields)."""
        if tuple(batch.grid_size) != self.grid_size:
            raise ValueError(f"batch grid size {tuple(batch.grid_size)} != model grid size {self.grid_size}")
        image, text = self._towers or (self.image, self.text)
        return beside(lambda: F.normalize(image(batch.regions, batch.boxes, batch.region_mask, batch.grids), dim=-1),
                      lambda: F.normalize(text(batch.tokens, batch.lengths, batch.attention_mask), dim=-1),
                      batch.regions.device, enabled=self.side_streams)

    def param_groups_hint(self) -> dict[str, float]:
        """Parameter-name prefix -> learning-rate multiplier; names not listed use 1.0."""
        return {"text.hf": self.cfg.text.lr_mult} if self.cfg.text.encoder == "hf" else {}


def build_model(
    cfg: ModelConfig, *, region_dim: int, grid_dim: int, grid_size: tuple[int, int], vocab_size: int
) -> RetrievalModel:
    return RetrievalModel(cfg, region_dim=region_dim, grid_dim=grid_dim, grid_size=grid_size, vocab_size=vocab_size)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
