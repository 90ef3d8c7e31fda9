"""Channel and head geometry: which rows and columns of which linears one MLP channel or one
attention head owns, for every supported family, and applying a keep-mask over them by zeroing.

A *unit* is what structured pruning keeps or removes whole:
- `channel`: one MLP intermediate neuron: its row in up/gate (and bias entry), its column in down.
- `head`: one attention head: its rows in q, k, v (fused qkv included) and its columns in o.
  With grouped-query attention the unit is a KV group (its query heads plus the shared key/value
  head), so a slimmed layer keeps the stock `num_key_value_groups` and needs no new attention code.

Every part of a unit is described by an `owner` vector: for each row (or column) of a linear, the
unit index it belongs to. A unit keep-mask then maps to row/column keep-masks by indexing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from workbench.arch import BlockInfo, LinearInfo, ModelLayout, in_out_features, weight_of
from workbench.patterns import PatternError

# Fused qkv layouts by family: "concat" = [q heads | k heads | v heads] (GPT-2 c_attn, MPT
# Wqkv); "interleaved" = per head [q | k | v] (GPT-NeoX, BLOOM query_key_value).
FUSED_QKV_LAYOUT = {"gpt2": "concat", "mpt": "concat", "gpt_neox": "interleaved",
                    "bloom": "interleaved"}
KIND_SCOPE = {"channel": "mlp", "head": "attention"}


class StructureError(PatternError):
    """A channel/head request that this model or budget cannot satisfy; the message says why."""


@dataclass
class Part:
    linear: LinearInfo
    axis: int  # 0: output rows (and bias entries), 1: input columns of the (out, in) weight
    owner: torch.Tensor = field(repr=False)  # long, one unit index per row/column

    def keep_along_axis(self, unit_keep: torch.Tensor) -> torch.Tensor:
        return unit_keep.to(torch.bool)[self.owner]


@dataclass
class BlockGeometry:
    block: int
    kind: str  # "channel" or "head"
    unit: str  # "channel", "head" or "kv_group"
    num_units: int
    heads_per_unit: int  # query heads per unit (1 for channels and plain multi-head attention)
    parts: list[Part]
    output: Part  # the part on down / o: its input carries the units (masks and tuning act here)

    def linears(self) -> list[LinearInfo]:
        return [part.linear for part in self.parts]


def _arange_owner(size: int, width: int) -> torch.Tensor:
    return torch.arange(size) // width


def channel_geometry(block: BlockInfo) -> BlockGeometry:
    mlp = block.select("mlp")
    inputs = [lin for lin in mlp if lin.role in ("up", "gate")]
    downs = [lin for lin in mlp if lin.role == "down"]
    if not inputs or len(downs) != 1:
        raise StructureError(
            f"{block.name}: channel pruning needs up/gate linears and one down linear in the MLP; "
            f"found {[lin.kind for lin in mlp]}"
        )
    width = in_out_features(downs[0].module)[0]
    for lin in inputs:
        if in_out_features(lin.module)[1] != width:
            raise StructureError(
                f"{lin.full_name} has {in_out_features(lin.module)[1]} outputs but "
                f"{downs[0].full_name} has {width} inputs; cannot pair MLP channels"
            )
    owner = torch.arange(width)
    parts = [Part(lin, 0, owner) for lin in inputs]
    output = Part(downs[0], 1, owner)
    return BlockGeometry(block.index, "channel", "channel", width, 1, parts + [output], output)


def head_geometry(block: BlockInfo, layout: ModelLayout) -> BlockGeometry:
    heads, kv_heads, head_dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
    family = layout.family
    if family == "falcon":
        raise StructureError(
            "head pruning is not supported for Falcon (its fused query_key_value layout depends on "
            "multi_query/new_decoder_architecture); prune MLP channels with pattern 'channel'"
        )
    if kv_heads < 2:
        raise StructureError(
            f"{block.name}: all {heads} query heads share {kv_heads} key/value head, so no head "
            "can be removed without removing the whole attention; use pattern 'channel'"
        )
    group = heads // kv_heads  # query heads per KV group, repeat_kv's n_rep
    unit, num_units = ("head", heads) if group == 1 else ("kv_group", kv_heads)
    q_owner = _arange_owner(heads * head_dim, head_dim) // group
    kv_owner = _arange_owner(kv_heads * head_dim, head_dim)
    parts = []
    for lin in block.select("attention"):
        rows = in_out_features(lin.module)[1]
        if lin.role == "q":
            owner = q_owner
        elif lin.role in ("k", "v"):
            owner = kv_owner
        elif lin.role == "o":
            owner = q_owner
        elif lin.role == "qkv":
            layout_kind = FUSED_QKV_LAYOUT.get(family)
            if layout_kind is None or group != 1:
                raise StructureError(
                    f"{lin.full_name}: the head layout of this fused qkv projection is unknown; "
                    "head pruning supports separate q/k/v projections and the GPT-2, MPT, "
                    "GPT-NeoX and BLOOM fused layouts"
                )
            if layout_kind == "concat":
                owner = (torch.arange(rows) % (heads * head_dim)) // head_dim
            else:
                owner = torch.arange(rows) // (3 * head_dim)
        else:
            continue
        size = in_out_features(lin.module)[0] if lin.role == "o" else rows
        if owner.numel() != size:
            side = "inputs" if lin.role == "o" else "outputs"
            raise StructureError(f"{lin.full_name}: expected {owner.numel()} {side} for {heads} "
                                 f"heads of width {head_dim}, found {size}")
        parts.append(Part(lin, 1 if lin.role == "o" else 0, owner))
    outputs = [p for p in parts if p.linear.role == "o"]
    if len(outputs) != 1 or len(parts) < 2:
        raise StructureError(f"{block.name}: could not find the attention projections of "
                             "every head")
    return BlockGeometry(block.index, "head", unit, num_units, group, parts, outputs[0])


def block_geometry(block: BlockInfo, layout: ModelLayout, kind: str) -> BlockGeometry:
    if kind == "channel":
        return channel_geometry(block)
    if kind == "head":
        return head_geometry(block, layout)
    raise StructureError(f"unknown structured pattern {kind!r}: use 'channel' or 'head'")


def model_geometry(layout: ModelLayout, kind: str) -> list[BlockGeometry]:
    return [block_geometry(block, layout, kind) for block in layout.blocks]


# --- FLOPs budgets ---------------------------------------------------------------------------
# Forward FLOPs per token count 2 per multiply-add of the matmuls: the linears (biases, norms,
# activations and embedding lookups are left out) and causal attention, where a token at position
# t attends to t tokens, so over a seqlen-token window the mean context is (seqlen + 1) / 2.

UNIT_NOUNS = {"channel": "MLP channels", "head": "attention heads", "kv_group": "attention KV groups"}


def lm_head_params(model) -> int:
    """Weights of the LM head (tied to the embeddings or not); 0 if the model reports none."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.numel()) if weight is not None else 0


