"""describe() maps every supported family onto blocks, linear roles and head geometry."""

from __future__ import annotations

import pytest
from tiny_models import FAMILIES, tiny_config, tiny_model
from torch import nn

from workbench.arch import UnsupportedArchitectureError, describe, in_out_features, weight_of

FUSED_QKV = {"bloom", "falcon", "mpt", "gpt2", "gpt_neox"}


def _first(config, *names):
    return next(getattr(config, n) for n in names if getattr(config, n, None) is not None)


def expected_geometry(family: str) -> dict:
    config = tiny_config(family)
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head", "n_heads")
    if family == "falcon":
        kv = config.num_kv_heads if config.new_decoder_architecture else (1 if config.multi_query else heads)
    else:
        kv = getattr(config, "num_key_value_heads", None) or heads
    if family == "mpt":
        intermediate = config.expansion_ratio * hidden
    else:
        intermediate = next(
            (getattr(config, n) for n in ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
             if getattr(config, n, None)),
            4 * hidden,
        )
    layers = _first(config, "num_hidden_layers", "n_layer", "n_layers")
    return {"hidden": hidden, "heads": heads, "kv": kv, "intermediate": intermediate, "layers": layers}


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_matches_config(family):
    model = tiny_model(family)
    layout = describe(model)
    expected = expected_geometry(family)

    assert layout.family == model.config.model_type
    assert layout.num_blocks == expected["layers"]
    assert layout.hidden_size == expected["hidden"]
    assert layout.num_heads == expected["heads"]
    assert layout.num_kv_heads == expected["kv"]
    assert layout.head_dim == expected["hidden"] // expected["heads"]
    assert layout.intermediate_size == expected["intermediate"]
    assert layout.head_name is not None

    for block in layout.blocks:
        roles = {lin.role for lin in block.linears}
        assert {"up", "down"} <= roles
        assert "o" in roles
        if family in FUSED_QKV:
            assert "qkv" in roles
        else:
            assert {"q", "k", "v"} <= roles
        assert block.select("attention") and block.select("mlp")
        assert len(block.select("attention")) + len(block.select("mlp")) == len(block.linears)
        for lin in block.linears:  # every linear found is really inside this block
            assert lin.full_name.startswith(block.name + ".")
            assert model.get_submodule(lin.full_name) is lin.module


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_shapes_follow_geometry(family):
    layout = describe(tiny_model(family))
    hidden, kv_width = layout.hidden_size, layout.num_kv_heads * layout.head_dim
    block = layout.blocks[0]
    for lin in block.by_role("down"):
        assert in_out_features(lin.module) == (layout.intermediate_size, hidden)
    for lin in block.by_role("k") + block.by_role("v"):
        assert in_out_features(lin.module) == (hidden, kv_width)
    for lin in block.by_role("qkv"):
        assert in_out_features(lin.module) == (hidden, hidden + 2 * kv_width)


def test_gpt2_conv1d_weights_are_out_by_in():
    layout = describe(tiny_model("gpt2"))
    block = layout.blocks[0]
    (qkv,) = block.by_role("qkv")
    (up,) = block.by_role("up")
    (down,) = block.by_role("down")
    (out,) = block.by_role("o")
    assert weight_of(qkv.module).shape == (3 * 64, 64)
    assert weight_of(up.module).shape == (256, 64)
    assert weight_of(down.module).shape == (64, 256)
    assert weight_of(out.module).shape == (64, 64)
    # a view, not a copy: writes through weight_of reach the parameter
    weight_of(up.module)[0, 0] = 123.0
    assert up.module.weight[0, 0] == 123.0


def test_summary_lists_prunable_linears():
    summary = describe(tiny_model("llama")).summary()
    assert summary["blocks"] == 2 and summary["heads"] == 4 and summary["kv_heads"] == 2
    assert summary["prunable_linears_per_block"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class _Config:
    model_type = "toy"
    hidden_size = 8
    num_attention_heads = 2
    num_hidden_layers = 2


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.embed = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10)


class UnknownNames(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)) for _ in range(2))


def test_model_without_blocks_is_unsupported():
    with pytest.raises(UnsupportedArchitectureError, match="no list of decoder blocks"):
        describe(NoBlocks())


def test_blocks_with_unknown_linears_name_the_fix():
    with pytest.raises(UnsupportedArchitectureError, match="ROLE_BY_NAME") as info:
        describe(UnknownNames())
    assert "attention projections" in str(info.value)



def test_fused_projections_get_roles_and_nothing_is_left_unnamed():
    """Fused q/k/v and gate/up matrices are prunable linears; every other linear is named."""
    import transformers as T

    from workbench.arch import left_dense

    phi3 = T.AutoModelForCausalLM.from_config(T.Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, pad_token_id=0))
    layout = describe(phi3)
    roles = {lin.kind: (lin.role, lin.group) for lin in layout.blocks[0].linears}
    assert roles["gate_up_proj"] == ("gate_up", "mlp") and roles["qkv_proj"] == ("qkv", "attention")
    assert left_dense(layout) == []
    for family in ("gpt2", "falcon", "gpt_neox", "bloom", "mpt"):
        layout = describe(tiny_model(family))
        assert any(lin.role == "qkv" for lin in layout.blocks[0].linears), family
        every = {path for path, module in layout.blocks[0].module.named_modules()
                 if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"}
        assert every == {lin.name for lin in layout.blocks[0].linears}, family
        assert left_dense(layout) == [], family

    model = tiny_model("llama")
    model.model.layers[1].mlp.router = nn.Linear(64, 4)
    skipped = left_dense(describe(model))
    assert [name for name, _ in skipped] == ["model.layers.1.mlp.router"]
    assert "4x64" in skipped[0][1] and "ROLE_BY_NAME" in skipped[0][1]
