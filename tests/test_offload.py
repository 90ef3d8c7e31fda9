"""Out-of-core prunes: blocks onloaded one at a time from the safetensors checkpoint must give
the very weights an in-memory prune gives, in the checkpoint's dtype, in a folder stock
`from_pretrained` loads."""

import json

import pytest
import torch
import transformers as T
from tiny_models import FAMILIES, tiny_config, token_batch

from workbench.memory import activations_fit, choose_offload, estimate_memory
from workbench.offload import DiskBlocks, OffloadError, prune_from_disk
from workbench.prune import PruneConfig, prune

IDS = token_batch(8, 16)


def saved(tmp_path, family="llama", dtype=torch.bfloat16, layers=3, **save_kwargs):
    torch.manual_seed(0)
    config = tiny_config(family)
    for name in ("num_hidden_layers", "n_layer"):
        if hasattr(config, name) and getattr(config, name) is not None:
            setattr(config, name, layers)
    kinds = getattr(config, "layer_types", None)
    if kinds:  # one kind per block, repeating the tiny config's pattern
        config.layer_types = [kinds[index % len(kinds)] for index in range(layers)]
    model = T.AutoModelForCausalLM.from_config(config).to(dtype)
    folder = tmp_path / f"{family}-{str(dtype)[6:]}"
    model.save_pretrained(folder, **save_kwargs)
    return folder


def in_memory(folder, config):
    model = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    result = prune(model, config, calibration=IDS)
    return model, result


def assert_same_weights(model, folder):
    reloaded = T.AutoModelForCausalLM.from_pretrained(folder)
    expected, got = model.state_dict(), reloaded.state_dict()
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize(("family", "method", "pattern"), [
    ("llama", "wanda", "unstructured"),
    ("llama", "sparsegpt", "2:4"),
    ("llama", "magnitude", "unstructured"),
    ("gpt2", "sparsegpt", "unstructured"),  # Conv1D and a tied LM head
    ("opt", "wanda", "4:8"),
])
def test_out_of_core_equals_in_memory(tmp_path, family, method, pattern):
    folder = saved(tmp_path, family)
    config = PruneConfig(method=method, pattern=pattern, sparsity=0.5, batch_size=4)
    model, expected = in_memory(folder, config)
    result = prune_from_disk(folder, tmp_path / "out", config, calibration=IDS)
    assert_same_weights(model, tmp_path / "out")
    assert result.summary == expected.summary
    pd_errors = result.errors.reset_index(drop=True)
    assert pd_errors.equals(expected.errors.reset_index(drop=True))
    assert result.masks == {}  # out of core the masks are the zeros of the written weights


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_out_of_core_like_in_memory(tmp_path, family):
    # some families store weights under other names than the model uses (GPT-NeoX: embed_out)
    folder = saved(tmp_path, family, dtype=torch.float32)
    config = PruneConfig(method="wanda", pattern="2:4", batch_size=4)
    model, _ = in_memory(folder, config)
    prune_from_disk(folder, tmp_path / "out", config, calibration=IDS)
    assert_same_weights(model, tmp_path / "out")


def test_spilled_activations_give_the_same_weights(tmp_path):
    folder = saved(tmp_path)
    config = PruneConfig(method="sparsegpt", sparsity=0.5, batch_size=2)
    model, _ = in_memory(folder, config)
    prune_from_disk(folder, tmp_path / "out", config, calibration=IDS, activations_in_memory=False)
    assert_same_weights(model, tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_checkpoint_dtype_is_kept(tmp_path, dtype):
    folder = saved(tmp_path, dtype=dtype)
    prune_from_disk(folder, tmp_path / "out", PruneConfig(method="wanda", batch_size=4), calibration=IDS)
    from safetensors import safe_open

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / "out" / file, framework="pt") as handle:
            assert handle.get_tensor(name).dtype == dtype, name
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == dtype


