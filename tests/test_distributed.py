"""Data-parallel calibration: two gloo processes on this machine give the masks and weights of
one process; plus the pieces (window slices, layer owners, merging statistics) on their own."""

from __future__ import annotations

import json
import os
import random
import socket
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import char_tokenizer
from tiny_models import tiny_model, token_batch

from workbench.distributed import (
    Ranks,
    assign_owners,
    check_supported,
    local_windows,
    split_solves,
    window_range,
)
from workbench.methods import METHODS, elementwise_methods
from workbench.patterns import parse_pattern
from workbench.stats import InputStats

ROOT = Path(__file__).resolve().parents[1]
CASES = {"wanda": ("wanda", "unstructured", "all"), "sparsegpt": ("sparsegpt", "unstructured", "all"),
         "sparsegpt-2:4": ("sparsegpt", "2:4", "all"), "magnitude": ("magnitude", "unstructured", "all"),
         "wanda-channel": ("wanda", "channel", "mlp")}
WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prune_cases(folder: str, ids: torch.Tensor) -> dict:
    """Each case on a fresh copy of the saved model: masks and every pruned weight."""
    from transformers import AutoModelForCausalLM

    from workbench.prune import PruneConfig, prune

    results = {}
    for case, (method, pattern, scope) in CASES.items():
        model = AutoModelForCausalLM.from_pretrained(folder)
        # batch_size 3 splits 8 windows 3+1 per rank and 3+3+2 in one process: a different
        # summation order, as in real use
        config = PruneConfig(method=method, pattern=pattern, scope=scope,
                             sparsity=0.25 if scope == "mlp" else 0.5, batch_size=3)
        result = prune(model, config, calibration=ids)
        weights = {name: module.weight.detach().clone() for name, module in model.named_modules()
                   if f"{name}" in result.masks}
        results[case] = {"masks": result.masks, "weights": weights,
                         "errors": result.errors["error"].tolist()}
    return results


def _worker(rank: int, world: int, port: int, folder: str, ids: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_prune_cases(folder, ids), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", seed=3).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def two_ranks_and_one(saved_model, tmp_path_factory):
    """Every case pruned by two gloo ranks (both ranks' results) and by this process alone."""
    ids = token_batch(8, 32, seed=5)
    out = str(tmp_path_factory.mktemp("ranks") / "result")
    mp.spawn(_worker, args=(WORLD, _free_port(), saved_model, ids, out), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(WORLD)]
    return ranks, _prune_cases(saved_model, ids)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_single_process_masks_and_weights(two_ranks_and_one, case):
    ranks, single = two_ranks_and_one
    expected = single[case]
    assert expected["masks"] and set(expected["masks"]) == set(expected["weights"])
    for got in (ranks[0][case], ranks[1][case]):
        assert set(got["masks"]) == set(expected["masks"])
        for name, mask in expected["masks"].items():
            assert torch.equal(got["masks"][name], mask), name
            torch.testing.assert_close(got["weights"][name], expected["weights"][name], rtol=1e-4, atol=1e-5)
        # the per-layer errors come from the all-reduced X^T X: the whole set's, on every rank
        torch.testing.assert_close(torch.tensor(got["errors"]), torch.tensor(expected["errors"]),
                                   rtol=1e-3, atol=1e-6, equal_nan=True)
    # both ranks hold the very same bits (the solved layers were broadcast from their owner)
    for name in expected["masks"]:
        assert torch.equal(ranks[0][case]["weights"][name], ranks[1][case]["weights"][name])


def test_torchrun_command_line_rank0_alone_prints_and_writes(saved_model, tmp_path):
    calib = tmp_path / "calib.txt"
    # varied text: a repeated sentence makes windows that are shifted copies of each other, whose
    # singular Hessians turn float-order noise into different (equally good) 2:4 choices
    rng = random.Random(0)
    calib.write_text(" ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
                              for _ in range(600)))
    out = tmp_path / "pruned"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               "-m", "workbench", "prune", "--model", saved_model, "--method", "sparsegpt",
               "--pattern", "2:4", "--calib", str(calib), "--nsamples", "8", "--seqlen", "32",
               "--out", str(out), "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == 1, done.stdout  # rank 1 prints nothing
    assert done.stderr.count("estimated peak memory") == 1, done.stderr[-3000:]  # nor the estimate
    report = json.loads(reports[0])
    assert report["calibration"]["nsamples"] == 8  # the whole set, not one rank's share
    assert done.stdout.count("saved:") == 1

    from transformers import AutoModelForCausalLM

    from workbench.prune import PruneConfig, prune

    single = AutoModelForCausalLM.from_pretrained(saved_model)
    result = prune(single, PruneConfig(method="sparsegpt", pattern="2:4", calibration=str(calib),
                                       nsamples=8, seqlen=32), tokenizer=char_tokenizer())
    written = AutoModelForCausalLM.from_pretrained(out)
    modules = dict(written.named_modules())
    for name, mask in result.masks.items():
        assert torch.equal(modules[name].weight != 0, mask), name


