"""Calibration statistics of a linear layer's inputs, accumulated batch by batch in fp32."""

from __future__ import annotations

import torch


class InputStats:
    """Running sums over calibration tokens x (rows of the layer input):
    the per-feature squared norms always, and the Gram matrix X^T X when `gram` is set."""

    def __init__(self, in_features: int, gram: bool, device: torch.device | str = "cpu"):
        self.in_features = in_features
        self.tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.gram = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if gram else None
        )

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.detach().reshape(-1, self.in_features).to(self.sq_sum.device, torch.float32)
        self.tokens += x.shape[0]
        self.sq_sum += (x * x).sum(dim=0)
        if self.gram is not None:
            self.gram.addmm_(x.t(), x)

    def input_norms(self) -> torch.Tensor:
        """||x_j||_2 over every calibration token, per input feature (Wanda's activation norm)."""
        return self.sq_sum.sqrt()

    def hessian(self) -> torch.Tensor:
        """X^T X / tokens: the layer-wise least-squares Hessian up to a constant factor."""
        if self.gram is None:
            raise RuntimeError("this layer's statistics were collected without the Gram matrix")
        return self.gram / max(self.tokens, 1)

    def relative_error(self, dense: torch.Tensor, pruned: torch.Tensor) -> float:
        """||(W - W') X||^2 / ||W X||^2 over the calibration tokens, from the Gram matrix."""
        if self.gram is None:
            return float("nan")
        delta = (dense.float() - pruned.float()).to(self.gram.device)
        dense = dense.float().to(self.gram.device)
        num = ((delta @ self.gram) * delta).sum()
        den = ((dense @ self.gram) * dense).sum()
        return float(num / den) if den > 0 else float("nan")
