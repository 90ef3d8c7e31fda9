"""Bounds on one request: the operator's settings, refusals that name them, the time budget per job."""

from __future__ import annotations

import time

import pytest
import torch
from test_workflow import SMALL, block_weights, save_tiny

from workbench import workflow
from workbench.limits import LimitError, Limits, TimeBudgetExceeded, on_space


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


def bounded_session(folder: str, **bounds) -> workflow.Session:
    session = workflow.Session(limits=Limits(**bounds))
    workflow.load(session, folder)
    return session


# --- the settings ---------------------------------------------------------------------------


def test_defaults_fit_a_small_server_and_are_local():
    limits = Limits.from_env({})
    assert limits == Limits()
    assert 0 < limits.max_nsamples <= 128 and 0 < limits.max_seqlen <= 1024 and 0 < limits.job_seconds
    assert not limits.public and limits.model_dirs == ()


def test_every_setting_comes_from_its_variable(tmp_path):
    limits = Limits.from_env({
        "WORKBENCH_MAX_SAMPLES": "8", "WORKBENCH_MAX_SEQLEN": "64", "WORKBENCH_MAX_EVAL": "5",
        "WORKBENCH_MAX_SWEEP_POINTS": "3", "WORKBENCH_MAX_NEW_TOKENS": "7", "WORKBENCH_SESSION_JOBS": "1",
        "WORKBENCH_JOB_SECONDS": "30", "WORKBENCH_PUBLIC": "yes",
        "WORKBENCH_MODEL_DIRS": f"{tmp_path / 'a'}:{tmp_path / 'b'}"})
    assert (limits.max_nsamples, limits.max_seqlen, limits.max_eval, limits.max_sweep_points,
            limits.max_new_tokens, limits.session_jobs, limits.job_seconds) == (8, 64, 5, 3, 7, 1, 30)
    assert limits.public and limits.model_dirs == ((tmp_path / "a").resolve(), (tmp_path / "b").resolve())


@pytest.mark.parametrize(("environ", "public"), [
    ({"SYSTEM": "spaces", "SPACE_ID": "someone/workbench"}, True),
    ({"SPACE_ID": "someone/workbench"}, True),
    ({"SYSTEM": "spaces", "SPACE_ID": "someone/workbench", "WORKBENCH_PUBLIC": "0"}, False),
    ({"WORKBENCH_PUBLIC": "1"}, True),
    ({"WORKBENCH_PUBLIC": "off"}, False),
    ({}, False),
])
def test_public_mode_is_on_on_a_space_unless_forced(environ, public):
    assert Limits.from_env(environ).public is public
    assert on_space(environ) is ("SPACE_ID" in environ)


@pytest.mark.parametrize(("variable", "value"), [
    ("WORKBENCH_MAX_SAMPLES", "many"), ("WORKBENCH_JOB_SECONDS", "-5"), ("WORKBENCH_MAX_EVAL", "1.5"),
    ("WORKBENCH_PUBLIC", "maybe"),
])
def test_a_malformed_setting_names_its_variable(variable, value):
    with pytest.raises(LimitError, match=variable):
        Limits.from_env({variable: value})


def test_a_bound_refuses_above_it_never_clamps_and_names_the_variable():
    limits = Limits(max_nsamples=8)
    limits.check("max_nsamples", 8)  # at the bound is fine
    with pytest.raises(LimitError, match=r"calibration samples is 9, above this server's limit of 8.*"
                                         r"WORKBENCH_MAX_SAMPLES"):
        limits.check("max_nsamples", 9)
    with pytest.raises(LimitError, match="'all' is not allowed.*WORKBENCH_MAX_EVAL"):
        Limits(max_eval=10).check("max_eval", None)
    Limits(max_nsamples=0).check("max_nsamples", 10 ** 6)  # 0: no bound


# --- the workflow applies them ----------------------------------------------------------------


@pytest.mark.parametrize(("settings", "variable"), [
    ({"nsamples": 9, "seqlen": 32}, "WORKBENCH_MAX_SAMPLES"),
    ({"nsamples": 4, "seqlen": 65}, "WORKBENCH_MAX_SEQLEN"),
])
def test_prune_refuses_oversized_calibration_before_any_work(tiny_folder, settings, variable):
    session = bounded_session(tiny_folder, max_nsamples=8, max_seqlen=64)
    before = block_weights(session)
    config = {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5, **settings}
    assert any(variable in p for p in workflow.validate_settings(settings=config, limits=session.limits))
    with pytest.raises(LimitError, match=variable):
        workflow.run_prune(session, config)
    assert not session.is_pruned
    assert all(torch.equal(before[n], p) for n, p in block_weights(session).items())