# --- the pieces, in one process ------------------------------------------------------------


def test_window_slices_are_disjoint_and_cover_the_set():
    for count, world in [(8, 2), (7, 2), (10, 3), (3, 3)]:
        ranges = [window_range(count, Ranks(rank, world)) for rank in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == count
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    ids = token_batch(5, 4)
    assert torch.equal(torch.cat([local_windows(ids, Ranks(r, 2)) for r in range(2)]), ids)
    assert local_windows(ids, Ranks()) is ids
    with pytest.raises(ValueError, match="nsamples >= 4"):
        window_range(3, Ranks(0, 4))


def test_layer_owners_balance_the_work_deterministically():
    costs = [8.0, 1.0, 1.0, 4.0, 4.0, 2.0]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(load) == [10.0, 10.0]
    assert set(assign_owners([1.0] * 5, 3)) == {0, 1, 2}


def test_merged_sums_equal_the_statistics_of_all_tokens():
    """What the all-reduce adds: the running sums and counts of disjoint token sets."""
    x = torch.randn(6, 10, 300, generator=torch.Generator().manual_seed(0))
    whole = InputStats(300, gram=True)
    whole.add_batch(x)
    parts = [InputStats(300, gram=True) for _ in range(2)]
    parts[0].add_batch(x[:2])
    parts[0].add_batch(x[2:3])
    parts[1].add_batch(x[3:])
    for mine, theirs in zip(parts[0].sums(), parts[1].sums()):
        mine += theirs
    parts[0].tokens += parts[1].tokens
    assert parts[0].tokens == whole.tokens == 60
    torch.testing.assert_close(parts[0].hessian(), whole.hessian(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[0].input_norms(), whole.input_norms())
    assert torch.equal(parts[0].gram, parts[0].gram.t())


def test_single_process_split_solves_is_a_plain_loop():
    weights = [torch.randn(8, 16), torch.randn(4, 16)]
    solved = split_solves(METHODS["magnitude"].prune, weights, [None, None], parse_pattern("2:4"), 0.5)
    for weight, (new_weight, keep) in zip(weights, solved):
        assert torch.equal(new_weight, weight * keep)
        assert int(keep.sum()) == weight.numel() // 2


def test_retrain_free_is_refused_across_processes():
    check_supported("retrain-free", ranks=Ranks())  # one process: fine
    check_supported("sparsegpt", ranks=Ranks(1, 2))
    with pytest.raises(ValueError, match="single process"):
        check_supported("retrain-free", ranks=Ranks(1, 2))


@pytest.mark.parametrize("method", elementwise_methods())
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_statistics_and_methods_follow_the_weights_device(method, pattern):
    """On the meta device any tensor made on CPU by mistake fails loudly (a CPU tensor cannot
    meet a meta one), so this proves nothing in the kernels pins a device."""
    stats = InputStats(64, gram=True, device="meta")
    stats.add_batch(torch.empty(2, 5, 64, device="meta"))
    assert {stats.gram.device.type, stats.hessian().device.type, stats.input_norms().device.type} == {"meta"}
    new_weight, keep = METHODS[method].prune(torch.empty(32, 64, device="meta"), stats, parse_pattern(pattern), 0.5)
    assert new_weight.device.type == keep.device.type == "meta"
    assert keep.dtype == torch.bool and keep.shape == (32, 64)
