"""Export: every format round-trips, the card tells the run's numbers, and bad destinations,
overwrites and failures leave nothing half-written."""

from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_model, token_batch

from workbench import compact
from workbench import export as ex
from workbench.compact import BITMASK, BITMASK_24, COMPACT_WEIGHTS, load_compact, read_compact_state
from workbench.export import ExportError, ExportExistsError, export_model
from workbench.prune import PruneConfig, prune
from workbench.saving import MARKER, UnsafeDestinationError, read_marker

SOURCE = {"source": "tiny-llama", "kind": "folder", "resolved": "/models/tiny-llama", "dtype": "fp32"}


def _pruned(pattern="unstructured", method="wanda", sparsity=0.5, family="llama"):
    model = tiny_model(family)
    config = PruneConfig(method=method, pattern=pattern, sparsity=sparsity, nsamples=4, seqlen=16,
                         batch_size=4)
    result = prune(model, config, calibration=token_batch(4, 16))
    return model, result


@pytest.fixture(scope="module")
def pruned():
    return _pruned()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    return tensor.view(ints[tensor.dtype]) if tensor.dtype in ints else tensor


# --- formats ------------------------------------------------------------------------------------


def test_masked_loads_with_stock_transformers_and_identical_logits(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    model, result = pruned
    exported = export_model(model, None, tmp_path, "masked", result=result, source=SOURCE)
    loaded = AutoModelForCausalLM.from_pretrained(exported.path).eval()
    ids = token_batch(2, 16, seed=3)
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    config = json.loads((exported.path / "config.json").read_text())
    # the saved config reports the measured sparsity, not 0
    assert config["workbench"]["sparsity"]["mlp"] == pytest.approx(result.summary["mlp"])
    assert config["workbench"]["sparsity"]["matmul"] == pytest.approx(result.summary["matmul"])
    assert config["workbench"]["method"] == "wanda"
    assert loaded.config.workbench["format"] == "masked"


def test_compact_round_trip_is_bit_identical_and_smaller(pruned, tmp_path):
    model, result = pruned
    exported = export_model(model, None, tmp_path, "both", formats=("masked", "compact"),
                            result=result, source=SOURCE)
    folder = exported.path / "compact"
    restored = load_compact(folder)
    original = model.state_dict()
    for key, value in restored.state_dict().items():
        assert torch.equal(value, original[key]), key
        nonzero = original[key] != 0
        # stored values keep their exact bits; zeros come back as +0.0
        assert torch.equal(_bits(value[nonzero]), _bits(original[key][nonzero])), key
    ids = token_batch(2, 16, seed=4)
    assert torch.equal(_logits(model, ids), _logits(restored, ids))
    masked_bytes = (exported.path / "model.safetensors").stat().st_size
    compact_bytes = (folder / COMPACT_WEIGHTS).stat().st_size
    assert compact_bytes < 0.75 * masked_bytes
    assert exported.sizes["compact"] < exported.sizes["masked"]
    # the compressed tensors use compressed-tensors' sparse-bitmask names
    from safetensors import safe_open

    with safe_open(str(folder / COMPACT_WEIGHTS), framework="pt") as handle:
        keys = set(handle.keys())
    name = "model.layers.0.mlp.up_proj.weight"
    assert {f"{name}.{p}" for p in ("shape", "compressed", "bitmask", "row_offsets")} <= keys
    assert name not in keys
    config = json.loads((folder / "config.json").read_text())
    assert config["workbench"]["sparsity_config"]["format"] == BITMASK
    # a stock loader refuses the compact folder rather than loading random weights
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(folder)


def test_compact_two_four_uses_the_24_layout(tmp_path):
    model, result = _pruned(pattern="2:4", method="magnitude")
    exported = export_model(model, None, tmp_path, "nm", formats=("compact",), result=result,
                            make_zip=False)
    state, aliases = read_compact_state(exported.path)
    original = model.state_dict()
    for key, value in state.items():
        assert torch.equal(value, original[key]), key
    from safetensors import safe_open

    with safe_open(str(exported.path / COMPACT_WEIGHTS), framework="pt") as handle:
        layouts = json.loads(handle.metadata()[compact.COMPACT_METADATA_KEY])["layouts"]
        compressed = handle.get_tensor("model.layers.1.mlp.down_proj.compressed")
    assert layouts["model.layers.1.mlp.down_proj.weight"] == BITMASK_24
    assert compressed.shape == (64, 64)  # down_proj is 64 x 128: half the columns kept


def test_gguf_loaded_model_exports_and_keeps_its_quantizer(tmp_path):
    """A GGUF-loaded model carries a quantizer that save_pretrained refuses; export copes and
    leaves the caller's model as it was."""
    model = tiny_model("llama")
    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method="gguf"))
    model.hf_quantizer = quantizer
    model.config.quantization_config = {"quant_method": "gguf"}
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "plain")
    exported = export_model(model, None, tmp_path, "from-gguf", formats=("masked", "compact"),
                            make_zip=False)
    assert model.hf_quantizer is quantizer
    assert model.config.quantization_config == {"quant_method": "gguf"}
    for folder in (exported.path, exported.path / "compact"):
        assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(exported.path)
    ids = token_batch(1, 8)
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_compact_round_trips_other_families(family, tmp_path):
    model, result = _pruned(family=family, method="magnitude")
    exported = export_model(model, None, tmp_path, family, formats=("compact",), result=result,
                            make_zip=False)
    restored = load_compact(exported.path)
    ids = token_batch(2, 12, seed=5)
    assert torch.equal(_logits(model, ids), _logits(restored, ids))


