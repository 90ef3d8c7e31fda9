"""The notebooks run headless with small settings, and say what they should.

Each notebook has a code cell tagged `parameters`; like papermill, the test inserts a cell right
after it that overrides those settings with small values, executes the notebook with nbclient, and
reads the JSON summary its last cell prints. The committed notebooks must carry no outputs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
ALL = sorted(NOTEBOOKS.glob("*.ipynb"))
sys.path.insert(0, str(NOTEBOOKS))
import strip_outputs  # noqa: E402

CELL_TIMEOUT_S = 900


def parameters_cell(nb) -> int:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    return tagged[0]


def inject(nb, params: dict) -> None:
    """Papermill-style: a cell after the parameters cell assigning the overrides."""
    index = parameters_cell(nb)
    source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, cell)


def kernel_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    # Two torch threads spin-wait against each other on a shared, oversubscribed CPU (several
    # times slower than one); a CI runner with its own cores can set OMP_NUM_THREADS itself.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["WORKBENCH_RUNS"] = str(tmp_path / "runs")
    return env


def run_notebook(name: str, params: dict, tmp_path: Path):
    """Execute notebooks/<name> with `params` injected; return (executed nb, summary, seconds)."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    inject(nb, params)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    started = time.perf_counter()
    client.execute(env=kernel_env(tmp_path))
    seconds = time.perf_counter() - started
    nbformat.write(nb, tmp_path / name)  # the executed copy, for a look when a test fails
    print(f"{name}: executed in {seconds:.1f} s")
    return nb, last_json(nb), seconds


def last_json(nb) -> dict:
    """The JSON object printed last by the notebook's last code cell."""
    cell = [c for c in nb.cells if c.cell_type == "code"][-1]
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, f"the last cell printed no JSON summary; it printed: {text[-2000:]!r}"
    return json.loads(lines[-1])


def images(nb) -> int:
    return sum(1 for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
               if "image/png" in out.get("data", {}))


def errors(nb) -> list[str]:
    return [f"{o.get('ename')}: {o.get('evalue')}" for cell in nb.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if o.output_type == "error"]


# --- the committed files -------------------------------------------------------------------


def test_notebooks_exist():
    names = {path.name for path in ALL}
    assert {"01_quickstart.ipynb", "02_accuracy_vs_sparsity.ipynb",
            "03_retrain_free_channels.ipynb", "04_widget_panel.ipynb"} <= names


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert not strip_outputs.strip(nb), (f"{path.name} holds outputs or widget state; clear it before "
                                         "committing: python notebooks/strip_outputs.py")
    parameters_cell(nb)


