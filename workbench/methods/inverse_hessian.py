"""The dampened inverse Hessian's Cholesky factor that SparseGPT's column sweep reads, computed
in the Hessian's own buffer (plus bounded temporaries, `factor_temporary_bytes`) and shared by
the layers fed the same input."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class InverseHessianFactor:
    """What the column sweep needs of a layer's input statistics."""

    upper: torch.Tensor  # U with U^T U = (H + damping I)^-1, H = X^T X / tokens
    dead: torch.Tensor  # inputs that never fired: given a unit diagonal in H, their weights zeroed
    damping: torch.Tensor  # 0-d: percdamp x H's mean diagonal, raised when H stayed singular


def inverse_hessian_factor(stats, percdamp: float, device: torch.device | str = "cpu") -> InverseHessianFactor:
    """The dampened inverse Hessian's factor for a layer's input statistics; inputs that never
    fired get a unit diagonal so the Hessian stays invertible. The factor is shared by
    consecutive calls with the same, unchanged statistics object."""
    device = torch.device(device)
    cached = _factors.get(stats, percdamp, device)
    if cached is not None:
        return cached
    gram = stats.gram
    if gram is None:
        stats.hessian()  # raises, naming the problem
    hessian = torch.empty_like(gram, device=device)

    def write_hessian(out: torch.Tensor) -> None:  # into `out`, without a temporary on its device
        if out.device == gram.device:
            stats.hessian(out=out)
        else:
            out.copy_(stats.hessian())

    write_hessian(hessian)
    dead = torch.diagonal(hessian) == 0

    def refill(out: torch.Tensor) -> None:
        write_hessian(out)
        torch.diagonal(out)[dead] = 1.0

    torch.diagonal(hessian)[dead] = 1.0
    upper, damping = _inverse_hessian_cholesky(hessian, percdamp, refill)
    value = InverseHessianFactor(upper, dead, damping)
    _factors.put(stats, percdamp, device, value)
    return value


