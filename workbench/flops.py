"""FLOPs accounting: forward FLOPs per token of a model and of one channel or head, and the unit
fraction that meets a FLOPs budget.

Forward FLOPs per token count 2 per multiply-add of the matmuls: the linears (biases, norms,
activations and embedding lookups are left out) and causal attention, where a token at position
t attends to t tokens, so over a seqlen-token window the mean context is (seqlen + 1) / 2.
"""

from __future__ import annotations

import math

from workbench.arch import BlockInfo, ModelLayout, in_out_features
from workbench.structured import UNIT_NOUNS, BlockGeometry, StructureError


def lm_head_params(model) -> int:
    """Weights of the LM head (tied to the embeddings or not); 0 if the model reports none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.numel()) if weight is not None else 0


def attention_flops_per_token(head_dim: int, seqlen: int) -> int:
    """Scores q.k plus the weighted sum of values for one query head, per token, averaged over a
    causal `seqlen` window: 2 x 2 x head_dim x (seqlen + 1) / 2."""
    return 2 * head_dim * (seqlen + 1)


def block_flops_per_token(block: BlockInfo, layout: ModelLayout, seqlen: int) -> int:
    """FLOPs per token of one decoder block: its linears (2 x in x out each) and the causal
    attention of every query head (`attention_flops_per_token`)."""
    linears = sum(2 * math.prod(in_out_features(lin.module)) for lin in block.select("all"))
    return linears + layout.num_heads * attention_flops_per_token(layout.head_dim, seqlen)


def forward_flops_per_token(layout: ModelLayout, seqlen: int, *, lm_head_params: int) -> int:
    """FLOPs per token of a forward pass over a `seqlen`-token sequence of the dense model.

    Every decoder block (`block_flops_per_token`) and the LM head (2 x `lm_head_params`: pass
    `lm_head_params(model)`, the layout does not hold it). Other linears outside the blocks (e.g.
    OPT's project_in/out) are not counted. Eager attention computes the full seqlen x seqlen score
    matrix and masks half of it; this counts only the causal half that a causal kernel computes.
    """
    blocks = sum(block_flops_per_token(block, layout, seqlen) for block in layout.blocks)
    return blocks + 2 * int(lm_head_params)


def unit_flops_per_token(geometry: BlockGeometry, seqlen: int) -> int:
    """FLOPs per token that one unit of `geometry` costs (what removing it saves).

    Per part, 2 x the linear's size along the other axis x the rows/columns the unit owns; a head
    or KV-group unit adds the attention of its `heads_per_unit` query heads. Every unit of a block
    owns the same number of rows and columns, so unit 0 speaks for all of them.
    """
    flops = 0
    for part in geometry.parts:
        in_features, out_features = in_out_features(part.linear.module)
        other = in_features if part.axis == 0 else out_features
        flops += 2 * other * int((part.owner == 0).sum())
    if geometry.kind == "head":
        head_dim = int((geometry.output.owner == 0).sum()) // geometry.heads_per_unit
        flops += geometry.heads_per_unit * attention_flops_per_token(head_dim, seqlen)
    return flops


def _uniform_removed_flops(units: list[int], costs: list[int], sparsity: float) -> int:
    """FLOPs per token removed when every block drops floor(sparsity x units), as the driver does."""
    return sum(int(n * sparsity + 1e-9) * c for n, c in zip(units, costs))


def flops_budget_to_sparsity(geometries: list[BlockGeometry], layout: ModelLayout,
                             flops_fraction: float, seqlen: int, *, lm_head_params: int,
                             allocation: str = "global") -> float:
    """The unit fraction that removes at least `flops_fraction` of the dense model's forward
    FLOPs per token (`forward_flops_per_token` at `seqlen`), pruning only these `geometries`
    (the blocks that may lose units; all of one kind).

    "global" (units chosen across blocks): removes ceil(fraction x total FLOPs / unit cost) units
    and returns that count over all units of `geometries`, which the global search removes
    exactly. Units cost the same in every block of the supported models; if blocks differed, the
    unit-count-weighted mean cost is used, and the FLOPs actually removed would depend on which
    blocks the search picks. "uniform" (floor(fraction x units) per block): the smallest fraction
    whose per-block counts remove enough, so the FLOPs may overshoot by up to one unit per block.
    Raises StructureError when the pattern cannot reach the fraction even keeping only one unit
    per block.
    """
    if not 0.0 <= flops_fraction < 1.0:
        raise StructureError(f"FLOPs fraction {flops_fraction!r} is outside [0, 1): give the "
                             "fraction of forward FLOPs per token to remove, e.g. 0.2")
    if not geometries:
        raise StructureError("no block is left to prune (exclude matches a linear in every "
                             "block), so no FLOPs budget can be met; narrow exclude")
    if allocation not in ("global", "uniform"):
        raise ValueError(f"unknown allocation {allocation!r}: use 'global' or 'uniform'")
    total = forward_flops_per_token(layout, seqlen, lm_head_params=lm_head_params)
    target = flops_fraction * total
    units = [g.num_units for g in geometries]
    costs = [unit_flops_per_token(g, seqlen) for g in geometries]
    most = sum((n - 1) * c for n, c in zip(units, costs))  # every block keeps one unit
    if target > most * (1 + 1e-12):
        noun = UNIT_NOUNS.get(geometries[0].unit, geometries[0].unit)
        raise StructureError(
            f"a FLOPs budget of {flops_fraction:.2%} cannot be met by removing {noun} alone: they "
            f"can remove at most {most / total:.2%} of the forward FLOPs per token at seqlen "
            f"{seqlen} (keeping one per block in {len(geometries)} blocks). Lower the fraction "
            "to at most that, or give the budget as a unit fraction (budget 'units')"
        )
    if allocation == "global":
        all_units = sum(units)
        mean_cost = sum(n * c for n, c in zip(units, costs)) / all_units
        remove = min(math.ceil(target / mean_cost - 1e-9), all_units - len(geometries))
        return remove / all_units
    candidates = sorted({k / n for n in set(units) for k in range(n)})
    for sparsity in candidates:
        if _uniform_removed_flops(units, costs, sparsity) >= target * (1 - 1e-12):
            return sparsity
    return candidates[-1]  # unreachable: `most` is the last candidate's FLOPs
