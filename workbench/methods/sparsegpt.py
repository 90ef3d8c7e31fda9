"""SparseGPT (Frantar & Alistarh 2023): prune column by column and let the not yet visited
columns absorb each removal's error through the inverse Hessian (an OBS update).

The columns are visited in three nested spans. A lazy block (`blocksize`, 128 by default) is the
span whose unstructured mask is chosen at once; inside it, sub-blocks of `SUB_BLOCK` columns are
solved column by column with rank-1 updates confined to the sub-block, and each finished sub-block
passes its errors to the rest of the lazy block in one matrix product, as each lazy block does to
the rest of the layer. Only the small updates are column by column; every large one is a GEMM.
The result is the textbook per-column loop's, up to float summation order.

Layers fed the same input (q/k/v, gate/up) share one Hessian, and the sweep treats every output
row on its own: `sparsegpt_joint` solves them as one matrix stacked along the output dimension,
one pass over the columns with larger products, unstructured masks still chosen per layer.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from workbench.methods.inverse_hessian import InverseHessianFactor, inverse_hessian_factor
from workbench.patterns import Pattern, PatternError, unstructured_mask

__all__ = ["InverseHessianFactor", "inverse_hessian_factor", "sparsegpt", "sparsegpt_joint"]

# Columns per sub-block: small enough that a rank-1 update of the sub-block stays one cheap
# single-threaded op, large enough that the GEMM after it does most of the work.
SUB_BLOCK = 16


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Inside a lazy block every op is small (a row, a rank-1 update of a sub-block, a product
    with a sub-block's errors); on CPU, splitting each across threads costs more in
    synchronisation than it saves (10x slower on a busy 2-core machine). The factorisation and
    the product passing a lazy block's errors to the rest of the layer run on every thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Sweep:
    """The column-by-column sweep of one sub-block: an error row and a rank-1 update per column,
    a `topk` per N:M group."""

    def __init__(self, block: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor,
                 errors: torch.Tensor, pattern: Pattern, diag_sq: torch.Tensor):
        self.block, self.scale, self.pattern, self.diag_sq = block, scale, pattern, diag_sq
        self.inverse_diag = 1.0 / torch.diagonal(upper).unsqueeze(1)
        # Row views made once: indexing in the loop below is a large share of its cost.
        self.rows = (block.unbind(0), errors.unbind(0), scale.unbind(0), upper.unbind(0))

    def __call__(self, start: int, end: int) -> None:
        columns, column_errors, column_scales, upper_rows = self.rows
        pattern = self.pattern
        for i in range(start, end):
            if pattern.kind == "nm" and (i - start) % pattern.m == 0:
                # N:M groups are chosen on the weights as updated by every earlier column.
                group = slice(i, i + pattern.m)
                saliency = self.block[group].square().div_(self.diag_sq[group])
                kept = torch.topk(saliency, pattern.n, dim=0).indices
                self.scale[group].copy_(self.inverse_diag[group].expand_as(saliency))
                self.scale[group].scatter_(0, kept, 0.0)
            torch.mul(columns[i], column_scales[i], out=column_errors[i])
            if i + 1 < end:
                self.block[i + 1:end].addr_(upper_rows[i][i + 1:end], column_errors[i], alpha=-1.0)


def _solve_lazy_block(block: torch.Tensor, upper: torch.Tensor, pattern: Pattern, sparsity: float,
                      sub_block: int, layers: list[slice]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one lazy block of W^T in place (rows of `block` are columns of W); `upper` is the
    block's diagonal square of the inverse-Hessian factor. Returns (keep mask, errors), the
    errors being what the rest of the layer absorbs. `layers` are the column spans of `block`
    holding each stacked layer: an unstructured mask is chosen within each layer's span."""
    width = block.shape[0]
    diag = torch.diagonal(upper).unsqueeze(1)
    diag_sq = diag**2
    # scale[i] = 1/d_i where column i's weight goes, 0 where it stays: error of column i is
    # its removed part / d_i. d_i > 0 always, so a zero scale marks exactly the kept weights.
    if pattern.kind == "unstructured":
        # The mask for the whole lazy block is chosen up front from the OBS saliency, per layer.
        saliency = block**2 / diag_sq
        keep = torch.empty_like(block, dtype=torch.bool)
        for span in layers:
            keep[:, span] = unstructured_mask(saliency[:, span], sparsity)
        scale = torch.logical_not(keep) * (1.0 / diag)  # bool masks: `where` is 3x slower here
    else:
        scale = torch.empty_like(block)  # written group by group as the sweep chooses
    errors = torch.empty_like(block)
    sweep = _Sweep(block, upper, scale, errors, pattern, diag_sq)
    for start in range(0, width, sub_block):
        end = min(start + sub_block, width)
        sweep(start, end)
        if end < width:
            block[end:].addmm_(upper[start:end, end:].t(), errors[start:end], alpha=-1.0)
    if pattern.kind == "nm":
        keep = torch.logical_not(scale.bool())
    return keep, errors


