"""Where activations live when blocks are pruned on an accelerator (what a CPU machine can check)."""

import torch

from workbench.devices import activations_fit, place_activations


def test_activations_fit_leaves_room_for_the_block_and_its_solves():
    assert activations_fit(100, 400)
    assert not activations_fit(101, 400)
    assert not activations_fit(1, 0)


def test_cpu_work_and_machines_without_cuda_leave_activations_as_they_are():
    tensors = [torch.randn(2, 4, 8), torch.randn(2, 4, 8)]
    assert place_activations(tensors, "cpu") is tensors
    assert place_activations(tensors, torch.device("cpu")) is tensors
    store = (t for t in tensors)  # a store that is not a plain list (spilled to disk) is not touched
    assert place_activations(store, "cuda") is store
    if not torch.cuda.is_available():  # nothing is pinned: page-locking only helps copies to a GPU
        assert place_activations(tensors, "cuda") is tensors
        assert not any(t.is_pinned() for t in tensors)
    else:  # small activations fit on the GPU
        placed = place_activations(tensors, "cuda")
        assert all(t.is_cuda for t in placed)
        assert place_activations(placed, "cuda") is placed
