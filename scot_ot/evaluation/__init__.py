"""Evaluation metrics for semantic correspondence."""

from .pck import (
    DEFAULT_ALPHAS,
    PairPCK,
    PCKAccumulator,
    PCKSummary,
    keypoint_errors,
    pck_per_pair,
    summarize_pck,
)

__all__ = [
    "DEFAULT_ALPHAS",
    "PCKAccumulator",
    "PCKSummary",
    "PairPCK",
    "keypoint_errors",
    "pck_per_pair",
    "summarize_pck",
]
