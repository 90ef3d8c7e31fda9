"""Pruning methods: one `Method` record per method in `METHODS`, which the driver, the
estimators and the interfaces ask instead of comparing names.

A method's element-wise form is a pure function over one linear layer:

    prune(weight, stats, pattern, sparsity, **options) -> (new_weight, keep_mask)

`weight` is (out_features, in_features) in fp32, `stats` the layer's calibration input statistics
collected once by the driver (`workbench.stats.InputStats`, None for data-free methods). The
function may carry `solve_joint` (layers sharing an input solved as one, `workbench.solve_groups`)
and `warm_up()` (called as a prune starts, before the calibration pass). Its
channel/head form is either a unit scorer, `unit_scores(geometry, output_stats) -> scores` over one
block's units (`workbench.structured.BlockGeometry`; `output_stats` are the statistics of the
down / o input, None when the method reads none), or a `plan` that chooses every block's units
before the driver starts (see `workbench.methods.unit_plan`).

A new element-wise method is one file here plus one entry in `METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from workbench.methods.magnitude import magnitude, magnitude_unit_scores
from workbench.methods.retrain_free import fisher_plan
from workbench.methods.sparsegpt import sparsegpt
from workbench.methods.wanda import wanda, wanda_unit_scores


@dataclass(frozen=True)
class Method:
    """What the rest of the workbench needs to know about one pruning method."""

    name: str
    # per-layer input statistics the driver collects for it: None (none), "diag" (per-input-feature
    # squared norms) or "gram" (the full X^T X matrix)
    stats: str | None = None
    prune: Callable | None = None  # element-wise form (unstructured and N:M patterns); None: none
    unit_scores: Callable | None = None  # channel/head form scored block by block; None: none
    # channel/head form that picks the units of every block before the driver starts, comparing
    # them across blocks: plan(model, geometries, ids, targets, allocation, *, batch_size,
    # rearrange) -> (block -> unit keep-mask, per-block gradients)
    plan: Callable | None = None
    # back-propagates the LM loss through the whole model (a pass of its own, before the layer-wise
    # driver): needs calibration token ids up front, the whole model in memory, one process
    needs_gradients: bool = False
    mask_tuning_default: bool = False  # channel/head: refit down / o by least squares by default
    # solves with each layer's inverse Hessian (an OBS update): the estimators count an
    # O(in^3) factorisation and an O(out x in^2) update per layer
    obs_update: bool = False

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning with it reads calibration data at all."""
        return self.stats is not None or self.needs_gradients

    @property
    def elementwise(self) -> bool:
        return self.prune is not None

    @property
    def structured(self) -> bool:
        """Whether it removes whole MLP channels or attention heads."""
        return self.unit_scores is not None or self.plan is not None

    @property
    def ranks_across_blocks(self) -> bool:
        """Whether its unit choice compares units across blocks (allocation 'global' is its default);
        block-by-block unit scores are not comparable, so those methods remove the same fraction
        in every block."""
        return self.plan is not None


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", prune=magnitude, unit_scores=magnitude_unit_scores),
    "wanda": Method("wanda", stats="diag", prune=wanda, unit_scores=wanda_unit_scores),
    "sparsegpt": Method("sparsegpt", stats="gram", prune=sparsegpt, obs_update=True),
    "retrain-free": Method("retrain-free", plan=fisher_plan, needs_gradients=True,
                           mask_tuning_default=True),
}


def method_record(name: str) -> Method:
    """The record of method `name`; a ValueError naming the known methods when there is none."""
    record = METHODS.get(name)
    if record is None:
        raise ValueError(f"unknown method {name!r}: choose one of {sorted(METHODS)}")
    return record


def elementwise_methods() -> list[str]:
    """Names of the methods with an element-wise form (what sweeps and OWL sensitivity run)."""
    return [name for name, record in METHODS.items() if record.elementwise]


def structured_methods() -> list[str]:
    """Names of the methods that prune whole channels and heads."""
    return [name for name, record in METHODS.items() if record.structured]

