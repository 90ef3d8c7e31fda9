"""`python -m workbench evaluate`: JSON on the last stdout line, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from workbench.cli import build_parser, emit_json, main, split_list


def test_split_list():
    assert split_list(["lambada,wikitext2", "lambada", " lambada-last-token "]) == [
        "lambada", "wikitext2", "lambada-last-token"]
    assert split_list(None) == []


def test_emit_json_is_one_line(capsys):
    emit_json({"a": 1.5, "b": float("nan"), "c": [1, float("inf")], "d": {"e": (2, 3)}})
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert json.loads(out) == {"a": 1.5, "b": None, "c": [1, None], "d": {"e": [2, 3]}}


def test_parser_has_evaluate():
    args = build_parser().parse_args(["evaluate", "--task", "lambada", "--limit", "3", "--json"])
    assert args.command == "evaluate" and args.limit == 3 and args.json and args.model == "default"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--task", "mmlu"], "unknown task"),
        (["evaluate", "--model", "./no/such/folder", "--task", "lambada"], "no such model"),
        (["evaluate", "--model", "nobody-here/nothing", "--task", "lambada"], "hub"),
    ],
)
def test_bad_input_is_one_error_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_bad_argument_value_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["evaluate", "--limit", "0"])
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_module_entry_point_reports_errors():
    done = subprocess.run([sys.executable, "-m", "workbench", "evaluate", "--task", "nope"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: unknown task")


@pytest.mark.slow
def test_evaluate_json_on_bundled_model(capsys, bundled, data_dir):
    code = main(["evaluate", "--model", "default", "--task", "lambada,lambada-last-token", "--limit", "4",
                 "--data-dir", str(data_dir), "--json"])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    assert report["model"] == "default" and report["dtype"] == "fp32" and report["limit"] == 4
    assert set(report["results"]) == {"lambada", "lambada-last-token"}
    assert report["results"]["lambada"]["n"] == 4
    assert 0.0 <= report["results"]["lambada"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_evaluate_table_on_bundled_model(capsys, bundled, data_dir):
    assert main(["evaluate", "--task", "wikitext2", "--limit", "1", "--seqlen", "128",
                 "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "wikitext2" in out and "perplexity" in out


def test_budgeted_sweep_from_the_command_line(tmp_path, capsys, data_dir):
    from test_workflow import save_tiny

    from workbench.runs import load_run

    folder = save_tiny(tmp_path / "tiny")
    out = tmp_path / "run"
    code = main(["sweep", "--model", folder, "--methods", "magnitude", "--sparsities", "0.3,0.9", "--patterns", "",
                 "--tasks", "wikitext2", "--limit", "16", "--eval-seqlen", "24", "--nsamples", "4", "--seqlen", "16",
                 "--data-dir", str(data_dir), "--budget", "40", "--first", "4", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert [row["method"] for row in report["rows"]] == ["dense", "magnitude", "magnitude"]
    assert all(4 <= row["items"] <= 16 for row in report["rows"])
    assert report["items_used"] == sum(row["items"] for row in report["rows"]) <= 40
    run = load_run(out)
    assert report["run"] == str(out) and run.kind == "budgeted-sweep" and run.status == "done"
    assert run.config["budget"] == 40 and run.config["first"] == 4
    assert run.load_json("budget")["items_used"] == report["items_used"]


@pytest.mark.parametrize("argv, message", [
    (["--first", "4"], "--first has no effect here"),
    (["--budget", "40", "--windows", "4"], "--windows has no effect here"),
    (["--budget", "40", "--backend", "ray"], "a budgeted sweep runs in this process"),
])
def test_budgeted_sweep_bad_options(tmp_path, capsys, argv, message):
    assert main(["sweep", "--out", str(tmp_path / "run"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_prune_method_help_names_every_method():
    # the parser avoids importing torch (and so METHODS) to stay fast: its help text is written
    # out by hand, and this keeps it equal to the methods the workbench has
    import re

    from workbench.methods import METHODS

    prune_parser = build_parser()._subparsers._group_actions[0].choices["prune"]
    help_text = next(a.help for a in prune_parser._actions if "--method" in a.option_strings)
    named = set(re.findall(r"[a-z][a-z-]+", help_text)) - {"or", "and"}
    assert named == set(METHODS)
