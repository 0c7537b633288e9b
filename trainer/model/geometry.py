"""Spatial graph over regions ∪ grid cells: adjacency and relative edge geometry (pure functions).

Node order everywhere: the R region slots first, then the H·W grid cells in row-major order.
Boxes are normalised ``x1, y1, x2, y2`` in [0, 1]; ``adj[b, i, j]`` means node i attends to
(receives from) node j. All functions are batch-vectorised and free of host syncs.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Widths/heights below this (a thousandth of the image) are clamped so log-ratios stay finite.
MIN_SIZE = 1e-3
GEOMETRY_DIM = 5


def cell_boxes(grid_size: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """(H·W, 4) boxes of the grid cells, row-major."""
    h, w = grid_size
    rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h)
    return torch.stack([cols / w, rows / h, (cols + 1) / w, (rows + 1) / h], dim=-1)


def intersection_area(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise intersection areas of boxes ``a`` (..., Na, 4) and ``b`` (..., Nb, 4)."""
    lo = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    hi = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    return (hi - lo).clamp(min=0).prod(-1)


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    inter = intersection_area(a, b)
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    return inter / union.clamp(min=MIN_SIZE**2)


def region_cell_links(boxes: Tensor, grid_size: tuple[int, int], overlap_threshold: float) -> Tensor:
    """(B, R, H·W) bool: the box covers > threshold of the cell's area, or the cell holds its centre.

    Coverage is measured as a fraction of the *cell* (intersection / cell area): a large box then
    links to every cell it substantially covers, independent of its own size. A box smaller than
    a cell could never pass that test, so the cell containing the box centre is always linked too.
    """
    h, w = grid_size
    cells = cell_boxes(grid_size, boxes.device)
    covered = intersection_area(boxes, cells) * (h * w) > overlap_threshold
    cx = (boxes[..., 0] + boxes[..., 2]) / 2
    cy = (boxes[..., 1] + boxes[..., 3]) / 2
    col = (cx * w).floor().long().clamp(0, w - 1)
    row = (cy * h).floor().long().clamp(0, h - 1)
    centre = torch.arange(h * w, device=boxes.device) == (row * w + col)[..., None]
    return covered | centre


def cell_neighbours(grid_size: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """(H·W, H·W) bool: cells that are 8-neighbours (or the same cell)."""
    h, w = grid_size
    idx = torch.arange(h * w, device=device)
    row, col = idx // w, idx % w
    return ((row[:, None] - row[None, :]).abs() <= 1) & ((col[:, None] - col[None, :]).abs() <= 1)


def joint_adjacency(
    boxes: Tensor,
    region_mask: Tensor,
    grid_size: tuple[int, int],
    *,
    overlap_threshold: float,
    region_edges: str,
) -> Tensor:
    """(B, R+G, R+G) bool adjacency of the joint region–cell graph.

    Edges: region–cell where :func:`region_cell_links` says so (both directions), cell–cell for
    8-neighbours, region–region all or only for boxes that intersect with positive area
    (``region_edges`` 'all' | 'overlap'), and self loops. Padded regions neither send nor
    receive; they keep only their self loop so a masked softmax over their row stays defined.
    ``grid_size`` (0, 0) gives the region-only graph, R = 0 the grid-only one.
    """
    if region_edges not in ("all", "overlap"):
        raise ValueError(f"region_edges must be 'all' or 'overlap', got {region_edges!r}")
    b, r = region_mask.shape
    g = grid_size[0] * grid_size[1]
    device = region_mask.device
    boxes = boxes.float().clamp(0, 1)
    if region_edges == "all":
        rr = torch.ones(b, r, r, dtype=torch.bool, device=device)
    else:
        rr = intersection_area(boxes, boxes) > 0
    rc = region_cell_links(boxes, grid_size, overlap_threshold) if g else boxes.new_zeros(b, r, 0).bool()
    cc = cell_neighbours(grid_size, device).expand(b, g, g)
    adj = torch.cat([torch.cat([rr, rc], dim=2), torch.cat([rc.transpose(1, 2), cc], dim=2)], dim=1)
    valid = torch.cat([region_mask.bool(), region_mask.new_ones(b, g, dtype=torch.bool)], dim=1)
    adj = adj & valid[:, :, None] & valid[:, None, :]
    return adj | torch.eye(r + g, dtype=torch.bool, device=device)


def node_boxes(boxes: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """(B, R+G, 4) boxes of all graph nodes: the region boxes, then the cell boxes."""
    cells = cell_boxes(grid_size, boxes.device).expand(boxes.shape[0], -1, -1)
    return torch.cat([boxes.float().clamp(0, 1), cells], dim=1)


def relative_geometry(boxes: Tensor) -> Tensor:
    """(B, N, N, 5) edge features of node j seen from node i.

    ``(dx, dy, log(w_j/w_i), log(h_j/h_i), IoU)`` with centre offsets in image-normalised units:
    bounded in [-1, 1] (unlike offsets divided by the box size, which explode for tiny boxes),
    which keeps the bias MLP's input well scaled.
    """
    boxes = boxes.float()
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    size = (boxes[..., 2:] - boxes[..., :2]).clamp(min=MIN_SIZE)
    offset = centre[:, None, :, :] - centre[:, :, None, :]
    log_ratio = size.log()[:, None, :, :] - size.log()[:, :, None, :]
    iou = pairwise_iou(boxes, boxes)[..., None]
    return torch.cat([offset, log_ratio, iou], dim=-1)
