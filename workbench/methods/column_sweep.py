"""SparseGPT's lazy-block sweep on CPU, its column-by-column part compiled by numba.

In PyTorch ops (TorchScript included) the sweep of a sub-block is a chain of small ops, an error
row and a rank-1 update per column and a choice per N:M group, each costing about a microsecond
of dispatch for a few hundred multiply-adds. Compiled, a sub-block is one call: its inner loops
run along contiguous rows of W^T (vectorised) and the GIL is released, so the driver's
side-by-side solves run in parallel. Each sub-block's errors still reach the rest of the lazy
block through one PyTorch matrix product. Same arithmetic as `sparsegpt._sweep_lazy_block`; the
N:M saliency is (w*w)/(d*d) as the reference writes it, so the masks are the same.

Where numba is not installed, is disabled (NUMBA_DISABLE_JIT), or cannot compile the kernel,
`sweep_lazy_block()` returns None and SparseGPT sweeps in PyTorch ops.
"""

from __future__ import annotations

import importlib.util
import logging
import threading

import numpy as np
import torch

log = logging.getLogger(__name__)

# Output rows swept together: a sub-block's slice of them stays in the core's L1/L2 cache.
_ROW_CHUNK = 1024


def _sweep_columns(block, upper, scale, errors, start, end, n, m):  # pragma: no cover - compiled
    """Columns start..end-1 of a lazy block of W^T, in place (rows of `block` are columns of W).

    m == 0: `scale` already holds 1/d where a weight goes and 0 where it stays. N:M: at each
    group's first column the n most salient weights of every output row are kept (of tied
    saliencies, the earlier column's) and `scale` is written for the group. Then each column's
    error row is its removed part / d, pushed onto the sub-block's later columns by a rank-1
    update."""
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
                    for b in range(m):  # how many of the group outrank weight a
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


_kernel = None
_kernel_tried = False
_kernel_lock = threading.Lock()


def numba_installed() -> bool:
    """Whether numba can be imported, answered without importing it (for the time estimate)."""
    return importlib.util.find_spec("numba") is not None


def _compiled_kernel():
    """`_sweep_columns` compiled by numba (once per process, from numba's on-disk cache after the
    first), or None where numba is missing, disabled or fails to compile it."""
    global _kernel, _kernel_tried
    with _kernel_lock:
        if not _kernel_tried:
            _kernel_tried = True
            try:
                import numba

                if numba.config.DISABLE_JIT:  # the kernel would run as Python loops: far slower
                    raise RuntimeError("NUMBA_DISABLE_JIT is set")
                kernel = numba.njit(nogil=True, cache=True, boundscheck=False)(_sweep_columns)
                probe = np.zeros((4, 2), dtype=np.float32)  # compiles the one signature used
                kernel(probe, np.eye(4, dtype=np.float32), probe.copy(), probe.copy(), 0, 4, 2, 4)
                _kernel = kernel
            except Exception as exc:  # noqa: BLE001 -- any failure leaves the PyTorch sweep
                log.debug("SparseGPT sweep runs in PyTorch ops: numba unavailable (%s)", exc)
    return _kernel


def warm_up() -> None:
    """Compile the kernel (or load it from numba's cache: about half a second) on a background
    thread, so that the first solve finds it ready: called as a prune starts, before its
    calibration pass. The first solve waits for a compile still under way."""
    if not _kernel_tried:
        threading.Thread(target=_compiled_kernel, name="sparsegpt-sweep-compile", daemon=True).start()


def sweep_lazy_block():
    """The compiled lazy-block sweep (same contract as `sparsegpt._sweep_lazy_block`: fp32 CPU
    tensors, `block` C-contiguous), or None where numba cannot provide it."""
    return _sweep_lazy_block if _compiled_kernel() is not None else None


def _sweep_lazy_block(block: torch.Tensor, upper: torch.Tensor, scale: torch.Tensor, n: int, m: int,
                      sub_block: int) -> torch.Tensor:
    errors = torch.empty_like(block)
    arrays = (block.numpy(), upper.contiguous().numpy(), scale.numpy(), errors.numpy())
    width = block.shape[0]
    for start in range(0, width, sub_block):
        end = min(start + sub_block, width)
        _kernel(*arrays, start, end, n, m)
        if end < width:
            block[end:].addmm_(upper[start:end, end:].t(), errors[start:end], alpha=-1.0)
    return errors
