import json
import random

import pytest
import torch
from conftest import CHARS, char_tokenizer
from tiny_models import tiny_model, token_batch
from transformers import AutoModelForCausalLM

from workbench.arch import describe, weight_of
from workbench.cli import main, save_model_folder
from workbench.prune import PruneConfig, prune


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
