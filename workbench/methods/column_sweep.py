"""SparseGPT's column-by-column sweep of one sub-block, compiled for CPU.

In PyTorch the sweep is a chain of small ops (an error row and a rank-1 update per column, a
selection per N:M group), each costing microseconds of dispatch for a few hundred
multiply-adds. Compiled with numba the whole sub-block is one call, its inner loops run along
contiguous rows (vectorised), and the GIL is released so the driver's solve threads run side by
side. The arithmetic is the textbook loop's: the N:M saliency is (w*w)/(d*d) as the reference
writes it, so the mask choices are the same.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

# Output rows swept together: the sub-block's slice of them stays in the core's L1/L2 cache.
_ROW_CHUNK = 1024


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _sweep(block, upper, scale, errors, start, end, n, m):  # pragma: no cover - compiled
    """Columns start..end-1 of a lazy block (rows of `block` are columns of W, in place).

    m == 0: `scale` already holds 1/d where a weight goes and 0 where it stays. N:M: at each
    group's first column the n most salient weights of every output row are kept (ties go to
    the earlier column) and `scale` is written for the group. Then each column's error row is
    its removed part / d, pushed onto the sub-block's later columns by a rank-1 update."""
    rows = block.shape[1]
    group = max(m, 1)
    saliency = np.empty((group, _ROW_CHUNK), dtype=np.float32)
    rank = np.empty(_ROW_CHUNK, dtype=np.int32)
    for r0 in range(0, rows, _ROW_CHUNK):
        size = min(_ROW_CHUNK, rows - r0)
        for i in range(start, end):
            if m > 0 and (i - start) % m == 0:
                for a in range(m):
                    d = upper[i + a, i + a]
                    d_sq = d * d
                    w = block[i + a, r0:r0 + size]
                    s = saliency[a]
                    for r in range(size):
                        s[r] = (w[r] * w[r]) / d_sq
                for a in range(m):
                    s_a = saliency[a]
                    for r in range(size):
                        rank[r] = 0
                    for b in range(m):
                        s_b = saliency[b]
                        if b < a:
                            for r in range(size):
                                rank[r] += s_b[r] >= s_a[r]
                        elif b > a:
                            for r in range(size):
                                rank[r] += s_b[r] > s_a[r]
                    inverse = np.float32(1.0) / upper[i + a, i + a]
                    out = scale[i + a, r0:r0 + size]
                    for r in range(size):
                        out[r] = np.float32(0.0) if rank[r] < n else inverse
            error = errors[i, r0:r0 + size]
            w = block[i, r0:r0 + size]
            s = scale[i, r0:r0 + size]
            for r in range(size):
                error[r] = w[r] * s[r]
            for j in range(i + 1, end):
                u = upper[i, j]
                target = block[j, r0:r0 + size]
                for r in range(size):
                    target[r] -= u * error[r]


class CompiledSweep:
    """The compiled sweep bound to one lazy block's fp32 CPU tensors (numpy views of them, made
    once); `__call__(start, end)` sweeps columns start..end-1."""

    def __init__(self, block: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor,
                 errors: torch.Tensor, n: int, m: int):
        self._arrays = (block.numpy(), upper.contiguous().numpy(), scale.numpy(), errors.numpy())
        self._n, self._m = n, m

    def __call__(self, start: int, end: int) -> None:
        _sweep(*self._arrays, start, end, self._n, self._m)

