"""The compact codec: bitmask and 2:4 layouts round-trip bit for bit and pack as compressed-tensors does."""

from __future__ import annotations

import pytest
import torch

from workbench import compact
from workbench.compact import bitmask_decode, bitmask_encode, two_four_decode, two_four_encode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [13, 64, 100])
def test_bitmask_codec_round_trips(dtype, cols):
    generator = torch.Generator().manual_seed(cols)
    weight = torch.randn(7, cols, generator=generator).to(dtype)
    weight[torch.rand(7, cols, generator=generator) < 0.6] = 0
    weight[0] = 0  # an empty row
    parts = bitmask_encode(weight)
    assert parts["bitmask"].shape == (7, (cols + 7) // 8)
    assert parts["compressed"].numel() == int((weight != 0).sum())
    assert torch.equal(bitmask_decode(parts), weight)


def test_two_four_codec_round_trips_with_sparse_groups():
    weight = torch.tensor([[0.0, 1.5, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0],
                           [3.0, 0.0, 0.0, 0.0, 0.0, 4.0, 5.0, 0.0]])
    assert compact.is_two_four(weight)
    parts = two_four_encode(weight)
    assert parts["compressed"].shape == (2, 4)
    assert torch.equal(two_four_decode(parts), weight)
    assert not compact.is_two_four(torch.ones(2, 8))


def test_bitmask_matches_compressed_tensors_packing():
    helpers = pytest.importorskip("compressed_tensors.utils.helpers")
    mask = torch.rand(5, 21, generator=torch.Generator().manual_seed(0)) < 0.5
    weight = torch.where(mask, torch.ones(5, 21), torch.zeros(5, 21))
    ours = bitmask_encode(weight)["bitmask"]
    assert torch.equal(ours, helpers.pack_bitmasks(mask))
    assert torch.equal(helpers.unpack_bitmasks(ours, [5, 21]), mask)
