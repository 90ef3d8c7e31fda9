"""How long a prune will take on this machine, said before it starts.

    estimate = estimate_prune(model, PruneConfig(method="sparsegpt", pattern="2:4"))
    estimate.text  # 'about 40 s'

The work is counted from the model's shapes and the config: the calibration forwards (each block
runs twice: once for statistics, once to feed the next block), the X^T X accumulation, and the
method's per-layer solve. It is turned into seconds with this machine's matmul rate, measured
once per process by a short probe, and a measured cost per small tensor op (the SparseGPT column
loop is bound by those, not by FLOPs). An estimate, not a promise: a busy machine is slower.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from workbench.arch import describe, in_out_features
from workbench.flops import block_flops_per_token
from workbench.methods import column_sweep

# Fractions of the probe's matmul rate that each kind of work reaches, from the engine
# measurements on the bundled model (BENCHMARKS.md): block forwards ~0.8 (small micro-batches
# and attention run below a large GEMM), X^T X strips ~0.8, the SparseGPT solve ~0.4 (its
# factors and lazy-block products on the side-by-side solve threads).
FORWARD_EFFICIENCY = 0.8
GRAM_EFFICIENCY = 0.7
SOLVE_EFFICIENCY = 0.4
# The SparseGPT column sweep's small-op latency per input column, in units of the probe's small
# op: about 2 for numba's compiled sweep (the Python loop over its sub-blocks), 8 for PyTorch
# ops (an error row, a rank-1 update of a sub-block, a share of its N:M selection).
SOLVE_OPS_PER_COLUMN = {True: 2.0, False: 8.0}  # keyed by: numba installed


@dataclass(frozen=True)
class MachineSpeed:
    gflops: float  # a large fp32 matmul, GFLOP/s, all threads
    op_seconds: float  # one small elementwise op on a 576-vector, dispatch included

    def to_dict(self) -> dict:
        return {"gflops": round(self.gflops, 1), "op_us": round(self.op_seconds * 1e6, 2)}


@lru_cache(maxsize=1)
def machine_speed() -> MachineSpeed:
    """This machine's matmul rate and small-op cost, probed once per process (about 0.1 s)."""
    size = 512
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool, BLAS dispatch
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    x, y = torch.randn(576), torch.empty(576)
    ops = 200
    started = time.perf_counter()
    for _ in range(ops):
        torch.mul(x, x, out=y)
    op_seconds = (time.perf_counter() - started) / ops
    return MachineSpeed(gflops=2 * size**3 / max(best, 1e-9) / 1e9, op_seconds=op_seconds)


@dataclass
class Estimate:
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    speed: MachineSpeed | None = None

    @property
    def text(self) -> str:
        return format_seconds(self.seconds)


def format_seconds(seconds: float) -> str:
    """'about 40 s', 'about 3 min', 'about 1 h 20 min': coarse, as an estimate should be."""
    if seconds < 60:
        return f"about {max(1, round(seconds / 5) * 5 if seconds >= 10 else round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"about {hours} h {minutes} min" if minutes else f"about {hours} h"


def _shared_input(lin) -> str:
    """Linears fed the same tensor share one statistics object (and one SparseGPT factor)."""
    if lin.role in ("q", "k", "v", "qkv"):
        return "attention input"
    if lin.role in ("gate", "up"):
        return "mlp input"
    return lin.full_name


def estimate_prune(model: nn.Module, config, speed: MachineSpeed | None = None) -> Estimate:
    """Seconds a `workbench.prune.prune(model, config)` should take here, by stage.

    Counts the blocks' linears from the model itself, so any supported family works; the
    evaluation afterwards is not included."""
    from workbench.prune import _prunes_nothing  # the driver's own rule for an instant prune

    pattern = config.validate()
    speed = speed or machine_speed()
    rate = speed.gflops * 1e9
    if _prunes_nothing(config):
        return Estimate(0.0, {}, speed)
    layout = describe(model)
    uses_data = config.uses_calibration
    gram = config.collects_gram
    tokens = config.nsamples * config.seqlen if uses_data else 0
    obs_solve = config.method_record.obs_update and not pattern.structured
    compiled_sweep = column_sweep.numba_installed()
    forward = gram_flops = solve_flops = solve_ops = 0.0
    for block in layout.blocks:
        forward += tokens * block_flops_per_token(block, layout, config.seqlen)
        scoped = block.select(config.scope)
        widths = {}  # one statistics (and one factor) per distinct input: q/k/v, gate/up share
        for lin in scoped:
            in_features, out_features = in_out_features(lin.module)
            widths.setdefault(_shared_input(lin), in_features)
            if obs_solve:
                solve_flops += out_features * in_features**2
                solve_ops += SOLVE_OPS_PER_COLUMN[compiled_sweep] * in_features
            else:
                solve_flops += 20 * out_features * in_features  # scores, top-k, masking
        for width in widths.values():
            if gram:
                gram_flops += 2 * tokens * width**2 * 5 / 8  # upper strips only (workbench.stats)
            if obs_solve:
                solve_flops += 4 / 3 * width**3  # factor, invert, factor
    parts = {}
    if uses_data:
        # each block runs twice (statistics, then the next block's inputs)
        parts["calibration forwards"] = 2 * forward / (rate * FORWARD_EFFICIENCY)
        if gram:
            parts["statistics"] = gram_flops / (rate * GRAM_EFFICIENCY)
    parts["solve"] = solve_flops / (rate * SOLVE_EFFICIENCY) + solve_ops * speed.op_seconds
    if pattern.structured:  # the structured pipeline re-scores units and refits: about one more pass
        parts["structured planning"] = forward / (rate * FORWARD_EFFICIENCY)
    return Estimate(sum(parts.values()), parts, speed)
