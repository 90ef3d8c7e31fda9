"""Physical removal of pruned MLP channels and attention heads: a really smaller, faster model.

    slim = slim_model(model, result)  # result: a channel/head PruneResult (or its .structure)
    save_slimmed(slim.model, tokenizer, "out/")
    loaded = load_slimmed("out/")

Removed units become narrower nn.Linear / Conv1D layers. Blocks may keep different numbers of
units (the Fisher search allocates globally); `round_to` rounds every block's count up to a
multiple (e.g. 32, friendlier to matmul kernels) and `uniform` pads every block to the largest
count. Padding re-adds removed units, whose weights are zero, so the output is unchanged.
When every block has one size and the family's config can express it, the config is rewritten
(e.g. `intermediate_size`) and stock `AutoModelForCausalLM.from_pretrained` loads the folder;
otherwise the per-block sizes are recorded in `config.workbench_slim` and `load_slimmed`
rebuilds the exact shapes.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from workbench.arch import ModelLayout, describe, weight_of
from workbench.saving import save_folder
from workbench.structured import BlockGeometry, Structure, StructureError, apply_unit_mask, model_geometry

log = logging.getLogger(__name__)

SLIM_KEY = "workbench_slim"  # config attribute holding per-block sizes when they are not stock
# Families whose attention infers the head count from the projection width (or whose count
# attribute is fixed here); ALiBi models (BLOOM, MPT) carry per-head slopes and are left out.
HEAD_SLIM_FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2", "gptj", "gpt_neox")
INTERMEDIATE_ATTRS = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size")
HEAD_COUNT_ATTRS = ("num_heads", "n_heads", "num_attention_heads")


@dataclass
class SlimResult:
    model: nn.Module = field(repr=False)
    kind: str  # "channel" or "head"
    sizes: list[int]  # per block: kept units (channels, or heads/KV groups) after rounding
    reference_shapes: dict[str, tuple[int, int]]  # full linear name -> dense (out, in)
    stock_loadable: bool  # config rewritten; stock from_pretrained rebuilds the shapes
    parameters_before: int
    parameters_after: int

    @property
    def uniform(self) -> bool:
        return len(set(self.sizes)) == 1


def _structure_of(result) -> Structure:
    structure = getattr(result, "structure", result)
    if isinstance(structure, dict):
        structure = Structure.from_dict(structure)
    if not isinstance(structure, Structure):
        raise StructureError(
            "nothing to slim: pass the result of a channel or head prune (PruneResult.structure); "
            "element-wise sparsity (unstructured, N:M) cannot be removed physically"
        )
    return structure


def _parameter_count(model: nn.Module) -> int:
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel()
    return total


def final_sizes(structure: Structure, round_to: int | None = None,
                uniform: bool = False) -> list[int]:
    """Kept units per block after rounding up to a multiple of `round_to` and/or padding."""
    sizes = [rounded_size(len(k), n, round_to) for k, n in zip(structure.kept, structure.num_units)]
    if uniform:
        sizes = [max(sizes)] * len(sizes)
    return sizes


def rounded_size(kept: int, units: int, round_to: int | None) -> int:
    """`kept` rounded up to a multiple of `round_to` (at most `units`)."""
    if not round_to:
        return kept
    if round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to}")
    return min(math.ceil(kept / round_to) * round_to, units)


def pad_keep(keep: torch.Tensor, size: int) -> torch.Tensor:
    """`keep` with the first removed units re-added until `size` are kept (their weights are zero)."""
    keep = keep.clone()
    extra = size - int(keep.sum())
    if extra > 0:
        keep[torch.nonzero(~keep).flatten()[:extra]] = True
    return keep


def _padded_keep(structure: Structure, block: int, size: int) -> torch.Tensor:
    return pad_keep(structure.keep_mask(block), size)


def _narrowed(module: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Module:
    """A copy of a linear keeping the given output rows / input columns (index tensors)."""
    weight = weight_of(module)
    if rows is not None:
        weight = weight[rows]
    if cols is not None:
        weight = weight[:, cols]
    bias = module.bias.data if getattr(module, "bias", None) is not None else None
    if bias is not None and rows is not None:
        bias = bias[rows]
    out_f, in_f = weight.shape
    if isinstance(module, Conv1D):
        new = Conv1D(out_f, in_f)
        new.weight.data = weight.t().contiguous()
    else:
        new = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device,
                        dtype=weight.dtype)
        new.weight.data = weight.contiguous()
    if bias is not None:
        new.bias.data = bias.clone()
    return new.to(device=weight.device, dtype=weight.dtype)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def _slice_block(layout: ModelLayout, geometry: BlockGeometry, keep: torch.Tensor) -> None:
    """Replace every linear the block's units touch by its narrowed copy."""
    block = layout.blocks[geometry.block]
    for part in geometry.parts:
        index = torch.nonzero(part.keep_along_axis(keep)).flatten()
        index = index.to(weight_of(part.linear.module).device)
        rows, cols = (index, None) if part.axis == 0 else (None, index)
        new = _narrowed(part.linear.module, rows, cols)
        _replace(block.module, part.linear.name, new)
        part.linear.module = new
    if geometry.kind == "head":
        attention_path = geometry.output.linear.name.rpartition(".")[0]
        attention = block.module.get_submodule(attention_path)
        heads = int(keep.sum()) * geometry.heads_per_unit
        for attr in HEAD_COUNT_ATTRS:
            if isinstance(getattr(attention, attr, None), int):
                setattr(attention, attr, heads)
        for attr in ("num_key_value_heads", "num_kv_heads"):
            if isinstance(getattr(attention, attr, None), int) and geometry.heads_per_unit > 1:
                setattr(attention, attr, int(keep.sum()))
        if isinstance(getattr(attention, "split_size", None), int):  # GPT-2's q|k|v split
            attention.split_size = heads * layout.head_dim


