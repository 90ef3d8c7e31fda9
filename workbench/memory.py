"""Peak memory of a prune, estimated before it runs, and whether it should onload from disk.

    estimate = estimate_memory("llama-7b/", PruneConfig(method="wanda"))
    print(estimate.describe())   # "in memory 31.2 GiB, out of core 2.9 GiB; 20.1 GiB available: ..."

The estimate counts the weights (in the checkpoint's dtype), one block's fp32 working copy, the
method's statistics for that block (X^T X per distinct layer input for SparseGPT or the error
report, input norms for Wanda), its solve workspace, and the calibration activations (a block's
inputs and outputs, fp32). Available memory is the smaller of what the system has free and
what this process's cgroup still allows (a container or a `memory.limit_in_bytes` cap).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from workbench.arch import ModelLayout, describe, in_out_features
from workbench.methods.inverse_hessian import factor_temporary_bytes
from workbench.prune import PruneConfig

GIB = 2 ** 30
HEADROOM = 0.85  # plan to use at most this share of the available memory
OVERHEAD = 600 * 2 ** 20  # Python, torch and transformers themselves


@dataclass
class MemoryEstimate:
    in_memory_bytes: int  # peak of a prune with the whole model in memory
    offload_bytes: int  # peak of an out-of-core prune (one block at a time from disk)
    available_bytes: int
    offload: bool  # whether the prune should onload blocks from disk
    activations_bytes: int  # calibration activations of one block (inputs and outputs)
    activations_in_memory: bool  # False: they spill to disk between blocks
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return self.offload_bytes if self.offload else self.in_memory_bytes

    def describe(self) -> str:
        mode = "onloading blocks from disk" if self.offload else "in memory"
        spill = "" if self.activations_in_memory else ", calibration activations spill to disk"
        return (f"estimated peak memory {self.peak_bytes / GIB:.1f} GiB ({mode}{spill}); in memory "
                f"{self.in_memory_bytes / GIB:.1f} GiB, out of core {self.offload_bytes / GIB:.1f} GiB, "
                f"{self.available_bytes / GIB:.1f} GiB available")

    def to_dict(self) -> dict:
        return {"in_memory_gib": self.in_memory_bytes / GIB, "offload_gib": self.offload_bytes / GIB,
                "available_gib": self.available_bytes / GIB, "peak_gib": self.peak_bytes / GIB,
                "offload": self.offload, "activations_in_memory": self.activations_in_memory,
                "parts_gib": {k: v / GIB for k, v in self.parts.items()}}


def _cgroup_room() -> int | None:
    """Bytes this process's memory cgroup still allows (v1 or v2), or None when uncapped."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit_file, usage_file = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        elif controllers == "":
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit_file, usage_file = base / "memory.max", base / "memory.current"
        else:
            continue
        try:
            limit_text = limit_file.read_text().strip()
            if limit_text == "max" or int(limit_text) >= 2 ** 60:
                return None
            # page cache counts in the usage but is reclaimed under the cap: count it as room
            return max(int(limit_text) - _rss(), 0) if usage_file.exists() else int(limit_text)
        except (OSError, ValueError):
            return None
    return None


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def available_memory() -> int:
    """Bytes a prune may use now: free system memory, capped by this process's cgroup."""
    import psutil

    free = int(psutil.virtual_memory().available)
    room = _cgroup_room()
    return min(free, room) if room is not None else free


def _unique_params(module: nn.Module) -> int:
    seen, total = set(), 0
    for param in module.parameters():
        key = id(param)
        if key not in seen:
            seen.add(key)
            total += param.numel()
    return total


def _stats_and_workspace(layout: ModelLayout, config: PruneConfig) -> tuple[int, int, int]:
    """Bytes of one block's statistics, and of the statistics still alive and the solve workspace
    at the layer where their sum peaks: the driver solves one layer at a time and frees a layer's
    statistics once it is solved (shared ones after the last layer reading them), so a 7B block
    peaks at down_proj with its own 11008-wide X^T X only."""

    block = layout.blocks[0]
    linears = block.select(config.scope)
    gram = config.collects_gram
    # layers reading the same tensor share one accumulator: q/k/v (or qkv), gate/up
    widths: dict[str, int] = {}
    last_use: dict[str, int] = {}
    for index, lin in enumerate(linears):
        shared = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "qkv": "attn_in",
                  "gate": "mlp_in", "up": "mlp_in"}.get(lin.role, lin.full_name)
        widths[shared] = in_out_features(lin.module)[0]
        last_use[shared] = index
    stat_bytes = {key: (width * width if gram else width) * 4 for key, width in widths.items()}
    alive_at_peak = workspace = 0
    for index, lin in enumerate(linears):
        in_f, out_f = in_out_features(lin.module)
        if config.method_record.obs_update:
            # fp32 dense copy, W^T being solved, its mask, the returned weight and mask; the
            # Hessian is factorised in one buffer that becomes the inverse's factor, with the
            # factorisation's own temporaries (none for the widest CPU Hessians)
            need = out_f * in_f * (4 + 4 + 1 + 4 + 1) + in_f * in_f * 4 + factor_temporary_bytes(in_f)
        else:
            # fp32 dense copy, new weight, scores, sort indices (int64), mask
            need = out_f * in_f * (4 + 4 + 4 + 8 + 1)
        alive = sum(size for key, size in stat_bytes.items() if last_use[key] >= index)
        if alive + need > alive_at_peak + workspace:
            alive_at_peak, workspace = alive, need
    return sum(stat_bytes.values()), alive_at_peak, workspace


