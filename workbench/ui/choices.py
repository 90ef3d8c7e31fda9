"""What both user interfaces offer: the option lists, built from the core's own tables, and how the
other settings answer a pattern choice.

The Gradio app and the notebook panel read every list from here, so a method, task or format
added to the core shows up in both at once. Nothing here imports a UI library.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.patterns import STRUCTURED_KINDS, PatternError, parse_pattern

DEFAULT_METHOD = "sparsegpt"
STRUCTURED_METHOD = "retrain-free"  # the structured method a channel/head pattern switches to
NM_PATTERNS = ("2:4", "4:8")
PATTERNS = ("unstructured", *NM_PATTERNS, *STRUCTURED_KINDS)
MODEL_SUGGESTIONS = ("default", "HuggingFaceTB/SmolLM2-135M", "facebook/opt-125m")
EVAL_HINT = "search, or type lm-eval:NAME for any installed lm-eval task"


def methods() -> list[str]:
    """Every method a single pruning accepts (`workbench.methods.METHODS`)."""
    from workbench.methods import METHODS

    return list(METHODS)


def sweep_methods() -> list[str]:
    """The element-wise methods (`workbench.methods.elementwise_methods`), the ones a sweep runs."""
    from workbench.methods import elementwise_methods

    return elementwise_methods()


def structured_methods() -> list[str]:
    """The methods that can remove whole channels and heads."""
    from workbench.methods import structured_methods

    return structured_methods()


def scopes() -> list[str]:
    from workbench.prune import SCOPES

    return list(SCOPES)


def calibration_sources() -> list[str]:
    from workbench.data import CALIBRATION_SOURCES

    return list(CALIBRATION_SOURCES)


def eval_tasks() -> list[str]:
    """The built-in tasks, then each preset followed by its members (lm-eval:NAME; any other
    installed lm-eval task can be typed)."""
    from workbench.evaluate import task_names

    return task_names()


def eval_presets() -> list[str]:
    from workbench.evaluate import PRESETS

    return list(PRESETS)


def allocations() -> list[str]:
    from workbench.sweep import ALLOCATIONS

    return list(ALLOCATIONS)


def sweep_modes() -> list[str]:
    from workbench.sweep import MODES

    return list(MODES)


def sweep_backends() -> list[str]:
    from workbench.sweep import BACKENDS

    return list(BACKENDS)


def dtypes() -> list[str]:
    """The short dtype names (fp32 first), not their long aliases."""
    from workbench.models import DTYPES

    return list(dict.fromkeys(name for name in DTYPES if len(name) == 4))


def export_formats() -> list[str]:
    from workbench.export import FORMATS

    return list(FORMATS)


@dataclass(frozen=True)
class PatternReaction:
    """What the other settings do when a pattern is picked; None leaves a setting as it is."""

    method: str | None
    scope: str | None
    fixed_sparsity: float | None  # N:M fixes the sparsity: the box shows it and is locked

    @property
    def sparsity_label(self) -> str:
        return "target sparsity (fixed by N:M)" if self.fixed_sparsity is not None else "target sparsity"


def pattern_reaction(pattern: str, method: str, available: list[str] | None = None,
                     structured: list[str] | None = None) -> PatternReaction | None:
    """N:M fixes the sparsity; channel/head set their scope and switch a method that cannot remove
    whole units to the structured one; leaving channel/head from a method without an element-wise
    form switches back to the default method over all layers. `available` / `structured` default
    to the core's method table. None for a pattern that does not parse (the run says why)."""
    try:
        parsed = parse_pattern(pattern)
    except PatternError:
        return None
    from workbench.structured import KIND_SCOPE

    available = methods() if available is None else available
    structured = structured_methods() if structured is None else structured
    if parsed.structured:
        switch = STRUCTURED_METHOD if STRUCTURED_METHOD in available and method not in structured else None
        return PatternReaction(method=switch, scope=KIND_SCOPE[parsed.kind], fixed_sparsity=None)
    if method in structured and method not in sweep_methods():  # no element-wise form
        return PatternReaction(method=DEFAULT_METHOD, scope="all", fixed_sparsity=parsed.fixed_sparsity)
    return PatternReaction(method=None, scope=None, fixed_sparsity=parsed.fixed_sparsity)
