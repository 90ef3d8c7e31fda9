"""How much to prune each block: sensitivity measures and OWL's non-uniform allocation.

OWL (Yin et al., 2023, "Outlier Weighed Layerwise sparsity") observes that blocks holding many
activation outliers suffer most from pruning. Its outlier ratio of a block is the fraction of
Wanda scores |W_ij| * ||x_j|| above M times their mean over the block (M = 5 in the paper). Blocks
get densities spread linearly over [1 - target - lam, 1 - target + lam] by outlier ratio, shifted
so the overall budget stays the target: more outliers, less sparsity.

    sparsities = owl_block_sparsity(model, tokenizer, target=0.6)
    prune(model, PruneConfig(method="wanda", sparsity=0.6, block_sparsity=sparsities), ...)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from workbench import snapshot
from workbench.arch import describe, weight_of
from workbench.methods import METHODS, elementwise_methods, method_record
from workbench.methods.wanda import wanda_scores
from workbench.patterns import check_sparsity, parse_pattern
from workbench.prune import CalibrationCache, PruneConfig, collect_dense_stats

log = logging.getLogger(__name__)


def _scoped(model: nn.Module, scope: str):
    layout = describe(model)
    return layout, [block.select(scope) for block in layout.blocks]


def outlier_ratios(model: nn.Module, cache: CalibrationCache, m: float = 5.0,
                   scope: str = "all") -> list[float]:
    """Per block: the fraction of Wanda scores |W| * ||x|| over the block's linears that exceed
    `m` times the block's mean score. `cache` holds dense statistics (`collect_dense_stats`)."""
    if cache.dense_stats is None:
        raise ValueError("the cache holds no dense statistics: fill it with collect_dense_stats")
    _, scoped = _scoped(model, scope)
    ratios = []
    for linears in scoped:
        if not linears:
            ratios.append(0.0)
            continue
        scores = torch.cat([
            wanda_scores(weight_of(lin.module).detach().float().cpu(), cache.dense_stats[lin.full_name]).flatten()
            for lin in linears])
        ratios.append(float((scores > m * scores.mean()).float().mean()))
    return ratios


def _shift_to_budget(sparsities: torch.Tensor, weights: torch.Tensor, target: float,
                     ceiling: float) -> torch.Tensor:
    """Add one offset to every block so the weighted mean, after clipping to [0, ceiling], is the
    target (bisection: clipping makes it non-linear)."""
    def mean_at(offset: float) -> float:
        return float(((sparsities + offset).clamp(0.0, ceiling) * weights).sum() / weights.sum())

    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean_at(mid) < target:
            lo = mid
        else:
            hi = mid
    return (sparsities + (lo + hi) / 2).clamp(0.0, ceiling)


def owl_allocation(ratios: Sequence[float], target: float, lam: float = 0.08,
                   weights: Sequence[float] | None = None, ceiling: float = 0.99) -> list[float]:
    """Per-block sparsities from outlier ratios: spread over target +- lam (more outliers, lower
    sparsity), with the mean weighted by `weights` (parameters per block) equal to `target`."""
    check_sparsity(target)
    if not 0 <= lam < 1:
        raise ValueError(f"lam must be in [0, 1), got {lam}")
    ratio = torch.tensor(list(ratios), dtype=torch.float64)
    if ratio.numel() == 0:
        raise ValueError("no blocks to allocate")
    weight = torch.ones_like(ratio) if weights is None else torch.tensor(list(weights),
                                                                           dtype=torch.float64)
    if weight.shape != ratio.shape or (weight < 0).any() or weight.sum() <= 0:
        raise ValueError("weights must be one non-negative number per block, not all zero")
    span = ratio.max() - ratio.min()
    if span <= 0:
        return [float(target)] * ratio.numel()
    sparsity = target - ((ratio - ratio.min()) / span * 2 * lam - lam)
    return [float(s) for s in _shift_to_budget(sparsity, weight, target, ceiling)]


def block_weights(model: nn.Module, scope: str = "all") -> list[int]:
    """Prunable parameters per block in `scope` (the budget's weights)."""
    _, scoped = _scoped(model, scope)
    return [sum(weight_of(lin.module).numel() for lin in linears) for linears in scoped]


