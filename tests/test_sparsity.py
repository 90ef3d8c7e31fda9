import pytest
import torch
import transformers as T
from tiny_models import tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from workbench.arch import describe, weight_of
from workbench.sparsity import by_block_and_kind, sparsity_summary, sparsity_table


def zero_fraction(model, fraction, seed=0, only=None):
    """Zero a random `fraction` of each block linear's weights (optionally only some roles)."""
    g = torch.Generator().manual_seed(seed)
    for block in describe(model).blocks:
        for lin in block.linears:
            if only and lin.group != only:
                continue
            w = weight_of(lin.module)
            k = int(w.numel() * fraction)
            idx = torch.randperm(w.numel(), generator=g)[:k]
            flat = w.reshape(-1) if w.is_contiguous() else None
            if flat is None:  # Conv1D: weight_of is a transposed view
                w.t().reshape(-1)[idx] = 0.0
            else:
                flat[idx] = 0.0


def independent_counts(model):
    """Zeros/elements over every matmul weight, straight from the parameters, ties counted once."""
    seen, zeros, numel = set(), 0, 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, Conv1D)) and module.weight.data_ptr() not in seen:
            seen.add(module.weight.data_ptr())
            zeros += int((module.weight == 0).sum())
            numel += module.weight.numel()
    return zeros, numel


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "opt", "gptj"])
def test_summary_matches_an_independent_count(family):
    model = tiny_model(family)
    zero_fraction(model, 0.3)
    zero_fraction(model, 0.5, seed=1, only="mlp")
    summary = sparsity_summary(model)
    zeros, numel = independent_counts(model)
    assert summary["linear_zeros"] == zeros
    assert summary["linear_numel"] == numel
    assert summary["matmul"] == pytest.approx(zeros / numel)

    state = model.state_dict()
    mlp_zeros = mlp_numel = 0
    for block in describe(model).blocks:
        for lin in block.linears:
            if lin.group == "mlp":
                w = state[f"{lin.full_name}.weight"]
                mlp_zeros += int((w == 0).sum())
                mlp_numel += w.numel()
    assert summary["mlp"] == pytest.approx(mlp_zeros / mlp_numel)

    unique = {p.data_ptr(): p for p in model.parameters()}.values()
    assert summary["parameters"] == pytest.approx(
        sum(int((p == 0).sum()) for p in unique) / sum(p.numel() for p in unique))


def test_tied_lm_head_counted_once():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    summary = sparsity_summary(model)
    table = sparsity_table(model)
    assert summary["linear_numel"] == int(table["numel"].sum()) + model.lm_head.weight.numel()


def test_table_rows_and_heatmap():
    model = tiny_model("llama")
    layout = describe(model)
    for lin in layout.blocks[1].linears:
        if lin.kind == "up_proj":
            weight_of(lin.module)[:, : weight_of(lin.module).shape[1] // 4] = 0.0
    table = sparsity_table(model, layout)
    assert len(table) == sum(len(b.linears) for b in layout.blocks)
    assert table["numel"].tolist() == (table["rows"] * table["cols"]).tolist()
    matrix = by_block_and_kind(table)
    assert matrix.shape == (2, 7)
    assert matrix.loc[1, "up_proj"] == pytest.approx(0.25)
    assert matrix.loc[0, "up_proj"] == 0.0


def test_reference_shapes_count_removed_rows_as_zeros():
    model = tiny_model("llama")
    layout = describe(model)
    up = layout.blocks[0].by_role("up")[0]
    rows, cols = weight_of(up.module).shape
    up.module.weight = nn.Parameter(up.module.weight.data[: rows // 2].clone())  # half the channels gone
    table = sparsity_table(model, layout, reference_shapes={up.full_name: (rows, cols)})
    row = table[table["name"] == up.full_name].iloc[0]
    assert row["numel"] == rows * cols and row["sparsity"] == pytest.approx(0.5)


def test_seed_definition_gptj_6b_element_wise_over_matmul():
    """The seed reports 0.0999 over the MLP block and 0.0643 element-wise over matmul for
    GPT-J-6B (10% of the 16384 MLP channels, 1638, pruned). That ratio holds only when the
    LM head (untied in GPT-J) is in the denominator."""
    hidden, inner, layers, vocab = 4096, 16384, 28, 50400
    mlp_sparsity = 1638 / inner  # 0.09998, shown truncated as 0.0999 in the seed
    attention = 4 * hidden * hidden  # q, k, v, out_proj
    mlp = 2 * hidden * inner  # fc_in, fc_out
    head = vocab * hidden
    mlp_zeros = mlp_sparsity * layers * mlp
    assert abs(mlp_zeros / (layers * (attention + mlp) + head) - 0.0643) < 5e-5
    assert abs(mlp_zeros / (layers * (attention + mlp)) - 0.0643) > 2e-3  # 0.0667 without the head

    # The same proportions at 1/32 scale, counted by sparsity_summary from real weights.
    scale = 32
    config = T.GPTJConfig(n_embd=hidden // scale, n_inner=inner // scale, n_layer=layers, n_head=4,
                          rotary_dim=8, vocab_size=vocab // scale, n_positions=64)
    model = T.GPTJForCausalLM(config)
    assert not config.tie_word_embeddings
    for block in describe(model).blocks:
        for lin in block.linears:
            if lin.group == "mlp":
                w = weight_of(lin.module)
                w.view(-1)[: round(mlp_sparsity * w.numel())] = 0.0
    summary = sparsity_summary(model)
    assert summary["mlp"] == pytest.approx(mlp_sparsity)
    assert summary["attention"] == 0.0
    assert abs(summary["matmul"] - 0.0643) < 5e-5
