"""Pruning methods. Each is a pure function over one linear layer:

    method(weight, stats, pattern, sparsity, **options) -> (new_weight, keep_mask)

`weight` is (out_features, in_features) in fp32, `stats` the layer's calibration input statistics
collected once by the driver (`workbench.stats.InputStats`, None for data-free methods).
"""

from workbench.methods.magnitude import magnitude
from workbench.methods.sparsegpt import sparsegpt
from workbench.methods.wanda import wanda

METHODS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}

# What each method needs the driver to collect: None (no data), "diag" (per-input-feature
# squared norms) or "gram" (the full X^T X matrix).
STATS_NEEDED = {"magnitude": None, "wanda": "diag", "sparsegpt": "gram"}
