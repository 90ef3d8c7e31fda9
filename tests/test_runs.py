import json
import logging

import pandas as pd
import pytest
from matplotlib.figure import Figure

from workbench.runs import RunError, compare_runs, create_run, list_runs, load_run, open_run
from workbench.saving import MARKER, read_marker


def test_run_files_roundtrip(tmp_path):
    run = create_run(tmp_path, "prune", {"method": "wanda", "sparsity": 0.5})
    assert run.status == "running"
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["kind"] == "prune" and meta["config"] == {"method": "wanda", "sparsity": 0.5}
    assert "torch" in meta["versions"] and "python" in meta["versions"]

    run.save_json("results", {"ppl": 12.5, "bad": float("nan")})
    assert run.load_json("results") == {"ppl": 12.5, "bad": None}
    table = pd.DataFrame({"block": [0, 1], "sparsity": [0.5, 0.25]})
    run.save_table("sparsity", table)
    pd.testing.assert_frame_equal(run.load_table("sparsity"), table)
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    png = run.save_figure("curve", fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run.update(data={"calibration_sha256": "abc"})
    run.mark_done({"summary": {"blocks": 0.5}})

    again = load_run(run.path)
    assert again.status == "done" and again.meta["data"]["calibration_sha256"] == "abc"
    assert again.load_json("results") == {"summary": {"blocks": 0.5}}
    assert "done" in (run.path / "log.txt").read_text()
    # nothing temporary is left behind
    assert not [p for p in run.path.iterdir() if p.name.startswith(".") and p.name != MARKER]
    assert read_marker(run.path)["kind"] == "run"  # ours: never replaced by a save


def test_bad_names_are_refused(tmp_path):
    run = create_run(tmp_path, "prune", {})
    with pytest.raises(RunError, match="bad file name"):
        run.save_json("../escape", {})


def test_failed_run_keeps_what_it_finished(tmp_path):
    run = create_run(tmp_path, "sweep", {"a": 1})
    run.save_point("p1", {"x": 1.0})
    try:
        raise RuntimeError("boom")
    except RuntimeError as err:
        run.mark_failed(err)
    again = load_run(run.path)
    assert again.status == "failed" and "boom" in again.meta["error"]
    assert again.points() == {"p1": {"x": 1.0}}
    assert "Traceback" in (run.path / "log.txt").read_text()


def test_open_run_resumes_same_config_and_refuses_another(tmp_path):
    path = tmp_path / "r"
    run = open_run(path, "sweep", {"a": 1})
    run.save_point("p", {"x": 2})
    run.mark_failed("crash")
    resumed = open_run(path, "sweep", {"a": 1})
    assert resumed.status == "running" and resumed.points() == {"p": {"x": 2}}
    with pytest.raises(RunError, match="different config"):
        open_run(path, "sweep", {"a": 2})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(RunError, match="not a run folder"):
        open_run(tmp_path / "other", "sweep", {})


def test_list_runs_reports_and_skips_corrupt_folders(tmp_path, caplog):
    good = create_run(tmp_path, "prune", {"method": "wanda", "pattern": "2:4", "sparsity": 0.5})
    good.mark_done({})
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "run.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="workbench.runs"):
        frame = list_runs(tmp_path)
    assert list(frame["name"]) == [good.name]
    assert frame.loc[0, "status"] == "done" and frame.loc[0, "method"] == "wanda"
    assert "corrupt" in caplog.text and "empty" in caplog.text
    with pytest.raises(RunError, match="corrupt"):
        load_run(corrupt)
    assert list_runs(tmp_path / "missing").empty


def test_unreadable_point_is_skipped(tmp_path, caplog):
    run = create_run(tmp_path, "sweep", {})
    run.save_point("a", {"x": 1})
    (run.path / "points" / "broken.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="workbench.runs"):
        assert run.points() == {"a": {"x": 1}}
    assert "broken.json" in caplog.text


def test_compare_runs(tmp_path):
    sweep = create_run(tmp_path, "sweep", {"methods": ["wanda"]})
    sweep.save_point("dense", {"method": "dense", "ppl": 10.0})
    sweep.save_point("w", {"method": "wanda", "ppl": 12.0})
    single = create_run(tmp_path, "prune", {"method": "magnitude"})
    single.mark_done({"summary": {"blocks": 0.5}, "wikitext2": {"perplexity": 20.0}})
    frame = compare_runs([sweep.path, single.path])
    assert len(frame) == 3
    assert set(frame["run"]) == {sweep.name, single.name}
    row = frame[frame["run"] == single.name].iloc[0]
    assert row["wikitext2/perplexity"] == 20.0 and row["summary/blocks"] == 0.5


def test_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "elsewhere"))
    run = create_run(None, "prune", {})
    assert run.path.parent == tmp_path / "elsewhere"
    assert list(list_runs()["name"]) == [run.name]
