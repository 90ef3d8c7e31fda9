import torch

from workbench.patterns import Pattern, mask_from_scores


def magnitude(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float,
              **_) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the smallest |w|; the comparison group is the whole layer."""
    mask = mask_from_scores(weight.abs(), pattern, sparsity, per_row=False)
    return weight * mask, mask
