"""The notebook panel, driven from code: set widget values, click, check what it shows and holds."""

from __future__ import annotations

import importlib
import sys
import threading

import pytest
import torch

pytest.importorskip("ipywidgets")

from conftest import char_tokenizer  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from workbench.arch import describe, weight_of  # noqa: E402
from workbench.report import most_pruned_layer  # noqa: E402
from workbench.ui.widgets import Workbench  # noqa: E402

PNG = b"\x89PNG"


def is_png(image) -> bool:
    return bytes(image.value).startswith(PNG)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama with a character tokenizer, saved like any local model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def panel(source, **options) -> Workbench:
    defaults = dict(method="wanda", pattern="2:4", nsamples=4, seqlen=32, eval_tasks=(), eval_limit=2,
                    background=False, show=False)
    return Workbench(str(source), **{**defaults, **options})


def mlp_zeros(model) -> float:
    weights = [weight_of(lin.module) for block in describe(model).blocks for lin in block.linears
               if lin.group == "mlp"]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_import_without_ipywidgets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    monkeypatch.delitem(sys.modules, "workbench.ui.widgets", raising=False)
    with pytest.raises(ImportError, match="pip install ipywidgets"):
        importlib.import_module("workbench.ui.widgets")


def test_run_click_prunes_and_shows_figures_and_table(tiny_folder):
    wb = panel(tiny_folder, eval_tasks=("lambada",))
    assert wb.model is None and wb.result is None
    wb.run_button.click()
    assert wb.error == "", wb.error
    outcome = wb.result
    assert outcome is not None and wb.model is wb.session.model
    summary = outcome.result.summary
    assert summary["mlp"] == pytest.approx(0.5) and summary["attention"] == pytest.approx(0.5)
    assert mlp_zeros(wb.model) == pytest.approx(summary["mlp"])  # the numbers come from the weights
    assert is_png(wb.heatmap) and is_png(wb.zoom)
    assert wb.progress.value == 1.0 and wb.cancel_button.disabled
    html = wb.summary.value
    assert "<table" in html and "Over MLP block sparsity" in html and "0.5000" in html and "wanda" in html
    # the figures lead: metric, dense, pruned, the change in words; then the context
    assert html.index(">Metric<") < html.index(">Dense<") < html.index(">Pruned<") < html.index(">Change<") \
        < html.index(">Over MLP block sparsity<")
    assert "accuracy " in html and " points" in html and "perplexity x" in html
    assert set(outcome.table["Method"]) == {"wanda"}
    assert list(outcome.table["Metric"]) == ["LAMBADA last-word accuracy", "LAMBADA last-word perplexity"]
    assert set(wb.zoom_layer.options) == set(outcome.result.masks)
    assert wb.zoom_layer.value == outcome.zoom_layer == most_pruned_layer(outcome.result)
    before = wb.zoom.value
    wb.zoom_layer.value = wb.zoom_layer.options[-1]
    assert is_png(wb.zoom) and wb.zoom.value != before
    assert "Pruned with wanda 2:4" in wb.message.value
    assert "LlamaForCausalLM" in wb.model_status.value and "2 blocks" in wb.model_status.value
    assert "pruned: wanda 2:4" in repr(wb)


def test_second_run_starts_from_dense(tiny_folder):
    wb = panel(tiny_folder, pattern="unstructured", sparsity=0.25)
    wb.run()
    assert wb.result.result.summary["mlp"] == pytest.approx(0.25, abs=0.01)
    wb.sparsity.value = 0.5
    outcome = wb.run(wait=True)
    assert outcome is wb.result
    assert mlp_zeros(wb.model) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("change, expected", [
    ({"nsamples": 0}, "nsamples must be a positive integer"),
    ({"seqlen": -5}, "seqlen must be a positive integer"),
    ({"model_picker": "/no/such/folder"}, "no such folder or file"),
    ({"calibration": "not-a-dataset"}, None),  # checked when loading the data, shown all the same
])
def test_invalid_values_show_a_clear_message(tiny_folder, change, expected):
    wb = panel(tiny_folder)
    for name, value in change.items():
        getattr(wb, name).value = value
    wb.run_button.click()
    assert wb.result is None
    assert wb.error and wb.error in wb.message.value.replace("&#x27;", "'")
    if expected is not None:
        assert expected in wb.error
        assert wb.session.loaded is None  # refused before loading anything
    else:
        assert "unknown calibration source 'not-a-dataset'" in wb.error
    assert not wb.run_button.disabled  # ready for the next try


