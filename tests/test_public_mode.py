"""Public mode: no server paths in or out, each session sees and downloads only its own work."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
from test_workflow import SMALL, save_tiny

from workbench import workflow
from workbench.limits import LimitError, Limits, scrub

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from test_gradio_app import FOLDER, PRUNE_24, rows, serve_app  # noqa: E402


@pytest.fixture(scope="module")
def allowed(tmp_path_factory) -> Path:
    """An allow-listed folder holding two tiny models: a 2-block one and a 12-block one (slow to prune)."""
    from conftest import char_tokenizer
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("allowed")
    save_tiny(root / "tiny", "llama")
    config = tiny_config("llama")
    config.num_hidden_layers = 12
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "deep")
    char_tokenizer().save_pretrained(root / "deep")
    return root


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> str:
    """A valid model folder that is not allow-listed."""
    return save_tiny(tmp_path_factory.mktemp("secret-models"))


def public(**fields) -> Limits:
    return Limits(public=True, **fields)


# --- the workflow in public mode ----------------------------------------------------------------


@pytest.mark.parametrize("source", ["/etc", "/no/such/folder", "../x", "~/models/m", "model.gguf", "workbench"])
def test_local_paths_are_refused_without_saying_whether_they_exist(source):
    session = workflow.Session(limits=public())
    with pytest.raises(LimitError) as refused:
        workflow.load(session, source)
    message = str(refused.value)
    assert "local paths are not accepted" in message and "hub id" in message
    assert source not in message and "no such" not in message and "not found" not in message
    assert session.loaded is None


def test_a_real_model_outside_the_allow_list_is_refused_inside_it_loads(outside, allowed):
    session = workflow.Session(limits=public(model_dirs=(allowed.resolve(),)))
    with pytest.raises(LimitError) as refused:
        workflow.load(session, outside)
    assert outside not in str(refused.value) and "allow-listed" in str(refused.value)
    info = workflow.load(session, str(allowed / "tiny"))
    assert info["class"] == "LlamaForCausalLM"
    escape = str(allowed / "tiny" / ".." / ".." / Path(outside).name)  # '..' does not leave the list
    with pytest.raises(LimitError):
        workflow.load(session, escape)


def test_hub_ids_and_the_bundled_default_pass_the_source_check():
    limits = public()
    assert workflow.check_source("default", limits) == "default"
    assert workflow.check_source("HuggingFaceTB/SmolLM2-135M", limits) == "HuggingFaceTB/SmolLM2-135M"


def test_calibration_only_from_named_data_or_uploads(tmp_path):
    text = tmp_path / "uploads" / "calib.txt"
    text.parent.mkdir()
    text.write_text("a few words of calibration text " * 50, encoding="utf-8")
    secret = tmp_path / "server" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not yours", encoding="utf-8")
    limits = public(upload_dirs=(text.parent.resolve(),))
    base = {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5, **SMALL}
    assert workflow.make_config({**base, "calibration": "wikitext2"}, limits).calibration == "wikitext2"
    assert workflow.make_config({**base, "calibration": str(text)}, limits).calibration == str(text)
    for path in (secret, tmp_path / "missing.txt"):
        problems = workflow.validate_settings(settings={**base, "calibration": str(path)}, limits=limits)
        assert len(problems) == 1 and "server paths are not accepted" in problems[0]
        assert str(path) not in problems[0] and "not yours" not in problems[0]
    # locally a path is still fine
    assert workflow.make_config({**base, "calibration": str(secret)}, Limits()).calibration == str(secret)


def test_scrub_removes_server_paths_and_keeps_the_rest():
    message = ("could not load '/srv/app/models/x/config.json': see ~/.cache/hf/log and ./runs/a; "
               "try HuggingFaceTB/SmolLM2-135M or https://huggingface.co/docs; sparsity in [0, 1)")
    clean = scrub(message)
    assert "/srv" not in clean and "~/.cache" not in clean and "./runs" not in clean
    assert "HuggingFaceTB/SmolLM2-135M" in clean and "https://huggingface.co/docs" in clean
    assert "[0, 1)" in clean and clean.count("<path>") == 3
    assert len(scrub("x" * 5000)) <= 400


def test_the_run_list_shows_only_a_sessions_own_runs_in_public_mode(allowed, tmp_path):
    mine, theirs = workflow.Session(limits=public()), workflow.Session(limits=public())
    local = workflow.Session()
    for session in (mine, theirs):
        session.limits = Limits()  # load from a plain folder, then go public
        workflow.load(session, str(allowed / "tiny"))
        outcome = workflow.run_prune(session, {"method": "magnitude", "pattern": "2:4", **SMALL})
        workflow.record_run(session, outcome, tmp_path)
        session.limits = public()
    assert len(workflow.runs_table(tmp_path)) == 2 == len(workflow.runs_table(tmp_path, local))
    for session in (mine, theirs):
        table = workflow.runs_table(tmp_path, session)
        assert list(table["session"]) == [session.id]
    assert workflow.runs_table(tmp_path, workflow.Session(limits=public())).empty


def test_compare_refuses_another_sessions_run_as_if_it_did_not_exist(allowed, tmp_path, monkeypatch):
    import gradio as gr

    from workbench.ui import gradio_app

    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path))
    owner = workflow.Session()
    workflow.load(owner, str(allowed / "tiny"))
    name = workflow.record_run(owner, workflow.run_prune(owner, {"method": "magnitude", "pattern": "2:4", **SMALL}),
                               tmp_path).name
    owner.limits = public()
    assert gradio_app.compare_runs(owner, [name])["run"].tolist() == [name]
    for names in ([name], ["no-such-run"], ["../" + tmp_path.name]):
        with pytest.raises(gr.Error, match="no such run") as refused:
            gradio_app.compare_runs(workflow.Session(limits=public()), names)
        assert str(tmp_path) not in refused.value.message


# --- the real app on loopback ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, allowed):
    with serve_app(tmp_path_factory, WORKBENCH_PUBLIC="1", WORKBENCH_MODEL_DIRS=str(allowed),
                   WORKBENCH_SESSION_JOBS="1", WORKBENCH_CONCURRENCY="1") as url:
        yield url


def client(url: str, download: bool = True) -> Client:
    return Client(url, verbose=False, download_files=download)


def fetch(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_app_refuses_server_paths_without_echoing_them(server, outside, allowed):
    app = client(server)
    for path in (outside, "/etc", "/no/such/place"):
        with pytest.raises(AppError) as refused:
            app.predict(FOLDER, path, None, "fp32", api_name="/load")
        assert "local paths are not accepted" in str(refused.value) and path not in str(refused.value)
    status, info, line = app.predict(FOLDER, str(allowed / "tiny"), None, "fp32", api_name="/load")
    assert status.startswith("Loaded")
    shown = {r["property"]: r["value"] for r in rows(info)}["loaded from"]
    assert str(allowed) not in shown and str(allowed) not in line  # named, not located
    args = list(PRUNE_24)
    args[4] = str(allowed / "tiny" / "config.json")  # calibration from a server file
    with pytest.raises(AppError) as refused:
        app.predict(*args, api_name="/prune")
    assert "server paths are not accepted" in str(refused.value) and str(allowed) not in str(refused.value)
    assert '"model_type"' not in str(refused.value)  # nothing of the file's contents either


def test_uploaded_calibration_text_is_accepted(server, allowed, tmp_path):
    from gradio_client import handle_file

    text = tmp_path / "my-calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    app = client(server)
    app.predict(FOLDER, str(allowed / "tiny"), None, "fp32", api_name="/load")
    status, table, *_ = app.predict(*PRUNE_24, handle_file(str(text)), api_name="/prune")
    assert status.startswith("Pruned with sparsegpt 2:4")
    assert "my-calibration.txt" in rows(table)[0]["Calibration dataset"]
    assert rows(table)[0]["Calibration dataset"].startswith("my-calibration.txt")  # not where it is kept


def test_bounds_are_refused_through_the_app(server, allowed):
    app = client(server)
    app.predict(FOLDER, str(allowed / "tiny"), None, "fp32", api_name="/load")
    args = list(PRUNE_24)
    args[5] = 10_000  # calibration samples
    with pytest.raises(AppError, match="above this server's limit of 64.*WORKBENCH_MAX_SAMPLES"):
        app.predict(*args, api_name="/prune")
    with pytest.raises(AppError, match="sweep points is 15.*WORKBENCH_MAX_SWEEP_POINTS"):
        app.predict(["magnitude", "wanda", "sparsegpt"], "0.1, 0.2, 0.3, 0.4, 0.5", [], "exact", "all",
                    "wikitext2", 4, 32, ["lambada"], 2, api_name="/sweep")


def test_a_session_sees_and_downloads_only_its_own_runs_and_exports(server, allowed, tmp_path_factory):
    owner, other = client(server, download=False), client(server, download=False)
    owner.predict(FOLDER, str(allowed / "tiny"), None, "fp32", api_name="/load")
    status, *_ = owner.predict(*PRUNE_24, api_name="/prune")
    run_name = status.split("Saved as run `")[1].split("`")[0]
    assert [r["name"] for r in rows(owner.predict(api_name="/runs")[0])] == [run_name]
    assert rows(other.predict(api_name="/runs")[0]) == []
    with pytest.raises(AppError, match="no such run|not in the list of choices"):
        other.predict([run_name], api_name="/compare_runs")
    assert rows(owner.predict([run_name], api_name="/compare_runs"))[0]["run"] == run_name

    status, download, card, sizes = owner.predict(["masked"], "mine", False, api_name="/export")
    assert status.startswith("Exported as `mine`. Loads in stock transformers")  # no server path
    assert os.environ["WORKBENCH_EXPORTS"] not in status
    exported = next(Path(os.environ["WORKBENCH_EXPORTS"]).rglob("mine.zip"))
    assert fetch(download["url"]) == 200  # the owner's link, under an unguessable name in Gradio's cache
    assert Path(download["path"]).samefile(exported)  # the same bytes on disk, not a second copy
    assert Path(download["path"]).parent != exported.parent
    assert fetch(f"{server}gradio_api/file={exported}") == 403  # the export folder itself is not served
    assert fetch(f"{server}gradio_api/file={exported.parent}") == 403


def test_locally_the_export_folder_is_served_as_before(tmp_path_factory, allowed):
    with serve_app(tmp_path_factory, WORKBENCH_PUBLIC="0") as url:
        app = client(url, download=False)
        app.predict(FOLDER, str(allowed / "tiny"), None, "fp32", api_name="/load")
        app.predict(*PRUNE_24, api_name="/prune")
        status, download, *_ = app.predict(["masked"], "mine", False, api_name="/export")
        exported = next(Path(os.environ["WORKBENCH_EXPORTS"]).rglob("mine.zip"))
        assert status.startswith(f"Exported to `{exported.parent / 'mine'}`.")
        assert fetch(f"{url}gradio_api/file={exported}") == 200
        assert Path(download["path"]) == exported  # served from where it was written, no copy in Gradio's cache


def test_a_session_may_hold_only_so_many_jobs(server, allowed):
    app, other = client(server), client(server)
    app.predict(FOLDER, str(allowed / "deep"), None, "fp32", api_name="/load")
    job = app.submit("sparsegpt", "unstructured", 0.5, "all", "wikitext2", 32, 128, [], 2, api_name="/prune")
    deadline = time.time() + 60
    while time.time() < deadline and job.status().code.name not in ("PROCESSING", "PROGRESS", "FINISHED"):
        time.sleep(0.1)
    try:
        # this session's second job is refused at the door; the browser shows the reason ('detail')
        with pytest.raises(httpx.HTTPStatusError) as refused:
            app.predict("hello", 3, api_name="/generate")
        assert refused.value.response.status_code == 400
        detail = refused.value.response.json()["detail"]
        assert "already has 1 job(s) waiting or running" in detail and "WORKBENCH_SESSION_JOBS" in detail
        queued = other.submit("hello", 3, api_name="/generate")  # another session still gets in line
    finally:
        app.predict(api_name="/cancel")
    status, *_ = job.result()
    assert status.startswith(("Cancelled", "Pruned"))
    with pytest.raises(AppError, match="no model loaded"):
        queued.result()
