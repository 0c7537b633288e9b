"""Joint-graph adjacency and edge geometry against hand-placed boxes and brute-force loops."""

from __future__ import annotations

import math

import pytest
import torch

from rgfusion.trainer.model.geometry import (
    cell_neighbours,
    joint_adjacency,
    node_boxes,
    relative_geometry,
)


def _inter(a, b):
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _cell(c, h, w):
    r, col = divmod(c, w)
    return [col / w, r / h, (col + 1) / w, (r + 1) / h]


def brute_adjacency(boxes, mask, grid_size, thr, region_edges):
    h, w = grid_size
    b, r = mask.shape
    n = r + h * w
    adj = torch.zeros(b, n, n, dtype=torch.bool)
    for bi in range(b):
        bx = [[min(max(v, 0.0), 1.0) for v in box] for box in boxes[bi].tolist()]
        for i in range(n):
            for j in range(n):
                if i == j:
                    adj[bi, i, j] = True
                    continue
                if (i < r and not mask[bi, i]) or (j < r and not mask[bi, j]):
                    continue
                if i < r and j < r:
                    adj[bi, i, j] = region_edges == "all" or _inter(bx[i], bx[j]) > 0
                elif i >= r and j >= r:
                    ri, ci = divmod(i - r, w)
                    rj, cj = divmod(j - r, w)
                    adj[bi, i, j] = abs(ri - rj) <= 1 and abs(ci - cj) <= 1
                else:
                    k, c = (i, j - r) if i < r else (j, i - r)
                    box = bx[k]
                    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                    centre = min(int(math.floor(cy * h)), h - 1) * w + min(int(math.floor(cx * w)), w - 1)
                    adj[bi, i, j] = _inter(box, _cell(c, h, w)) * h * w > thr or centre == c
    return adj


def random_boxes(b, r, gen):
    xy = torch.rand(b, r, 2, generator=gen) * 0.8
    wh = torch.rand(b, r, 2, generator=gen) * 0.6
    return torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=-1)


@pytest.mark.parametrize("region_edges", ["all", "overlap"])
@pytest.mark.parametrize("grid_size", [(3, 4), (2, 2), (1, 5)])
def test_adjacency_matches_brute_force(region_edges, grid_size):
    gen = torch.Generator().manual_seed(0)
    boxes = random_boxes(3, 6, gen)
    mask = torch.rand(3, 6, generator=gen) > 0.3
    got = joint_adjacency(boxes, mask, grid_size, overlap_threshold=0.2, region_edges=region_edges)
    n = 6 + grid_size[0] * grid_size[1]
    assert got.dtype == torch.bool and got.shape == (3, n, n)
    assert torch.equal(got, brute_adjacency(boxes, mask, grid_size, 0.2, region_edges))
    assert torch.equal(got, got.transpose(1, 2))


def test_adjacency_hand_placed_boxes():
    # 2x2 grid: cells 0 TL, 1 TR, 2 BL, 3 BR (nodes 4..7 after 4 region slots).
    boxes = torch.tensor(
        [
            [
                [0.0, 0.0, 0.5, 0.5],  # A: exactly cell 0 (touching edges of others has zero area)
                [0.4, 0.4, 0.6, 0.6],  # B: small; covers 4% of each cell; centre (0.5, 0.5) -> cell 3
                [0.0, 0.5, 1.0, 1.0],  # C: bottom half -> cells 2, 3
                [0.0, 0.0, 1.0, 1.0],  # padding slot with a box over everything
            ]
        ]
    )
    mask = torch.tensor([[True, True, True, False]])
    adj = joint_adjacency(boxes, mask, (2, 2), overlap_threshold=0.25, region_edges="overlap")[0].int()
    expected = torch.tensor(
        [
            #A  B  C  P  c0 c1 c2 c3
            [1, 1, 0, 0, 1, 0, 0, 0],  # A overlaps B only
            [1, 1, 1, 0, 0, 0, 0, 1],  # B overlaps A and C (y 0.5..0.6)
            [0, 1, 1, 0, 0, 0, 1, 1],
            [0, 0, 0, 1, 0, 0, 0, 0],  # padding: self loop only
            [1, 0, 0, 0, 1, 1, 1, 1],  # in a 2x2 grid every cell neighbours every other
            [0, 0, 0, 0, 1, 1, 1, 1],
            [0, 0, 1, 0, 1, 1, 1, 1],
            [0, 1, 1, 0, 1, 1, 1, 1],
        ]
    )
    assert torch.equal(adj, expected)
    all_edges = joint_adjacency(boxes, mask, (2, 2), overlap_threshold=0.25, region_edges="all")[0].int()
    assert all_edges[:3, :3].eq(1).all() and all_edges[3].sum() == 1
    # A low threshold lets the small box B reach every cell it touches.
    low = joint_adjacency(boxes, mask, (2, 2), overlap_threshold=0.01, region_edges="all")[0]
    assert low[1, 4:].all()


def test_cell_neighbours_3x3():
    nb = cell_neighbours((3, 3))
    assert nb[4].all()  # the centre cell touches all 9
    assert nb[0].nonzero().flatten().tolist() == [0, 1, 3, 4]
    assert nb[5].nonzero().flatten().tolist() == [1, 2, 4, 5, 7, 8]


def test_region_only_and_grid_only_graphs():
    gen = torch.Generator().manual_seed(1)
    boxes = random_boxes(2, 4, gen)
    mask = torch.ones(2, 4, dtype=torch.bool)
    regions = joint_adjacency(boxes, mask, (0, 0), overlap_threshold=0.2, region_edges="overlap")
    assert torch.equal(regions, brute_adjacency(boxes, mask, (0, 0), 0.2, "overlap"))
    cells = joint_adjacency(boxes[:, :0], mask[:, :0], (3, 3), overlap_threshold=0.2, region_edges="all")
    assert torch.equal(cells, cell_neighbours((3, 3)).expand(2, 9, 9))


def test_relative_geometry_matches_brute_force():
    gen = torch.Generator().manual_seed(2)
    boxes = node_boxes(random_boxes(2, 3, gen), (2, 3))
    geo = relative_geometry(boxes)
    assert geo.shape == (2, 9, 9, 5)
    for b in range(2):
        bx = boxes[b].tolist()
        for i in range(9):
            for j in range(9):
                bi, bj = bx[i], bx[j]
                wi, hi = max(bi[2] - bi[0], 1e-3), max(bi[3] - bi[1], 1e-3)
                wj, hj = max(bj[2] - bj[0], 1e-3), max(bj[3] - bj[1], 1e-3)
                inter = _inter(bi, bj)
                union = (bi[2] - bi[0]) * (bi[3] - bi[1]) + (bj[2] - bj[0]) * (bj[3] - bj[1]) - inter
                want = [
                    (bj[0] + bj[2]) / 2 - (bi[0] + bi[2]) / 2,
                    (bj[1] + bj[3]) / 2 - (bi[1] + bi[3]) / 2,
                    math.log(wj / wi),
                    math.log(hj / hi),
                    inter / union,
                ]
                assert geo[b, i, j].tolist() == pytest.approx(want, abs=1e-5)


def test_relative_geometry_degenerate_boxes_are_finite():
    boxes = torch.zeros(1, 3, 4)
    assert torch.isfinite(relative_geometry(boxes)).all()