def test_in_memory_prune_keeps_a_low_precision_model_low_precision():
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config("llama")).to(torch.bfloat16)
    prune(model, PruneConfig(method="sparsegpt", batch_size=4), calibration=IDS)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_sharded_source_and_output_layout(tmp_path):
    folder = saved(tmp_path, layers=4, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    config = PruneConfig(method="wanda", batch_size=4)
    model, _ = in_memory(folder, config)
    out = tmp_path / "out"
    prune_from_disk(folder, out, config, calibration=IDS)
    assert_same_weights(model, out)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 5  # one per block and one for the embeddings, norm and head
    assert not (out / ".progress").exists()


def test_one_block_in_memory_at_a_time(tmp_path, monkeypatch):
    folder = saved(tmp_path, layers=4)
    loaded_counts = []
    real_fetch = DiskBlocks.fetch

    def observed(self, block, device):
        real_fetch(self, block, device)
        loaded = [b.index for b in self.layout.blocks
                  if any(p.device.type != "meta" for p in b.module.parameters())]
        loaded_counts.append(loaded)

    monkeypatch.setattr(DiskBlocks, "fetch", observed)
    prune_from_disk(folder, tmp_path / "out", PruneConfig(method="wanda", batch_size=4), calibration=IDS)
    assert loaded_counts == [[0], [1], [2], [3]]


def test_gemma3_with_layer_types_out_of_core(tmp_path):
    config = T.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "g")
    prune_config = PruneConfig(method="sparsegpt", sparsity=0.5, batch_size=4)
    model, _ = in_memory(tmp_path / "g", prune_config)
    prune_from_disk(tmp_path / "g", tmp_path / "out", prune_config, calibration=IDS)
    assert_same_weights(model, tmp_path / "out")


@pytest.mark.parametrize(("pattern", "method", "scope"), [("channel", "retrain-free", "mlp"),
                                                          ("head", "retrain-free", "attention")])
def test_structured_patterns_are_refused_with_the_workaround(tmp_path, pattern, method, scope):
    folder = saved(tmp_path)
    config = PruneConfig(method=method, pattern=pattern, scope=scope, sparsity=0.25)
    with pytest.raises(OffloadError, match="--offload none"):
        prune_from_disk(folder, tmp_path / "out", config, calibration=IDS)
    assert not (tmp_path / "out").exists()


def test_output_folder_rules(tmp_path):
    folder = saved(tmp_path)
    config = PruneConfig(method="magnitude")
    with pytest.raises(OffloadError, match="source folder"):
        prune_from_disk(folder, folder, config, calibration=IDS)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not written by prune-workbench"):
        prune_from_disk(folder, tmp_path / "foreign", config, calibration=IDS)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    prune_from_disk(folder, tmp_path / "out", config, calibration=IDS)
    with pytest.raises(ValueError, match="overwrite"):
        prune_from_disk(folder, tmp_path / "out", config, calibration=IDS)
    prune_from_disk(folder, tmp_path / "out", config, calibration=IDS, overwrite=True)


def test_memory_estimate_decides_offload_and_spill(tmp_path):
    folder = saved(tmp_path)
    config = PruneConfig(method="sparsegpt", nsamples=8, seqlen=16)
    plenty = estimate_memory(folder, config, available=64 * 2 ** 30)
    assert not plenty.offload and plenty.activations_in_memory
    assert plenty.offload_bytes < plenty.in_memory_bytes
    weights = plenty.parts["weights"]
    assert weights == sum(p.numel() for p in T.AutoModelForCausalLM.from_pretrained(folder).parameters()) * 2
    tight = estimate_memory(folder, config, available=int(plenty.in_memory_bytes * 0.9))
    assert tight.offload
    assert "onloading blocks from disk" in tight.describe()
    assert choose_offload("disk", folder, config) and not choose_offload("none", folder, config)
    with pytest.raises(ValueError, match="offload"):
        choose_offload("sometimes", folder, config)
    model = T.AutoModelForCausalLM.from_pretrained(folder)
    from workbench.arch import describe

    assert not activations_fit(describe(model), PruneConfig(nsamples=4096, seqlen=4096), available=2 ** 30)


def test_sparsegpt_estimate_counts_its_hessians(tmp_path):
    folder = saved(tmp_path)
    wanda = estimate_memory(folder, PruneConfig(method="wanda", record_error=False), available=2 ** 34)
    sparsegpt = estimate_memory(folder, PruneConfig(method="sparsegpt"), available=2 ** 34)
    assert sparsegpt.parts["statistics"] > wanda.parts["statistics"]


