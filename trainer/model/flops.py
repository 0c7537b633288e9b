"""Analytic forward FLOPs of the model, for model-FLOPs utilisation.

Only matrix products are counted, at 2·m·n·k each (a multiply and an add); norms, activations,
softmax, sorting and the embedding lookup are a few percent at most. Attention is counted dense
over all nodes (masked entries are computed too), as the hardware does it. A training step costs
about 3x the forward (the backward computes gradients for both inputs and weights, 2x).
GPO's rank-weight GRU runs once per batch over tiny sizes and is left out, as is the loss.
"""

from __future__ import annotations

from .config import ModelConfig
from .geometry import GEOMETRY_DIM
from .image import BOX_FEATURES


def mm(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def flops_per_pair(
    cfg: ModelConfig,
    region_dim: int,
    grid_dim: int,
    grid_size: tuple[int, int],
    n_regions: int,
    n_words: int,
) -> int:
    """Forward FLOPs to embed one image (``n_regions`` region slots) and one ``n_words`` caption."""
    return image_flops(cfg, region_dim, grid_dim, grid_size, n_regions) + text_flops(cfg, n_words)


def image_flops(cfg: ModelConfig, region_dim: int, grid_dim: int, grid_size: tuple[int, int], n_regions: int) -> int:
    d = cfg.width
    r = n_regions if cfg.uses_regions else 0
    g = grid_size[0] * grid_size[1] if cfg.uses_grid else 0
    n = r + g
    total = r * (projection(region_dim, d) + mm(1, BOX_FEATURES, d)) + g * projection(grid_dim, d)
    if cfg.graph:
        total += cfg.graph_layers * graph_layer(cfg, n)
    if cfg.uses_cgf:
        total += gated_cross_attention(d, r, g) + gated_cross_attention(d, g, r)
    return total + pooling(cfg, n, d)


def text_flops(cfg: ModelConfig, n_words: int) -> int:
    t = cfg.text
    if t.encoder == "bigru":
        h = t.hidden or cfg.width
        words = 0
        for layer in range(t.layers):
            in_dim = t.word_dim if layer == 0 else 2 * h
            words += 2 * n_words * (mm(1, in_dim, 3 * h) + mm(1, h, 3 * h))  # two directions, 3 gates
    else:
        h, words = transformer_flops(t.hf_path, n_words)
    return words + pooling(cfg, n_words, h) + mm(1, h, cfg.width)


def projection(in_dim: int, d: int) -> int:
    return mm(1, in_dim, d) + mm(1, in_dim, d // 2) + mm(1, d // 2, d)


def graph_layer(cfg: ModelConfig, n: int) -> int:
    d = cfg.width
    geometry = n * n * (mm(1, GEOMETRY_DIM, cfg.geometry_hidden) + mm(1, cfg.geometry_hidden, cfg.heads))
    attention = mm(n, d, 3 * d) + 2 * mm(n, n, d) + mm(n, d, d)
    return geometry + attention + 2 * mm(n, d, cfg.ffn_mult * d)


def gated_cross_attention(d: int, n_query: int, n_key: int) -> int:
    return mm(n_query, d, d) + mm(n_key, d, 2 * d) + 2 * mm(n_query, n_key, d) + mm(n_query, d, d) + mm(n_query, 2 * d, d)


def pooling(cfg: ModelConfig, n: int, d: int) -> int:
    if cfg.pooling != "map":
        return 0
    k = cfg.map_heads
    combine = mm(1, k * d, d) if cfg.map_combine == "concat" else 0
    return mm(n, d, d) + 2 * mm(k, n, d) + combine


def transformer_flops(path: str | None, n_words: int) -> tuple[int, int]:
    """(hidden size, forward FLOPs) of a BERT-like encoder described by its local config."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path, local_files_only=True)
    h, t = int(c.hidden_size), n_words
    per_layer = mm(t, h, 3 * h) + 2 * mm(t, t, h) + mm(t, h, h) + 2 * mm(t, h, int(c.intermediate_size))
    return h, int(c.num_hidden_layers) * per_layer