def test_evaluation_size_and_the_full_set_are_bounded(tiny_folder):
    session = bounded_session(tiny_folder, max_eval=5)
    prune = {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5, **SMALL}
    with pytest.raises(LimitError, match="evaluation size is 6.*WORKBENCH_MAX_EVAL"):
        workflow.run_prune(session, prune, ["lambada"], 6)
    with pytest.raises(LimitError, match="'all' is not allowed"):
        workflow.run_prune(session, prune, ["lambada"], None)
    workflow.run_prune(session, prune, [], None)  # no evaluation: nothing to bound


def test_the_unbounded_python_api_is_unchanged(tiny_folder):
    session = workflow.Session()
    workflow.load(session, tiny_folder)
    outcome = workflow.run_prune(session, {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5,
                                           "nsamples": 200, "seqlen": 16})
    assert outcome.result.summary["blocks"] == pytest.approx(0.5, abs=0.01)


def test_sweep_points_samples_and_generated_tokens_are_bounded(tiny_folder):
    session = bounded_session(tiny_folder, max_sweep_points=3, max_nsamples=8, max_new_tokens=4)
    with pytest.raises(LimitError, match="sweep points is 4.*WORKBENCH_MAX_SWEEP_POINTS"):
        workflow.run_sweep(session, ["magnitude", "wanda"], [0.3, 0.5], eval_tasks=["lambada"], limit=2, **SMALL)
    with pytest.raises(LimitError, match="WORKBENCH_MAX_SAMPLES"):
        workflow.run_sweep(session, ["magnitude"], [0.3], eval_tasks=["lambada"], limit=2, nsamples=9, seqlen=32)
    with pytest.raises(LimitError, match="generated tokens is 5.*WORKBENCH_MAX_NEW_TOKENS"):
        workflow.generate(session, "ab", 5)
    assert isinstance(workflow.generate(session, "ab", 4)[0], str)


# --- the time budget ------------------------------------------------------------------------------


def _slow_after_first_block(seconds: float):
    """A progress callback that waits past the budget once the first block is done."""
    def progress(fraction: float, message: str) -> None:
        if message.startswith("Pruning") and fraction > 0:
            time.sleep(seconds)
    return progress


def test_time_budget_stops_a_prune_cleanly_and_leaves_the_dense_weights(tiny_folder):
    session = bounded_session(tiny_folder, job_seconds=1)
    dense = block_weights(session)
    with pytest.raises(TimeBudgetExceeded, match=r"time budget of 1 s.*dense again.*WORKBENCH_JOB_SECONDS"):
        workflow.run_prune(session, {"method": "sparsegpt", "pattern": "2:4", **SMALL},
                           progress=_slow_after_first_block(1.2))
    assert not session.is_pruned and not session.stop_requested
    assert all(torch.equal(dense[n], p) for n, p in block_weights(session).items())
    assert not session.limits.deadline().expired()  # every job starts a budget of its own


def test_time_budget_spent_before_the_capture_stops_it_before_any_block(tiny_folder):
    session = bounded_session(tiny_folder, job_seconds=1)
    dense = block_weights(session)
    messages = []

    def slow_capture(fraction: float, message: str) -> None:
        messages.append(message)
        if "capturing block inputs" in message:
            time.sleep(1.2)  # the budget runs out as the capture starts

    with pytest.raises(TimeBudgetExceeded, match="time budget of 1 s") as stopped:
        workflow.run_prune(session, {"method": "sparsegpt", "pattern": "2:4", **SMALL}, progress=slow_capture)
    assert "capturing the calibration inputs" in str(stopped.value.__context__)  # not "before block 0"
    assert any("capturing block inputs" in m for m in messages)
    assert not any("block 1/" in m for m in messages)  # stopped in the capture, not after a block
    assert all(torch.equal(dense[n], p) for n, p in block_weights(session).items())


def test_time_budget_ends_a_sweep_with_its_finished_points(tiny_folder):
    session = bounded_session(tiny_folder, job_seconds=1)
    dense = block_weights(session)

    def progress(fraction: float, message: str) -> None:
        if fraction > 0:  # a point is done: spend the budget
            time.sleep(1.2)

    table = workflow.run_sweep(session, ["magnitude"], [0.2, 0.4, 0.6], eval_tasks=["lambada"], limit=2,
                               progress=progress, **SMALL)
    assert 1 <= len(table) < 4
    assert "time budget" in table.attrs["stopped"] and "WORKBENCH_JOB_SECONDS" in table.attrs["stopped"]
    assert all(torch.equal(dense[n], p) for n, p in block_weights(session).items())