def test_cli_prunes_out_of_core_and_prints_the_estimate(tmp_path, capsys):
    import random

    from conftest import CHARS, char_tokenizer

    from workbench.cli import main

    folder = saved(tmp_path, layers=2)
    char_tokenizer().save_pretrained(folder)
    rng = random.Random(0)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join("".join(rng.choice(CHARS[:60]) for _ in range(80)) for _ in range(40)))
    common = ["prune", "--model", str(folder), "--method", "wanda", "--pattern", "2:4", "--calib", str(calib),
              "--nsamples", "4", "--seqlen", "32", "--dtype", "bf16"]
    assert main([*common, "--offload", "disk", "--out", str(tmp_path / "disk"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "out of core: estimated peak memory" in captured.err
    assert "s/block" in captured.err and "left" in captured.err
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["offload"] and report["summary"]["blocks"] == pytest.approx(0.5)
    assert main([*common, "--offload", "none", "--out", str(tmp_path / "memory")]) == 0
    assert "in memory: estimated peak memory" in capsys.readouterr().err
    disk = T.AutoModelForCausalLM.from_pretrained(tmp_path / "disk")
    memory = T.AutoModelForCausalLM.from_pretrained(tmp_path / "memory")
    for name, tensor in memory.state_dict().items():
        assert torch.equal(disk.state_dict()[name], tensor), name
    assert (tmp_path / "disk" / "tokenizer.json").is_file()
    assert main([*common, "--offload", "none", "--resume", "--out", str(tmp_path / "x")]) != 0
    assert "use it with --offload disk" in capsys.readouterr().err
    assert main([*common, "--offload", "disk"]) != 0
    assert "give --out FOLDER" in capsys.readouterr().err


def test_workflow_exposes_the_memory_estimate(tmp_path):
    from workbench import workflow

    folder = saved(tmp_path)
    session = workflow.Session()
    estimate = workflow.estimate_prune_memory(session, {"method": "wanda", "nsamples": 8, "seqlen": 16},
                                              source=str(folder))
    assert estimate.offload_bytes > 0 and "estimated peak memory" in estimate.describe()
    with pytest.raises(workflow.NoModelError):
        workflow.estimate_prune_memory(session, {"method": "wanda"})


def test_estimate_counts_x_t_x_whenever_the_prune_collects_it():
    # Wanda needs only input norms, but by default the error report makes the pass collect X^T X too
    from tiny_models import tiny_model

    model = tiny_model("llama")
    statistics = {record_error: estimate_memory(model, PruneConfig(method="wanda", record_error=record_error))
                  .parts["statistics"] for record_error in (None, False)}
    sparsegpt = estimate_memory(model, PruneConfig(method="sparsegpt")).parts["statistics"]
    assert statistics[None] == sparsegpt > statistics[False]


# --- channel and head patterns, scored block by block --------------------------------------


@pytest.mark.parametrize(("method", "pattern", "round_to"), [("wanda", "channel", None), ("magnitude", "head", None),
                                                             ("wanda", "channel", 48)])
def test_channels_and_heads_out_of_core_equal_in_memory_masked_and_slimmed(tmp_path, method, pattern, round_to):
    from workbench.slim import slim_model

    folder = saved(tmp_path)
    config = PruneConfig(method=method, pattern=pattern, sparsity=0.5, batch_size=4)
    model, expected = in_memory(folder, config)
    masked = prune_from_disk(folder, tmp_path / "masked", config, calibration=IDS)
    assert_same_weights(model, tmp_path / "masked")  # removed units zeroed, the same units
    assert masked.summary == expected.summary
    slimmed = slim_model(model, expected, round_to=round_to)
    result = prune_from_disk(folder, tmp_path / "slim", config, calibration=IDS, slim={"round_to": round_to})
    assert result.summary == expected.summary  # counted before the units were cut out
    assert slimmed.stock_loadable
    assert_same_weights(model, tmp_path / "slim")  # stock from_pretrained rebuilds the narrow shapes
    size = T.AutoConfig.from_pretrained(tmp_path / "slim")
    if pattern == "channel":
        assert size.intermediate_size == slimmed.sizes[0] < T.AutoConfig.from_pretrained(folder).intermediate_size
    else:
        assert size.num_key_value_heads == slimmed.sizes[0] < T.AutoConfig.from_pretrained(folder).num_key_value_heads


@pytest.mark.parametrize("uniform", [False, True])
def test_slimmed_blocks_of_different_widths(tmp_path, uniform):
    from workbench.slim import load_slimmed, slim_model

    folder = saved(tmp_path)
    config = PruneConfig(method="wanda", pattern="channel", block_sparsity=[0.25, 0.5, 0.75], batch_size=4)
    model, expected = in_memory(folder, config)
    slimmed = slim_model(model, expected, uniform=uniform)
    prune_from_disk(folder, tmp_path / "slim", config, calibration=IDS, slim={"uniform": uniform})
    assert slimmed.stock_loadable == uniform
    if uniform:
        assert_same_weights(model, tmp_path / "slim")
    loaded = load_slimmed(tmp_path / "slim").model  # per-block sizes: config.workbench_slim
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.float()), name


def test_slimming_out_of_core_is_refused_where_it_cannot_work(tmp_path):
    folder = saved(tmp_path)
    with pytest.raises(OffloadError, match="--pattern channel"):
        prune_from_disk(folder, tmp_path / "out", PruneConfig(method="wanda"), calibration=IDS, slim={})
    with pytest.raises(OffloadError, match="wanda or magnitude"):
        prune_from_disk(folder, tmp_path / "out", PruneConfig(method="retrain-free", pattern="channel",
                                                              sparsity=0.25), calibration=IDS, slim={})
    assert not (tmp_path / "out").exists()


def test_unslimmable_heads_are_refused_before_the_output_folder_is_made(tmp_path, capsys):
    from conftest import char_tokenizer

    from workbench.cli import main

    folder = saved(tmp_path, family="bloom")  # ALiBi: its heads cannot be cut out
    char_tokenizer().save_pretrained(folder)
    out = tmp_path / "out"
    command = ["prune", "--model", str(folder), "--method", "magnitude", "--pattern", "head", "--scope",
               "attention", "--sparsity", "0.5", "--offload", "disk", "--slim", "--out", str(out)]
    assert main(command) != 0
    error = capsys.readouterr().err
    assert "removing heads from bloom models is not supported" in error and "without --slim" in error
    assert not out.exists()
    # a finished model in the folder is not deleted by a refused --overwrite either
    config = PruneConfig(method="magnitude", pattern="head", scope="attention", sparsity=0.5)
    prune_from_disk(folder, out, config)
    before = sorted(path.name for path in out.iterdir())
    with pytest.raises(OffloadError, match="removing heads from bloom"):
        prune_from_disk(folder, out, config, overwrite=True, slim={})
    assert sorted(path.name for path in out.iterdir()) == before and (out / "config.json").is_file()


class Interrupted(Exception):
    pass


def stored_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / file))
    return tensors


