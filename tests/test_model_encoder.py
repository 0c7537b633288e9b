"""The fusion model: padding/permutation invariance, gradients, ablations, FLOP count."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from rgfusion.configs import RECIPES_DIR, from_dict, read_recipe
from rgfusion.trainer.model import ModelConfig, TextConfig, build_model, count_parameters, flops_per_pair
from rgfusion.trainer.model.flops import image_flops

REGION_DIM, GRID_DIM, GRID, VOCAB = 12, 10, (3, 3), 40
ABLATIONS = sorted((RECIPES_DIR / "ablations").glob("*.yaml"))

torch.set_num_threads(1)


def tiny(**overrides) -> ModelConfig:
    text = overrides.pop("text", TextConfig(word_dim=8))
    return ModelConfig(width=16, heads=2, geometry_hidden=4, ffn_mult=2, map_heads=2, text=text, **overrides)


def make(cfg: ModelConfig):
    torch.manual_seed(0)
    return build_model(cfg, region_dim=REGION_DIM, grid_dim=GRID_DIM, grid_size=GRID, vocab_size=VOCAB)


def image_inputs(b=3, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(b, r, 2, generator=g) * 0.7
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(b, r, 2, generator=g) * 0.25], dim=-1)
    regions = torch.randn(b, r, REGION_DIM, generator=g)
    grids = torch.randn(b, GRID[0] * GRID[1], GRID_DIM, generator=g)
    return regions, boxes, torch.ones(b, r, dtype=torch.bool), grids


def caption_inputs(c=3, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (c,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    tokens = torch.randint(4, VOCAB, (c, t), generator=g).masked_fill(~mask, 0)
    return tokens, lengths, mask


VARIANTS = {
    "full-map": {},
    "full-gpo": {"pooling": "gpo"},
    "full-max": {"pooling": "max", "region_edges": "overlap"},
    "full-mean": {"pooling": "mean"},
    "map-mean-combine": {"map_combine": "mean", "cgf": False},
    "region-graph": {"features": "region"},
    "grid-graph": {"features": "grid"},
    "concat": {"graph": False, "cgf": False},
    "full-map-math-attention": {"attention": "math"},
    "region-graph-math-attention": {"features": "region", "attention": "math"},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_padding_changes_nothing(variant):
    model = make(tiny(**VARIANTS[variant])).eval()
    regions, boxes, mask, grids = image_inputs(r=3)
    ref = model.embed_images(regions, boxes, mask, grids)
    # Two more slots holding garbage (NaN features, boxes outside the image) marked as padding.
    pad_regions = torch.cat([regions, torch.full((3, 2, REGION_DIM), float("nan"))], dim=1)
    pad_boxes = torch.cat([boxes, torch.tensor([-3.0, 0.2, 9.0, float("nan")]).expand(3, 2, 4)], dim=1)
    pad_mask = torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], dim=1)
    got = model.embed_images(pad_regions, pad_boxes, pad_mask, grids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # And padding placed in the middle, with different real-region counts per image.
    pad_mask[1, 2] = False
    mid = model.embed_images(pad_regions, pad_boxes, pad_mask, grids)
    two = model.embed_images(regions[1:2, :2], boxes[1:2, :2], mask[1:2, :2], grids[1:2])
    torch.testing.assert_close(mid[1:2], two, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_region_order_does_not_change_embedding(variant):
    model = make(tiny(**VARIANTS[variant])).eval()
    regions, boxes, mask, grids = image_inputs(r=5)
    mask[0, 3] = False
    perm = torch.tensor([4, 2, 0, 3, 1])
    ref = model.embed_images(regions, boxes, mask, grids)
    got = model.embed_images(regions[:, perm], boxes[:, perm], mask[:, perm], grids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_text_padding_changes_nothing():
    model = make(tiny()).eval()
    tokens, lengths, mask = caption_inputs()
    ref = model.embed_captions(tokens, lengths, mask)
    longer = torch.cat([tokens, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    got = model.embed_captions(longer, lengths, torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def forward_backward(model):
    regions, boxes, mask, grids = image_inputs()
    mask[0, -1] = False
    tokens, lengths, tmask = caption_inputs()
    batch = SimpleNamespace(
        regions=regions, boxes=boxes, region_mask=mask, grids=grids, grid_size=GRID,
        tokens=tokens, lengths=lengths, attention_mask=tmask,
    )
    img, cap = model(batch)
    g = torch.Generator().manual_seed(5)
    (img * torch.randn(img.shape, generator=g)).sum().add((cap * torch.randn(cap.shape, generator=g)).sum()).backward()
    return img, cap


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_reach_every_parameter(variant):
    model = make(tiny(**VARIANTS[variant])).train()
    img, cap = forward_backward(model)
    assert img.shape == (3, 16) and cap.shape == (3, 16)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def _model_section(path: Path) -> dict:
    """The recipe's model section (through its base chain when the base recipe exists)."""
    base = path.parent / yaml.safe_load(path.read_text())["base"]
    return read_recipe(path)["model"] if base.is_file() else yaml.safe_load(path.read_text())["model"]


