import json
import random

import pytest
import torch
from conftest import CHARS, char_tokenizer
from tiny_models import tiny_model, token_batch
from transformers import AutoModelForCausalLM

from workbench.arch import describe, weight_of
from workbench.cli import main, save_model_folder
from workbench.model_card import model_card
from workbench.prune import PruneConfig, prune
from workbench.recipe import read_recipe
from workbench.runs import load_run


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.config.max_position_embeddings = 4096
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join("".join(rng.choice(CHARS[:60]) for _ in range(80)) for _ in range(40)))
    return path


def run_cli(capsys, *argv):
    code = main(["prune", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_command_saves_a_stock_loadable_folder(tiny_folder, calib_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(capsys, "--model", tiny_folder, "--method", "wanda", "--pattern", "2:4",
                                "--calib", calib_file, "--nsamples", 4, "--seqlen", 32, "--out", out, "--json")
    assert code == 0, err
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["config"]["method"] == "wanda" and report["config"]["pattern"] == "2:4"
    assert report["summary"]["blocks"] == pytest.approx(0.5)
    assert report["calibration"]["nsamples"] == 4
    assert report["seconds"]["prune"] > 0 and report["out"] == str(out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left

    model = AutoModelForCausalLM.from_pretrained(out)
    for block in describe(model).blocks:
        for lin in block.linears:
            keep = weight_of(lin.module) != 0
            assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) <= 2).all()

    # a non-empty --out is refused without --overwrite, and left as it was
    before = sorted(p.name for p in out.iterdir())
    code, _, err = run_cli(capsys, "--model", tiny_folder, "--method", "magnitude", "--out", out)
    assert code == 2 and "error:" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == before
    code, _, err = run_cli(capsys, "--model", tiny_folder, "--method", "magnitude", "--out", out, "--overwrite")
    assert code == 0, err


def test_prune_command_evaluates_dense_then_pruned(tiny_folder, calib_file, capsys, data_dir):
    code, stdout, err = run_cli(capsys, "--model", tiny_folder, "--method", "sparsegpt", "--sparsity", 0.6,
                                "--scope", "mlp", "--calib", calib_file, "--nsamples", 4, "--seqlen", 32,
                                "--eval", "lambada,wikitext2", "--limit", 2, "--data-dir", data_dir, "--json")
    assert code == 0, err
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["summary"]["mlp"] == pytest.approx(0.6, abs=1e-3)
    assert report["summary"]["attention"] == 0.0
    dense, sparse = report["evaluation"]["dense"], report["evaluation"]["sparse"]
    assert dense["lambada"]["n"] == sparse["lambada"]["n"] == 2
    assert dense["wikitext2"]["perplexity"] != sparse["wikitext2"]["perplexity"]
    assert "relative drop" in stdout  # the seed-style comparison table


def test_prune_command_flops_budget(tiny_folder, capsys):
    code, stdout, err = run_cli(capsys, "--model", tiny_folder, "--method", "magnitude", "--pattern", "channel",
                                "--scope", "mlp", "--budget", "flops", "--sparsity", 0.1, "--seqlen", 32,
                                "--slim", "--json")  # magnitude reads no calibration: no --calib
    assert code == 0, err
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["config"]["budget"] == "flops" and report["config"]["sparsity"] == 0.1
    # tiny llama at seqlen 32: 147456 linear + 8448 attention + 16384 LM head = 172288 FLOPs per
    # token; a channel costs 384, so 10% needs 45 channels, 23 per block with uniform allocation
    assert report["slim"]["sizes"] == [128 - 23, 128 - 23]
    code, stdout, err = run_cli(capsys, "--model", tiny_folder, "--method", "magnitude", "--pattern", "channel",
                                "--scope", "mlp", "--budget", "units", "--sparsity", 0.1, "--slim", "--json")
    assert code == 0, err
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["config"]["budget"] == "units" and report["slim"]["sizes"] == [128 - 12, 128 - 12]


@pytest.mark.parametrize("argv,message", [
    (["--budget", "flops"], "budget 'flops' is for the channel/head patterns"),
    (["--pattern", "4:4"], "1 <= N < M"),
    (["--pattern", "3:5"], "does not divide"),
    (["--sparsity", "1.5"], r"outside [0, 1)"),
    (["--method", "obs"], "unknown method"),
    (["--scope", "lm_head"], "unknown scope"),
    (["--eval", "hellaswag"], "unknown task"),
])
def test_prune_command_bad_input(tiny_folder, calib_file, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    code, stdout, err = run_cli(capsys, "--model", tiny_folder, "--calib", calib_file, "--nsamples", 2,
                                "--seqlen", 16, "--out", out, *argv)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last
    assert not out.exists()


def test_saved_folder_reloads_with_identical_logits(tmp_path):
    model = tiny_model("gpt2")  # Conv1D weights and a tied LM head
    prune(model, PruneConfig(method="sparsegpt", pattern="2:4"), calibration=token_batch(4, 16))
    save_model_folder(model, char_tokenizer(), tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = token_batch(2, 12, seed=5)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_prune_records_a_run_like_the_uis(tiny_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    code, stdout, err = run_cli(capsys, "--model", tiny_folder, "--method", "magnitude", "--sparsity", 0.3, "--json")
    assert code == 0, err
    report = json.loads(stdout.strip().splitlines()[-1])
    run = load_run(report["run"])
    assert run.path.parent == tmp_path / "runs" and f"run: {run.path}" in stdout
    assert run.kind == "prune" and run.status == "done"
    assert run.config["method"] == "magnitude" and run.config["sparsity"] == 0.3
    assert run.load_json("results")["sparsity"]["blocks"] == pytest.approx(report["summary"]["blocks"])
    assert len(run.load_table("sparsity")) > 0 and (run.path / "heatmap.png").is_file()

    code, stdout, err = run_cli(capsys, "--model", tiny_folder, "--method", "magnitude", "--no-record", "--json")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["run"] is None
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]


def test_pruned_folder_carries_its_recipe_into_a_later_export(tiny_folder, calib_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(capsys, "--model", tiny_folder, "--method", "wanda", "--pattern", "2:4",
                                "--calib", calib_file, "--nsamples", 4, "--seqlen", 32, "--out", out, "--json")
    assert code == 0, err
    saved = read_recipe(out)
    assert saved.config.method == "wanda" and saved.config.pattern == "2:4"
    assert saved.model["source"] == str(tiny_folder) and saved.result["masks_sha256"]
    # the run records where the model went
    assert load_run(json.loads(stdout.strip().splitlines()[-1])["run"]).meta["out"] == str(out)

    code = main(["export", "--model", str(out), "--name", "again", "--root", str(tmp_path / "exports"),
                 "--no-zip", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    exported = tmp_path / "exports" / "again"
    assert read_recipe(exported).raw["prune"] == saved.raw["prune"]
    card = (exported / "README.md").read_text()
    assert "No prune config was recorded" not in card and "**wanda**, pattern **2:4**" in card
    title = next(line for line in card.splitlines() if line.startswith("# "))
    assert title == f"# Pruned {tiny_folder.name}"  # the model's name, not the local path


@pytest.mark.parametrize("source, name", [
    ("/home/someone/models/llama-7b", "llama-7b"),
    ("/home/someone/models/llama-7b/", "llama-7b"),
    ("C:\\models\\phi.gguf", "phi.gguf"),
    ("", "model"),
])
def test_model_card_title_is_a_name_not_a_path(source, name):
    card = model_card({"model": {"source": source, "kind": "local"}, "prune": {"method": "magnitude"}},
                      {"blocks": 0.5, "matmul": 0.5, "mlp": 0.5, "attention": 0.5})
    assert f"# Pruned {name}\n" in card
    hub = model_card({"model": {"source": "owner/name", "kind": "hub"}}, {"blocks": 0.0})
    assert "# Pruned owner/name\n" in hub


def test_out_of_core_prune_writes_its_recipe_and_records_a_run(tiny_folder, calib_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(capsys, "--model", tiny_folder, "--method", "wanda", "--pattern", "2:4",
                                "--calib", calib_file, "--nsamples", 4, "--seqlen", 32, "--offload", "disk",
                                "--out", out, "--json")
    assert code == 0, err
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["offload"] is True and report["summary"]["blocks"] == pytest.approx(0.5)
    recipe = read_recipe(out)
    assert recipe.config.method == "wanda" and recipe.model["source"] == str(tiny_folder)
    assert "masks_sha256" not in recipe.result  # the masks live in the written weights only
    run = load_run(report["run"])
    assert run.status == "done" and run.meta["offload"] is True and run.meta["out"] == str(out)
    assert run.load_json("results")["sparsity"]["blocks"] == pytest.approx(0.5)