def test_pattern_drives_method_scope_and_sparsity(tiny_folder):
    wb = panel(tiny_folder, pattern="unstructured", method="sparsegpt")
    assert not wb.sparsity.disabled
    wb.pattern.value = "2:4"
    assert wb.sparsity.disabled
    wb.pattern.value = "channel"
    assert wb.scope.value == "mlp" and wb.method.value == "retrain-free"
    wb.pattern.value = "head"
    assert wb.scope.value == "attention"
    wb.method.value = "sparsegpt"  # element-wise method with a structured pattern
    wb.run_button.click()
    assert "sparsegpt" in wb.error and wb.result is None
    wb.pattern.value = "unstructured"
    assert wb.scope.value == "all" or wb.method.value != "retrain-free"


def press_cancel_on(wb, prefix: str) -> None:
    """Make the panel's Cancel button be pressed when a progress message starts with `prefix`."""
    show = wb._progress

    def progress(fraction, message):
        show(fraction, message)
        if message.startswith(prefix):
            wb.cancel_button.click()

    wb._progress = progress


def test_background_run_and_cancel(tiny_folder):
    wb = panel(tiny_folder, background=True)
    assert wb.run() is None or wb.result is not None  # returns at once
    assert wb.wait(timeout=120)
    assert wb.result is not None and wb.error == ""

    wb.pattern.value = "unstructured"  # a different prune, restored to dense first
    press_cancel_on(wb, "Pruning block 1/")
    wb.run(wait=True)
    assert wb.result is None and wb.error.startswith("Cancelled")
    assert wb.status.value == "Cancelled" and wb.cancel_button.disabled
    dense = wb.session.dense_state  # the model is dense again
    for block in describe(wb.model).blocks:
        for lin in block.linears:
            assert torch.equal(weight_of(lin.module), dense[f"{lin.full_name}.weight"])
    assert mlp_zeros(wb.model) == 0.0


def test_cancel_from_another_thread_and_busy_guard(tiny_folder):
    wb = panel(tiny_folder, background=True)
    wb.cancel()
    assert wb.status.value == "Nothing is running."
    gate, reached = threading.Event(), threading.Event()
    show = wb._progress

    def hold_after_first_block(fraction, message):
        show(fraction, message)
        if message.startswith("Pruning block 1/"):
            reached.set()
            gate.wait(60)

    wb._progress = hold_after_first_block
    wb.run()  # returns at once; the worker stops at the gate
    assert reached.wait(120) and wb.busy and wb.run_button.disabled and not wb.cancel_button.disabled
    wb.run_button.click()
    assert wb.error == "pruning is running: wait for it or press Cancel"
    wb.cancel_button.click()
    assert wb.status.value.startswith("Stopping pruning")
    gate.set()
    assert wb.wait(timeout=120)
    assert wb.error.startswith("Cancelled") and wb.result is None and mlp_zeros(wb.model) == 0.0


def test_sweep_draws_the_curve(tiny_folder, tmp_path):
    wb = panel(tiny_folder, eval_tasks=("lambada",))
    wb.run_button.click()  # prune 2:4 first: the sweep must not throw that work away
    assert wb.error == "", wb.error
    pruned = {name: p.detach().clone() for name, p in wb.model.named_parameters()}
    wb.sweep_methods.value = ("wanda",)
    wb.sweep_sparsities.value = "0.25, 0.5"
    wb.sweep_button.click()
    assert wb.error == "", wb.error
    table = wb.sweep_table
    assert list(table["method"]) == ["dense", "wanda", "wanda"]
    assert table.loc[table["method"] != "dense", "sparsity_blocks"].round(2).tolist() == [0.25, 0.5]
    assert "lambada/accuracy" in table.columns
    assert is_png(wb.curve) and "<table" in wb.sweep_html.value
    # the sweep ran from the dense weights (its dense row has no zeros) and left the pruned model in place
    assert table["sparsity_blocks"].iloc[0] == 0.0 and mlp_zeros(wb.model) == pytest.approx(0.5)
    assert all(torch.equal(p, pruned[name]) for name, p in wb.model.named_parameters())
    assert wb.session.is_pruned and "pruned model is unchanged" in wb.message.value
    assert "Sweep finished: 3 points" in wb.message.value and "stopped early" not in wb.message.value
    wb.export_root.value = str(tmp_path)
    wb.export_zip.value = False
    wb.export_button.click()
    assert wb.error == "" and (wb.exported.path / "recipe.json").is_file()


