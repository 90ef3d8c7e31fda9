"""The Gradio app as a real server on loopback, driven through its named API endpoints."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from test_workflow import save_tiny

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from workbench import report  # noqa: E402

FOLDER = "local folder or .gguf path"
# method, pattern, sparsity, scope, calibration, nsamples, seqlen, tasks, limit
PRUNE_24 = ("sparsegpt", "2:4", 0.5, "all", "wikitext2", 4, 32, ["lambada"], 2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_app(tmp_path_factory, **env: str):
    """The app on a free loopback port; runs and exports go to temporary folders."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    env = {"WORKBENCH_RUNS": str(tmp_path_factory.mktemp("runs")),
           "WORKBENCH_EXPORTS": str(tmp_path_factory.mktemp("exports")), **env}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        from workbench.ui.gradio_app import build_app, launch

        demo = build_app()
        port = free_port()
        launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve_app(tmp_path_factory, WORKBENCH_CONCURRENCY="2") as url:
        yield url


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    return {"llama": save_tiny(tmp_path_factory.mktemp("llama"), "llama"),
            "opt": save_tiny(tmp_path_factory.mktemp("opt"), "opt", seed=1)}


def client(url: str) -> Client:
    return Client(url, verbose=False, download_files=True)


def rows(table: dict) -> list[dict]:
    return [dict(zip(table["headers"], row)) for row in table["data"]]


def test_named_endpoints(server):
    names = set(client(server).view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/load", "/prune", "/sweep", "/export", "/generate", "/cancel"} <= names


def test_load_prune_sweep_export_through_the_api(server, folders, tmp_path):
    app = client(server)
    status, info, model_line = app.predict(FOLDER, folders["llama"], None, "fp32", api_name="/load")
    assert status.startswith("Loaded")
    properties = {row["property"]: row["value"] for row in rows(info)}
    assert properties["decoder blocks"] == "2" and properties["architecture"] == "LlamaForCausalLM"
    assert "(dense)" in model_line
    with pytest.raises(AppError, match="prune the model first"):
        app.predict(["masked"], "tiny", False, api_name="/export")

    status, table, heatmap, mask, error, timings, layer, model_line = app.predict(*PRUNE_24, api_name="/prune")
    assert status.startswith("Pruned with sparsegpt 2:4")
    assert table["headers"] == report.RESULTS_COLUMNS  # metric, dense, pruned and change lead
    summary = rows(table)
    assert [r["Metric"] for r in summary] == ["LAMBADA last-word accuracy", "LAMBADA last-word perplexity"]
    accuracy, perplexity = summary
    assert accuracy["Change"].startswith(f"accuracy {(accuracy['Pruned'] - accuracy['Dense']) * 100:+.1f} points")
    assert perplexity["Change"].startswith(f"perplexity x{perplexity['Pruned'] / perplexity['Dense']:.3g}")
    shown = table["metadata"]["display_value"]  # rounded on screen, every digit in the data
    assert shown[0][1] == f"{accuracy['Dense']:.2%}"
    assert shown[1][2] == report.format_value("perplexity", perplexity["Pruned"]) != str(perplexity["Pruned"])
    run_name = status.split("Saved as run `")[1].split("`")[0]  # the run store keeps every digit too
    stored = pd.read_csv(Path(os.environ["WORKBENCH_RUNS"]) / run_name / "comparison.csv")
    assert stored["dense"].tolist() == pytest.approx([accuracy["Dense"], perplexity["Dense"]], rel=1e-12)
    assert {r["Over MLP block sparsity"] for r in summary} == {"0.5000"}  # counted from the weights
    assert heatmap is not None and mask is not None and error is not None
    assert "prune" in {r["stage"] for r in rows(timings)}
    assert "(pruned)" in model_line

    dense_text, pruned_text = app.predict("hello", 5, api_name="/generate")
    assert isinstance(dense_text, str) and not pruned_text.startswith("(nothing pruned")

    runs, _ = app.predict(api_name="/runs")
    assert any(r["kind"] == "prune" and r["pattern"] == "2:4" for r in rows(runs))

    # method, sparsities, N:M points, mode, scope, calibration, nsamples, seqlen, tasks, limit, backend, address
    job = app.submit(["magnitude"], "0.5", ["2:4"], "exact", "all", "wikitext2", 4, 32, ["lambada"], 2, "local", "",
                     api_name="/sweep")
    status, points, curve, model_line = job.result()
    assert status.startswith("Sweep finished: 3 points")
    streamed = [len(update[1]["data"]) for update in job.outputs()[:-1]]
    assert streamed and streamed == sorted(streamed) and streamed[-1] == 3  # filled in point by point
    assert [r["method"] for r in rows(points)] == ["dense", "magnitude", "magnitude"]
    column = points["headers"].index("sparsity_matmul")  # rounded on screen, every digit in the data
    assert [row[column] for row in points["metadata"]["display_value"]] == \
        [f"{row[column]:.4g}" for row in points["data"]]
    # the sweep ran on the dense weights and left the pruned model as it was: export it, no second prune
    assert curve is not None and "(pruned)" in model_line and "pruned model is unchanged" in status

    status, zip_path, card, sizes = app.predict(["masked"], "tiny-24", False, api_name="/export")
    assert status.startswith("Exported")
    with zipfile.ZipFile(zip_path) as archive:
        names = {name.split("/")[-1] for name in archive.namelist()}
    assert {"README.md", "config.json", "model.safetensors"} <= names
    assert "2:4" in card
    with pytest.raises(AppError, match="overwrite"):
        app.predict(["masked"], "tiny-24", False, api_name="/export")


def test_two_sessions_keep_their_own_state(server, folders):
    first, second = client(server), client(server)
    with ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(first.predict, FOLDER, folders["llama"], None, "fp32", api_name="/load"),
                 pool.submit(second.predict, FOLDER, folders["opt"], None, "fp32", api_name="/load")]
        (_, info_a, _), (_, info_b, _) = (job.result() for job in loads)
    assert {r["property"]: r["value"] for r in rows(info_a)}["family"] == "llama"
    assert {r["property"]: r["value"] for r in rows(info_b)}["family"] == "opt"

    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(first.predict, *PRUNE_24, api_name="/prune")
        b = pool.submit(second.predict, "magnitude", "unstructured", 0.3, "mlp", "wikitext2", 4, 32, [], 2,
                        api_name="/prune")
        status_a, table_a, *_, line_a = a.result()
        status_b, table_b, *_, line_b = b.result()
    assert "LlamaForCausalLM" in line_a and "OPTForCausalLM" in line_b
    assert rows(table_a)[0]["Sparsity pattern"] == "2:4"
    b_row = rows(table_b)[0]
    assert b_row["Sparsity pattern"] == "1x1 30%" and b_row["Metric"] == "-"
    assert float(b_row["Over MLP block sparsity"]) == pytest.approx(0.3, abs=0.01)

    third = client(server)  # a new visitor sees no model at all
    with pytest.raises(AppError, match="no model loaded"):
        third.predict("hi", 4, api_name="/generate")


