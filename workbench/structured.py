"""Channel and head geometry: which rows and columns of which linears one MLP channel or one
attention head owns, for every supported family, and applying a keep-mask over them by zeroing.

A *unit* is what structured pruning keeps or removes whole:
- `channel`: one MLP intermediate neuron: its row in up/gate (and bias entry), its column in down.
- `head`: one attention head: its rows in q, k, v (fused qkv included) and its columns in o.
  With grouped-query attention the unit is a KV group (its query heads plus the shared key/value
  head), so a slimmed layer keeps the stock `num_key_value_groups` and needs no new attention code.

Every part of a unit is described by an `owner` vector: for each row (or column) of a linear, the
unit index it belongs to. A unit keep-mask then maps to row/column keep-masks by indexing, and a
per-row or per-column score sums to a unit score (`unit_sum`: each method's unit scorer lives in
its own file under `workbench.methods`). `Structure` records what a prune kept, for slimming.
FLOPs per unit and FLOPs budgets are in `workbench.flops`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench.arch import BlockInfo, LinearInfo, ModelLayout, in_out_features, weight_of
from workbench.patterns import PatternError

# Fused qkv layouts by family: "concat" = [q heads | k heads | v heads] (GPT-2 c_attn, MPT
# Wqkv); "interleaved" = per head [q | k | v] (GPT-NeoX, BLOOM query_key_value).
FUSED_QKV_LAYOUT = {"gpt2": "concat", "mpt": "concat", "gpt_neox": "interleaved",
                    "bloom": "interleaved"}
KIND_SCOPE = {"channel": "mlp", "head": "attention"}
UNIT_NOUNS = {"channel": "MLP channels", "head": "attention heads", "kv_group": "attention KV groups"}


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


def unit_sum(values: torch.Tensor, owner: torch.Tensor, num_units: int) -> torch.Tensor:
    """Per unit, the sum of `values` over the rows/columns it owns (fp32, on CPU): how a method's
    per-row or per-column score is lifted to channels and heads."""
    return torch.zeros(num_units, dtype=torch.float32).index_add_(0, owner, values.float().cpu())


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
