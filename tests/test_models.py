"""load_model: local folders, dtypes, the bundled default, and clear errors for everything else."""

from __future__ import annotations

import time

import pytest
import torch
import transformers as T
from tiny_models import tiny_model, token_batch

from workbench import models
from workbench.models import ModelLoadError, load_model, model_info, parameter_count, strip_quantizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, chars):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    model.save_pretrained(folder)
    chars.save_pretrained(folder)
    return folder, model


def test_loads_a_save_pretrained_folder(tiny_folder):
    folder, original = tiny_folder
    loaded = load_model(str(folder))
    assert loaded.kind == "folder" and loaded.source == str(folder)
    assert loaded.resolved == str(folder.resolve())
    assert loaded.dtype == "fp32" and loaded.revision is None
    assert not loaded.model.training
    batch = token_batch(2, 8)
    with torch.no_grad():
        assert torch.allclose(loaded.model(batch).logits, original(batch).logits, atol=1e-6)
    assert loaded.tokenizer("ab").input_ids == [3, 4]


@pytest.mark.parametrize("dtype", ["bf16", torch.bfloat16, "bfloat16"])
def test_bf16(tiny_folder, dtype):
    loaded = load_model(str(tiny_folder[0]), dtype=dtype)
    assert loaded.dtype == "bf16"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_unknown_dtype(tiny_folder):
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tiny_folder[0]), dtype="int3")


def test_unknown_hub_id_fails_fast_offline():
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE") as info:
        load_model("nobody-here/no-such-model")
    assert time.perf_counter() - started < 20
    message = str(info.value)
    assert "nobody-here/no-such-model" in message and "default" in message and "folder" in message


@pytest.mark.parametrize("source", ["./no/such/folder", "/no/such/model", "missing.gguf", "a/b/c"])
def test_missing_path(source):
    with pytest.raises(ModelLoadError, match="not found|no such"):
        load_model(source)


def test_empty_source():
    with pytest.raises(ModelLoadError, match="no model given"):
        load_model("  ")


def test_corrupt_gguf(tmp_path):
    junk = tmp_path / "x.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match="GGUF") as info:
        load_model(str(junk))
    assert "corrupt" in str(info.value)


def test_folder_without_config(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_folder_without_tokenizer(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(str(tmp_path))


def test_not_a_causal_lm(tmp_path):
    config = T.DistilBertConfig(vocab_size=128, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    T.AutoModel.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a causal language model") as info:
        load_model(str(tmp_path))
    assert len(str(info.value)) < 600  # not the transformers list of every supported config


def test_default_falls_back_to_the_hub_without_the_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    assert models.bundled_gguf() is None
    with pytest.raises(ModelLoadError, match="HuggingFaceTB/SmolLM2-135M"):
        load_model("default")


def test_strip_quantizer_lets_save_pretrained_work(tmp_path):
    model = tiny_model("llama")
    model.hf_quantizer = object()
    model.config.quantization_config = {"quant_method": "gguf"}
    strip_quantizer(model)
    assert model.hf_quantizer is None
    assert not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()


def test_parameter_count_and_info(tiny_folder):
    loaded = load_model(str(tiny_folder[0]))
    count = parameter_count(loaded.model)
    assert count == sum(p.numel() for p in loaded.model.parameters())
    info = model_info(loaded)
    assert info["params"] == count
    assert info["family"] == "llama" and info["blocks"] == 2 and info["kv_heads"] == 2
    assert "down_proj" in info["prunable_linears_per_block"]
    assert "unsupported" not in info


def test_info_names_why_an_architecture_is_unsupported():
    from test_arch import NoBlocks

    from workbench.models import LoadedModel

    info = model_info(LoadedModel(NoBlocks(), None, "toy", "folder", "toy", None, "fp32"))
    assert "no list of decoder blocks" in info["unsupported"]
    assert "blocks" not in info and info["class"] == "NoBlocks"


@pytest.mark.slow
def test_bundled_default(bundled):
    assert bundled.kind == "default" and bundled.source == "default"
    info = model_info(bundled)
    assert info["class"] == "LlamaForCausalLM"
    assert info["blocks"] == 30 and info["hidden_size"] == 576 and info["intermediate_size"] == 1536
    assert info["heads"] == 9 and info["kv_heads"] == 3
    assert abs(info["params"] - 134.5e6) < 0.1e6
    assert not bundled.model.training
    assert bundled.tokenizer.pad_token_id is not None


@pytest.mark.slow
def test_bundled_cached_load_is_fast(bundled):
    started = time.perf_counter()
    again = load_model("default")
    assert time.perf_counter() - started < 20  # ~1 s on an idle machine; the GGUF path takes ~35 s
    assert again.resolved == bundled.resolved
    ids = bundled.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, bundled.model(ids).logits)


def _copy_config_and_tokenizer(tiny_folder, path):
    import shutil

    path.mkdir()
    for item in tiny_folder[0].iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, path / item.name)
    return path


@pytest.mark.parametrize("weights, message", [
    (None, "no weights file"),
    (b"", "header too small"),
    ("half", "could not be loaded"),
    (b"\x00" * 8 + b"garbage", "could not be loaded"),
])
def test_missing_or_corrupt_weights_are_a_model_load_error(tiny_folder, tmp_path, weights, message):
    folder = _copy_config_and_tokenizer(tiny_folder, tmp_path / "m")
    if weights == "half":
        data = (tiny_folder[0] / "model.safetensors").read_bytes()
        weights = data[: len(data) // 2]
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(str(folder))
    assert str(folder) in str(info.value) and "re-save or re-download" in str(info.value)


def test_weights_of_another_model_are_refused_not_randomly_filled(tiny_folder, tmp_path):
    from safetensors.torch import save_file

    folder = _copy_config_and_tokenizer(tiny_folder, tmp_path / "m")
    save_file({"unrelated.weight": torch.zeros(2)}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing from its weights file"):
        load_model(str(folder))


@pytest.mark.parametrize("config", [b"{oops", b"[1]", b'{"model_type": "llama", "hidden_size": "x"}'])
def test_bad_config_json_is_a_model_load_error(tiny_folder, tmp_path, config):
    folder = _copy_config_and_tokenizer(tiny_folder, tmp_path / "m")
    (folder / "config.json").write_bytes(config)
    with pytest.raises(ModelLoadError, match="config.json cannot be used"):
        load_model(str(folder))


def test_an_encoder_is_refused_naming_its_architecture(tmp_path, chars):
    from workbench.errors import UnsupportedModelError

    bert = T.BertForMaskedLM(T.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64))
    bert.save_pretrained(tmp_path)
    chars.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="encoder model, bert \\(BertForMaskedLM\\)") as info:
        load_model(str(tmp_path))
    assert "both sides" in str(info.value)


def test_revision_of_a_local_folder_is_refused(tiny_folder):
    from workbench.errors import OptionError

    with pytest.raises(OptionError, match="revision"):
        load_model(str(tiny_folder[0]), revision="main")