def _check_slimmable(layout: ModelLayout, kind: str) -> None:
    if kind == "head" and layout.family not in HEAD_SLIM_FAMILIES:
        raise StructureError(
            f"removing heads from {layout.family} models is not supported (ALiBi or fused layouts "
            f"carry per-head state); supported: {', '.join(HEAD_SLIM_FAMILIES)}. The masked model "
            "(heads zeroed) still works"
        )


def _stock_config(model: nn.Module, layout: ModelLayout, kind: str, size: int,
                  heads_per_unit: int):
    """A copy of the config whose stock model has exactly `model`'s shapes, or None."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, SLIM_KEY):
        delattr(config, SLIM_KEY)
    if kind == "channel":
        attrs = [a for a in INTERMEDIATE_ATTRS if hasattr(config, a)]
        if not attrs:
            return None
        setattr(config, attrs[0], size)
    else:
        config.num_attention_heads = size * heads_per_unit
        if heads_per_unit > 1 or hasattr(config, "num_key_value_heads"):
            if not hasattr(config, "num_key_value_heads"):
                return None
            config.num_key_value_heads = size
        if hasattr(config, "head_dim"):
            config.head_dim = layout.head_dim
    try:
        with torch.device("meta"):
            reference = AutoModelForCausalLM.from_config(config)
    except Exception as error:  # the family's config refuses these sizes
        log.info("stock config does not express the slimmed sizes: %s", error)
        return None
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return config if expected == actual else None


def _apply_sizes(layout: ModelLayout, geometries: list[BlockGeometry],
                 keeps: list[torch.Tensor]) -> None:
    for geometry, keep in zip(geometries, keeps):
        if not bool(keep.all()):
            _slice_block(layout, geometry, keep)


@torch.no_grad()
def slim_model(model: nn.Module, result, round_to: int | None = None,
               uniform: bool = False) -> SlimResult:
    """Remove the pruned channels or heads of `model` in place (see the module docstring).

    `result` is a `PruneResult` of a channel/head prune or its `Structure`. `round_to` applies to
    channels (heads are few); `uniform` gives every block the same size.
    """
    structure = _structure_of(result)
    layout = describe(model)
    _check_slimmable(layout, structure.kind)
    if len(structure.kept) != layout.num_blocks:
        raise StructureError(f"the structure covers {len(structure.kept)} blocks but the model has "
                             f"{layout.num_blocks}; slim the model that was pruned")
    geometries = model_geometry(layout, structure.kind)
    for geometry, units in zip(geometries, structure.num_units):
        if geometry.num_units != units:
            raise StructureError(f"block {geometry.block} has {geometry.num_units} "
                                 f"{geometry.unit}s but the structure expects {units}; was this "
                                 "model already slimmed?")
    sizes = final_sizes(structure, round_to if structure.kind == "channel" else None, uniform)
    before = _parameter_count(model)
    reference_shapes = {p.linear.full_name: tuple(weight_of(p.linear.module).shape)
                        for g in geometries for p in g.parts}
    keeps = []
    for geometry, size in zip(geometries, sizes):
        apply_unit_mask(geometry, structure.keep_mask(geometry.block))  # removed units are zero
        keeps.append(_padded_keep(structure, geometry.block, size))
    _apply_sizes(layout, geometries, keeps)

    stock = set_slim_config(model, layout, structure.kind, sizes, structure.heads_per_unit)
    after = _parameter_count(model)
    log.info("slimmed %s: %d -> %d parameters (%s)", structure.kind, before, after,
             "stock config" if stock else "per-block sizes in config.workbench_slim")
    return SlimResult(model, structure.kind, sizes, reference_shapes, stock, before, after)


def set_slim_config(model: nn.Module, layout: ModelLayout, kind: str, sizes: list[int],
                    heads_per_unit: int) -> bool:
    """Give `model` (already slimmed to `sizes`; a meta-device skeleton will do) the config that
    describes it: the family's stock config when every block has one size and the config can
    express it (returns True: stock from_pretrained loads it), else the per-block sizes recorded
    in `config.workbench_slim` (for `load_slimmed`)."""
    stock = None
    if len(set(sizes)) == 1:
        stock = _stock_config(model, layout, kind, sizes[0], heads_per_unit)
    if stock is not None:
        model.config = stock
    else:
        setattr(model.config, SLIM_KEY, {"kind": kind, "sizes": list(sizes), "heads_per_unit": heads_per_unit})
    return stock is not None


def slim_skeleton(model: nn.Module, kind: str, sizes: list[int]) -> None:
    """Narrow a meta-device skeleton's blocks to `sizes` units (shapes only, as `load_slimmed`
    rebuilds them), so its config can be checked against the shapes of a slimmed checkpoint."""
    layout = describe(model)
    geometries = model_geometry(layout, kind)
    keeps = []
    for geometry, size in zip(geometries, sizes):
        keep = torch.zeros(geometry.num_units, dtype=torch.bool)
        keep[:size] = True
        keeps.append(keep)
    _apply_sizes(layout, geometries, keeps)


def slice_block(layout: ModelLayout, geometry: BlockGeometry, keep: torch.Tensor) -> None:
    """Narrow one block in place to the units `keep` marks (see `slim_model`)."""
    _check_slimmable(layout, geometry.kind)
    if not bool(keep.all()):
        _slice_block(layout, geometry, keep)


# --- saving and loading --------------------------------------------------------------------


def write_slimmed(model: nn.Module, tokenizer, folder: str | Path) -> None:
    """`save_pretrained` the slimmed model (and tokenizer) into `folder`, as it is."""
    from workbench.models import strip_quantizer

    strip_quantizer(model)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_slimmed(model: nn.Module, tokenizer, folder: str | Path, overwrite: bool = False) -> Path:
    """Save into `folder` through `workbench.saving`: atomic, and only over a folder of ours."""
    return save_folder(folder, lambda tmp: write_slimmed(model, tokenizer, tmp), "model", overwrite)


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{folder} holds no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for file in bins:
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def load_slimmed(folder: str | Path, dtype: str | torch.dtype = "fp32", device: str = "cpu"):
    """Load a slimmed folder (stock or per-block sizes) as a `workbench.models.LoadedModel`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from workbench.models import LoadedModel, dtype_name, dtype_of

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; give a folder written by "
                                "save_slimmed (or save_pretrained)")
    torch_dtype = dtype_of(dtype)
    config = AutoConfig.from_pretrained(folder)
    spec = getattr(config, SLIM_KEY, None)
    if spec is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    else:
        # Stock loading with its key renames fills everything whose shape is stock; the
        # narrowed linears are then rebuilt at their recorded sizes and read by name.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the expected size mismatches are not news
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype,
                                                         ignore_mismatched_sizes=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        layout = describe(model)
        kind, sizes = spec["kind"], [int(s) for s in spec["sizes"]]
        if len(sizes) != layout.num_blocks:
            raise StructureError(f"{folder}: {SLIM_KEY} lists {len(sizes)} blocks but the config "
                                 f"builds {layout.num_blocks}")
        geometries = model_geometry(layout, kind)
        keeps = []
        for g, size in zip(geometries, sizes):
            keep = torch.zeros(g.num_units, dtype=torch.bool)
            keep[:size] = True  # placeholder positions: the weights are read next
            keeps.append(keep)
        _apply_sizes(layout, geometries, keeps)
        state = _read_state_dict(folder)
        with torch.no_grad():
            for geometry in geometries:
                for part in geometry.parts:
                    for pname, param in part.linear.module.named_parameters():
                        key = f"{part.linear.full_name}.{pname}"
                        if key not in state or tuple(state[key].shape) != tuple(param.shape):
                            raise StructureError(
                                f"{folder}: {key} is missing or does not have the recorded "
                                f"shape {tuple(param.shape)}; the folder is not a slimmed save")
                        param.copy_(state[key].to(param.dtype))
    model = model.to(device)
    model.eval()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        log.info("no tokenizer in %s: %s", folder, error)
    return LoadedModel(model, tokenizer, str(folder), "folder", str(folder), None,
                       dtype_name(torch_dtype))