def test_slimmed_needs_a_structured_result(pruned, tmp_path):
    model, result = pruned
    with pytest.raises(ExportError, match="slimmed"):
        export_model(model, None, tmp_path, "slim", formats=("slimmed",), result=result)
    assert _listing(tmp_path) == []


def test_unknown_format_is_refused(pruned, tmp_path):
    model, result = pruned
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(model, None, tmp_path / "exports", "x", formats=("onnx",), result=result)
    assert not (tmp_path / "exports").exists()


# --- card, recipe, zip ----------------------------------------------------------------------


def test_model_card_holds_the_numbers_of_the_run(pruned, tmp_path):
    model, result = pruned
    evaluation = {"dense": {"lambada": {"accuracy": 0.3125, "perplexity": 41.5, "n": 16},
                            "wikitext2": {"perplexity": 30.0, "windows": 4}},
                  "sparse": {"lambada": {"accuracy": 0.25, "perplexity": 60.25, "n": 16},
                             "wikitext2": {"perplexity": 37.5, "windows": 4}}}
    exported = export_model(model, None, tmp_path, "card", result=result, evaluation=evaluation,
                            source={"source": "default", "kind": "default", "dtype": "fp32"})
    card = (exported.path / "README.md").read_text()
    assert card.startswith("---\n")
    front = card.split("---\n")[1]
    assert "library_name: transformers" in front
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in front
    assert f"| over MLP block | {result.summary['mlp']:.4f} |" in card
    assert f"{result.summary['matmul']:.4f} |" in card
    gate = result.sparsity[result.sparsity["kind"] == "gate_proj"]
    assert f"| gate_proj | {int(gate['zeros'].sum()):,} | {int(gate['numel'].sum()):,} |" in card
    assert "| 0.3125 | 0.2500 | -20.00% |" in card  # LAMBADA accuracy, dense vs pruned
    assert "| 30.0000 | 37.5000 | +25.00% |" in card  # WikiText-2 perplexity
    assert "**wanda**" in card and "pattern **unstructured**" in card
    assert "![Sparsity per block and module](sparsity_heatmap.png)" in card
    assert (exported.path / "sparsity_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "does not speed up dense matrix kernels" in card
    recipe = json.loads((exported.path / "recipe.json").read_text())
    assert recipe["prune"] == result.config.to_dict()
    assert recipe["result"]["sparsity"]["mlp"] == pytest.approx(result.summary["mlp"])
    assert {"python", "torch", "transformers", "workbench"} <= set(recipe["versions"])


def test_heatmap_figure_argument_is_saved(pruned, tmp_path):
    from matplotlib.figure import Figure

    model, result = pruned
    figure = Figure(figsize=(1, 1))
    figure.add_subplot().plot([0, 1])
    exported = export_model(model, None, tmp_path, "fig", result=result, heatmap=figure,
                            make_zip=False)
    assert (exported.path / "sparsity_heatmap.png").stat().st_size > 0


def test_zip_holds_the_whole_export(pruned, tmp_path):
    model, result = pruned
    exported = export_model(model, None, tmp_path, "zipped", formats=("masked", "compact"),
                            result=result)
    assert exported.zip_path == tmp_path.resolve() / "zipped.zip"
    with zipfile.ZipFile(exported.zip_path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    on_disk = {f"zipped/{p.relative_to(exported.path).as_posix()}": p.read_bytes() for p in exported.files}
    assert members.keys() == on_disk.keys()
    assert all(members[name] == on_disk[name] for name in on_disk)
    assert exported.sizes["zip"] == exported.zip_path.stat().st_size


# --- safety ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "/abs/path", "~/x", ".hidden", "",
                                  "a\\b", "sp ace"])
