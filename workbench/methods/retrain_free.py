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
   The plan that runs the driver's side (step 3, and the cheap Magnitude and Wanda unit scores
   that plug into the same plan as baselines) is `workbench.methods.unit_plan`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.progress import Progress
from workbench.structured import BlockGeometry, StructureError, keep_lowest_removed, units_to_remove

log = logging.getLogger(__name__)

FISHER_MAX_BATCH = 4  # windows per backward pass: bounds activation memory on small machines


# --- step 1: Fisher information of the mask variables -------------------------------------


def fisher_gradients(model: nn.Module, geometries: list[BlockGeometry], ids: torch.Tensor,
                     batch_size: int = FISHER_MAX_BATCH, progress: Progress | None = None) -> list[torch.Tensor]:
    """Per-window gradients of the LM loss w.r.t. unit mask variables: one (windows, units)
    tensor per block. A separate pass over the full model (gradients need every block).
    `progress(fraction, message)` after every batch of windows."""
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
                windows = min(start + batch_size, ids.shape[0])
                progress(windows / ids.shape[0], f"fisher {windows}/{ids.shape[0]} windows")
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


# --- the unit choice the structured plan runs before the driver ---------------------------


def fisher_plan(model: nn.Module, geometries: list[BlockGeometry], ids: torch.Tensor | None,
                targets: float | list[float], allocation: str, *, batch_size: int = FISHER_MAX_BATCH,
                rearrange: bool = True) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
    """Retrain-free's choice of units in `geometries` (the blocks that may lose units): the Fisher
    pass, the search under the budget (`targets`: one fraction, or one per geometry) and the
    rearrangement. Returns (block -> unit keep-mask, per block the per-window gradients)."""
    if ids is None:
        raise ValueError("retrain-free pruning needs calibration data for its Fisher pass")
    grads = fisher_gradients(model, geometries, ids, batch_size)
    diag = [g.pow(2).sum(0) for g in grads]
    keeps = search_masks(diag, targets, allocation)
    chosen = {}
    for g, keep, block_grads in zip(geometries, keeps, grads):
        if rearrange:
            before = predicted_loss(keep, block_grads)
            keep = rearrange_mask(keep, block_grads)
            log.debug("block %d: rearrangement %.4g -> %.4g", g.block, before,
                      predicted_loss(keep, block_grads))
        chosen[g.block] = keep
    return chosen, grads
