"""Set pooling over masked node/word features: MAP, GPO, mean and max.

Every pooler maps ``x`` (B, N, D) with ``mask`` (B, N) bool (True = real element) to (B, D),
ignores masked elements completely, and is invariant to the order of the elements.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .attention import Attention, attend


# Additive attention-mask value for excluded keys. Not -inf and not finfo(float32).min: autocast
# casts the mask to bf16/fp16 with the other SDPA inputs, where those become -inf, and a row with
# nothing to attend to (an image without regions) would turn NaN in some kernels. -1e4 is finite
# in every float type and still zeroes the excluded weights (exp(-1e4) underflows to 0).
MASK_VALUE = -1e4


def additive_mask(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where ``keep``, :data:`MASK_VALUE` elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, MASK_VALUE)


class MeanPool(nn.Module):
    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


class MaxPool(nn.Module):
    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        pooled = x.masked_fill(~mask[..., None], torch.finfo(x.dtype).min).amax(1)
        return torch.where(mask.any(1, keepdim=True), pooled, torch.zeros_like(pooled))


class MultiAttentionPooling(nn.Module):
    """K learned queries each attend over the set; their pooled vectors are combined.

    Values are the input features themselves, so every pooler returns a convex combination of
    the set (a soft selection) and the poolers differ only in what they look for.
    """

    def __init__(self, dim: int, poolers: int, combine: str, attention: Attention = "sdpa") -> None:
        super().__init__()
        self.attention = attention
        if combine not in ("concat", "mean"):
            raise ValueError(f"MAP combine must be 'concat' or 'mean', got {combine!r}")
        self.queries = nn.Parameter(torch.randn(poolers, dim) / math.sqrt(dim))
        self.key = nn.Linear(dim, dim)
        self.combine = nn.Linear(poolers * dim, dim) if combine == "concat" else None

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        # One attention "head" over the full width: (B, 1, K|N, D) is the layout every SDPA kernel
        # (and the FLOP counter) accepts.
        q = self.queries.to(x.dtype).expand(x.shape[0], 1, -1, -1)
        bias = additive_mask(mask, x.dtype)[:, None, None, :]
        pooled = attend(q, self.key(x)[:, None], x[:, None], bias, 0.0, self.attention)[:, 0]
        return pooled.mean(1) if self.combine is None else self.combine(pooled.flatten(1))


def positional_encoding(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """(length, dim) sinusoidal encoding of positions 0..length-1 (Vaswani et al.)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


class GeneralizedPooling(nn.Module):
    """VSE∞'s Generalized Pooling Operator (Chen et al., CVPR 2021).

    Each feature dimension is sorted over the set (descending); a weight per rank, produced by a
    bidirectional GRU over the sinusoidal encodings of ranks 1..n, mixes the sorted values. The
    weights depend only on the set size n, so instead of packing the batch by its (data-dependent,
    host-synced) lengths we run the GRU once over every possible size 1..N — lengths known on the
    host — and gather each sample's row: same result as VSE∞, no host sync.
    """

    # VSE∞'s sizes and softmax temperature.
    PE_DIM = 32
    HIDDEN = 32
    TEMPERATURE = 0.1

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(self.PE_DIM, self.HIDDEN, batch_first=True, bidirectional=True)
        self.score = nn.Linear(self.HIDDEN, 1, bias=False)

    def rank_weights(self, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """(n, n): row k holds the weights over ranks for a set of size n-k (zero past its size)."""
        pe = positional_encoding(n, self.PE_DIM, device).to(dtype).expand(n, n, self.PE_DIM)
        # Sizes in descending order on the host: packing needs no sort, no index copy, no sync.
        packed = pack_padded_sequence(pe, torch.arange(n, 0, -1), batch_first=True)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=n)
        out = (out[..., : self.HIDDEN] + out[..., self.HIDDEN :]) / 2
        scores = self.score(out).squeeze(-1) / self.TEMPERATURE
        sizes = torch.arange(n, 0, -1, device=device)
        valid = torch.arange(n, device=device)[None, :] < sizes[:, None]
        return torch.softmax(scores.masked_fill(~valid, torch.finfo(scores.dtype).min), dim=1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        n = x.shape[1]
        size = mask.sum(1)
        weights = self.rank_weights(n, x.device, x.dtype)[(n - size).clamp(max=n - 1)]
        ranked = x.masked_fill(~mask[..., None], torch.finfo(x.dtype).min).sort(dim=1, descending=True).values
        in_set = torch.arange(n, device=x.device)[None, :] < size[:, None]
        ranked = ranked.masked_fill(~in_set[..., None], 0)
        return (ranked * weights[..., None]).sum(1)


def build_pooling(kind: str, dim: int, *, map_heads: int, map_combine: str, attention: Attention = "sdpa") -> nn.Module:
    if kind == "map":
        return MultiAttentionPooling(dim, map_heads, map_combine, attention)
    if kind == "gpo":
        return GeneralizedPooling()
    if kind == "mean":
        return MeanPool()
    if kind == "max":
        return MaxPool()
    raise ValueError(f"unknown pooling {kind!r} (map|gpo|mean|max)")