def sparsegpt(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float,
              blocksize: int = 128, percdamp: float = 0.01,
              **_) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight, keep mask) of `weight` pruned by SparseGPT with lazy blocks of `blocksize`
    columns; N:M groups never straddle two lazy blocks."""
    return sparsegpt_joint([weight], stats, pattern, sparsity, blocksize=blocksize, percdamp=percdamp)[0]


def sparsegpt_joint(weights: list[torch.Tensor], stats, pattern: Pattern, sparsity: float,
                    blocksize: int = 128, percdamp: float = 0.01, error_energies: list | None = None,
                    **_) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(new weight, keep mask) per layer of `weights`, layers fed the same input (one `stats`),
    solved as one matrix stacked along the output dimension: the OBS sweep treats every output
    row on its own, so one pass over the columns serves all of them with larger products. An
    unstructured mask is still chosen per layer (in each lazy block, among that layer's
    weights), so each result equals `sparsegpt` on that layer alone, up to float summation
    order.

    With `error_energies` (a list), each layer's ||(W - W') X||^2 over the calibration tokens is
    appended to it, read off the sweep instead of a product with X^T X: each column's error row
    e is its removed part / d, and W - W' = E U, so sum(E^2) = tr((W - W') (H + damping I)
    (W - W')^T); the damping's share is subtracted."""
    if pattern.kind not in ("unstructured", "nm"):
        raise PatternError(f"SparseGPT prunes element-wise patterns, not {pattern}")
    if not weights:
        return []
    widths = {w.shape[1] for w in weights}
    if len(widths) != 1:
        raise ValueError(f"a joint SparseGPT solve needs layers of one input width, got {sorted(widths)}")
    factor = inverse_hessian_factor(stats, percdamp, weights[0].device)
    upper, dead = factor.upper, factor.dead
    # W^T, so that a column of W is a contiguous row and its rank-1 update one BLAS call.
    layers, offset = [], 0
    for w in weights:
        layers.append(slice(offset, offset + w.shape[0]))
        offset += w.shape[0]
    Wt = torch.cat([w.t().to(torch.float32) for w in weights], dim=1)  # a new tensor, even for one layer
    Wt[dead] = 0.0

    cols = Wt.shape[0]
    sub_block = SUB_BLOCK
    if pattern.kind == "nm":
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
        sub_block = max(pattern.m, sub_block // pattern.m * pattern.m)
    sub_block = min(sub_block, blocksize)
    keep_t = torch.ones_like(Wt, dtype=torch.bool)
    error_sq = torch.zeros(offset, dtype=torch.float64, device=Wt.device)  # sum(E^2) per output row
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        with _one_cpu_thread(Wt.device):
            keep_t[start:end], errors = _solve_lazy_block(Wt[start:end], upper[start:end, start:end],
                                                          pattern, sparsity, sub_block, layers)
            if error_energies is not None:
                error_sq += errors.square().sum(0)
        if end < cols:
            Wt[end:].addmm_(upper[start:end, end:].t(), errors, alpha=-1.0)
    Wt.mul_(keep_t)  # a boolean-indexed fill costs 3x more
    # transposed back in one piece each (3x faster than layer by layer); the layers are row spans
    new_weights, keeps = Wt.t().contiguous(), keep_t.t().contiguous()
    results = [(new_weights, keeps)] if len(layers) == 1 else \
        [(new_weights[span].clone(), keeps[span].clone()) for span in layers]  # no shared storage
    if error_energies is not None:
        has_dead = bool(dead.any())
        for w, span in zip(weights, layers):
            change = w.float() - new_weights[span]
            if has_dead:
                change[:, dead] = 0.0  # X is 0 there: no output error
            # per-row sums in fp32, rows added in fp64: the subtraction below can cancel most digits
            change_sq = torch.linalg.vector_norm(change, dim=1).double().square().sum()
            in_h = float(error_sq[span].sum() - float(factor.damping) * change_sq)
            error_energies.append(max(in_h, 0.0) * max(stats.tokens, 1))  # H = X^T X / tokens
    return results


sparsegpt.solve_joint = sparsegpt_joint  # how the driver finds the stacked solve of a method
