import torch

from workbench.patterns import Pattern, mask_from_scores


def wanda(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float,
          **_) -> tuple[torch.Tensor, torch.Tensor]:
    """Wanda (Sun et al. 2023): score |w_ij| * ||x_j||_2, compared within each output row."""
    scores = weight.abs() * stats.input_norms().to(weight.device).unsqueeze(0)
    mask = mask_from_scores(scores, pattern, sparsity, per_row=True)
    return weight * mask, mask
