"""The compact format: sparse weights as values + bitmask (+ row offsets), bit for bit.

The tensor layout is that of compressed-tensors' `sparse-bitmask` / `sparse-24-bitmask`:
    <weight>.shape, .compressed (non-zero values in row order), .bitmask (packed, little-endian
    bits per row), .row_offsets (where each row starts; not in the 2:4 layout)
The installed compressed-tensors (>= 0.15) no longer ships those compressors and transformers'
compressed-tensors integration no longer reads a `sparsity_config`, hence our own reader,
`load_compact(folder)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workbench.saving import ExportError, patch_config, saveable

COMPACT_WEIGHTS = "model.compact.safetensors"
COMPACT_METADATA_KEY = "workbench.compact"
BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"


def unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor once, and {dropped name: kept name} for the rest."""
    state, aliases, seen = {}, {}, {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        state[key] = tensor.detach()
    return state, aliases


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bits as a numpy array (bf16, which numpy lacks, as int16). Numpy's boolean
    indexing is several times faster than torch's on CPU."""
    tensor = tensor.detach().to("cpu").contiguous()
    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def _from_numpy(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(dtype) if dtype == torch.bfloat16 else tensor


def _pack(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask, axis=-1, bitorder="little"))


def _unpack(bits: torch.Tensor, shape: list[int]) -> np.ndarray:
    unpacked = np.unpackbits(bits.numpy(), axis=-1, count=shape[-1], bitorder="little")
    return unpacked.reshape(shape).astype(bool)


def bitmask_encode(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Non-zero values in row order, a bitmask of their positions and where each row starts."""
    nonzero = (weight != 0).numpy()
    row_counts = torch.from_numpy(np.count_nonzero(nonzero, axis=-1).astype(np.int64))
    return {
        "shape": torch.tensor(list(weight.shape)),
        "compressed": _from_numpy(_as_numpy(weight)[nonzero], weight.dtype),
        "bitmask": _pack(nonzero),
        "row_offsets": torch.cumsum(row_counts, 0) - row_counts,
    }


def _scatter(values: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
    flat = _as_numpy(values).reshape(-1)
    dense = np.zeros(positions.shape, dtype=flat.dtype)
    dense[positions] = flat
    return _from_numpy(dense, values.dtype)


def bitmask_decode(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    shape = [int(s) for s in parts["shape"].flatten().tolist()]
    return _scatter(parts["compressed"], _unpack(parts["bitmask"], shape))


def _group_counts(nonzero: np.ndarray) -> np.ndarray:
    """Non-zeros per group of 4 consecutive row elements (four strided adds beat a reduction)."""
    groups = nonzero.reshape(nonzero.shape[0], -1, 4).view(np.uint8)
    return groups[..., 0] + groups[..., 1] + groups[..., 2] + groups[..., 3]


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive elements of a row."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        return False
    return bool((_group_counts((weight != 0).numpy()) <= 2).all())


def two_four_encode(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exactly 2 kept values per group of 4 (rows x cols/2) and the bitmask of their positions."""
    rows, cols = weight.shape
    nonzero = (weight != 0).numpy()
    # every non-zero, then the earliest zeros of groups with fewer than two: exactly two per group
    missing = 2 - _group_counts(nonzero).astype(np.int8)
    groups = nonzero.reshape(rows, -1, 4)
    keep = np.empty_like(groups)
    zeros_seen = np.zeros(missing.shape, dtype=np.int8)
    for j in range(4):
        is_zero = ~groups[..., j]
        zeros_seen += is_zero
        keep[..., j] = groups[..., j] | (is_zero & (zeros_seen <= missing))
    keep = keep.reshape(rows, cols)
    values = _as_numpy(weight)[keep].reshape(rows, cols // 2)
    return {
        "shape": torch.tensor([rows, cols]).reshape(-1, 1),
        "compressed": _from_numpy(values, weight.dtype),
        "bitmask": _pack(keep),
    }


def two_four_decode(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    shape = [int(s) for s in parts["shape"].flatten().tolist()]
    return _scatter(parts["compressed"], _unpack(parts["bitmask"], shape))


def _nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def _encode(key: str, tensor: torch.Tensor, structure: str) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(layout, {stored name: tensor}) when a compressed layout is smaller, else None."""
    if tensor.ndim != 2 or not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    dense_bytes = tensor.numel() * tensor.element_size()
    rows, cols = tensor.shape
    if structure == "2:4" and is_two_four(tensor):
        prefix = key[: -len(".weight")] if key.endswith(".weight") else key
        parts = two_four_encode(tensor)
        layout = BITMASK_24
    else:
        nonzeros = int(np.count_nonzero((tensor != 0).numpy()))
        bitmask_bytes = nonzeros * tensor.element_size() + rows * ((cols + 7) // 8 + 8)
        if bitmask_bytes >= dense_bytes:
            return None  # too dense to gain: skip the encoding work
        prefix, parts, layout = key, bitmask_encode(tensor), BITMASK
    if _nbytes(parts) >= dense_bytes:
        return None
    return layout, {f"{prefix}.{part}": value for part, value in parts.items()}


def save_compact(model: nn.Module, folder: Path, tokenizer=None, structure: str = "unstructured",
                 entry: dict | None = None) -> dict:
    """Write the compact format; returns {"compressed": n tensors, "dense": n, "global_sparsity"}.

    `structure` "2:4" stores weights that satisfy 2:4 in the `sparse-24-bitmask` layout; every
    other 2-D weight goes into the `sparse-bitmask` layout when that is smaller than dense.
    """
    from safetensors.torch import save_file

    if structure not in ("unstructured", "2:4"):
        raise ExportError(f"compact structure {structure!r} is not known; use 'unstructured' or '2:4'")
    folder.mkdir(parents=True, exist_ok=True)
    state, aliases = unique_tensors(model)
    stored: dict[str, torch.Tensor] = {}
    layouts: dict[str, str] = {}
    zeros = numel = 0
    for key, tensor in state.items():
        tensor = tensor.to("cpu").contiguous()
        encoded = _encode(key, tensor, structure)
        if encoded is None:
            stored[key] = tensor
            continue
        layouts[key], parts = encoded
        stored.update(parts)
        numel += tensor.numel()
        zeros += tensor.numel() - int(np.count_nonzero((tensor != 0).numpy()))
    info = {"version": 1, "layouts": layouts, "aliases": aliases}
    save_file(stored, str(folder / COMPACT_WEIGHTS),
              metadata={"format": "pt", COMPACT_METADATA_KEY: json.dumps(info)})
    with saveable(model):
        model.config.save_pretrained(folder)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    sparsity_config = {  # the shape of compressed-tensors' BitmaskConfig, for readers who know it
        "format": BITMASK_24 if structure == "2:4" else BITMASK,
        "global_sparsity": zeros / numel if numel else 0.0,
        "sparsity_structure": structure,
        "targets": sorted(layouts),
        "ignore": [],
    }
    patch_config(folder, {"format": "compact", "weights": COMPACT_WEIGHTS,
                           "sparsity_config": sparsity_config, **(entry or {})})
    return {"compressed": len(layouts), "dense": len(state) - len(layouts),
            "global_sparsity": sparsity_config["global_sparsity"]}


def read_compact_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The dense state dict stored in a compact folder, and its aliases (tied names)."""
    from safetensors import safe_open

    path = Path(folder) / COMPACT_WEIGHTS
    if not path.is_file():
        raise ExportError(f"{folder} holds no {COMPACT_WEIGHTS}: it is not a compact export "
                          "(a masked export loads with AutoModelForCausalLM.from_pretrained)")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    if COMPACT_METADATA_KEY not in metadata:
        raise ExportError(f"{path} has no {COMPACT_METADATA_KEY!r} metadata; re-export it")
    info = json.loads(metadata[COMPACT_METADATA_KEY])
    state = {}
    for key, layout in info["layouts"].items():
        if layout == BITMASK_24:
            prefix = key[: -len(".weight")] if key.endswith(".weight") else key
            names, decode = ("shape", "compressed", "bitmask"), two_four_decode
        elif layout == BITMASK:
            prefix, names, decode = key, ("shape", "compressed", "bitmask", "row_offsets"), bitmask_decode
        else:
            raise ExportError(f"{path}: unknown layout {layout!r} for {key}; upgrade prune-workbench")
        state[key] = decode({name: stored.pop(f"{prefix}.{name}") for name in names})
    state.update(stored)
    return state, dict(info.get("aliases") or {})


def load_compact(folder: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild the dense model from a compact export: the exact stored values, in eval mode."""
    # lazy: the Auto classes and their initialisation cost seconds of import that only loading needs
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    folder = Path(folder)
    state, aliases = read_compact_state(folder)
    config = AutoConfig.from_pretrained(folder)
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # assign: the decoded tensors become the parameters, no second copy of the weights
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if aliases and hasattr(model, "tie_weights"):
        model.tie_weights()  # assigning replaced one side of each tied pair
    params = model.state_dict()
    with torch.no_grad():  # whichever way tying went, every stored value ends up in place
        for key, tensor in state.items():
            if key in params and params[key].data_ptr() != tensor.data_ptr():
                params[key].copy_(tensor)
        for name, source in aliases.items():
            if name in params and source in state and params[name].data_ptr() != params[source].data_ptr():
                params[name].copy_(state[source])
    left = [name for name in missing if name not in aliases]
    if left or unexpected:
        raise ExportError(f"{folder}: the stored weights do not match the config "
                          f"(missing {left[:3]}, unexpected {list(unexpected)[:3]}); re-export it")
    return model.to(device).eval()


__all__ = ["BITMASK", "BITMASK_24", "COMPACT_METADATA_KEY", "COMPACT_WEIGHTS", "bitmask_decode", "bitmask_encode",
           "is_two_four", "load_compact", "read_compact_state", "save_compact", "two_four_decode",
           "two_four_encode", "unique_tensors"]
