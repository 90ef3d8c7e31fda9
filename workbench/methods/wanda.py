"""Wanda (Sun et al. 2023): weights scored by |w_ij| * ||x_j||_2, the input feature's norm over
the calibration tokens."""

from __future__ import annotations

import torch

from workbench.arch import weight_of
from workbench.patterns import Pattern, mask_from_scores
from workbench.stats import InputStats
from workbench.structured import BlockGeometry, unit_sum


def wanda_scores(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """|w_ij| * ||x_j||_2 for every weight of a (out, in) `weight`, on the weight's device."""
    return weight.abs() * stats.input_norms().to(weight.device).unsqueeze(0)


def wanda(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float,
          **_) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the lowest Wanda scores, compared within each output row."""
    mask = mask_from_scores(wanda_scores(weight, stats), pattern, sparsity, per_row=True)
    return weight * mask, mask


def wanda_unit_scores(geometry: BlockGeometry, output_stats: InputStats) -> torch.Tensor:
    """Wanda's |w| x ||x|| lifted to units: ||W_out[:, unit] * ||x_unit||||_F on down / o input.
    `output_stats`: the input statistics of down / o (`geometry.output`)."""
    out_part = geometry.output
    col_sq = weight_of(out_part.linear.module).float().pow(2).sum(0).cpu()
    weighted = col_sq * output_stats.sq_sum.float().cpu()
    return unit_sum(weighted, out_part.owner, geometry.num_units).sqrt()
