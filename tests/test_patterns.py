import pytest
import torch

from workbench.patterns import (
    Pattern,
    PatternError,
    check_divides,
    check_sparsity,
    mask_from_scores,
    nm_mask,
    parse_pattern,
    unstructured_mask,
)


def scores(rows=16, cols=64, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (3, 8)])
def test_nm_mask_keeps_exactly_n_in_every_group(n, m):
    s = scores()
    mask = nm_mask(s, n, m)
    groups = mask.reshape(s.shape[0], -1, m)
    assert (groups.sum(-1) == n).all()
    # the kept ones are the N largest of each group
    s_groups = s.reshape(s.shape[0], -1, m)
    kept_min = torch.where(groups, s_groups, torch.inf).min(-1).values
    dropped_max = torch.where(~groups, s_groups, -torch.inf).max(-1).values
    assert (kept_min >= dropped_max).all()


@pytest.mark.parametrize("text,fixed", [("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75), ("3:8", 0.625)])
def test_parse_nm_fixed_sparsity(text, fixed):
    pattern = parse_pattern(text)
    assert pattern == Pattern("nm", int(text[0]), int(text[2]))
    assert str(pattern) == text
    assert pattern.fixed_sparsity == pytest.approx(fixed)
    assert not pattern.structured


def test_parse_aliases_and_unknown():
    assert parse_pattern("1x1") == Pattern("unstructured")
    assert parse_pattern(" 2 : 4 ") == Pattern("nm", 2, 4)
    assert parse_pattern("channelx1").structured
    with pytest.raises(PatternError, match="unknown pattern"):
        parse_pattern("diagonal")


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "1:1"])
def test_parse_rejects_n_not_below_m(text):
    with pytest.raises(PatternError, match="1 <= N < M"):
        parse_pattern(text)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.9, 0.999])
def test_unstructured_exact_count_per_layer(sparsity):
    s = scores(32, 48)
    mask = unstructured_mask(s, sparsity)
    assert int((~mask).sum()) == int(s.numel() * sparsity)
    # the removed ones are the smallest scores
    if sparsity:
        assert s[~mask].max() <= s[mask].min()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_unstructured_exact_count_per_row(sparsity):
    s = scores(10, 40)
    mask = unstructured_mask(s, sparsity, per_row=True)
    assert ((~mask).sum(dim=1) == int(40 * sparsity)).all()


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", None])
def test_sparsity_outside_range_is_an_error(bad):
    with pytest.raises(PatternError, match=r"outside \[0, 1\)"):
        check_sparsity(bad)
    with pytest.raises(PatternError):
        unstructured_mask(scores(), bad)


def test_nm_needs_dividing_width():
    with pytest.raises(PatternError, match="multiple of 4"):
        nm_mask(scores(4, 30), 2, 4)
    with pytest.raises(PatternError, match="does not divide model.layers.0.mlp.up_proj"):
        check_divides(Pattern("nm", 2, 8), 60, "model.layers.0.mlp.up_proj")
    check_divides(Pattern("nm", 2, 4), 60, "fine")  # 60 is a multiple of 4
    check_divides(Pattern("unstructured"), 61, "unstructured never needs it")


def test_mask_from_scores_dispatch():
    s = scores()
    assert torch.equal(mask_from_scores(s, Pattern("nm", 2, 4), 0.9), nm_mask(s, 2, 4))
    assert torch.equal(mask_from_scores(s, Pattern("unstructured"), 0.3, per_row=True),
                       unstructured_mask(s, 0.3, per_row=True))
    with pytest.raises(PatternError, match="structured"):
        mask_from_scores(s, Pattern("channel"), 0.5)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])  # numpy's selection or torch's
def test_unstructured_mask_prunes_exactly_k_among_tied_scores(sparsity, dtype):
    # few distinct values: the k-th lowest is tied with many others
    s = torch.tensor([[3.0, 1.0, 1.0, 2.0, 1.0, 0.0], [2.0, 1.0, 3.0, 1.0, 0.0, 1.0]], dtype=dtype)
    mask = unstructured_mask(s, sparsity)
    k = int(s.numel() * sparsity)
    assert int((~mask).sum()) == k
    assert s[~mask].max() <= s[mask].min()  # nothing pruned scores above anything kept