@pytest.mark.parametrize("recipe", ABLATIONS, ids=lambda p: p.stem)
def test_each_ablation_recipe_runs_forward_backward(recipe):
    section = from_dict(ModelConfig, _model_section(recipe), str(recipe))
    small = dict(width=16, heads=2, geometry_hidden=4, ffn_mult=2, map_heads=2, text=TextConfig(word_dim=8))
    cfg = dataclasses.replace(section, **small)
    model = make(cfg).train()
    img, cap = forward_backward(model)
    assert torch.isfinite(img).all() and torch.isfinite(cap).all()
    assert all(p.grad is not None for p in model.parameters())


def test_ablation_recipes_cover_the_paper_table():
    sections = {p.stem: _model_section(p) for p in ABLATIONS}
    assert set(sections) == {"region_only", "grid_only", "concat", "step1_only", "step2_only", "full"}
    switches = {k: (v["features"], v["graph"], v["cgf"]) for k, v in sections.items()}
    assert switches == {
        "region_only": ("region", False, False),
        "grid_only": ("grid", False, False),
        "concat": ("both", False, False),
        "step1_only": ("both", True, False),
        "step2_only": ("both", False, True),
        "full": ("both", True, True),
    }


def test_single_feature_models_switch_cgf_off_and_skip_other_branch():
    region = make(tiny(features="region"))
    assert region.image.cgf is None and not hasattr(region.image, "grid_proj")
    grid = make(tiny(features="grid"))
    assert grid.image.cgf is None and not hasattr(grid.image, "region_proj")