def attention_flops_per_token(head_dim: int, seqlen: int) -> int:
    """Scores q.k plus the weighted sum of values for one query head, per token, averaged over a
    causal `seqlen` window: 2 x 2 x head_dim x (seqlen + 1) / 2."""
    return 2 * head_dim * (seqlen + 1)


def forward_flops_per_token(layout: ModelLayout, seqlen: int, *, lm_head_params: int) -> int:
    """FLOPs per token of a forward pass over a `seqlen`-token sequence of the dense model.

    Every decoder-block linear (2 x in x out), every block's causal attention for each query head
    (`attention_flops_per_token`), and the LM head (2 x `lm_head_params`: pass
    `lm_head_params(model)`, the layout does not hold it). Other linears outside the blocks (e.g.
    OPT's project_in/out) are not counted. Eager attention computes the full seqlen x seqlen score
    matrix and masks half of it; this counts only the causal half that a causal kernel computes.
    """
    linears = sum(2 * math.prod(in_out_features(lin.module))
                  for block in layout.blocks for lin in block.select("all"))
    attention = layout.num_blocks * layout.num_heads * attention_flops_per_token(layout.head_dim,
                                                                                 seqlen)
    return linears + attention + 2 * int(lm_head_params)


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


# --- keep-masks ---------------------------------------------------------------------------


def units_to_remove(num_units: int, sparsity: float, where: str = "") -> int:
    """floor(sparsity * units), refusing budgets that would empty a block."""
    count = int(num_units * sparsity + 1e-9)
    if count >= num_units:
        raise StructureError(
            f"sparsity {sparsity:g} removes all {num_units} units{where}; at least one must stay. "
            "Lower the sparsity"
        )
    return count


