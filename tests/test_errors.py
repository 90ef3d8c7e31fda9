"""One error contract: typed exceptions in the API, one `error:` line and exit 2 on the CLI for
what the user can fix, a logged traceback and exit 1 for bugs; and runs list survives bad runs."""

from __future__ import annotations

import errno
import json
import logging

import pytest

from workbench import cli
from workbench.arch import UnsupportedArchitectureError
from workbench.cli import main
from workbench.cli_checks import explicit_options
from workbench.errors import (
    DataError,
    ModelLoadError,
    NumericsError,
    OptionError,
    UnsupportedModelError,
    WorkbenchError,
)
from workbench.recipe import RecipeError
from workbench.runs import RunError, create_run, list_runs


def test_every_user_error_is_a_workbench_error_and_a_value_error():
    for kind in (ModelLoadError, UnsupportedModelError, DataError, NumericsError, OptionError, RecipeError,
                 RunError, UnsupportedArchitectureError):
        assert issubclass(kind, WorkbenchError) and issubclass(kind, ValueError)
    from workbench import models

    assert models.ModelLoadError is ModelLoadError


def _raise(error):
    def command(_args):
        raise error
    return command


def test_an_internal_error_prints_one_line_and_logs_the_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORKBENCH_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(cli, "cmd_runs", _raise(ZeroDivisionError("a bug")))
    assert main(["runs", "list"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: internal error (ZeroDivisionError: a bug)")
    logs = list((tmp_path / "logs").glob("error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err
    text = logs[0].read_text()
    assert "Traceback" in text and "ZeroDivisionError: a bug" in text and "runs list" in text


@pytest.mark.parametrize("error, code, text", [
    (OSError(errno.ENOSPC, "No space left on device", "/full/disk"), 2, "No space left on device: /full/disk"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro"), 2, "Permission denied: /ro"),
    (DataError("bad data\nover two lines"), 2, "bad data over two lines"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_user_errors_and_interrupts_are_one_line(monkeypatch, tmp_path, capsys, error, code, text):
    monkeypatch.setenv("WORKBENCH_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(cli, "cmd_runs", _raise(error))
    assert main(["runs", "list"]) == code
    err = capsys.readouterr().err.strip()
    assert err == f"error: {text}" or (code == 130 and err.startswith("error: interrupted"))
    assert not (tmp_path / "logs").exists()


def test_explicit_options_tell_given_from_default():
    argv = ["prune", "--method", "wanda", "--seqlen", "512"]
    given = explicit_options(cli.build_parser(), argv)
    assert {"method", "seqlen"} <= given
    assert not {"sparsity", "limit", "out", "overwrite", "data_dir"} & given


def test_options_that_do_nothing_are_refused_before_loading(capsys):
    # the model does not exist: a refusal must come before any attempt to load it
    for argv, option in [(["prune", "--model", "/no/model", "--uniform"], "--uniform"),
                         (["prune", "--model", "/no/model", "--limit", "3"], "--limit"),
                         (["prune", "--model", "/no/model", "--overwrite"], "--overwrite"),
                         (["export", "--model", "/no/model", "--name", "x", "--token-env", "T"], "--token-env")]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {option} has no effect here"), err


def test_runs_list_skips_a_run_json_of_the_wrong_shape(tmp_path, caplog, capsys):
    good = create_run(tmp_path, "prune", {"method": "wanda", "pattern": "2:4", "sparsity": 0.5})
    good.mark_done({})
    shapes = {"list": [1], "config-list": {"kind": "prune", "status": "done", "config": [1]},
              "methods-number": {"kind": "sweep", "status": "done", "config": {"methods": 5}},
              "created-number": {"kind": "prune", "status": "done", "created": 5},
              "status-dict": {"kind": "prune", "status": {}}}
    for name, meta in shapes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="workbench.runs"):
        frame = list_runs(tmp_path)
    assert list(frame["name"]) == [good.name]
    for name in shapes:
        assert f"skipping run folder {tmp_path / name}" in caplog.text
    assert main(["runs", "list", "--root", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [run["name"] for run in listed["runs"]] == [good.name]


def model_and_data_dir(tmp_path, tokenizer):
    """A tiny model folder, and a data folder whose calibration text exists nowhere else."""
    from tiny_models import tiny_model

    from workbench.data import WIKITEXT2_CALIBRATION_FILE

    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = tmp_path / "data"
    data.mkdir()
    (data / WIKITEXT2_CALIBRATION_FILE).write_text("only in this folder: a calibration text. " * 50)
    return folder, data


def test_prune_reads_calibration_from_data_dir(tmp_path, capsys, chars):
    """--data-dir holds the calibration file too (it used to be read from the default folder)."""
    from workbench.data import load_calibration

    folder, data = model_and_data_dir(tmp_path, chars)
    assert main(["prune", "--model", str(folder), "--method", "wanda", "--calib", "wikitext2",
                 "--nsamples", "2", "--seqlen", "16", "--data-dir", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = load_calibration(chars, "wikitext2", nsamples=2, seqlen=16, data_dir=data)
    assert report["calibration"]["sha256"] == expected.sha256


def test_sweep_reads_calibration_from_data_dir(tmp_path, capsys, chars):
    """The local sweep calibrates from --data-dir too, as prune does."""
    from workbench.data import load_calibration
    from workbench.runs import load_run

    folder, data = model_and_data_dir(tmp_path, chars)
    (data / "wikitext2_test.raw").write_text("some test text for perplexity windows. " * 40)
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(folder), "--methods", "wanda", "--sparsities", "0.5", "--patterns", "",
                 "--tasks", "wikitext2", "--windows", "1", "--eval-seqlen", "16", "--nsamples", "2",
                 "--seqlen", "16", "--data-dir", str(data), "--out", str(out), "--json"]) == 0
    expected = load_calibration(chars, "wikitext2", nsamples=2, seqlen=16, data_dir=data)
    assert expected.sha256 in json.dumps(load_run(out).meta)
