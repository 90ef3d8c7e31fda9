"""The channel/head plan the layer-wise driver executes, for every method with a unit form.

A method (its `Method` record) removes whole MLP channels or attention heads in one of two ways:
- `unit_scores`: the driver scores a block's units from that block's statistics when it reaches
  the block, and removes the same fraction in every block (allocation 'uniform');
- `plan`: the method chooses the units of every block before the driver starts (retrain-free's
  Fisher pass), across blocks ('global') or per block ('uniform').
Either way the removed units are zeroed, and with mask tuning the kept input columns of down / o
are refit by least squares on the driver's Gram matrix (`reconstruct_columns`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from workbench.arch import LinearInfo, ModelLayout, set_weight, weight_of
from workbench.methods import METHODS, method_record, structured_methods
from workbench.methods.retrain_free import FISHER_MAX_BATCH
from workbench.structured import (
    KIND_SCOPE,
    BlockGeometry,
    Structure,
    apply_unit_mask,
    keep_lowest_removed,
    model_geometry,
    reconstruct_columns,
    units_to_remove,
)

log = logging.getLogger(__name__)

ALLOCATIONS = ("auto", "global", "uniform")


@dataclass
class StructuredPlan:
    """Unit choices for every block plus the per-block step the driver calls."""

    kind: str
    method: str
    geometries: list[BlockGeometry]
    mask_tuning: bool
    percdamp: float
    skip_blocks: set[int] = field(default_factory=set)
    chosen: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> unit keep-mask
    fisher: list[torch.Tensor] | None = None  # per block, per-window gradients (a method's plan)
    calibration: dict = field(default_factory=dict)  # what the method's own pass read (a recipe's)

    def needs_stats(self) -> str | None:
        if self.mask_tuning:
            return "gram"
        return method_record(self.method).stats

    def block_linears(self, index: int) -> list[LinearInfo]:
        return [] if index in self.skip_blocks else self.geometries[index].linears()

    def solve_block(self, index: int, stats: dict, target: float
                    ) -> list[tuple[LinearInfo, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Decide (unless pre-decided), zero, and refit one block; returns per linear
        (info, dense weight, new weight, keep mask)."""
        geometry = self.geometries[index]
        keep = self.chosen.get(index)
        if keep is None:
            remove = units_to_remove(geometry.num_units, target, f" in block {index}")
            scores = method_record(self.method).unit_scores(
                geometry, stats.get(geometry.output.linear.full_name))
            keep = keep_lowest_removed(scores, remove)
            self.chosen[index] = keep
        dense = {p.linear.full_name: weight_of(p.linear.module).to(torch.float32, copy=True)
                 for p in geometry.parts}
        masks = apply_unit_mask(geometry, keep)
        if self.mask_tuning and not bool(keep.all()):
            out = geometry.output.linear
            out_stats = stats[out.full_name]
            keep_cols = geometry.output.keep_along_axis(keep)
            tuned = reconstruct_columns(dense[out.full_name], out_stats.gram, keep_cols,
                                        self.percdamp)
            set_weight(out.module, tuned)
        return [(p.linear, dense[p.linear.full_name],
                 weight_of(p.linear.module).to(torch.float32, copy=True),
                 masks[p.linear.full_name]) for p in geometry.parts]

    def structure(self) -> Structure:
        first = self.geometries[0]
        kept = []
        for g in self.geometries:
            keep = self.chosen.get(g.block, torch.ones(g.num_units, dtype=torch.bool))
            kept.append(torch.nonzero(keep).flatten().tolist())
        return Structure(self.kind, first.unit, first.heads_per_unit,
                         [g.num_units for g in self.geometries], kept)


def resolve_allocation(method: str, allocation: str) -> str:
    """'auto' made concrete for `method`; refuses 'global' for block-by-block unit scores."""
    record = method_record(method)
    if allocation == "auto":
        return "global" if record.ranks_across_blocks else "uniform"
    if allocation == "global" and not record.ranks_across_blocks:
        ranking = " or ".join(repr(name) for name, other in METHODS.items()
                              if other.ranks_across_blocks)
        raise ValueError(f"{method} unit scores are not comparable across blocks; use "
                         f"allocation 'uniform' (or method {ranking} for a global choice)")
    return allocation


def plan_structured(model: nn.Module, layout: ModelLayout, kind: str, method: str,
                    sparsity: float, ids: torch.Tensor | None, *, allocation: str = "auto",
                    block_sparsity: list[float] | None = None, mask_tuning: bool | None = None,
                    percdamp: float = 0.01, batch_size: int = FISHER_MAX_BATCH,
                    skip_blocks: set[int] | None = None, rearrange: bool = True,
                    geometries: list[BlockGeometry] | None = None) -> StructuredPlan:
    """Build the plan; for a method with a `plan` of its own (retrain-free: the Fisher pre-pass,
    search and rearrangement) this runs it. `geometries`: `model_geometry(layout, kind)` when the
    caller already has it."""
    record = METHODS.get(method)
    if record is None or not record.structured:
        raise ValueError(f"{kind} pruning supports methods {tuple(structured_methods())}, not "
                         f"{method!r}")
    if allocation == "auto" and block_sparsity is not None:
        allocation = "uniform"  # per-block targets fix every block's count
    allocation = resolve_allocation(method, allocation)
    geometries = geometries if geometries is not None else model_geometry(layout, kind)
    tuning = record.mask_tuning_default if mask_tuning is None else bool(mask_tuning)
    plan = StructuredPlan(kind, method, geometries, tuning, percdamp, set(skip_blocks or ()))
    targets = block_sparsity if block_sparsity is not None else sparsity
    if record.plan is None:
        # Counts are checked now, so an impossible budget fails before anything is zeroed.
        for g in geometries:
            target = targets[g.block] if isinstance(targets, list) else targets
            units_to_remove(g.num_units, target, f" in block {g.block}")
        return plan
    active = [g for g in geometries if g.block not in plan.skip_blocks]
    if isinstance(targets, list):
        targets = [targets[g.block] for g in active]
    plan.chosen, plan.fisher = record.plan(model, active, ids, targets, allocation,
                                           batch_size=batch_size, rearrange=rearrange)
    log.info("%s %s: kept %s units per block", method, kind,
             [int(plan.chosen[g.block].sum()) for g in active])
    return plan


def check_scope(kind: str, scope: str) -> str:
    """The scope a structured pattern acts on ('all' means the pattern's own)."""
    natural = KIND_SCOPE[kind]
    if scope not in ("all", natural):
        raise ValueError(f"pattern {kind!r} prunes the {natural} block; use scope {natural!r} "
                         f"(got {scope!r})")
    return natural