def keep_lowest_removed(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Unit keep-mask dropping the `remove` lowest scores (ties broken by index)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if remove:
        order = torch.argsort(scores.float().cpu(), stable=True)
        keep[order[:remove]] = False
    return keep


def linear_masks(geometry: BlockGeometry, unit_keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Element keep-masks (out, in) for every linear the units touch."""
    masks: dict[str, torch.Tensor] = {}
    for part in geometry.parts:
        out_f_in_f = weight_of(part.linear.module).shape
        along = part.keep_along_axis(unit_keep)
        mask = (along[:, None] if part.axis == 0 else along[None, :]).expand(out_f_in_f)
        name = part.linear.full_name
        masks[name] = masks[name] & mask if name in masks else mask.clone()
    return masks


@torch.no_grad()
def apply_unit_mask(geometry: BlockGeometry, unit_keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero the rows/columns (and the row biases) of removed units in place; return the masks."""
    for part in geometry.parts:
        along = part.keep_along_axis(unit_keep).to(weight_of(part.linear.module).device)
        weight = weight_of(part.linear.module)
        if part.axis == 0:
            weight[~along, :] = 0
            bias = getattr(part.linear.module, "bias", None)
            if bias is not None:
                bias.data[~along] = 0
        else:
            weight[:, ~along] = 0
    return linear_masks(geometry, unit_keep)


# --- cheap unit scores (baselines) ---------------------------------------------------------


def _group_sum(values: torch.Tensor, owner: torch.Tensor, num_units: int) -> torch.Tensor:
    return torch.zeros(num_units, dtype=torch.float32).index_add_(0, owner, values.float().cpu())


def magnitude_unit_scores(geometry: BlockGeometry) -> torch.Tensor:
    """||output columns of the unit|| x ||input rows of the unit|| (mean over up/gate or q/k/v)."""
    out_part = geometry.output
    out_sq = weight_of(out_part.linear.module).float().pow(2).sum(0)
    score = _group_sum(out_sq, out_part.owner, geometry.num_units).sqrt()
    in_parts = [p for p in geometry.parts if p.axis == 0]
    in_norm = torch.zeros(geometry.num_units)
    for part in in_parts:
        rows_sq = weight_of(part.linear.module).float().pow(2).sum(1)
        in_norm += _group_sum(rows_sq, part.owner, geometry.num_units).sqrt()
    return score * in_norm / max(len(in_parts), 1)


def wanda_unit_scores(geometry: BlockGeometry, output_input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda's |w| x ||x|| lifted to units: ||W_out[:, unit] * ||x_unit||||_F on down / o input."""
    out_part = geometry.output
    col_sq = weight_of(out_part.linear.module).float().pow(2).sum(0).cpu()
    weighted = col_sq * output_input_sq_sum.float().cpu()
    return _group_sum(weighted, out_part.owner, geometry.num_units).sqrt()


# --- layer-wise least squares (mask tuning) ------------------------------------------------


def reconstruct_columns(weight: torch.Tensor, gram: torch.Tensor, keep_cols: torch.Tensor,
                        percdamp: float = 0.01) -> torch.Tensor:
    """Refit the kept input columns of `weight` (out, in) so W' X matches W X on calibration data.

    min ||W X - W'_K X_K||^2 + lam ||W'_K - W_K||^2 with G = X^T X gives
    W'_K = (W G[:, K] + lam W_K) (G[K, K] + lam I)^-1; the removed columns stay zero. The ridge
    pulls toward the original weights, not toward zero, so directions the calibration tokens do
    not cover keep their dense values: with few tokens (rank(G) < |K|) a plain least-squares refit
    would invent weights there. lam is `percdamp` x the mean kept diagonal (as SparseGPT).
    """
    # float64: Gram matrices of real activations are badly conditioned, and fp32 normal
    # equations lose digits that the refit is meant to recover
    out_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    weight = weight.double()
    gram = gram.double().to(weight.device)
    kept = torch.nonzero(keep_cols.to(weight.device), as_tuple=False).flatten()
    g_kk = gram[kept][:, kept]
    damp = percdamp * torch.mean(torch.diag(g_kk)).clamp_min(1e-8)
    g_kk = g_kk + damp * torch.eye(kept.numel(), device=weight.device)
    rhs = weight @ gram[:, kept] + damp * weight[:, kept]  # (out, |K|)
    chol = torch.linalg.cholesky(g_kk)
    solved = torch.cholesky_solve(rhs.t(), chol).t()
    new_weight = torch.zeros_like(weight)
    new_weight[:, kept] = solved
    return new_weight.to(out_dtype)