def test_bad_inputs_fail_with_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(width=16, heads=3)
    model = make(tiny())
    regions, boxes, mask, grids = image_inputs()
    with pytest.raises(ValueError, match="cells"):
        model.embed_images(regions, boxes, mask, grids[:, :4])
    with pytest.raises(ValueError, match="grid size"):
        model(SimpleNamespace(grid_size=(7, 7)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_analytic_image_flops_match_flop_counter(variant):
    cfg = tiny(**VARIANTS[variant])
    model = make(cfg).eval()
    regions, boxes, mask, grids = image_inputs(b=1, r=5)
    # The math backend decomposes every attention into counted matmuls (the fused CPU kernel
    # used for unbatched-head shapes has no FLOP formula registered).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.embed_images(regions, boxes, mask, grids)
    n = 5 + GRID[0] * GRID[1] if cfg.features == "both" else 5 if cfg.features == "region" else 9
    # GPO's rank-weight GRU runs once per batch (left out of the per-pair count): packed steps
    # 1+2+..+n, two directions of 3 gates over 32-d inputs and states, plus the score layer.
    gru = (n * (n + 1) // 2) * 2 * (2 * 32 * 96 + 2 * 32 * 96) + 2 * n * n * 32 if cfg.pooling == "gpo" else 0
    assert image_flops(cfg, REGION_DIM, GRID_DIM, GRID, 5) + gru == counter.get_total_flops()


def test_flops_per_pair_adds_text_and_scales_with_width():
    cfg = tiny()
    text_only = flops_per_pair(cfg, REGION_DIM, GRID_DIM, GRID, 5, 7) - image_flops(cfg, REGION_DIM, GRID_DIM, GRID, 5)
    h = cfg.width
    gru = 2 * 7 * (2 * 8 * 3 * h + 2 * h * 3 * h)
    assert text_only > gru
    big = ModelConfig()
    assert flops_per_pair(big, 2048, 2048, (7, 7), 36, 12) > 10 * flops_per_pair(cfg, 2048, 2048, (7, 7), 36, 12)


def test_count_parameters_counts_all_or_trainable():
    model = make(tiny())
    total = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    model.text.proj.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - model.text.proj.weight.numel()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_image_path_never_reads_data_on_the_host(variant):
    """On the meta device any .item(), host copy, boolean indexing or data-dependent shape
    raises, so passing here means the image forward and backward never sync a GPU stream.
    The caption side is checked the same way in test_model_text_gru.py."""
    with torch.device("meta"):
        model = build_model(tiny(**VARIANTS[variant]), region_dim=REGION_DIM, grid_dim=GRID_DIM, grid_size=GRID, vocab_size=VOCAB)
        regions, boxes = torch.randn(2, 4, REGION_DIM), torch.rand(2, 4, 4)
        mask, grids = torch.ones(2, 4, dtype=torch.bool), torch.randn(2, 9, GRID_DIM)
    img = model.embed_images(regions, boxes, mask, grids)
    img.sum().backward()
    assert img.device.type == "meta" and img.shape == (2, 16)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_image_without_regions_stays_finite(variant, autocast):
    model = make(tiny(**VARIANTS[variant])).train()
    regions, boxes, mask, grids = image_inputs()
    mask[1] = False
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        img = model.embed_images(regions, boxes, mask, grids)
    img.float().sum().backward()
    assert torch.isfinite(img).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_forward_is_the_two_embeddings_whatever_the_streams():
    """forward() (the training path, optionally on side streams) and the eager embed_* calls
    (evaluation) give the same embeddings; on CPU side streams change nothing."""
    model = make(tiny(dropout=0.0)).eval()
    regions, boxes, mask, grids = image_inputs()
    tokens, lengths, cmask = caption_inputs()
    batch = SimpleNamespace(regions=regions, boxes=boxes, region_mask=mask, grids=grids, tokens=tokens,
                            lengths=lengths, attention_mask=cmask, grid_size=GRID)
    want = model.embed_images(regions, boxes, mask, grids), model.embed_captions(tokens, lengths, cmask)
    model.use_side_streams(True)
    assert model.text.gru.side_streams
    for got, ref in zip(model(batch), want):
        torch.testing.assert_close(got, ref)


def test_compiled_towers_draw_the_eager_dropout_masks():
    """train.compile_eager_random: compiled towers in training mode give the eager embeddings
    for the same seed, dropout included (inductor's own generator would draw other masks)."""
    model = make(tiny(dropout=0.3)).train()
    regions, boxes, mask, grids = image_inputs()
    tokens, lengths, cmask = caption_inputs()
    batch = SimpleNamespace(regions=regions, boxes=boxes, region_mask=mask, grids=grids, tokens=tokens,
                            lengths=lengths, attention_mask=cmask, grid_size=GRID)

    def embed():
        torch.manual_seed(1)
        return model(batch)

    eager = embed()
    model.compile_towers("default", eager_random=True)
    for got, ref in zip(embed(), eager):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