@pytest.mark.parametrize(("endpoint", "args", "message"), [
    ("/prune", PRUNE_24, "no model loaded"),
    ("/load", ("hub id", "not a hub id!", None, "fp32"), "valid hub id"),
    ("/load", (FOLDER, "/no/such/folder", None, "fp32"), "no such folder"),
    ("/load", (FOLDER, "", None, "fp32"), "type the path"),
    ("/load", ("upload .gguf", "", None, "fp32"), "upload a .gguf file"),
    ("/prune", ("sparsegpt", "4:4", 0.5, "all", "wikitext2", 4, 32, [], 2), "1 <= N < M"),
    ("/prune", ("sparsegpt", "unstructured", 1.5, "all", "wikitext2", 4, 32, [], 2), "1.5 is outside \\[0, 1\\)"),
    ("/prune", ("sparsegpt", "2:4", 0.5, "all", "no-such-data.txt", 4, 32, [], 2), "unknown calibration"),
    ("/sweep", (["magnitude"], "0.5, 1.5", [], "exact", "all", "wikitext2", 4, 32, ["lambada"], 2), "\\[0, 1\\)"),
    ("/sweep", (["magnitude"], "half", [], "exact", "all", "wikitext2", 4, 32, ["lambada"], 2), "numbers"),
    ("/generate", ("", 5), "no model loaded|type a prompt"),
])
def test_bad_inputs_get_clear_messages(server, folders, endpoint, args, message):
    app = client(server)
    if "no model loaded" not in message and endpoint != "/load":
        app.predict(FOLDER, folders["llama"], None, "fp32", api_name="/load")
    with pytest.raises(AppError, match=message) as caught:
        app.predict(*args, api_name=endpoint)
    assert "Traceback" not in str(caught.value)


def test_cancel_stops_a_running_prune(server, tmp_path):
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = 12  # enough blocks that the stop lands mid-run
    folder = tmp_path / "deep"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    from conftest import char_tokenizer

    char_tokenizer().save_pretrained(folder)
    app = client(server)
    app.predict(FOLDER, str(folder), None, "fp32", api_name="/load")
    job = app.submit("sparsegpt", "unstructured", 0.5, "all", "wikitext2", 32, 128, [], 2, api_name="/prune")
    deadline = time.time() + 60
    answer = ""
    while time.time() < deadline and not job.done():
        answer = app.predict(api_name="/cancel")
        if answer.startswith("Stopping"):
            break
        time.sleep(0.2)
    assert answer.startswith("Stopping pruning"), answer
    status, table, heatmap, *_, line = job.result()
    assert status.startswith("Cancelled") and not table["data"] and heatmap is None
    assert "(dense)" in line
    dense_text, pruned_text = app.predict("hello", 3, api_name="/generate")
    assert pruned_text.startswith("(nothing pruned")