def test_a_stopped_sweep_says_so(tiny_folder):
    wb = panel(tiny_folder, eval_tasks=("lambada",), background=True)
    wb.sweep_methods.value = ("magnitude",)
    wb.sweep_sparsities.value = "0.25, 0.5"
    press_cancel_on(wb, "Sweep: dense")  # after the dense row
    wb.sweep(wait=True)
    assert wb.error == "", wb.error
    assert list(wb.sweep_table["method"]) == ["dense"]  # stopped before the first pruned point
    assert "Sweep finished: 1 points" in wb.message.value and "(stopped early)" in wb.message.value
    assert not wb.session.stop_requested  # the request ended with the sweep it stopped


@pytest.mark.parametrize("text, expected", [("0.3, abc", "numbers separated by commas"),
                                             ("0.5, 1.5", "[0, 1)"), ("", "give sparsities")])
def test_sweep_rejects_bad_sparsities(tiny_folder, text, expected):
    wb = panel(tiny_folder)
    wb.sweep_sparsities.value = text
    wb.sweep_button.click()
    assert expected in wb.error and wb.sweep_table is None


def test_export_after_run(tiny_folder, tmp_path):
    wb = panel(tiny_folder)
    wb.export_root.value = str(tmp_path)
    wb.export_button.click()
    assert "nothing to export yet" in wb.error
    wb.run_button.click()
    wb.export_name.value = "tiny-2of4"
    wb.export_formats.value = ("masked",)
    wb.export_zip.value = False
    wb.export_button.click()
    assert wb.error == "", wb.error
    exported = wb.exported
    assert exported.path == tmp_path / "tiny-2of4" and (exported.path / "config.json").is_file()
    assert (exported.path / "recipe.json").is_file() and str(exported.path) in wb.export_html.value
    wb.export_button.click()  # exists, overwrite not ticked
    assert "overwrite" in wb.error


@pytest.mark.slow
def test_bundled_model_through_the_panel(tmp_path):
    wb = panel("default", eval_tasks=("lambada",), eval_limit=4, record=True, runs_root=tmp_path / "runs")
    wb.run_button.click()
    assert wb.error == "", wb.error
    outcome = wb.result
    assert wb.session.info["class"] == "LlamaForCausalLM"
    assert 0.5 <= outcome.result.summary["mlp"] < 0.501  # a few weights were zero already
    assert mlp_zeros(wb.model) == pytest.approx(outcome.result.summary["mlp"])
    row = outcome.table.iloc[0]
    assert row["Metric"] == "LAMBADA last-word accuracy"
    assert row["Over MLP block sparsity"].startswith("0.500") and row["Sparsity pattern"] == "2:4"
    assert 0.0 <= float(row["Dense"]) <= 1.0 and 0.0 <= float(row["Sparse"]) <= 1.0
    assert is_png(wb.heatmap) and is_png(wb.error_heatmap)
    assert "Saved as run" in wb.message.value and any((tmp_path / "runs").iterdir())


def test_out_of_range_sparsity_is_refused_not_clamped(tiny_folder):
    wb = panel(tiny_folder, pattern="unstructured")
    wb.sparsity.value = 1.5
    assert wb.sparsity.value == 1.5  # the field keeps what was typed
    wb.run_button.click()
    assert "1.5 is outside [0, 1)" in wb.error and wb.result is None


def test_typed_lm_eval_tasks_join_the_ticked_ones(tiny_folder):
    wb = panel(tiny_folder, eval_tasks=("lambada", "lm-eval:my_local_task"))
    assert wb.eval_tasks.value == ("lambada",) and wb.eval_more.value == "lm-eval:my_local_task"
    assert "lm-eval:hellaswag" in wb.eval_tasks.options  # the papers' suite is listed
    wb.eval_more.value = "lm-eval:a, lm-eval:b"
    assert wb._eval_settings()[0] == ("lambada", "lm-eval:a", "lm-eval:b")
