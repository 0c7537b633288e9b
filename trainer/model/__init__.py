"""The two-step region–grid fusion retrieval model (Wu et al., ACM MM 2022) and its ablations."""

from .config import ModelConfig, TextConfig
from .flops import flops_per_pair
from .geometry import joint_adjacency, relative_geometry
from .retrieval import RetrievalModel, build_model, count_parameters

__all__ = [
    "ModelConfig",
    "RetrievalModel",
    "TextConfig",
    "build_model",
    "count_parameters",
    "flops_per_pair",
    "joint_adjacency",
    "relative_geometry",
]