def test_card_preview_drops_front_matter_and_local_images():
    from workbench.ui.gradio_app import card_preview

    card = "---\nlicense: apache-2.0\n---\n# Pruned\n![Sparsity per block](sparsity_heatmap.png)\n![b](https://x.org/b.png)"
    preview = card_preview(card)
    assert preview.startswith("# Pruned") and "license" not in preview
    assert "sparsity_heatmap.png" not in preview and "Sparsity per block: in the download" in preview
    assert "![b](https://x.org/b.png)" in preview


def test_app_builds_without_loading_a_model():
    from workbench.ui.gradio_app import build_app

    demo = build_app()
    names = {dep.api_name for dep in demo.fns.values() if dep.api_visibility == "public"}
    assert {"load", "prune", "sweep", "export", "generate", "cancel"} <= names


def test_each_tab_gets_its_own_session_on_first_use_not_from_a_page_load_event():
    """A page-load event that set the session could run after the tab's first action and replace
    a session that already held a model; the session comes from Gradio's per-tab copy instead."""
    import gradio as gr
    from gradio.state_holder import SessionState

    from workbench.session import Session
    from workbench.ui.gradio_app import build_app

    demo = build_app()
    states = [block for block in demo.blocks.values() if isinstance(block, gr.State)]
    assert len(states) == 1
    state = states[0]
    assert state.load_event is None
    for dep in demo.fns.values():  # no event at all writes the session
        assert state._id not in [block._id for block in dep.outputs]
    first, second = SessionState(demo), SessionState(demo)  # two tabs, as Gradio's store makes them
    tab_a, tab_b = first[state._id], second[state._id]
    assert isinstance(tab_a, Session) and isinstance(tab_b, Session)
    assert tab_a is not tab_b and tab_a.id != tab_b.id
    assert first[state._id] is tab_a  # the same session on every later event of the tab
    assert tab_a.limits is demo.workbench_limits


def test_cancel_stops_a_running_sweep_and_keeps_finished_points(server, folders):
    app = client(server)
    app.predict(FOLDER, folders["llama"], None, "fp32", api_name="/load")
    job = app.submit(["magnitude", "wanda"], "0.2, 0.4, 0.6, 0.8", [], "exact", "all", "wikitext2", 4, 32,
                     ["lambada"], 2, api_name="/sweep")
    deadline = time.time() + 120
    while time.time() < deadline and not job.outputs() and not job.done():
        time.sleep(0.1)
    from workbench.ui.gradio_app import TAB_JOBS

    assert TAB_JOBS.jobs()[app.session_hash].busy == "the sweep"  # filed under its tab: closing the tab stops it
    assert app.predict(api_name="/cancel_sweep").startswith("Stopping the sweep")
    status, points, curve, line = job.result()
    assert status.startswith("Sweep stopped after"), status
    finished = len(points["data"])
    assert 1 <= finished < 9 and f"after {finished} of 9 points" in status
    assert "(dense)" in line


def test_locally_every_session_sees_every_run_and_the_bounds_still_apply(server, folders):
    first, second = client(server), client(server)
    first.predict(FOLDER, folders["llama"], None, "fp32", api_name="/load")
    status, *_ = first.predict(*PRUNE_24, api_name="/prune")
    name = status.split("Saved as run `")[1].split("`")[0]
    assert name in [r["name"] for r in rows(second.predict(api_name="/runs")[0])]
    assert "session" not in second.predict(api_name="/runs")[0]["headers"]  # an internal column
    with pytest.raises(AppError, match="above this server's limit of 128.*WORKBENCH_MAX_NEW_TOKENS|maximum"):
        first.predict("hello", 129, api_name="/generate")
    path_args = list(PRUNE_24)
    path_args[5] = 65  # calibration samples over the default bound, named with the variable that lifts it
    with pytest.raises(AppError, match="WORKBENCH_MAX_SAMPLES"):
        first.predict(*path_args, api_name="/prune")


def test_compared_runs_show_the_chosen_metrics_as_a_short_table_and_a_plot():
    from workbench.ui.gradio_app import show_comparison

    wide = pd.DataFrame([{"run": "p1", "status": "done", "sparsity/matmul": 0.5, "dense/lambada/accuracy": 0.3125,
                          "sparse/lambada/accuracy": 0.25, "dense/wikitext2/perplexity": 27.123456,
                          "sparse/wikitext2/perplexity": 80.0, "timings/prune_s": 1.5, "sparsity/mlp": 0.5}])
    table, plot = show_comparison(wide, ["accuracy"])
    view = table.data
    assert list(view.columns) == ["run", "point", "sparsity", "LAMBADA last-word accuracy"]
    assert view["point"].tolist() == ["dense", "pruned"]
    assert "31.25%" in table.to_html() and plot is not None and plot.size[0] > 100
    both, _ = show_comparison(wide, ["accuracy", "perplexity"])
    assert "WikiText-2 perplexity" in both.data.columns and "27.12" in both.to_html()
    assert show_comparison(None, ["accuracy"]) == (None, None)
