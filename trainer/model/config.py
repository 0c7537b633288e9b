"""Typed configuration of the retrieval model (the ``model:`` section of a recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from .attention import Attention

Pooling = Literal["map", "gpo", "mean", "max"]


@dataclass
class TextConfig:
    """Caption encoder."""

    # bigru: trained from scratch on the dataset vocabulary (the VSE default, cheap);
    # hf: a pretrained transformer (BERT-like) read from a local directory.
    encoder: Literal["bigru", "hf"] = "bigru"
    # Word-embedding size of the BiGRU; 300 matches GloVe-sized vectors used by VSE++/VSE∞.
    word_dim: int = 300
    # BiGRU hidden size per direction; None = the joint width, as in VSE∞ (directions averaged).
    hidden: int | None = None
    # Stacked GRU layers; VSE∞ uses 1, more rarely helps on 30K-caption datasets.
    layers: int = 1
    # Local directory holding a saved Hugging Face model (config + weights); nothing is downloaded.
    hf_path: str | None = None
    # Learning-rate multiplier for the pretrained transformer: VSE∞ fine-tunes BERT at 0.1x so
    # the randomly initialised heads can catch up without destroying pretrained features.
    lr_mult: float = 0.1
    # A BERT checkpoint runs as rgfusion's FusedBert (model/bert.py): the same function and
    # weights with one query-key-value product per layer, fewer kernels on a GPU. Its parameter
    # names differ from Hugging Face's, so checkpoints of one don't load into the other; false
    # keeps Hugging Face's module. Other architectures always run as Hugging Face's.
    fused_bert: bool = True

    def __post_init__(self) -> None:
        if self.encoder == "hf" and not self.hf_path:
            raise ValueError("text.encoder 'hf' needs text.hf_path (a local model directory)")
        if self.layers < 1 or self.word_dim < 1:
            raise ValueError("text.layers and text.word_dim must be positive")


@dataclass
class ModelConfig:
    """Two-step region–grid fusion model and the ablations that switch its parts off."""

    # Joint embedding size; 1024 is the VSE++/VSE∞ convention the paper's numbers use.
    width: int = 1024
    # Which visual features feed the model: the paper's claim is that 'both' beats each alone.
    features: Literal["region", "grid", "both"] = "both"
    # Step 1 (joint graph over regions ∪ cells with spatial edges); off = no message passing.
    graph: bool = True
    # Graph-attention layers; 2 lets a region reach a cell's neighbours (region→cell→cell).
    graph_layers: int = 2
    # Attention heads in the graph and CGF; 1024/8 = 128 per head, a size fused GPU kernels like.
    heads: int = 8
    # A region links to a grid cell when its box covers more than this fraction of the cell's area
    # (the cell holding the box centre is always linked, so small boxes still reach the grid).
    overlap_threshold: float = 0.25
    # Region–region edges: 'all' (regions see each other, VSE∞-like context) or 'overlap' only.
    region_edges: Literal["all", "overlap"] = "all"
    # Hidden units of the per-layer MLP mapping edge geometry to one attention bias per head;
    # tiny because it runs on every (B, N, N) edge.
    geometry_hidden: int = 16
    # Feed-forward expansion of the graph layers (the usual transformer 4x).
    ffn_mult: int = 4
    # Step 2 (cross-attention gated fusion); only meaningful with features 'both'.
    cgf: bool = True
    # Pooling of image nodes and of words: map (multi-attention pooling, the paper's), gpo
    # (VSE∞'s generalized pooling operator), mean or max (the baselines).
    pooling: Pooling = "map"
    # Number of learned-query attention poolers in MAP.
    map_heads: int = 4
    # How MAP's poolers are combined: concat→linear keeps each pooler's view, mean is cheaper.
    map_combine: Literal["concat", "mean"] = "concat"
    # Attention kernels of the graph, CGF, MAP and the transformer text encoder: 'sdpa' (PyTorch's
    # fused kernels) or 'math' (matrix products and a float32 softmax, see model/attention.py);
    # 'triton': the graph's, CGF's and FusedBert's attention as Triton kernels
    # (model/triton_attention.py) on CUDA with head sizes 16-128, the math path everywhere else
    # (MAP, a Hugging Face encoder, the CPU); the graph's geometry bias too (model/edge_bias.py),
    # and the GELU of the graph's and FusedBert's feed-forward (model/ffn.py).
    attention: Attention = "sdpa"
    # Dropout in projections, attention and fusion; 0.1 is the transformer default.
    dropout: float = 0.1
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.graph_layers < 1 or self.map_heads < 1:
            raise ValueError("graph_layers and map_heads must be positive")
        if not 0.0 <= self.overlap_threshold < 1.0:
            raise ValueError("overlap_threshold must lie in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must lie in [0, 1)")
        if self.attention not in get_args(Attention):
            raise ValueError(f"attention must be one of {get_args(Attention)}, got {self.attention!r}")

    @property
    def uses_regions(self) -> bool:
        return self.features in ("region", "both")

    @property
    def uses_grid(self) -> bool:
        return self.features in ("grid", "both")

    @property
    def uses_cgf(self) -> bool:
        # CGF needs both sets to cross-attend; with one feature type it switches off by design.
        return self.cgf and self.features == "both"