def test_bad_names_are_refused_and_nothing_is_written(pruned, tmp_path, name):
    model, result = pruned
    root = tmp_path / "exports"
    with pytest.raises(ExportError):
        export_model(model, None, root, name, result=result)
    assert not root.exists()
    assert _listing(tmp_path) == []


def test_symlink_escape_is_refused(pruned, tmp_path):
    model, result = pruned
    root, outside = tmp_path / "exports", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "evil").symlink_to(outside, target_is_directory=True)
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="symbolic link"):
            export_model(model, None, root, "evil", result=result, overwrite=overwrite)
    (root / "ok.zip").symlink_to(outside / "stolen.zip")
    with pytest.raises(ExportError, match="symbolic link"):
        export_model(model, None, root, "ok", result=result, overwrite=True)
    assert _listing(outside) == []
    assert sorted(p.name for p in root.iterdir()) == ["evil", "ok.zip"]


def test_symlinked_root_is_followed_but_checked(pruned, tmp_path):
    model, result = pruned
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    exported = export_model(model, None, tmp_path / "link", "fine", result=result, make_zip=False)
    assert exported.path == real.resolve() / "fine"
    assert (real / "fine" / "config.json").is_file()


def test_existing_export_is_not_overwritten_without_asking(pruned, tmp_path):
    model, result = pruned
    first = export_model(model, None, tmp_path, "same", result=result)
    snapshot = {p: p.read_bytes() for p in first.files}
    zip_bytes = first.zip_path.read_bytes()
    with pytest.raises(ExportExistsError, match="overwrite"):
        export_model(model, None, tmp_path, "same", formats=("compact",), result=result)
    with pytest.raises(FileExistsError):  # the UIs catch it as such
        export_model(model, None, tmp_path, "same", result=result)
    assert {p: p.read_bytes() for p in first.files} == snapshot
    assert first.zip_path.read_bytes() == zip_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same", "same.zip"]
    second = export_model(model, None, tmp_path, "same", formats=("compact",), result=result,
                          overwrite=True)
    assert (second.path / COMPACT_WEIGHTS).is_file()
    assert not (second.path / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same", "same.zip"]


@pytest.mark.parametrize("target", ["model_card", "_zip_folder", "save_compact"])
def test_failure_mid_export_leaves_nothing(pruned, tmp_path, monkeypatch, target):
    model, result = pruned

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ex, target, boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_model(model, None, tmp_path, "broken", formats=("masked", "compact"), result=result)
    assert _listing(tmp_path) == []


def test_failed_overwrite_keeps_the_old_export(pruned, tmp_path, monkeypatch):
    model, result = pruned
    first = export_model(model, None, tmp_path, "keep", result=result, make_zip=False)
    snapshot = {p: p.read_bytes() for p in first.files}

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(ex, "model_card", boom)
    with pytest.raises(RuntimeError):
        export_model(model, None, tmp_path, "keep", result=result, overwrite=True)
    kept = {p: p.read_bytes() for p in sorted(first.path.rglob("*")) if p.is_file() and p.name != MARKER}
    assert kept == snapshot and read_marker(first.path)["complete"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_disk_full_mid_export_is_a_clear_error_and_keeps_the_old_export(pruned, tmp_path, monkeypatch):
    import errno

    from workbench.saving import UnwritableDestinationError

    model, result = pruned
    first = export_model(model, None, tmp_path, "full", result=result)
    snapshot = {p: p.read_bytes() for p in [*first.files, first.zip_path]}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ex, "_zip_folder", full)
    with pytest.raises(UnwritableDestinationError, match="disk is full"):
        export_model(model, None, tmp_path, "full", result=result, overwrite=True)
    assert {p: p.read_bytes() for p in [*first.files, first.zip_path]} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "full.zip"]


