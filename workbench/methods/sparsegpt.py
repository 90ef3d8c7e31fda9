import torch

from workbench.patterns import Pattern, PatternError, nm_mask, unstructured_mask


def _inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian, retrying with more damping."""
    diag_mean = torch.diagonal(hessian).mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp = percdamp
    for _ in range(6):
        try:
            lower = torch.linalg.cholesky(hessian + damp * diag_mean * eye)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            damp *= 10
    raise RuntimeError("SparseGPT: the layer's Hessian stays singular even with heavy dampening")


def sparsegpt(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float,
              blocksize: int = 128, percdamp: float = 0.01,
              **_) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune column by column and let the not yet visited
    columns absorb each removal's error through the inverse Hessian (an OBS update), processing
    columns in lazy blocks so most of the work is matrix-matrix.
    """
    if pattern.kind not in ("unstructured", "nm"):
        raise PatternError(f"SparseGPT prunes element-wise patterns, not {pattern}")
    W = weight.clone().float()
    H = stats.hessian().to(W.device).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_hessian_cholesky(H, percdamp)

    rows, cols = W.shape
    if pattern.kind == "nm":  # an N:M group must never straddle two lazy blocks
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    keep = torch.ones_like(W, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        W_block = W[:, start:end].clone()
        Hinv_block = Hinv[start:end, start:end]
        diag = torch.diagonal(Hinv_block)
        errors = torch.zeros_like(W_block)
        if pattern.kind == "unstructured":
            # The mask for the whole lazy block is chosen up front from the OBS saliency.
            block_keep = unstructured_mask(W_block**2 / diag**2, sparsity)
        else:
            block_keep = torch.ones_like(W_block, dtype=torch.bool)
        for i in range(end - start):
            if pattern.kind == "nm" and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                saliency = W_block[:, group] ** 2 / diag[group] ** 2
                block_keep[:, group] = nm_mask(saliency, pattern.n, pattern.m)
            column = W_block[:, i]
            pruned = torch.where(block_keep[:, i], column, torch.zeros_like(column))
            error = (column - pruned) / diag[i]
            W_block[:, i:] -= error.unsqueeze(1) * Hinv_block[i, i:].unsqueeze(0)
            W_block[:, i] = pruned
            errors[:, i] = error
        W[:, start:end] = W_block
        keep[:, start:end] = block_keep
        W[:, end:] -= errors @ Hinv[start:end, end:]
    W[~keep] = 0.0
    return W, keep
