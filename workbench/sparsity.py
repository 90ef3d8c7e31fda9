"""Sparsity counted from the weights themselves: per linear, per block, per kind, and totals.

Totals follow the seed's tables: "over MLP block" is zeros / elements over the MLP linears of all
blocks; "element-wise over matmul" is zeros / elements over every matmul weight in the model
(block linears and the LM head; a tied LM head counts once). Structurally removed channels or
heads count as zeros when `reference_shapes` gives the dense shapes (slimmed models).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from workbench.arch import ModelLayout, describe, is_linear, weight_of

TABLE_COLUMNS = ["block", "name", "kind", "role", "group", "rows", "cols", "numel", "zeros",
                 "sparsity"]


def count_zeros(tensor: torch.Tensor) -> int:
    return tensor.numel() - int(torch.count_nonzero(tensor))


def _zeros_and_numel(weight: torch.Tensor, reference_shape: tuple[int, int] | None) -> tuple[int, int]:
    zeros = count_zeros(weight)
    numel = weight.numel()
    if reference_shape is not None:
        dense_numel = int(reference_shape[0]) * int(reference_shape[1])
        zeros += dense_numel - numel  # removed rows/columns are zeros that take no memory
        numel = dense_numel
    return zeros, numel


def layer_sparsity(weight: torch.Tensor, reference_shape: tuple[int, int] | None = None) -> float:
    """Zeros / elements of one weight (a keep mask counts its pruned entries); removed rows or
    columns count as zeros when `reference_shape` gives the dense shape."""
    zeros, numel = _zeros_and_numel(weight, reference_shape)
    return zeros / numel if numel else 0.0


def sparsity_table(model: nn.Module, layout: ModelLayout | None = None,
                   reference_shapes: dict[str, tuple[int, int]] | None = None) -> pd.DataFrame:
    """One row per prunable linear in the decoder blocks."""
    layout = layout or describe(model)
    reference_shapes = reference_shapes or {}
    rows = []
    for block in layout.blocks:
        for lin in block.linears:
            weight = weight_of(lin.module)
            ref = reference_shapes.get(lin.full_name)
            zeros, numel = _zeros_and_numel(weight, ref)
            out_f, in_f = ref if ref is not None else weight.shape
            rows.append({
                "block": block.index, "name": lin.full_name, "kind": lin.kind, "role": lin.role,
                "group": lin.group, "rows": int(out_f), "cols": int(in_f), "numel": numel,
                "zeros": zeros, "sparsity": zeros / numel if numel else 0.0,
            })
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def by_block_and_kind(table: pd.DataFrame) -> pd.DataFrame:
    """Blocks x module kinds, each cell the counted sparsity (the heatmap's numbers)."""
    grouped = table.groupby(["block", "kind"], sort=False)[["zeros", "numel"]].sum()
    matrix = (grouped["zeros"] / grouped["numel"]).unstack("kind")
    kinds = list(dict.fromkeys(table["kind"]))
    return matrix[kinds].sort_index()


def _ratio(frame: pd.DataFrame) -> float:
    numel = int(frame["numel"].sum())
    return int(frame["zeros"].sum()) / numel if numel else 0.0


def sparsity_summary(model: nn.Module, layout: ModelLayout | None = None,
                     table: pd.DataFrame | None = None,
                     reference_shapes: dict[str, tuple[int, int]] | None = None) -> dict:
    layout = layout or describe(model)
    reference_shapes = reference_shapes or {}
    if table is None:
        table = sparsity_table(model, layout, reference_shapes)

    # Every matmul weight outside the block linears (the LM head, extra projections), once each.
    seen = {weight_of(lin.module).data_ptr() for b in layout.blocks for lin in b.linears}
    block_ptrs = set(seen)
    extra_zeros = extra_numel = 0
    for name, module in model.named_modules():
        if is_linear(module) and weight_of(module).data_ptr() not in seen:
            seen.add(weight_of(module).data_ptr())
            zeros, numel = _zeros_and_numel(weight_of(module), reference_shapes.get(name))
            extra_zeros += zeros
            extra_numel += numel
    block_zeros, block_numel = int(table["zeros"].sum()), int(table["numel"].sum())
    matmul_numel = block_numel + extra_numel

    # Block linears were counted for the table already; count every other parameter once.
    param_zeros, param_numel = block_zeros, block_numel
    seen_params = set(block_ptrs)
    for param in model.parameters():
        if param.data_ptr() in seen_params:
            continue
        seen_params.add(param.data_ptr())
        param_zeros += count_zeros(param.data)
        param_numel += param.numel()
    # Removed elements of block linears are in the table's counts already; add the others'.
    block_names = {lin.full_name for b in layout.blocks for lin in b.linears}
    outside = {n: r for n, r in reference_shapes.items() if n not in block_names}
    removed = int(sum(r[0] * r[1] for r in outside.values())) - int(sum(
        weight_of(m).numel() for n, m in model.named_modules() if n in outside))
    param_zeros += removed
    param_numel += removed

    by_kind = table.groupby("kind", sort=False).apply(_ratio, include_groups=False)
    return {
        "mlp": _ratio(table[table["group"] == "mlp"]),
        "attention": _ratio(table[table["group"] == "attention"]),
        "blocks": _ratio(table),
        "matmul": (block_zeros + extra_zeros) / matmul_numel if matmul_numel else 0.0,
        "parameters": param_zeros / param_numel if param_numel else 0.0,
        "by_kind": {str(k): float(v) for k, v in by_kind.items()},
        "linear_zeros": block_zeros + extra_zeros,
        "linear_numel": matmul_numel,
    }
