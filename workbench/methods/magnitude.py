"""Magnitude pruning: remove the smallest weights, needing no calibration data."""

from __future__ import annotations

import torch

from workbench.arch import weight_of
from workbench.patterns import Pattern, mask_from_scores
from workbench.structured import BlockGeometry, unit_sum


def magnitude(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float,
              **_) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the smallest |w|; the comparison group is the whole layer."""
    mask = mask_from_scores(weight.abs(), pattern, sparsity, per_row=False)
    return weight * mask, mask


def magnitude_unit_scores(geometry: BlockGeometry, output_stats=None) -> torch.Tensor:
    """||output columns of the unit|| x ||input rows of the unit|| (mean over up/gate or q/k/v).
    Data-free: `output_stats` is accepted for the common unit-score signature and ignored."""
    out_part = geometry.output
    out_sq = weight_of(out_part.linear.module).float().pow(2).sum(0)
    score = unit_sum(out_sq, out_part.owner, geometry.num_units).sqrt()
    in_parts = [p for p in geometry.parts if p.axis == 0]
    in_norm = torch.zeros(geometry.num_units)
    for part in in_parts:
        rows_sq = weight_of(part.linear.module).float().pow(2).sum(1)
        in_norm += unit_sum(rows_sq, part.owner, geometry.num_units).sqrt()
    return score * in_norm / max(len(in_parts), 1)
