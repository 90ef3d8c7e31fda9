"""Where calibration activations live while blocks are pruned on an accelerator.

The model stays on CPU (or on disk); one block at a time moves to the working device. The
activations between blocks go to that device too when they fit beside the block's working set,
otherwise they stay in CPU memory, page-locked ("pinned") so each micro-batch's copy to the
device is a fast DMA. Pinning only happens when CUDA is present: it means nothing on CPU.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Inputs and outputs of a block are both alive during its re-run, and the block's fp32 weights,
# its statistics (X^T X per input width) and the solver's temporaries need room too.
_ACTIVATION_SHARE = 0.25


def activations_fit(activation_bytes: int, free_bytes: int) -> bool:
    """True when two copies of the activations (a block's inputs and outputs) take at most a
    quarter of the device's free memory each, leaving the rest for the block and its solves."""
    return activation_bytes <= _ACTIVATION_SHARE * free_bytes


def _free_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def place_activations(tensors, device: str | torch.device):
    """`tensors` (a list of micro-batch activations) moved to the CUDA `device` when they fit,
    else pinned in CPU memory. Anything else is returned as it is: CPU devices, machines without
    CUDA, and activation stores that are not plain lists (spilled to disk)."""
    target = torch.device(device)
    if target.type != "cuda" or not torch.cuda.is_available() or type(tensors) is not list or not tensors:
        return tensors
    if target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if all(t.device == target for t in tensors):
        return tensors
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    if activations_fit(nbytes, _free_bytes(target)):
        log.debug("activations (%.1f MiB) kept on %s", nbytes / 2**20, target)
        return [t.to(target, non_blocking=True) for t in tensors]
    log.debug("activations (%.1f MiB) kept in pinned CPU memory", nbytes / 2**20)
    return [t if t.device.type == "cpu" and t.is_pinned() else t.cpu().pin_memory() for t in tensors]
