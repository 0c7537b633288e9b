"""Image side: projections, step 1 (joint graph), step 2 (CGF) and pooling into one vector."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import cross_attend, self_attend
from .config import ModelConfig
from .edge_bias import edge_biases
from .ffn import feed_forward
from .geometry import GEOMETRY_DIM, joint_adjacency, node_boxes
from .pooling import additive_mask, build_pooling

BOX_FEATURES = 7


class FeatureProjection(nn.Module):
    """Detector/CNN features to the joint width: an MLP plus a residual linear path (VSE∞)."""

    def __init__(self, in_dim: int, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, width)
        # LayerNorm (not VSE∞'s BatchNorm) so padded slots and batch composition can't leak in.
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, width // 2), nn.LayerNorm(width // 2), nn.GELU(), nn.Linear(width // 2, width)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x) + self.mlp(x)


def box_features(boxes: Tensor) -> Tensor:
    """(…, 7) geometry of each box: x1, y1, x2, y2, w, h, area."""
    wh = boxes[..., 2:] - boxes[..., :2]
    return torch.cat([boxes, wh, wh.prod(-1, keepdim=True)], dim=-1)


class GraphAttentionLayer(nn.Module):
    """Masked multi-head attention over the joint graph with a learned geometry bias per head.

    Pre-norm residual blocks (attention, then FFN): they train stably without a learning-rate
    warm-up at depth, and the stack ends with one LayerNorm in :class:`JointGraph`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.heads, self.dropout, self.attention = cfg.width, cfg.heads, cfg.dropout, cfg.attention
        self.geometry = nn.Sequential(
            nn.Linear(GEOMETRY_DIM, cfg.geometry_hidden), nn.ReLU(), nn.Linear(cfg.geometry_hidden, cfg.heads)
        )
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_mult * d), nn.GELU(), nn.Linear(cfg.ffn_mult * d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, bias: Tensor, valid: Tensor) -> Tensor:
        """``bias``: this layer's geometry bias, ``self.geometry`` through ``edge_biases``. Every
        row keeps its self loop, so no row is fully masked."""
        p = self.dropout if self.training else 0.0
        att = self_attend(self.qkv(self.norm1(x)), bias, self.heads, p, self.attention)
        x = x + self.drop(self.out(att))
        x = x + self.drop(feed_forward(self.norm2(x), self.ffn[0], self.ffn[2], self.attention))
        return x.masked_fill(~valid[..., None], 0)


class JointGraph(nn.Module):
    """Step 1: message passing over regions ∪ cells along spatial edges."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(GraphAttentionLayer(cfg) for _ in range(cfg.graph_layers))
        self.norm = nn.LayerNorm(cfg.width)
        self.attention = cfg.attention

    def forward(self, x: Tensor, boxes: Tensor, adj: Tensor, valid: Tensor) -> Tensor:
        """``boxes``: (B, N, 4) of the nodes, whose relative geometry each layer's bias reads."""
        biases = edge_biases([layer.geometry for layer in self.layers], boxes, adj, x.dtype, self.attention)
        for layer, bias in zip(self.layers, biases):
            x = layer(x, bias, valid)
        return self.norm(x).masked_fill(~valid[..., None], 0)


