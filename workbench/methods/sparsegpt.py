from contextlib import contextmanager

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


@contextmanager
def _one_cpu_thread(device: torch.device):
    """The column loop issues thousands of tiny ops; on CPU, splitting each across threads costs
    more in synchronisation than it saves (10x slower on a busy 2-core machine)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sparsegpt(weight: torch.Tensor, stats, pattern: Pattern, sparsity: float,
              blocksize: int = 128, percdamp: float = 0.01,
              **_) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune column by column and let the not yet visited
    columns absorb each removal's error through the inverse Hessian (an OBS update), processing
    columns in lazy blocks so most of the work is matrix-matrix.
    """
    if pattern.kind not in ("unstructured", "nm"):
        raise PatternError(f"SparseGPT prunes element-wise patterns, not {pattern}")
    H = stats.hessian().to(weight.device).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    Hinv = _inverse_hessian_cholesky(H, percdamp)
    # W^T, so that a column of W is a contiguous row and its rank-1 update one BLAS call.
    Wt = weight.t().float().contiguous()
    Wt[dead] = 0.0

    cols = Wt.shape[0]
    if pattern.kind == "nm":  # an N:M group must never straddle two lazy blocks
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    keep_t = torch.ones_like(Wt, dtype=torch.bool)
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = Wt[start:end]  # a view: updated in place
        Hinv_block = Hinv[start:end, start:end]
        diag = torch.diagonal(Hinv_block)
        errors = torch.empty_like(block)
        if pattern.kind == "unstructured":
            # The mask for the whole lazy block is chosen up front from the OBS saliency.
            block_keep = unstructured_mask(block**2 / diag.unsqueeze(1) ** 2, sparsity)
        else:
            block_keep = torch.ones_like(block, dtype=torch.bool)
        drop = ~block_keep
        with _one_cpu_thread(Wt.device):
            for i in range(end - start):
                if pattern.kind == "nm" and i % pattern.m == 0:
                    group = slice(i, i + pattern.m)
                    saliency = (block[group] ** 2 / diag[group].unsqueeze(1) ** 2).t()
                    block_keep[group] = nm_mask(saliency, pattern.n, pattern.m).t()
                    torch.logical_not(block_keep[group], out=drop[group])
                column, error = block[i], errors[i]
                torch.mul(column, drop[i], out=error)  # the removed part of the column
                error.div_(diag[i])
                column.masked_fill_(drop[i], 0.0)
                block[i + 1:].addr_(Hinv_block[i, i + 1:], error, alpha=-1.0)
        keep_t[start:end] = block_keep
        if end < cols:
            Wt[end:].addmm_(Hinv[start:end, end:].t(), errors, alpha=-1.0)
    Wt[~keep_t] = 0.0
    return Wt.t().contiguous(), keep_t.t().contiguous()