def owl_block_sparsity(model: nn.Module, tokenizer_or_calib, target: float, lam: float = 0.08,
                       m: float = 5.0, scope: str = "all", calibration: str = "wikitext2",
                       nsamples: int = 32, seqlen: int = 256, seed: int = 0, batch_size: int = 8,
                       cache: CalibrationCache | None = None) -> list[float]:
    """OWL's per-block sparsities for `target`, ready for `PruneConfig(block_sparsity=...)`.

    `tokenizer_or_calib` is a tokenizer (calibration text is loaded as `calibration` says), token
    ids (nsamples, seqlen) or a `CalibrationData`. Pass a `cache` holding dense statistics to
    skip the calibration pass (the sweep does).
    """
    if cache is None or cache.dense_stats is None:
        config = PruneConfig(method="wanda", scope=scope, calibration=calibration,
                             nsamples=nsamples, seqlen=seqlen, seed=seed, batch_size=batch_size)
        is_data = isinstance(tokenizer_or_calib, torch.Tensor) or hasattr(tokenizer_or_calib, "ids")
        cache = collect_dense_stats(model, config,
                                    calibration=tokenizer_or_calib if is_data else None,
                                    tokenizer=None if is_data else tokenizer_or_calib,
                                    cache=cache, gram=False)
    ratios = outlier_ratios(model, cache, m=m, scope=scope)
    allocation = owl_allocation(ratios, target, lam, block_weights(model, scope))
    log.info("OWL at %.2f: outlier ratios %s -> sparsities %s", target,
             [round(r, 4) for r in ratios], [round(s, 3) for s in allocation])
    return allocation


@torch.no_grad()
def _loss(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size].to(device)
        total += float(model(input_ids=batch, labels=batch, use_cache=False).loss) * batch.shape[0]
        count += batch.shape[0]
    return total / count


@torch.no_grad()
def block_sensitivity(model: nn.Module, ids: torch.Tensor, target: float, method: str = "wanda",
                      pattern: str = "unstructured", scope: str = "all",
                      cache: CalibrationCache | None = None, batch_size: int = 8,
                      m: float = 5.0) -> pd.DataFrame:
    """Per block: calibration loss when that block alone is pruned to `target` (others dense),
    its increase over the dense loss, and the OWL outlier ratio. One forward over `ids` per block.

    Statistics come from the dense network (`cache`, collected if absent), so every block is
    judged under the same conditions. The model's weights are restored after each block.
    """
    if method not in elementwise_methods():
        what = f"{method} removes whole channels or heads" if method in METHODS else f"unknown method {method!r}"
        raise ValueError(f"{what}: block sensitivity prunes single weights, choose one of "
                         f"{sorted(elementwise_methods())}")
    record = method_record(method)
    parsed = parse_pattern(pattern)
    check_sparsity(target)
    ids = ids.ids if hasattr(ids, "ids") else ids
    gram = record.stats == "gram"
    if cache is None or cache.dense_stats is None or (gram and not cache.gram):
        config = PruneConfig(method=method, scope=scope, batch_size=batch_size)
        cache = collect_dense_stats(model, config, calibration=ids, gram=gram)
    layout, scoped = _scoped(model, scope)
    ratios = outlier_ratios(model, cache, m=m, scope=scope)
    was_training = model.training
    model.eval()
    dense_loss = _loss(model, ids, batch_size)
    rows = []
    try:
        for block, linears in zip(layout.blocks, scoped):
            saved = snapshot.take(model, [f"{lin.full_name}.weight" for lin in linears])
            try:
                for lin in linears:
                    weight = weight_of(lin.module)
                    new_weight, keep = record.prune(weight.float().clone(),
                                                    cache.dense_stats.get(lin.full_name), parsed, target)
                    weight.copy_((new_weight * keep).to(weight.dtype))
                loss = _loss(model, ids, batch_size)
            finally:
                snapshot.put_back(model, saved)
            rows.append({"block": block.index, "loss": loss, "loss_increase": loss - dense_loss,
                         "outlier_ratio": ratios[block.index]})
            log.info("block %d alone at %.2f: loss %.4f (+%.4f)", block.index, target, loss,
                     loss - dense_loss)
    finally:
        model.train(was_training)
    return pd.DataFrame(rows, columns=["block", "loss", "loss_increase", "outlier_ratio"])
