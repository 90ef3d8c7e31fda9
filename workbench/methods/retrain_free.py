"""Retrain-free structured pruning (Kwon et al. 2022, "A fast post-training pruning framework for
transformers"), for MLP channels or attention heads, in three steps:

1. Fisher mask search. A mask variable (1.0) multiplies each unit's activation where it enters
   down / o (a forward pre-hook). The LM loss is back-propagated on calibration windows, one mask
   row per window so every window's gradient is kept; the diagonal Fisher of a unit is the sum of
   its squared per-window gradients, i.e. the loss increase a second-order model predicts for
   removing it alone. With a sparsity budget every unit in a model has the same cost, so the
   paper's knapsack reduces to removing the lowest-Fisher units: globally across blocks
   (`allocation="global"`, the paper's choice, keeping at least one unit per block) or the same
   count per block (`allocation="uniform"`, which slims to a stock config).
2. Mask rearrangement. Within each block the pruned *set* is refined with the block-diagonal
   Fisher sum_s (sum_{i in S} g_si)^2 (units interact), by the paper's greedy swap.
3. Mask tuning. Inside the layer-wise driver, the kept output columns of down / o are refit by
   least squares so the block output matches the dense one on calibration activations (the
   driver's Gram matrix, ridge toward the dense weights: see `reconstruct_columns`). The paper
   tunes one scale per kept unit; refitting whole columns uses the same statistics and can
   recover more. INC's implementation stops before this step; `mask_tuning` toggles it.

Magnitude and Wanda unit scores plug into the same plan as cheap baselines (per-block counts).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.arch import LinearInfo, ModelLayout, set_weight, weight_of
from workbench.structured import (
    KIND_SCOPE,
    BlockGeometry,
    StructureError,
    apply_unit_mask,
    keep_lowest_removed,
    magnitude_unit_scores,
    model_geometry,
    reconstruct_columns,
    units_to_remove,
    wanda_unit_scores,
)

log = logging.getLogger(__name__)

STRUCTURED_METHODS = ("retrain-free", "magnitude", "wanda")
ALLOCATIONS = ("auto", "global", "uniform")
FISHER_MAX_BATCH = 4  # windows per backward pass: bounds activation memory on small machines


@dataclass
class Structure:
    """What structured pruning kept: per block, the indices of the kept units."""

    kind: str  # "channel" or "head"
    unit: str  # "channel", "head" or "kv_group"
    heads_per_unit: int
    num_units: list[int]  # per block, before pruning
    kept: list[list[int]]  # per block, sorted kept unit indices

    @property
    def removed_fraction(self) -> float:
        total = sum(self.num_units)
        return 1 - sum(len(k) for k in self.kept) / total if total else 0.0

    def keep_mask(self, block: int) -> torch.Tensor:
        keep = torch.zeros(self.num_units[block], dtype=torch.bool)
        keep[self.kept[block]] = True
        return keep

    def to_dict(self) -> dict:
        return {"kind": self.kind, "unit": self.unit, "heads_per_unit": self.heads_per_unit,
                "num_units": list(self.num_units), "kept": [list(k) for k in self.kept]}

    @classmethod
    def from_dict(cls, data: dict) -> Structure:
        return cls(data["kind"], data["unit"], int(data["heads_per_unit"]),
                   [int(n) for n in data["num_units"]], [[int(i) for i in k] for k in data["kept"]])


# --- step 1: Fisher information of the mask variables -------------------------------------


def fisher_gradients(model: nn.Module, geometries: list[BlockGeometry], ids: torch.Tensor,
                     batch_size: int = FISHER_MAX_BATCH, progress=None) -> list[torch.Tensor]:
    """Per-window gradients of the LM loss w.r.t. unit mask variables: one (windows, units)
    tensor per block. A separate pass over the full model (gradients need every block)."""
    device = next(model.parameters()).device
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    was_training = model.training
    model.eval()
    grads: list[list[torch.Tensor]] = [[] for _ in geometries]
    current: list[torch.Tensor | None] = [None] * len(geometries)

    def make_hook(index: int, owner: torch.Tensor):
        def hook(_module, args):
            mask = current[index][:, owner.to(device)]  # (batch, in_features)
            x = args[0]
            # (batch, tokens, in) or flattened (batch * tokens, in) as OPT's fc2 receives it
            grouped = x.reshape(mask.shape[0], -1, mask.shape[1]) * mask[:, None, :].to(x.dtype)
            return (grouped.reshape(x.shape),) + tuple(args[1:])
        return hook

    handles = [g.output.linear.module.register_forward_pre_hook(make_hook(i, g.output.owner))
               for i, g in enumerate(geometries)]
    batch_size = max(1, min(batch_size, FISHER_MAX_BATCH))
    starts = range(0, ids.shape[0], batch_size)
    try:
        for start in tqdm(starts, desc="fisher", unit="batch", leave=False):
            batch = ids[start:start + batch_size].to(device)
            for i, g in enumerate(geometries):
                current[i] = torch.ones(batch.shape[0], g.num_units, device=device,
                                        requires_grad=True)
            with torch.enable_grad():
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                # the loss is a batch mean: scale so each row is its own window's gradient
                (loss * batch.shape[0]).backward()
            for i in range(len(geometries)):
                grads[i].append(current[i].grad.detach().float().cpu())
                current[i] = None
            if progress is not None:
                progress(min(start + batch_size, ids.shape[0]), ids.shape[0], "fisher")
    finally:
        for handle in handles:
            handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
        model.train(was_training)
    return [torch.cat(g) for g in grads]


def search_masks(fisher: list[torch.Tensor], sparsity: float | list[float],
                 allocation: str = "global") -> list[torch.Tensor]:
    """Unit keep-masks meeting the budget with the least diagonal-Fisher loss.

    `fisher`: per block, the diagonal Fisher of each unit. "global" removes floor(sparsity *
    all units) lowest-Fisher units across blocks (never a block's last one); "uniform" removes
    floor(sparsity * units) per block (`sparsity` may be a per-block list)."""
    num = [f.numel() for f in fisher]
    if allocation == "uniform":
        targets = sparsity if isinstance(sparsity, list) else [sparsity] * len(fisher)
        return [keep_lowest_removed(f, units_to_remove(n, t, f" in block {b}"))
                for b, (f, n, t) in enumerate(zip(fisher, num, targets))]
    if allocation != "global":
        raise ValueError(f"unknown allocation {allocation!r}: use 'global' or 'uniform'")
    if isinstance(sparsity, list):
        raise TypeError("per-block sparsity targets need allocation='uniform'")
    total = sum(num)
    remove = int(total * sparsity + 1e-9)
    if remove > total - len(num):
        raise StructureError(
            f"sparsity {sparsity:g} removes {remove} of {total} units but every one of the "
            f"{len(num)} blocks must keep at least one (at most {total - len(num)} can go). "
            "Lower the sparsity"
        )
    scores = torch.cat([f.float() for f in fisher])
    block_of = torch.cat([torch.full((n,), b) for b, n in enumerate(num)])
    left = list(num)
    keep = [torch.ones(n, dtype=torch.bool) for n in num]
    offsets = [sum(num[:b]) for b in range(len(num))]
    removed = 0
    for flat in torch.argsort(scores, stable=True).tolist():
        if removed == remove:
            break
        b = int(block_of[flat])
        if left[b] == 1:
            continue
        keep[b][flat - offsets[b]] = False
        left[b] -= 1
        removed += 1
    return keep


# --- step 2: mask rearrangement ------------------------------------------------------------


def rearrange_mask(keep: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Refine which units of one block are pruned, keeping their count, using the block-diagonal
    Fisher: the predicted loss of pruning set S is sum_s (sum_{i in S} g_si)^2.

    The paper's greedy: start from the lowest diagonal-Fisher set, then offer every other unit in
    increasing Fisher order; after adding it, drop the member whose removal leaves the smallest
    predicted loss."""
    num_pruned = int((~keep).sum())
    if num_pruned == 0 or num_pruned == keep.numel():
        return keep.clone()
    per_unit = grads.t().contiguous().float()  # (units, windows)
    order = torch.argsort(per_unit.pow(2).sum(1), stable=True).tolist()
    pruned = order[:num_pruned]
    for index in order[num_pruned:]:
        pruned.append(index)
        vectors = per_unit[pruned]
        total = vectors.sum(0)
        losses = (total - vectors).pow(2).sum(1)  # loss if each member were put back
        del pruned[int(losses.argmin())]
    new_keep = torch.ones_like(keep)
    new_keep[pruned] = False
    return new_keep


def predicted_loss(keep: torch.Tensor, grads: torch.Tensor) -> float:
    """Block-diagonal Fisher estimate of the loss increase from removing ~keep (for reports)."""
    return float(grads[:, ~keep].float().sum(1).pow(2).sum())


# --- the plan the layer-wise driver executes -----------------------------------------------


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
    fisher: list[torch.Tensor] | None = None  # per block, per-window gradients (retrain-free)

    def needs_stats(self) -> str | None:
        if self.mask_tuning:
            return "gram"
        return "diag" if self.method == "wanda" else None

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
            if self.method == "magnitude":
                scores = magnitude_unit_scores(geometry)
            else:
                out_stats = stats[geometry.output.linear.full_name]
                scores = wanda_unit_scores(geometry, out_stats.sq_sum)
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
    if allocation == "auto":
        return "global" if method == "retrain-free" else "uniform"
    if allocation == "global" and method != "retrain-free":
        raise ValueError(f"{method} unit scores are not comparable across blocks; use "
                         "allocation 'uniform' (or method 'retrain-free' for a global choice)")
    return allocation


def plan_structured(model: nn.Module, layout: ModelLayout, kind: str, method: str,
                    sparsity: float, ids: torch.Tensor | None, *, allocation: str = "auto",
                    block_sparsity: list[float] | None = None, mask_tuning: bool | None = None,
                    percdamp: float = 0.01, batch_size: int = FISHER_MAX_BATCH,
                    skip_blocks: set[int] | None = None, rearrange: bool = True,
                    geometries: list[BlockGeometry] | None = None) -> StructuredPlan:
    """Build the plan; for retrain-free this runs the Fisher pre-pass, search and rearrangement.
    `geometries`: `model_geometry(layout, kind)` when the caller already has it."""
    if method not in STRUCTURED_METHODS:
        raise ValueError(f"{kind} pruning supports methods {STRUCTURED_METHODS}, not {method!r}")
    if allocation == "auto" and block_sparsity is not None:
        allocation = "uniform"  # per-block targets fix every block's count
    allocation = resolve_allocation(method, allocation)
    geometries = geometries if geometries is not None else model_geometry(layout, kind)
    tuning = (method == "retrain-free") if mask_tuning is None else bool(mask_tuning)
    plan = StructuredPlan(kind, method, geometries, tuning, percdamp, set(skip_blocks or ()))
    targets = block_sparsity if block_sparsity is not None else sparsity
    if method != "retrain-free":
        # Counts are checked now, so an impossible budget fails before anything is zeroed.
        for g in geometries:
            target = targets[g.block] if isinstance(targets, list) else targets
            units_to_remove(g.num_units, target, f" in block {g.block}")
        return plan
    if ids is None:
        raise ValueError("retrain-free pruning needs calibration data for its Fisher pass")
    active = [g for g in geometries if g.block not in plan.skip_blocks]
    grads = fisher_gradients(model, active, ids, batch_size)
    diag = [g.pow(2).sum(0) for g in grads]
    if isinstance(targets, list):
        targets = [targets[g.block] for g in active]
    keeps = search_masks(diag, targets, allocation)
    for g, keep, block_grads in zip(active, keeps, grads):
        if rearrange:
            before = predicted_loss(keep, block_grads)
            keep = rearrange_mask(keep, block_grads)
            log.debug("block %d: rearrangement %.4g -> %.4g", g.block, before,
                      predicted_loss(keep, block_grads))
        plan.chosen[g.block] = keep
    plan.fisher = grads
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