def test_not_enough_disk_space_is_refused(pruned, tmp_path, monkeypatch):
    model, result = pruned
    monkeypatch.setattr(ex.shutil, "disk_usage", lambda path: SimpleNamespace(free=1024))
    with pytest.raises(ExportError, match="not enough free disk space"):
        export_model(model, None, tmp_path, "big", result=result)
    assert _listing(tmp_path) == []


def test_estimate_bounds_what_is_written(pruned, tmp_path):
    model, result = pruned
    exported = export_model(model, None, tmp_path, "est", formats=("masked", "compact"), result=result)
    assert exported.sizes["total"] + exported.sizes["zip"] <= ex.estimate_bytes(model, ["masked", "compact"], True)


# --- the hub --------------------------------------------------------------------------------


class _FakeApi:
    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, **kwargs):
        _FakeApi.calls.append(("create_repo", kwargs, self.token))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        _FakeApi.calls.append(("upload_folder", kwargs, sorted(p.name for p in folder.iterdir())))


def test_push_uses_the_token_but_never_writes_or_logs_it(pruned, tmp_path, monkeypatch, caplog):
    import huggingface_hub

    token = "hf_SeCrEt0123456789tokenvalue"
    _FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    model, result = pruned
    with caplog.at_level(logging.DEBUG):
        exported = export_model(model, None, tmp_path, "pushed", formats=("masked", "compact"),
                                result=result, push_to="someone/pruned-tiny", token=token)
    assert exported.hub_url == "https://huggingface.co/someone/pruned-tiny"
    kinds = [call[0] for call in _FakeApi.calls]
    assert kinds == ["create_repo", "upload_folder"]
    assert _FakeApi.calls[0][1]["private"] is True and _FakeApi.calls[0][2] == token
    assert "README.md" in _FakeApi.calls[1][2]
    for path in [p for p in tmp_path.rglob("*") if p.is_file()]:
        assert token.encode() not in path.read_bytes(), path
    assert token not in caplog.text
    assert all(token not in str(record.args) for record in caplog.records)


def test_push_errors_never_show_the_token(pruned, tmp_path, monkeypatch):
    import huggingface_hub

    token = "hf_AnotherSecretToken987"

    class Failing(_FakeApi):
        def create_repo(self, **kwargs):
            raise RuntimeError(f"401 Unauthorized for token {self.token}")

    monkeypatch.setattr(huggingface_hub, "HfApi", Failing)
    model, result = pruned
    exported = export_model(model, None, tmp_path, "p", result=result, make_zip=False)
    with pytest.raises(ExportError) as caught:
        ex.push_to_hub(exported.path, "someone/x", token)
    assert token not in str(caught.value) and "***" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_push_needs_a_token_and_a_valid_repo(pruned, tmp_path):
    model, result = pruned
    with pytest.raises(ExportError, match="token"):
        export_model(model, None, tmp_path, "p", result=result, push_to="someone/x")
    with pytest.raises(ExportError, match="repo id"):
        export_model(model, None, tmp_path, "p", result=result, push_to="../x", token="t")
    assert _listing(tmp_path) == []