@pytest.mark.parametrize(("config", "slim", "stop_after", "in_memory"), [
    (PruneConfig(method="wanda", pattern="channel", block_sparsity=[0.25, 0.5, 0.75], batch_size=4),
     {"round_to": 8}, 1, True),
    (PruneConfig(method="magnitude", pattern="head", scope="attention", sparsity=0.5, batch_size=4),
     {"uniform": True}, 2, False),
])
def test_resumed_slimmed_prune_equals_an_uninterrupted_one(tmp_path, config, slim, stop_after, in_memory):
    folder = saved(tmp_path)
    whole = prune_from_disk(folder, tmp_path / "whole", config, calibration=IDS, slim=slim,
                            activations_in_memory=in_memory)

    def stop(fraction, message):
        if round(fraction * 3) == stop_after and "time left known" not in message:
            raise Interrupted

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        prune_from_disk(folder, out, config, calibration=IDS, slim=slim, activations_in_memory=in_memory,
                        progress=stop)
    assert json.loads((out / ".progress" / "progress.json").read_text())["done"] == stop_after
    assert not (out / "config.json").exists()
    resumed = prune_from_disk(folder, out, config, calibration=IDS, slim=slim, activations_in_memory=in_memory,
                              resume=True)
    assert resumed.summary == whole.summary
    assert list(resumed.timings["block"]) == [0, 1, 2]
    expected_config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == expected_config
    dense = T.AutoConfig.from_pretrained(folder)
    if config.pattern == "channel":  # per-block widths, each rounded to 8
        sizes = expected_config["workbench_slim"]["sizes"]
        assert len(set(sizes)) > 1 and all(s % 8 == 0 and s < dense.intermediate_size for s in sizes)
    else:
        assert expected_config["num_key_value_heads"] < dense.num_key_value_heads
    expected, got = stored_tensors(tmp_path / "whole"), stored_tensors(out)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_sparsegpt_factor_is_freed_with_its_statistics():
    # the driver drops a layer's statistics once it is solved; a 7B down_proj's factor (0.45 GiB)
    # must not outlive them in the factor cache
    import gc
    import weakref

    from workbench.methods.sparsegpt import inverse_hessian_factor
    from workbench.stats import InputStats

    stats = InputStats(300, gram=True)
    stats.add_batch(torch.randn(500, 300))
    upper = inverse_hessian_factor(stats, 0.01).upper
    assert inverse_hessian_factor(stats, 0.01).upper is upper  # cached while the statistics live
    factor = weakref.ref(upper)
    del upper, stats
    gc.collect()
    assert factor() is None
