"""The option lists both interfaces show come from the core's tables; the pattern reaction."""

from __future__ import annotations

import pytest

from workbench import data, evaluate, export, models, prune, sweep, workflow
from workbench.methods import METHODS
from workbench.ui import choices


def test_lists_equal_the_core_tables():
    assert choices.methods() == workflow.available_methods()
    assert set(METHODS) <= set(choices.methods())
    assert choices.sweep_methods() == [name for name, method in METHODS.items() if method.prune is not None]
    assert choices.structured_methods() == [name for name, method in METHODS.items() if method.structured]
    assert choices.scopes() == list(prune.SCOPES)
    assert choices.calibration_sources() == list(data.CALIBRATION_SOURCES)
    assert choices.allocations() == list(sweep.ALLOCATIONS)
    assert choices.sweep_modes() == list(sweep.MODES)
    assert choices.sweep_backends() == list(sweep.BACKENDS)
    assert choices.export_formats() == list(export.FORMATS)
    assert choices.dtypes() == ["fp32", "bf16", "fp16"] and set(choices.dtypes()) <= set(models.DTYPES)


def test_eval_tasks_hold_every_task_and_preset_with_its_members():
    listed = choices.eval_tasks()
    assert listed == evaluate.task_names()
    assert {name for name in evaluate.TASKS if not name.endswith(":")} <= set(listed)  # not the lm-eval: family
    for preset, members in evaluate.PRESETS.items():
        assert preset in listed and set(members) <= set(listed)
    assert len(listed) == len(set(listed))
    assert evaluate.check_tasks(listed)  # the core accepts every name offered


def test_every_listed_pattern_parses_and_its_methods_exist():
    from workbench.patterns import parse_pattern

    assert [str(parse_pattern(p)) for p in choices.PATTERNS] == list(choices.PATTERNS)
    assert choices.DEFAULT_METHOD in choices.methods()


@pytest.mark.parametrize(("pattern", "method", "expected"), [
    ("unstructured", "sparsegpt", (None, None, None)),
    ("2:4", "wanda", (None, None, 0.5)),
    ("4:8", "sparsegpt", (None, None, 0.5)),
    ("1:4", "magnitude", (None, None, 0.75)),
    ("channel", "sparsegpt", ("retrain-free", "mlp", None)),  # no channel form: the structured method
    ("head", "wanda", (None, "attention", None)),  # wanda scores whole heads too
    ("head", "retrain-free", (None, "attention", None)),  # already the structured method
    ("unstructured", "retrain-free", ("sparsegpt", "all", None)),  # leaving channel/head
    ("2:4", "retrain-free", ("sparsegpt", "all", 0.5)),
])
def test_pattern_reaction(pattern, method, expected):
    reaction = choices.pattern_reaction(pattern, method)
    assert (reaction.method, reaction.scope, reaction.fixed_sparsity) == expected
    assert ("fixed by N:M" in reaction.sparsity_label) == (expected[2] is not None)


def test_pattern_reaction_without_the_structured_method_keeps_the_method():
    reaction = choices.pattern_reaction("channel", "sparsegpt", available=["magnitude", "sparsegpt"], structured=[])
    assert reaction.method is None and reaction.scope == "mlp"


@pytest.mark.parametrize("pattern", ["4:4", "foo", ""])
def test_pattern_reaction_leaves_a_bad_pattern_to_the_run(pattern):
    assert choices.pattern_reaction(pattern, "sparsegpt") is None