def test_strip_outputs_clears_an_executed_notebook(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[0].execution_count = 1
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    path = tmp_path / "executed.ipynb"
    nbformat.write(nb, path)
    assert strip_outputs.main([str(path), "--check"]) == 1
    assert nbformat.read(path, as_version=4).cells[0].outputs  # --check changes nothing
    assert strip_outputs.main([str(path)]) == 0
    cleared = nbformat.read(path, as_version=4)
    assert cleared.cells[0].outputs == [] and cleared.cells[0].execution_count is None
    assert "widgets" not in cleared.metadata and cleared.cells[0].source == "print(1)"
    assert strip_outputs.main([str(path), "--check"]) == 0


def test_inject_overrides_defaults():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nb.cells[0].metadata["tags"] = ["parameters"]
    inject(nb, {"x": 2, "tasks": ["lambada"]})
    assert nb.cells[1].source == "x = 2\ntasks = ['lambada']"
    assert nb.cells[1].metadata["tags"] == ["injected-parameters"]


# --- executing them ------------------------------------------------------------------------

SMALL = {"nsamples": 4, "seqlen": 128, "eval_limit": 8}


@pytest.mark.slow
def test_01_quickstart(tmp_path):
    nb, summary, _ = run_notebook("01_quickstart.ipynb", {
        **SMALL, "eval_tasks": ["lambada"], "export_root": str(tmp_path / "exports"),
        "export_formats": ["compact"], "make_zip": False,
    }, tmp_path)
    assert not errors(nb)
    assert summary["pattern"] == "2:4" and summary["method"] == "sparsegpt"
    assert summary["groups_checked"] > 1_000_000 and summary["nm_violations"] == 0
    sparsity = summary["sparsity"]
    assert 0.5 <= sparsity["mlp"] < 0.51 and 0.5 <= sparsity["attention"] < 0.51
    assert 0.3 < sparsity["matmul"] < sparsity["blocks"]  # the dense tied LM head counts too
    for figures in (summary["dense"]["lambada"], summary["sparse"]["lambada"]):
        assert 0.0 <= figures["accuracy"] <= 1.0 and figures["perplexity"] > 1.0
    assert summary["figures"] == ["Figure", "Figure"]
    assert images(nb) >= 3  # heatmap, mask zoom, error heatmap
    export = Path(summary["export"])
    assert export.parent == tmp_path / "exports"
    assert {"recipe.json", "README.md"} <= set(summary["export_files"])
    assert all((export / name).is_file() for name in summary["export_files"])


@pytest.mark.slow
def test_02_accuracy_vs_sparsity(tmp_path):
    nb, summary, _ = run_notebook("02_accuracy_vs_sparsity.ipynb", {
        **SMALL, "sparsities": [0.5], "extra_patterns": [], "owl_methods": ["wanda"],
        "tasks": ["lambada"], "ppl_windows": 1, "mode": "fast",
    }, tmp_path)
    assert not errors(nb)
    rows = {(r["method"], r["allocation"]): r for r in summary["rows"]}
    assert set(rows) == {("dense", ""), ("magnitude", "uniform"), ("wanda", "uniform"),
                         ("sparsegpt", "uniform"), ("wanda", "owl")}
    assert rows[("dense", "")]["sparsity_blocks"] < 0.01
    for key, row in rows.items():
        assert 0.0 <= row["lambada/accuracy"] <= 1.0 and row["lambada/perplexity"] > 1.0
        if key[0] != "dense":
            # OWL moves sparsity between blocks but keeps the overall budget
            assert row["sparsity_blocks"] == pytest.approx(0.5, abs=0.01), key
            assert row["sparsity_matmul"] < row["sparsity_blocks"]
    allocation = summary["owl_allocation"]
    # blocks differ (lam = 0.08 around the target, shifted to keep the budget: equal-size blocks
    # here, so the plain mean is the budget)
    assert len(allocation) == 30 and max(allocation) - min(allocation) > 0.05
    assert all(0.3 < s < 0.7 for s in allocation)
    assert sum(allocation) / len(allocation) == pytest.approx(0.5, abs=0.002)
    assert set(summary["curve_lines"]) == {"magnitude", "wanda", "sparsegpt", "wanda (owl)"}
    assert images(nb) >= 2  # the allocation and the curve


@pytest.mark.slow
def test_03_retrain_free_channels(tmp_path):
    nb, summary, _ = run_notebook("03_retrain_free_channels.ipynb", {
        **SMALL, "sparsities": [0.1], "speed_seqlen": 128, "speed_repeats": 2,
    }, tmp_path)
    assert not errors(nb)
    (row,) = summary["rows"]
    assert row["mlp"] == pytest.approx(0.1, abs=0.005)
    assert 0.02 < row["matmul"] < row["mlp"]  # attention and the LM head stay dense
    for key in ("dense_last_token", "sparse_last_token", "dense_last_word", "sparse_last_word"):
        assert 0.0 <= row[key] <= 1.0
    assert summary["table_columns"] == [
        "Model", "Calibration dataset", "Evaluation dataset", "Sparsity pattern", "Over MLP block sparsity",
        "Element-wise/matmul ratio", "Dense last token accuracy", "Sparse last token accuracy", "Relative drop"]
    slim = summary["slim"]
    assert slim["max_logit_diff"] < 1e-3  # cutting zeroed channels out changes nothing
    assert slim["parameters_after"] < slim["parameters_before"]
    assert slim["counted_mlp"] == pytest.approx(row["mlp"], abs=1e-6)
    assert len(slim["sizes"]) == 30 and max(slim["sizes"]) <= 1536
    assert slim["dense_ms"] > 0 and slim["slim_ms"] > 0
    assert images(nb) >= 1


@pytest.mark.slow
def test_04_widget_panel(tmp_path):
    nb, summary, _ = run_notebook("04_widget_panel.ipynb", {
        "method": "wanda", "nsamples": 4, "seqlen": 64, "eval_limit": 4, "sweep_methods": ["magnitude"],
        "sweep_sparsities": "0.5", "export_root": str(tmp_path / "exports"),
    }, tmp_path)
    assert not errors(nb)
    assert summary["error"] == ""
    assert summary["method"] == "wanda" and summary["pattern"] == "2:4"
    assert 0.5 <= summary["mlp"] < 0.501  # 2:4, plus the few weights that were zero already
    assert "Over MLP block sparsity" in summary["table_columns"]
    assert summary["heatmap_png_bytes"] > 1000 and summary["curve_png_bytes"] > 1000
    assert summary["sweep_methods"] == ["dense", "magnitude"] and summary["sweep_points"] == 2
    assert Path(summary["export"]).parent == tmp_path / "exports" and summary["model_pruned"]
    # nbclient saved the widget state as JupyterLab would: the panel really rendered in a kernel
    state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    buttons = {m["state"].get("description") for m in state.values() if m["model_name"] == "ButtonModel"}
    assert {"Run", "Cancel", "Sweep", "Export", "Load"} <= buttons
    (panel_cell,) = [c for c in nb.cells if c.cell_type == "code" and "Workbench(" in c.source]
    (view,) = [o["data"]["application/vnd.jupyter.widget-view+json"] for o in panel_cell.outputs
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert state[view["model_id"]]["model_name"] == "VBoxModel"  # the panel itself was displayed