class GatedCrossAttention(nn.Module):
    """One direction of CGF: a set attends to the other set; a per-channel gate mixes context in.

    ``out = LayerNorm(x + g ⊙ ctx)`` with ``g = sigmoid(W[x; ctx])`` rather than the convex
    ``g·x + (1-g)·ctx``: the residual form keeps the feature itself whatever the gate says (g → 0
    is the identity), so taking in context never forces discarding the region's object detail or
    the cell's own content, and gradients always have a direct path.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.heads, self.dropout, self.attention = cfg.width, cfg.heads, cfg.dropout, cfg.attention
        self.norm_q = nn.LayerNorm(d)
        self.norm_kv = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        self.gate = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, other: Tensor, other_mask: Tensor | None) -> Tensor:
        bias = None if other_mask is None else additive_mask(other_mask, x.dtype)[:, None, None, :]
        p = self.dropout if self.training else 0.0
        att = cross_attend(self.q(self.norm_q(x)), self.kv(self.norm_kv(other)), bias, self.heads, p, self.attention)
        ctx = self.out(att)
        g = torch.sigmoid(self.gate(torch.cat([x, ctx], dim=-1)))
        return self.norm(x + self.drop(g * ctx))


class CrossGatedFusion(nn.Module):
    """Step 2: regions attend to cells and cells to regions, both from the step-1 features."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.regions = GatedCrossAttention(cfg)
        self.cells = GatedCrossAttention(cfg)

    def forward(self, r: Tensor, region_mask: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        r_out = self.regions(r, g, None).masked_fill(~region_mask[..., None], 0)
        return r_out, self.cells(g, r, region_mask)


class ImageEncoder(nn.Module):
    """Regions (B, R, Dr) + boxes + mask and cells (B, H·W, Dg) to one (B, width) vector."""

    def __init__(self, cfg: ModelConfig, region_dim: int, grid_dim: int, grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.grid_size = tuple(grid_size)
        d = cfg.width
        if cfg.uses_regions:
            self.region_proj = FeatureProjection(region_dim, d)
            self.box_embed = nn.Linear(BOX_FEATURES, d)
            self.region_norm = nn.LayerNorm(d)
        if cfg.uses_grid:
            self.grid_proj = FeatureProjection(grid_dim, d)
            # Learned row + column embeddings: 2-D position with H + W vectors instead of H·W.
            self.row_embed = nn.Parameter(torch.randn(grid_size[0], d) * 0.02)
            self.col_embed = nn.Parameter(torch.randn(grid_size[1], d) * 0.02)
            self.grid_norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        self.graph = JointGraph(cfg) if cfg.graph else None
        self.cgf = CrossGatedFusion(cfg) if cfg.uses_cgf else None
        self.pool = build_pooling(cfg.pooling, d, map_heads=cfg.map_heads, map_combine=cfg.map_combine,
                                  attention=cfg.attention)

    def forward(self, regions: Tensor, boxes: Tensor, region_mask: Tensor, grids: Tensor) -> Tensor:
        region_mask = region_mask.bool()
        # Padded slots may hold anything (even NaN); scrub them before they touch any op.
        boxes = boxes.float().masked_fill(~region_mask[..., None], 0).clamp(0, 1)
        r = self._regions(regions, boxes, region_mask) if self.cfg.uses_regions else None
        g = self._cells(grids) if self.cfg.uses_grid else None
        if self.graph is not None:
            r, g = self._graph(r, g, boxes, region_mask)
        if self.cgf is not None:
            r, g = self.cgf(r, region_mask, g)
        nodes, mask = self._node_set(r, g, region_mask)
        return self.pool(nodes, mask)

    def _regions(self, regions: Tensor, boxes: Tensor, region_mask: Tensor) -> Tensor:
        regions = regions.masked_fill(~region_mask[..., None], 0)
        x = self.region_proj(regions) + self.box_embed(box_features(boxes).to(regions.dtype))
        return self.drop(self.region_norm(x)).masked_fill(~region_mask[..., None], 0)

    def _cells(self, grids: Tensor) -> Tensor:
        h, w = self.grid_size
        if grids.shape[1] != h * w:
            raise ValueError(f"grids have {grids.shape[1]} cells, the model was built for {h}x{w}")
        pos = (self.row_embed[:, None, :] + self.col_embed[None, :, :]).reshape(h * w, -1)
        return self.drop(self.grid_norm(self.grid_proj(grids) + pos.to(grids.dtype)))

    def _graph(
        self, r: Tensor | None, g: Tensor | None, boxes: Tensor, region_mask: Tensor
    ) -> tuple[Tensor | None, Tensor | None]:
        """Run step 1 on whichever node sets are in use (one joint graph when both)."""
        if r is None:
            boxes, region_mask = boxes[:, :0], region_mask[:, :0]
        grid_size = self.grid_size if g is not None else (0, 0)
        adj = joint_adjacency(
            boxes,
            region_mask,
            grid_size,
            overlap_threshold=self.cfg.overlap_threshold,
            region_edges=self.cfg.region_edges,
        )
        x, valid = self._node_set(r, g, region_mask)
        x = self.graph(x, node_boxes(boxes, grid_size), adj, valid)
        n_regions = region_mask.shape[1]
        return (x[:, :n_regions] if r is not None else None), (x[:, n_regions:] if g is not None else None)

    @staticmethod
    def _node_set(r: Tensor | None, g: Tensor | None, region_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Concatenated nodes (regions first) and their validity mask."""
        parts, masks = [], []
        if r is not None:
            parts.append(r)
            masks.append(region_mask)
        if g is not None:
            parts.append(g)
            masks.append(torch.ones(g.shape[:2], dtype=torch.bool, device=g.device))
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)