@pytest.mark.slow
def test_bundled_model_masked_and_compact(bundled, tmp_path):
    """The bundled SmolLM2 (from GGUF): magnitude 50% on two blocks, exported and reloaded."""
    import copy

    from transformers import AutoModelForCausalLM

    from workbench.arch import describe
    from workbench.methods import magnitude
    from workbench.patterns import parse_pattern

    model = copy.deepcopy(bundled.model)
    with torch.no_grad():  # magnitude 50% on the first two blocks: the driver's loop is not the point
        for block in describe(model).blocks[:2]:
            for lin in block.linears:
                weight, keep = magnitude(lin.module.weight, None, parse_pattern("unstructured"), 0.5)
                lin.module.weight.copy_(weight * keep)
    exported = export_model(model, bundled.tokenizer, tmp_path, "smol", formats=("masked", "compact"),
                            source=bundled, make_zip=False)
    ids = bundled.tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    stock = AutoModelForCausalLM.from_pretrained(exported.path)
    assert torch.equal(_logits(model, ids), _logits(stock, ids))
    compact = load_compact(exported.path / "compact")
    assert torch.equal(_logits(model, ids), _logits(compact, ids))
    assert os.path.getsize(exported.path / "compact" / COMPACT_WEIGHTS) < os.path.getsize(
        exported.path / "model.safetensors")
    config = json.loads((exported.path / "config.json").read_text())
    from workbench.sparsity import sparsity_summary

    # counted, not 2/30 * 0.5: the dequantized 4-bit weights already hold some exact zeros
    assert config["workbench"]["sparsity"]["mlp"] == pytest.approx(sparsity_summary(stock)["mlp"])
    assert config["workbench"]["sparsity"]["mlp"] > 2 / 30 * 0.5
    assert config["tie_word_embeddings"] is True  # the tied pair is stored once and re-tied
    assert compact.lm_head.weight.data_ptr() == compact.model.embed_tokens.weight.data_ptr()


def _channel_pruned():
    model = tiny_model("llama")
    config = PruneConfig(method="retrain-free", pattern="channel", scope="mlp", sparsity=0.25,
                         nsamples=4, seqlen=16, batch_size=4)
    return model, prune(model, config, calibration=token_batch(4, 16))


@pytest.mark.parametrize("uniform", [False, True])
def test_slimmed_is_smaller_and_loads_with_the_same_logits(tmp_path, uniform):
    from transformers import AutoModelForCausalLM

    from workbench.slim import load_slimmed

    model, result = _channel_pruned()
    dense_params = sum(p.numel() for p in model.parameters())
    exported = export_model(model, None, tmp_path, "slim", formats=("slimmed", "masked"),
                            result=result, uniform=uniform, make_zip=False)
    assert sum(p.numel() for p in model.parameters()) == dense_params  # the caller's model is intact
    assert exported.sizes["slimmed"] < exported.sizes["masked"]
    ids = token_batch(2, 16, seed=6)
    reference = _logits(model, ids)
    assert torch.allclose(_logits(load_slimmed(exported.path).model, ids), reference, atol=1e-5)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(exported.path / "masked"), ids),
                       reference)
    config = json.loads((exported.path / "config.json").read_text())
    slim_info = config["workbench"]["slim"]
    assert slim_info["stock_loadable"] is uniform
    assert slim_info["parameters_after"] < slim_info["parameters_before"]
    assert config["workbench"]["sparsity"]["mlp"] == pytest.approx(result.summary["mlp"])
    card = (exported.path / "README.md").read_text()
    assert f"{slim_info['parameters_after']:,}" in card
    if uniform:
        stock = AutoModelForCausalLM.from_pretrained(exported.path)
        assert torch.allclose(_logits(stock, ids), reference, atol=1e-5)


