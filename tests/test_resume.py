"""Resumable out-of-core prunes: a prune killed with SIGKILL after block k, resumed, ends with
weights bit-identical to an uninterrupted run; the interrupted folder is never taken for a model."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as T
from tiny_models import tiny_config, token_batch

from workbench.models import load_model
from workbench.offload import IncompleteFolderError, OffloadError, is_incomplete, prune_from_disk
from workbench.prune import PruneConfig

BLOCKS = 4
IDS = token_batch(8, 16)
CONFIG = PruneConfig(method="sparsegpt", pattern="2:4", batch_size=4)

# Every prune here runs in its own process with one thread and no dynamic thread count, so that
# float summation order cannot change with the machine's load between the runs compared.
PRUNE_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, {tests!r})
    from tiny_models import token_batch
    from workbench.offload import prune_from_disk
    from workbench.prune import PruneConfig

    def kill_after(fraction, message):
        if round(fraction * {blocks}) == {kill_after}:
            os.kill(os.getpid(), signal.SIGKILL)

    prune_from_disk({source!r}, {out!r}, PruneConfig(method="sparsegpt", pattern="2:4", batch_size=4),
                    calibration=token_batch(8, 16), activations_in_memory={in_memory},
                    progress=kill_after, resume={resume})
""")
SERIAL = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}


def run_prune(source: Path, out: Path, kill_after: int | None = None, in_memory: bool = True,
              resume: bool = False) -> None:
    script = PRUNE_RUN.format(tests=str(Path(__file__).parent), source=str(source), out=str(out),
                              kill_after=kill_after, blocks=BLOCKS, in_memory=in_memory, resume=resume)
    env = {**os.environ, **SERIAL, "PYTHONPATH": str(Path(__file__).parent.parent)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    expected = 0 if kill_after is None else -signal.SIGKILL
    assert run.returncode == expected, run.stderr[-2000:]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume") / "tiny"
    config = tiny_config("llama")
    config.num_hidden_layers = BLOCKS
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def uninterrupted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    run_prune(source, out)
    return tensor_hashes(out)


def tensor_hashes(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    hashes = {}
    for name, file in index["weight_map"].items():
        with safe_open(folder / file, framework="pt") as handle:
            tensor = handle.get_tensor(name)
        hashes[name] = hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes()).hexdigest() \
            + str(tensor.dtype)
    return hashes


def kill_after_block(source: Path, out: Path, block: int, in_memory: bool = True) -> None:
    run_prune(source, out, kill_after=block, in_memory=in_memory)


@pytest.mark.parametrize(("block", "in_memory"), [(1, True), (3, False)])
def test_resume_after_sigkill_is_bit_identical(source, uninterrupted, tmp_path, block, in_memory):
    out = tmp_path / "out"
    kill_after_block(source, out, block, in_memory)
    assert is_incomplete(out)
    progress = json.loads((out / ".progress" / "progress.json").read_text())
    assert progress["done"] == block
    run_prune(source, out, in_memory=in_memory, resume=True)
    assert not is_incomplete(out)
    assert tensor_hashes(out) == uninterrupted


def test_resumed_result_reports_every_block(source, tmp_path):
    out = tmp_path / "out"
    kill_after_block(source, out, 2)
    result = prune_from_disk(source, out, CONFIG, calibration=IDS, resume=True)
    assert list(result.timings["block"]) == list(range(BLOCKS))  # the killed run's blocks included
    assert result.summary["blocks"] == 0.5


def test_interrupted_folder_is_refused(source, tmp_path):
    out = tmp_path / "out"
    kill_after_block(source, out, 2)
    with pytest.raises(IncompleteFolderError, match=r"unfinished prune \(2 of 4 blocks.*--resume"):
        load_model(str(out))
    with pytest.raises((OSError, ValueError)):  # no config.json until the last step
        T.AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(OffloadError, match="--resume"):  # a fresh start would throw the work away
        prune_from_disk(source, out, CONFIG, calibration=IDS)
    other = PruneConfig(method="wanda", pattern="2:4", batch_size=4)
    with pytest.raises(OffloadError, match="other settings"):
        prune_from_disk(source, out, other, calibration=IDS, resume=True)
    with pytest.raises(OffloadError, match="other settings"):
        prune_from_disk(source, out, CONFIG, calibration=token_batch(8, 16, seed=1), resume=True)
    with pytest.raises(OffloadError, match="cannot resume"):
        prune_from_disk(source, tmp_path / "never-started", CONFIG, calibration=IDS, resume=True)
    prune_from_disk(source, out, CONFIG, calibration=IDS, overwrite=True)  # start over on request
    assert not is_incomplete(out)
