"""Copy a model's decoder-block weights out, and put them back in place.

    dense = take(model)        # CPU copies of every decoder-block parameter, by parameter name
    prune(model, config)       # ... anything that changes weights in place
    put_back(model, dense)     # the same tensors hold the dense values again; nothing reallocated

The one home for weight snapshots: a session's dense weights, a sweep's starting point, swapping
the dense weights in to generate, a sensitivity scan undoing one block. Copies live on the CPU so
a model on an accelerator does not pay for them in device memory. Putting back checks every name
and shape first: a model that was slimmed (or replaced) since the copy was taken is reported with
`SnapshotMismatchError` and left untouched, never half-restored.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from workbench.arch import describe
from workbench.errors import WorkbenchError

Weights = dict[str, torch.Tensor]  # parameter name -> a CPU copy of its values


class SnapshotMismatchError(WorkbenchError):
    """The model's parameters no longer have the names or shapes of the copy being put back."""


def block_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter inside the decoder blocks, by its name in the model."""
    prefix = describe(model).blocks_name + "."
    return {name: p for name, p in model.named_parameters() if name.startswith(prefix)}


def take(model: nn.Module, names: Iterable[str] | None = None) -> Weights:
    """CPU copies of the decoder-block parameters, or of the parameters called `names`."""
    if names is None:
        chosen = block_parameters(model)
    else:
        params = dict(model.named_parameters())
        missing = [name for name in names if name not in params]
        if missing:
            raise KeyError(f"the model has no parameter {missing[0]!r} ({len(missing)} names missing)")
        chosen = {name: params[name] for name in names}
    return {name: p.detach().to("cpu", copy=True) for name, p in chosen.items()}


def mismatches(model: nn.Module, weights: Weights) -> list[str]:
    """One line per tensor of `weights` the model lacks or holds in another shape (empty: it fits)."""
    params = dict(model.named_parameters())
    lines = []
    for name, saved in weights.items():
        if name not in params:
            lines.append(f"{name}: not in the model")
        elif params[name].shape != saved.shape:
            lines.append(f"{name}: saved {tuple(saved.shape)}, now {tuple(params[name].shape)}")
    return lines


@torch.no_grad()
def put_back(model: nn.Module, weights: Weights) -> None:
    """Copy `weights` into the model's own parameters in place (same tensors, device and dtype)."""
    wrong = mismatches(model, weights)
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise SnapshotMismatchError(
            f"the saved weights no longer fit the model ({len(wrong)} of {len(weights)} tensors: {shown}). "
            "It was slimmed or replaced after the copy was taken: reload the model to get its weights back.")
    params = dict(model.named_parameters())
    for name, saved in weights.items():
        params[name].copy_(saved)


def nbytes(weights: Weights) -> int:
    """Bytes the copies hold."""
    return sum(t.numel() * t.element_size() for t in weights.values())