def test_overwrite_never_replaces_a_folder_that_is_not_an_export(pruned, tmp_path):
    model, result = pruned
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(UnsafeDestinationError, match="not written by prune-workbench"):
            export_model(model, None, tmp_path, "notes", result=result, overwrite=overwrite)
    assert (precious / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
    # nor a zip of that name that is not one of ours
    (tmp_path / "taxes.zip").write_bytes(b"PK not ours")
    with pytest.raises(UnsafeDestinationError, match="not a zip of the export"):
        export_model(model, None, tmp_path, "taxes", result=result, overwrite=True)
    assert (tmp_path / "taxes.zip").read_bytes() == b"PK not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "taxes.zip"]


def test_export_carries_the_marker_but_never_zips_or_lists_it(pruned, tmp_path):
    model, result = pruned
    exported = export_model(model, None, tmp_path, "marked", result=result)
    assert read_marker(exported.path)["kind"] == "export" and read_marker(exported.path)["complete"]
    assert all(p.name != MARKER for p in exported.files)
    with zipfile.ZipFile(exported.zip_path) as archive:
        assert not [name for name in archive.namelist() if name.endswith(MARKER)]
    # an empty folder of that name is not worth an overwrite
    (tmp_path / "empty").mkdir()
    assert export_model(model, None, tmp_path, "empty", result=result, make_zip=False).path.name == "empty"


def test_zip_progress_counts_bytes_up_to_the_export_size(pruned, tmp_path, monkeypatch):
    model, result = pruned
    monkeypatch.setattr(ex, "_ZIP_CHUNK_BYTES", 4096)  # a tiny model still takes many chunks
    reports: list[tuple[float, str]] = []
    exported = export_model(model, None, tmp_path, "counted", formats=("masked", "compact"), result=result,
                            progress=lambda fraction, message: reports.append((fraction, message)))
    zipping = [(f, m) for f, m in reports if m.startswith("zipping ")]
    total_mb = f"{exported.sizes['total'] / 1e6:.0f} MB"
    assert len(zipping) > 10 and all(m.endswith(f" / {total_mb}") for _, m in zipping)
    assert zipping[-1][1] == f"zipping {total_mb.removesuffix(' MB')} / {total_mb}"
    fractions = [f for f, _ in zipping]
    assert fractions == sorted(fractions) and fractions[-1] <= 1.0


def test_zip_message_is_in_megabytes():
    assert ex.zip_message(312_000_000, 540_400_000) == "zipping 312 / 540 MB"


def test_a_stop_while_zipping_leaves_the_folder_but_no_zip(pruned, tmp_path, monkeypatch):
    model, result = pruned
    monkeypatch.setattr(ex, "_ZIP_CHUNK_BYTES", 4096)

    chunks = []

    def stop_after_three_chunks(fraction: float, message: str) -> None:
        if message.startswith("zipping "):
            chunks.append(message)
            if len(chunks) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_model(model, None, tmp_path, "halted", result=result, progress=stop_after_three_chunks)
    assert _listing(tmp_path) == []  # neither a half zip nor the folder it was being made from


def test_the_app_zips_by_default_only_up_to_its_size_threshold(pruned, monkeypatch):
    from workbench.ui import downloads

    model, _ = pruned
    size = downloads.model_bytes(model)
    assert size == sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values()) \
        + sum(b.numel() * b.element_size() for b in model.buffers())
    assert downloads.zip_by_default(model) and downloads.zip_by_default(None)
    monkeypatch.setattr(downloads, "ZIP_DEFAULT_MAX_BYTES", size - 1)
    assert not downloads.zip_by_default(model)


def test_the_status_says_which_folders_load_in_stock_transformers(pruned, tmp_path):
    from workbench.ui.downloads import folder_loaders, loaders_line

    model, result = pruned
    exported = export_model(model, None, tmp_path, "two", formats=("masked", "compact"), result=result,
                            make_zip=False)
    assert folder_loaders(exported.path) == {".": True, "compact": False}
    line = loaders_line(exported.path)
    assert line.startswith("Loads in stock transformers (`AutoModelForCausalLM.from_pretrained`): the top folder.")
    assert line.endswith("Needs workbench to load (`workbench.compact.load_compact` or "
                         "`workbench.slim.load_slimmed`): `compact/`.")


def test_a_private_link_is_the_same_file_under_an_unguessable_folder(tmp_path):
    from workbench.ui.downloads import private_link

    original = tmp_path / "exports" / "model.zip"
    original.parent.mkdir()
    original.write_bytes(b"PK zip bytes")
    cache = tmp_path / "cache"
    first, second = private_link(original, cache), private_link(original, cache)
    assert first.samefile(original) and first.read_bytes() == b"PK zip bytes"
    assert first.parent != second.parent and len(first.parent.name) >= 32
    assert first.parent.parent == cache and oct(first.parent.stat().st_mode & 0o777) == "0o700"