def _inverse_hessian_cholesky(hessian: torch.Tensor, percdamp: float,
                              refill: Callable[[torch.Tensor], object]) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor U of the dampened inverse Hessian, the damping added to the
    diagonal): U^T U = (H + damping I)^-1, retrying with more damping.

    With P the order reversal, P H P = L L^T gives H^-1 = (P L^-1 P)^T (P L^-1 P), and P L^-1 P
    is upper triangular: so U is one Cholesky factorisation and one triangular inverse (2/3 n^3
    flops), where inverting H and factoring the inverse takes 4/3 n^3. The same factor up to
    rounding (the textbook chain's rounding differs, so near-tied mask choices can differ).
    CPU Hessians of moderate width are factored by halves instead (`_upper_factor_by_halves`).

    Computed in the storage of `hessian`, which is overwritten and returned: an 11008-wide
    Hessian is 0.45 GiB in fp32 (factoring by halves adds at most half of one 4096-wide
    Hessian, 32 MiB, of temporaries). A failed attempt leaves the storage half-factorised;
    `refill(hessian)` writes the Hessian back before the next one."""
    diag_mean = torch.diagonal(hessian).mean()
    damp = percdamp
    for attempt in range(6):
        if attempt:
            refill(hessian)
        torch.diagonal(hessian).add_(damp * diag_mean)
        if _upper_factor_in_place(hessian):
            return hessian, damp * diag_mean
        damp *= 10
    raise RuntimeError("SparseGPT: the layer's Hessian stays singular even with heavy dampening")


# On CPU, Hessians from _HALVES_MIN to _HALVES_MAX wide are factored by halves (see
# `_upper_factor_by_halves`): LAPACK's single-threaded Cholesky and triangular inverse run at a
# fifth of the matmul rate here, and two solve threads calling SciPy's OpenBLAS at once queue on
# its lock (two factors side by side took twice one's time). Beyond _HALVES_MAX the halves'
# temporaries (half a Hessian) cost more memory than the time they save is worth.
_HALVES_MIN = 256
_HALVES_MAX = 4096
_HALVES_LEAF = 192


def factor_temporary_bytes(width: int, device_type: str = "cpu") -> int:
    """Bytes the factor of a `width`-wide Hessian holds besides the Hessian's own buffer: half a
    Hessian by halves on CPU, one matrix for the triangular solve off CPU, none in place."""
    if device_type == "cpu":
        return 2 * width * width if _HALVES_MIN <= width <= _HALVES_MAX else 0
    return 4 * width * width


def _upper_factor_in_place(hessian: torch.Tensor) -> bool:
    """Overwrite a contiguous symmetric matrix H with U, upper triangular with zeros below,
    U^T U = H^-1; False when H is not positive definite (the storage is then half-written)."""
    n = hessian.shape[0]
    if hessian.device.type == "cpu" and _HALVES_MIN <= n <= _HALVES_MAX:
        return _upper_factor_by_halves(hessian)
    return _upper_factor_whole(hessian, lapack=hessian.device.type == "cpu")


def _upper_factor_whole(hessian: torch.Tensor, lapack: bool) -> bool:
    """`_upper_factor_in_place` for a contiguous H as a whole: P H P = L L^T, then U = P L^-1 P,
    through SciPy's LAPACK (`lapack`, CPU) or torch's ops."""
    _reverse_in_place(hessian)
    if not _cholesky_in_place(hessian, lapack):
        return False
    _invert_lower_in_place(hessian, lapack)
    _reverse_in_place(hessian)
    return True


def _upper_factor_by_halves(matrix: torch.Tensor) -> bool:
    """`_upper_factor_in_place` for a square view, recursively on halves, in matrix products.

    With H = V V^T, V = U^-1 upper triangular, split in halves: H22 = V22 V22^T gives U22 (by
    recursion), V12 = H12 U22^T, H11 - V12 V12^T = V11 V11^T gives U11 (by recursion), and
    U12 = -U11 V12 U22. About n^3 flops in GEMMs (products with a triangle skip its zero quarter;
    LAPACK counts 2/3 n^3 at a fifth of the GEMM rate here); leaves go to torch's Cholesky and
    triangular solve, which release the GIL."""
    n = matrix.shape[0]
    if n <= _HALVES_LEAF:
        leaf = matrix.contiguous()
        if not _upper_factor_whole(leaf, lapack=False):
            return False
        if leaf.data_ptr() != matrix.data_ptr():
            matrix.copy_(leaf)
        return True
    half = n // 2
    h11, h12, h22 = matrix[:half, :half], matrix[:half, half:], matrix[half:, half:]
    if not _upper_factor_by_halves(h22):  # now U22, zeros below its diagonal
        return False
    v12 = _times_upper(h12, h22.t(), lower=True)
    if half > _HALVES_LEAF:  # split again, which reads only the upper triangle: skip the rest
        quarter = half // 2
        h11[:quarter].addmm_(v12[:quarter], v12.t(), alpha=-1.0)
        h11[quarter:, quarter:].addmm_(v12[quarter:], v12[quarter:].t(), alpha=-1.0)
    else:
        h11.addmm_(v12, v12.t(), alpha=-1.0)
    if not _upper_factor_by_halves(h11):  # now U11
        return False
    v12_u22 = _times_upper(v12, h22)
    del v12  # at most two half-by-half temporaries alive at once (`factor_temporary_bytes`)
    h12.copy_(_upper_times(h11, v12_u22))
    h12.neg_()
    matrix[half:, :half].zero_()
    return True


def _times_upper(x: torch.Tensor, triangle: torch.Tensor, lower: bool = False) -> torch.Tensor:
    """x @ triangle for an upper (or `lower`) triangular square matrix, its zero quarter skipped:
    three quarters of the product's work."""
    cut = triangle.shape[0] // 2
    out = x.new_empty(x.shape[0], triangle.shape[1])
    if lower:
        torch.mm(x, triangle[:, :cut], out=out[:, :cut])
        torch.mm(x[:, cut:], triangle[cut:, cut:], out=out[:, cut:])
    else:
        torch.mm(x[:, :cut], triangle[:cut, :cut], out=out[:, :cut])
        torch.mm(x, triangle[:, cut:], out=out[:, cut:])
    return out


def _upper_times(upper: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """upper @ y for an upper triangular square matrix, its zero quarter skipped."""
    cut = upper.shape[0] // 2
    out = y.new_empty(upper.shape[0], y.shape[1])
    torch.mm(upper[:cut], y, out=out[:cut])
    torch.mm(upper[cut:, cut:], y[cut:], out=out[cut:])
    return out


# Elements per step when a matrix is reversed in place (two temporaries of this size).
_REVERSE_CHUNK = 2**20


def _reverse_in_place(matrix: torch.Tensor) -> None:
    """P M P for a contiguous square M: reversing both axes reverses its storage, done by
    swapping mirrored chunks so that no second matrix-sized buffer is needed."""
    flat = matrix.view(-1)
    total = flat.numel()
    for start in range(0, total // 2, _REVERSE_CHUNK):
        end = min(start + _REVERSE_CHUNK, total // 2)
        front, back = flat[start:end], flat[total - end:total - start]
        saved = front.clone()
        front.copy_(back.flip(0))
        back.copy_(saved.flip(0))


# On CPU both steps call SciPy's LAPACK on the tensor's own memory: single-threaded, its Cholesky
# ran 2.5x faster than torch's here (1536 wide: 15 vs 36 ms), and torch has no triangular
# inverse. A C-ordered matrix is the Fortran-ordered transpose, so "upper" below is our lower.


def _cholesky_in_place(matrix: torch.Tensor, lapack: bool) -> bool:
    """Overwrite a contiguous symmetric matrix with its lower Cholesky factor L (M = L L^T, zeros
    above the diagonal); False when it is not positive definite."""
    if not lapack:
        info = torch.zeros((), dtype=torch.int32, device=matrix.device)
        torch.linalg.cholesky_ex(matrix, out=(matrix, info))
        return not _failed(info)
    from scipy.linalg import lapack as scipy_lapack

    transposed = matrix.numpy().T
    potrf = scipy_lapack.spotrf if matrix.dtype == torch.float32 else scipy_lapack.dpotrf
    with _blas_threads(torch.get_num_threads()):
        factor, info = potrf(transposed, lower=0, overwrite_a=1, clean=1)
    _keep_in_place(factor, transposed)
    return info == 0


def _invert_lower_in_place(lower: torch.Tensor, lapack: bool) -> None:
    """Overwrite a contiguous lower-triangular L with L^-1 (zeros above the diagonal stay)."""
    if not lapack:
        inverse = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
        torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)  # one extra matrix
        lower.copy_(inverse)
        return
    from scipy.linalg import lapack as scipy_lapack

    transposed = lower.numpy().T
    trtri = scipy_lapack.strtri if lower.dtype == torch.float32 else scipy_lapack.dtrtri
    with _blas_threads(torch.get_num_threads()):
        inverse, info = trtri(transposed, lower=0, overwrite_c=1)
    if info != 0:
        raise RuntimeError(f"SparseGPT: the triangular inverse failed (LAPACK trtri info {info})")
    _keep_in_place(inverse, transposed)


def _keep_in_place(result: np.ndarray, storage: np.ndarray) -> None:
    """LAPACK wrappers work in place on a contiguous Fortran array, else on a copy: copy back."""
    if not np.shares_memory(result, storage):
        storage[...] = result


_blas_controller = None
_blas_controller_lock = threading.Lock()


@contextmanager
def _blas_threads(count: int):
    """SciPy's BLAS/LAPACK (OpenBLAS, not torch's) limited to `count` threads: one per solve
    when the driver solves groups side by side on one torch thread each."""
    global _blas_controller
    from threadpoolctl import ThreadpoolController

    with _blas_controller_lock:
        if _blas_controller is None:
            _blas_controller = ThreadpoolController()
    with _blas_controller.limit(limits=count, user_api="blas"):
        yield


def _failed(info: torch.Tensor) -> bool:
    """Whether a `cholesky_ex` failed; a meta-device run (shapes only) has no values to check."""
    return info.device.type != "meta" and int(info) != 0


class _FactorCache:
    """The last inverse-Hessian factor, kept for the statistics object it came from.

    Linears fed the same input (q/k/v, gate/up) share one statistics object, so the driver's
    consecutive solves for them reuse one factorisation. The entry is keyed on the object itself
    (held weakly), its token count and the Gram matrix's in-place version counter, so statistics
    that grew or changed since are factorised afresh."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entry = None  # (weakref to stats, key, InverseHessianFactor)

    @staticmethod
    def _key(stats, percdamp: float, device: torch.device) -> tuple:
        gram = stats.gram
        return stats.tokens, gram._version, gram.data_ptr(), float(percdamp), str(device)

    def get(self, stats, percdamp: float, device: torch.device):
        with self._lock:
            entry = self._entry
        if entry is None or entry[0]() is not stats or entry[1] != self._key(stats, percdamp, device):
            return None
        return entry[2]

    def put(self, stats, percdamp: float, device: torch.device, value) -> None:
        try:
            # the factor goes with its statistics: a driver that drops a block's statistics
            # frees the factor too (an 11008-wide one is 0.45 GiB in fp32)
            ref = weakref.ref(stats, self._forget)
        except TypeError:  # an object that cannot be referenced weakly is simply not cached
            return
        with self._lock:
            self._entry = (ref, self._key(stats, percdamp, device), value)

    def _forget(self, ref) -> None:
        with self._lock:
            if self._entry is not None and self._entry[0] is ref:
                self._entry = None


_factors = _FactorCache()
