"""Checks that refuse a prune whose numbers would be wrong: an absent device, a sequence longer
than the model's positions, NaN/inf weights or activations, and linears silently left dense."""

from __future__ import annotations

import logging

import torch
from torch import nn

from workbench.errors import NumericsError, OptionError

log = logging.getLogger(__name__)

# Config fields that bound the positions a model was trained on, by family.
_POSITION_FIELDS = ("n_positions", "max_position_embeddings", "max_seq_len", "seq_length", "n_ctx")
_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_device(device: str | torch.device) -> torch.device:
    """The device, parsed; an unknown name or a device this machine lacks is an OptionError."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in _DEVICE_TYPES:
        raise OptionError(f"unknown device {str(device)!r}: use cpu, cuda (or cuda:N) or mps")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OptionError(f"device {str(device)!r}: no CUDA device is available here; use cpu")
        if parsed.index is not None and parsed.index >= count:
            raise OptionError(f"device {str(device)!r}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(f"device {str(device)!r}: MPS is not available here; use cpu")
    if parsed.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise OptionError(f"device {str(device)!r}: no XPU device is available here; use cpu")
    return parsed


def max_positions(model_or_config) -> int | None:
    """The longest sequence the model has positions for, or None (ALiBi models, BLOOM/MPT)."""
    config = getattr(model_or_config, "config", model_or_config)
    if getattr(config, "alibi", False) or getattr(getattr(config, "attn_config", None), "alibi", False):
        return None
    for name in _POSITION_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seqlen(model_or_config, seqlen: int, option: str = "seqlen") -> None:
    """Refuse windows longer than the positions the model was trained on: learned position
    tables have no row for them (an index error), rotary ones were never trained there."""
    limit = max_positions(model_or_config)
    if limit is not None and int(seqlen) > limit:
        config = getattr(model_or_config, "config", model_or_config)
        family = getattr(config, "model_type", "this model")
        raise NumericsError(f"{option} {seqlen} is longer than the {limit} positions the model "
                            f"({family}) was trained on: use {option} {limit} or less")


def _first_bad(tensor: torch.Tensor) -> tuple[int, str] | None:
    if not tensor.is_floating_point() or tensor.device.type == "meta":  # meta: held on disk (offload)
        return None
    # A NaN or inf element always makes the sum NaN or inf, and a sum is several times cheaper
    # than isfinite().all() on CPU; only a non-finite sum (or an overflow) needs the exact look.
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return None
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return None
    bad = tensor[~finite]
    kind = "NaN" if bool(torch.isnan(bad).any()) else "inf"
    return int(bad.numel()), kind


def check_finite_parameters(module: nn.Module, prefix: str = "", when: str = "before pruning") -> None:
    """Every floating-point parameter of `module` finite, or a NumericsError naming the first."""
    for name, param in module.named_parameters():
        if param.device.type == "meta":  # not loaded: out-of-core prunes check each block as read
            continue
        found = _first_bad(param.detach())
        if found is not None:
            count, kind = found
            full = f"{prefix}.{name}" if prefix else name
            hint = ("the model file holds them: re-download or re-convert it (a bf16/fp16 overflow "
                    "when saving is a common cause)") if when == "before pruning" else \
                ("the method produced them: report this with the model and config")
            raise NumericsError(f"{full} holds {count} {kind} value(s) {when}; every result computed "
                                f"from it would be {kind}. {hint[0].upper()}{hint[1:]}")


def check_finite_activations(tensors: list[torch.Tensor], where: str) -> None:
    """Hidden states free of NaN/inf, or a NumericsError saying where they first appear."""
    for tensor in tensors:
        found = _first_bad(tensor)
        if found is not None:
            count, kind = found
            raise NumericsError(f"the hidden states entering {where} hold {count} {kind} value(s) on "
                                "the calibration batch, so its statistics and the pruned weights "
                                "would be meaningless. Check the model in fp32 (fp16 overflows), "
                                "or its weights")


def check_before_prune(model: nn.Module, layout, config, calibration) -> None:
    """Everything about (model, config) that would make a prune wrong or crash half-way."""
    from workbench.arch import left_dense

    check_device(config.device)
    if config.uses_calibration and not isinstance(calibration, torch.Tensor):
        seqlen = getattr(calibration, "seqlen", None) or config.seqlen
        check_seqlen(model, seqlen)
    check_finite_parameters(model)
    for name, reason in left_dense(layout):
        log.warning("%s stays dense: %s", name, reason)
