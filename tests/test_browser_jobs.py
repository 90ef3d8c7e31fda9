"""Jobs in a real browser: closing a tab stops its job, an export without a zip, lm-eval's tasks
in the evaluation picker. Playwright drives the system Chromium, as in test_browser."""

from __future__ import annotations

import re
import time

import pytest
import torch
from test_browser import (  # noqa: F401 - the browser fixtures and page helpers
    browser,
    console_on_failure,
    expect_text,
    fill_number,
    load,
    new_page,
    open_tab,
    playwright_api,
    small_settings,
    start,
)
from test_gradio_app import folders, serve_app  # noqa: F401 - fixtures shared with the API tests

from workbench.ui import gradio_app, tabs


@pytest.fixture(scope="module")
def deep_folder(tmp_path_factory) -> str:
    """A 16-block tiny model: pruning it with the largest calibration set takes a while."""
    from conftest import char_tokenizer
    from tiny_models import tiny_config
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("deep")
    config = tiny_config("llama")
    config.num_hidden_layers = 16
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """One job at a time on the whole server: an abandoned job would hold up everyone else."""
    with serve_app(tmp_path_factory, WORKBENCH_CONCURRENCY="1", WORKBENCH_JOB_SECONDS="0") as url:
        yield url


def wait_for(condition, what: str, seconds: float = 300.0):
    """Poll `condition()` until it returns something truthy (the bound only keeps a broken run finite)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting for {what}")


def test_closing_the_tab_cancels_its_job_and_frees_the_queue(browser, app, deep_folder, folders):  # noqa: F811
    context, page = new_page(browser)
    start(page, app)
    load(page, deep_folder)
    open_tab(page, "Prune")
    page.get_by_label("pattern", exact=True).fill("unstructured")
    page.get_by_label("pattern", exact=True).press("Enter")
    fill_number(page, "calibration samples", 64)
    fill_number(page, "tokens per sample", 512)
    tasks = page.get_by_label("evaluation", exact=True).first
    tasks.press("Backspace")  # no evaluation: the prune alone is the job
    page.locator("#prune-button").click()

    jobs = wait_for(gradio_app.TAB_JOBS.jobs, "the prune to start")
    (tab, session), = jobs.items()
    assert session.busy == "pruning"
    dense = {name: p.detach().clone() for name, p in session.model.named_parameters()}
    context.close()  # the tab goes away mid-prune

    wait_for(lambda: not session.busy, "the abandoned prune to stop")
    assert not session.is_pruned and session.result is None  # stopped, not finished
    assert all(torch.equal(p, dense[name]) for name, p in session.model.named_parameters())  # dense again
    assert gradio_app.TAB_JOBS.jobs() == {}

    # the next visitor's job runs now on the single worker
    context, page = new_page(browser)
    try:
        start(page, app)
        load(page, folders["llama"])
        open_tab(page, "Prune")
        small_settings(page)
        page.locator("#prune-button").click()
        expect_text(page, "#prune-status", "Pruned with sparsegpt 2:4")
    finally:
        context.close()


def test_a_tab_closed_before_its_job_registers_still_stops_it():
    class Job:
        busy = "pruning"
        stopped = False

        def request_stop(self):
            self.stopped = True

    jobs = tabs.TabJobs()
    assert not jobs.close("gone")  # nothing running yet
    late = Job()
    with jobs.running("gone", late):
        assert late.stopped
    other = Job()
    with jobs.running("open", other):
        assert jobs.jobs() == {"open": other} and not other.stopped
        assert jobs.close("open") and other.stopped
    assert jobs.jobs() == {}


def test_every_job_handler_takes_the_tabs_request():
    """Gradio hands the event's request to a parameter annotated `gr.Request`, and `_job` files the job
    under that request's tab. An annotation that does not resolve would silently hand over nothing."""
    import inspect
    import typing

    import gradio as gr

    handlers = {name: fn for name, fn in vars(gradio_app).items()
                if inspect.isfunction(fn) and fn.__module__ == gradio_app.__name__ and name != "_job"
                and "_job(session" in inspect.getsource(fn)}
    assert {"on_load", "on_prune", "on_sweep", "on_export", "generate"} <= set(handlers)
    for name, fn in handlers.items():
        assert typing.get_type_hints(fn).get("request") == gr.Request | None, name


