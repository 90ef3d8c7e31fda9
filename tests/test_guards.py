"""Refusals that keep numbers honest: devices, positions, NaN/inf, linears left dense."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as T
from tiny_models import tiny_config, tiny_model, token_batch

from workbench.errors import NumericsError, OptionError
from workbench.guards import (
    check_device,
    check_finite_activations,
    check_finite_parameters,
    check_seqlen,
    max_positions,
)
from workbench.prune import PruneConfig, prune


def _config(method: str, **fields) -> PruneConfig:
    return PruneConfig(method=method, sparsity=0.5, nsamples=4, seqlen=16, batch_size=4, **fields)


@pytest.mark.parametrize("device", ["tpu", "gpu", "", "cuda:x"])
def test_unknown_devices_are_refused(device):
    with pytest.raises(OptionError, match="unknown device"):
        check_device(device)


def test_cpu_is_fine_and_an_absent_cuda_is_named():
    assert check_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="no CUDA device"):
            check_device("cuda")


def test_unknown_device_in_a_prune_fails_before_any_work():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OptionError, match="unknown device 'gpu'"):
        prune(model, _config("wanda", device="gpu"), calibration=token_batch(4, 16))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_positions_by_family():
    gpt2 = tiny_config("gpt2")
    gpt2.n_positions = 32
    assert max_positions(gpt2) == 32
    assert max_positions(tiny_config("llama")) == tiny_config("llama").max_position_embeddings
    assert max_positions(T.BloomConfig()) is None  # ALiBi: no position table
    check_seqlen(gpt2, 32)
    with pytest.raises(NumericsError, match="seqlen 33 is longer than the 32 positions"):
        check_seqlen(gpt2, 33)


def test_seqlen_past_the_positions_is_refused_by_the_driver(chars):
    config = tiny_config("gpt2")
    config.n_positions = 8
    model = T.AutoModelForCausalLM.from_config(config)
    with pytest.raises(NumericsError, match="positions"):
        prune(model, _config("wanda"), tokenizer=chars)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_named_before_pruning(method, value):
    model = tiny_model("llama")
    model.model.layers[1].self_attn.k_proj.weight.data[0, 0] = value
    with pytest.raises(NumericsError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight holds 1 "
                                            r"(NaN|inf) value\(s\) before pruning"):
        prune(model, _config(method), calibration=token_batch(4, 16))


def test_non_finite_activations_name_the_block_they_enter():
    model = tiny_model("llama")
    # finite weights, but block 0's MLP overflows (as fp16 models can): its output is NaN
    model.model.layers[0].mlp.register_forward_hook(lambda _module, _inputs, output: output * float("inf") * 0)
    with pytest.raises(NumericsError, match=r"entering model\.layers\.1 hold"):
        prune(model, _config("sparsegpt", exclude=r"layers\.0\."), calibration=token_batch(4, 16))


def test_checks_name_the_tensor_and_the_stage():
    layer = torch.nn.Linear(4, 3)
    check_finite_parameters(layer, "block")
    layer.weight.data[1, 2] = float("nan")
    with pytest.raises(NumericsError, match=r"block\.weight holds 1 NaN value\(s\) after pruning"):
        check_finite_parameters(layer, "block", when="after pruning")
    check_finite_activations([torch.ones(2, 3)], "model.layers.0")
    with pytest.raises(NumericsError, match="entering model.layers.4"):
        check_finite_activations([torch.ones(2, 3), torch.tensor([float("inf")])], "model.layers.4")


def test_fused_gate_up_projection_is_pruned():
    """Phi-3 keeps gate and up in one `gate_up_proj` matrix; scope 'mlp' covers it."""
    config = T.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=128, pad_token_id=0)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    result = prune(model, _config("wanda", scope="mlp"), calibration=token_batch(4, 16))
    for index in range(2):
        assert f"model.layers.{index}.mlp.gate_up_proj" in result.masks
        weight = model.model.layers[index].mlp.gate_up_proj.weight
        assert (weight == 0).float().mean().item() == pytest.approx(0.5)
    result = prune(T.AutoModelForCausalLM.from_config(config).eval(), _config("magnitude"),
                   calibration=token_batch(4, 16))
    assert {name.rsplit(".", 1)[-1] for name in result.masks} == {"qkv_proj", "o_proj", "gate_up_proj",
                                                                  "down_proj"}


def test_a_linear_of_unknown_role_is_named_in_a_warning(caplog):
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.mlp.router = torch.nn.Linear(64, 4, bias=False)  # never called: only named
    with caplog.at_level(logging.WARNING, logger="workbench.guards"):
        result = prune(model, _config("magnitude"), calibration=token_batch(4, 16))
    assert "model.layers.0.mlp.router stays dense" in caplog.text
    assert "model.layers.1.mlp.router stays dense" in caplog.text
    assert "ROLE_BY_NAME" in caplog.text
    assert not any("router" in name for name in result.masks)