def estimate_for_model(model: nn.Module, config: PruneConfig, dtype: torch.dtype | None = None,
                       available: int | None = None, load_dtype: torch.dtype | None = None) -> MemoryEstimate:
    """The estimate for `model` (loaded, or a meta-device skeleton) stored in `dtype` on disk
    and loaded in `load_dtype` for an in-memory prune (default: `dtype`)."""
    layout = describe(model)
    dtype = dtype or next(model.parameters()).dtype
    size = torch.empty(0, dtype=dtype).element_size()
    load_size = torch.empty(0, dtype=load_dtype or dtype).element_size()
    total = _unique_params(model)
    per_block = _unique_params(layout.blocks[0].module)
    outside = max(total - per_block * layout.num_blocks, 0)
    stats, alive_at_peak, workspace = _stats_and_workspace(layout, config)
    activations = 2 * config.nsamples * config.seqlen * layout.hidden_size * 4
    micro_batches = 2 * min(config.batch_size, config.nsamples) * config.seqlen * layout.hidden_size * 4
    parts = {"weights": total * load_size, "outside_blocks": outside * size, "block_fp32": per_block * 4,
             "block_read": per_block * size, "statistics": stats, "solve_workspace": workspace,
             "activations": activations, "overhead": OVERHEAD}
    parts["solve_peak"] = alive_at_peak + workspace  # statistics still alive + the peak layer's workspace
    block_work = parts["block_fp32"] + parts["solve_peak"] + OVERHEAD
    in_memory = parts["weights"] + block_work + activations
    available = available_memory() if available is None else available
    # The block's read copy is freed before its solves, but counting it too matched the measured
    # peaks (7B shape: SparseGPT 2:4 3.73 GiB estimated, 3.6 measured; Wanda 3.12 vs 2.85): the
    # process holds more than OVERHEAD (libraries, allocator slack) when it solves.
    without_acts = parts["outside_blocks"] + parts["block_read"] + block_work
    activations_in_memory = without_acts + activations <= HEADROOM * available
    offload = without_acts + (activations if activations_in_memory else micro_batches)
    return MemoryEstimate(in_memory_bytes=in_memory, offload_bytes=offload, available_bytes=available,
                          offload=in_memory > HEADROOM * available, activations_bytes=activations,
                          activations_in_memory=activations_in_memory, parts=parts)


def estimate_memory(model: nn.Module | str | Path, config: PruneConfig, available: int | None = None,
                    load_dtype: str | torch.dtype | None = None) -> MemoryEstimate:
    """The estimate for a loaded model, or for a safetensors folder without loading its weights
    (`load_dtype`: the dtype an in-memory prune would load it in; default the checkpoint's)."""
    from workbench.models import dtype_of

    load_dtype = dtype_of(load_dtype) if load_dtype is not None else None
    if isinstance(model, nn.Module):
        return estimate_for_model(model, config, available=available, load_dtype=load_dtype)
    from workbench.offload import CheckpointReader, skeleton

    reader = CheckpointReader(model)
    dtype = reader.dtype()
    return estimate_for_model(skeleton(model, dtype=dtype), config, dtype=dtype, available=available,
                              load_dtype=load_dtype)


def activations_fit(layout: ModelLayout, config: PruneConfig, available: int | None = None) -> bool:
    """Whether a block's calibration inputs and outputs stay in memory during an out-of-core
    prune (else they spill to disk between blocks)."""
    available = available_memory() if available is None else available
    activations = 2 * config.nsamples * config.seqlen * layout.hidden_size * 4
    return activations <= HEADROOM * available / 4


def choose_offload(mode: str, model: nn.Module | str | Path, config: PruneConfig,
                   load_dtype: str | torch.dtype | None = None) -> bool:
    """Resolve an offload mode ('auto' | 'none' | 'disk') to whether to onload from disk."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"unknown offload mode {mode!r}: choose one of {OFFLOAD_MODES}")
    if mode != "auto":
        return mode == "disk"
    return estimate_memory(model, config, load_dtype=load_dtype).offload


OFFLOAD_MODES = ("auto", "none", "disk")