def test_export_without_zip_writes_the_folder_only(browser, app, folders):  # noqa: F811
    context, page = new_page(browser)
    try:
        start(page, app)
        load(page, folders["llama"])
        open_tab(page, "Prune")
        small_settings(page)
        page.locator("#prune-button").click()
        expect_text(page, "#prune-status", "Pruned with sparsegpt 2:4")

        open_tab(page, "Export")
        zip_box = page.locator("#export-zip input")
        playwright_api.expect(zip_box).to_be_checked()  # a small model is zipped by default
        zip_box.uncheck()
        page.get_by_label("name", exact=True).fill("no-zip")
        page.locator("#export-button").click()
        expect_text(page, "#export-status", "Exported to")
        expect_text(page, "#export-status", "Loads in stock transformers")
        playwright_api.expect(page.locator("#download")).not_to_contain_text(".zip")
        written = sorted(gradio_app.exports_root().rglob("no-zip*"))
        assert [p.name for p in written] == ["no-zip"] and written[0].is_dir()  # a folder, and no zip beside it
        assert (written[0] / "model.safetensors").is_file()
    finally:
        context.close()


@pytest.fixture
def tiny_session(tmp_path):
    """A workbench session holding a tiny saved model, and its dense block weights."""
    from test_workflow import block_weights, save_tiny

    from workbench import workflow

    session = workflow.Session()
    workflow.load(session, save_tiny(tmp_path / "model"))
    return session, block_weights(session)


def test_an_abandoned_sweep_stops_when_its_tab_closes(tmp_path, tiny_session):
    import threading

    from test_workflow import SMALL, block_weights

    from workbench import workflow

    session, dense = tiny_session
    sweep = workflow.iter_sweep(session, ["magnitude"], [0.3, 0.5, 0.7], [], ["lambada"], 2,
                                run_dir=tmp_path / "sweep", **SMALL)
    assert len(next(sweep)) == 1  # the dense row; the page that asked for more is gone
    session.request_stop()  # what closing the tab does

    def sweep_ended() -> bool:
        return not any(t.name == "sweep" and t.is_alive() for t in threading.enumerate())

    wait_for(sweep_ended, "the abandoned sweep to stop")
    assert not session.is_pruned
    assert all(torch.equal(tensor, dense[name]) for name, tensor in block_weights(session).items())
    sweep.close()


def test_the_evaluation_picker_offers_every_installed_lm_eval_task(browser, app):  # noqa: F811
    from workbench.lmeval import installed_task_names

    context, page = new_page(browser)
    try:
        start(page, app)
        open_tab(page, "Prune")
        assert "lm-eval:piqa" not in gradio_app.EVAL_TASKS  # not one of the preset's tasks
        names = wait_for(lambda: installed_task_names(wait=1.0), "lm-eval's task list", seconds=600)
        assert "piqa" in names
        picker = page.get_by_label("evaluation", exact=True).first
        option = page.get_by_role("option", name=re.compile(r"(^|\s)lm-eval:piqa$"))

        def offered() -> bool:  # the page asked for the list when it loaded; it comes once it is built
            picker.fill("")
            picker.fill("lm-eval:piqa")
            return option.count() == 1 and option.is_visible()

        wait_for(offered, "lm-eval:piqa among the choices", seconds=240)
    finally:
        context.close()


def test_a_stop_during_the_evaluation_leaves_the_model_dense(tiny_session):
    from test_workflow import SMALL, block_weights

    from workbench import workflow
    from workbench.prune import PruneCancelled

    session, dense = tiny_session
    messages = []
    settings = {"method": "sparsegpt", "pattern": "2:4", **SMALL}
    with pytest.raises(PruneCancelled, match="during the evaluation"):
        # asked to stop once the pruning is done: only the evaluation of the pruned model can see it
        workflow.run_prune(session, settings, ["lambada"], 4, progress=lambda f, m: messages.append(m),
                           should_stop=lambda: session.result is not None)
    assert any(m.startswith("Pruning") for m in messages)
    assert not session.is_pruned and session.pruned_eval is None
    assert all(torch.equal(tensor, dense[name]) for name, tensor in block_weights(session).items())
