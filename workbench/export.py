"""Export a pruned model as a complete artefact: weights, recipe, model card, heatmap, zip.

    exports/smollm2-sparsegpt-50/
      config.json, model.safetensors, tokenizer*    the first format asked for (stock-loadable)
      compact/ or masked/ or slimmed/               each further format in its own folder
      recipe.json                                   everything needed to prune the same way again
      README.md                                     model card (HF YAML front matter)
      sparsity.csv, sparsity_heatmap.png            counted sparsity per layer, as a figure
    exports/smollm2-sparsegpt-50.zip                the same files in one download

Formats:
- masked: `save_pretrained` safetensors; stock `AutoModelForCausalLM.from_pretrained` loads it.
- compact: sparse weights as values + bitmask (+ row offsets), the tensor layout of
  compressed-tensors' `sparse-bitmask` / `sparse-24-bitmask`; `load_compact(folder)` reads it.
  The installed compressed-tensors (>= 0.15) no longer ships those compressors and transformers'
  compressed-tensors integration no longer reads a `sparsity_config`, hence our own reader.
- slimmed: channels/heads physically removed through `workbench.slim`.

Safety: the destination is a plain name inside the export root (no `..`, no absolute paths, no
symbolic links), an existing export is replaced only with `overwrite=True`, and everything is
written into a temporary folder inside the root and renamed at the end, so a failure leaves no
half-written export behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workbench import __version__
from workbench.model_card import model_card
from workbench.recipe import RECIPE_FILE, make_recipe, source_info, write_recipe
from workbench.sparsity import sparsity_summary, sparsity_table

log = logging.getLogger(__name__)

FORMATS = ("masked", "compact", "slimmed")
COMPACT_WEIGHTS = "model.compact.safetensors"
COMPACT_METADATA_KEY = "workbench.compact"
BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
HEATMAP_FILE = "sparsity_heatmap.png"
TABLE_FILE = "sparsity.csv"
CARD_FILE = "README.md"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+@=-]*")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SLACK_BYTES = 64 * 2**20  # tokenizer, config, card, figure, and filesystem overhead


class ExportError(ValueError):
    """An export cannot be written; the message names the problem and the fix."""


class ExportExistsError(ExportError, FileExistsError):
    """The destination already holds an export and overwrite was not asked for."""


@dataclass
class ExportResult:
    path: Path  # the export folder
    files: list[Path]  # every file in it, absolute
    zip_path: Path | None  # the single-file download, beside the folder
    sizes: dict[str, int] = field(default_factory=dict)  # bytes per format, "total", "zip"
    hub_url: str | None = None


# --- where to write --------------------------------------------------------------------------


def check_name(name: str) -> str:
    """An export name is one plain folder name: letters, digits and _ . + @ = - only."""
    if not isinstance(name, str) or not name.strip():
        raise ExportError("the export needs a name: a plain folder name such as 'smollm2-50'")
    if os.path.isabs(name) or name.startswith(("~", "\\")):
        raise ExportError(f"export name {name!r} is an absolute path; give a plain folder name and "
                          "choose the location with the export root")
    if "/" in name or "\\" in name or ".." in name:
        raise ExportError(f"export name {name!r} contains a path ('/', '\\' or '..'); give a plain "
                          "folder name, exports always go directly inside the export root")
    if not _NAME.fullmatch(name):
        raise ExportError(f"export name {name!r} has characters that are not allowed; use letters, "
                          "digits and _ . + @ = - (not starting with a dot)")
    return name


def _inside(path: Path, root: Path) -> bool:
    return path.parent == root and path.resolve().parent == root


def export_destination(root: str | Path, name: str, overwrite: bool = False,
                       make_zip: bool = True) -> tuple[Path, Path, Path | None]:
    """(resolved root, export folder, zip path), after every check; creates only the root."""
    check_name(name)
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise ExportError(f"export root {root} is a file, not a folder; choose a folder")
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve(strict=True)
    dest = root / name
    zip_path = root / f"{name}.zip" if make_zip else None
    for path in filter(None, (dest, zip_path)):
        if path.is_symlink():
            raise ExportError(f"{path} is a symbolic link; exports never write through links. "
                              "Remove the link or choose another name")
        if not _inside(path, root):
            raise ExportError(f"{path} resolves outside the export root {root}; choose another name")
        if path.exists() and not overwrite:
            raise ExportExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to "
                                    "replace it, or choose another name")
    if dest.exists() and (not dest.is_dir() or not (dest / RECIPE_FILE).is_file()):
        raise ExportError(f"{dest} exists and is not an export (no {RECIPE_FILE}); it is never "
                          "replaced. Remove it yourself or choose another name")
    return root, dest, zip_path


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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


def estimate_bytes(model: nn.Module, formats: Sequence[str], make_zip: bool) -> int:
    """An upper bound of what the export writes: each format at most the dense size, zip again."""
    state, _ = _unique_tensors(model)
    dense = sum(t.numel() * t.element_size() for t in state.values())
    total = dense * len(formats) + _SLACK_BYTES
    return total * 2 if make_zip else total


def check_free_space(root: Path, needed: int) -> None:
    free = shutil.disk_usage(root).free
    if free < needed:
        raise ExportError(f"not enough free disk space in {root}: the export needs about "
                          f"{needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free. Free some "
                          "space, choose another export root, or export fewer formats or without zip")


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths)


# --- masked: the dense layout -----------------------------------------------------------------


@contextmanager
def saveable(model: nn.Module) -> Iterator[nn.Module]:
    """Let `save_pretrained` accept a model loaded from GGUF, and put its quantizer back after.

    A dequantized GGUF model still carries a quantizer and `quantization_config`; transformers
    refuses to save it until both are gone. The caller's model is left as it was.
    """
    from workbench.models import strip_quantizer

    config = getattr(model, "config", None)
    missing = object()
    quantizer = getattr(model, "hf_quantizer", None)
    quant_config = getattr(config, "quantization_config", missing) if config is not None else missing
    is_quantized = model.__dict__.get("is_quantized", missing)
    strip_quantizer(model)
    try:
        yield model
    finally:
        if quantizer is not None:
            model.hf_quantizer = quantizer
        if quant_config is not missing:
            config.quantization_config = quant_config
        if is_quantized is not missing:
            model.__dict__["is_quantized"] = is_quantized


def _sparsity_entry(summary: dict) -> dict:
    keys = ("mlp", "attention", "blocks", "matmul", "parameters", "by_kind")
    return {k: summary[k] for k in keys if k in summary}


def _patch_config(folder: Path, entry: dict) -> None:
    """Add a `workbench` entry to config.json, so the saved config says how sparse the model is."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["workbench"] = entry
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_masked(model: nn.Module, folder: Path, tokenizer=None, entry: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with saveable(model):
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    _patch_config(folder, {"format": "masked", **(entry or {})})


# --- compact: values + bitmask ----------------------------------------------------------------


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
    state, aliases = _unique_tensors(model)
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
    _patch_config(folder, {"format": "compact", "weights": COMPACT_WEIGHTS,
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


@contextmanager
def _no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise, just slower
        yield
        return
    with no_init_weights():
        yield


def load_compact(folder: str | Path, device: str = "cpu") -> nn.Module:
    """Rebuild the dense model from a compact export: the exact stored values, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    state, aliases = read_compact_state(folder)
    config = AutoConfig.from_pretrained(folder)
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    with _no_init():
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


# --- slimmed ------------------------------------------------------------------------------------


def _slim_module():
    try:
        from workbench import slim
    except ImportError:
        return None
    return slim


def _check_slimmed(result) -> None:
    if _slim_module() is None:
        raise ExportError("the 'slimmed' format needs workbench.slim, which this build does not "
                          "have; export 'masked' or 'compact' instead")
    if getattr(result, "structure", None) is None:
        pattern = str(getattr(getattr(result, "config", None), "pattern", "") or "none")
        raise ExportError("the 'slimmed' format removes pruned channels or heads: it needs the result "
                          f"of a channel or head prune (got pattern {pattern!r}); export 'masked' or "
                          "'compact' for element-wise sparsity")


def save_slimmed_format(model: nn.Module, result, folder: Path, tokenizer=None,
                        round_to: int | None = None, uniform: bool = False,
                        entry: dict | None = None) -> dict:
    """Slim a copy of `model` (the caller keeps its own) and save it; returns what slimming did."""
    import copy

    slim = _slim_module()
    slimmed = slim.slim_model(copy.deepcopy(model), result, round_to=round_to, uniform=uniform)
    try:
        with saveable(slimmed.model):
            slim.save_slimmed(slimmed.model, tokenizer, folder, overwrite=True)
        table = sparsity_table(slimmed.model, reference_shapes=slimmed.reference_shapes)
        summary = sparsity_summary(slimmed.model, table=table, reference_shapes=slimmed.reference_shapes)
        info = {"kind": slimmed.kind, "sizes": list(slimmed.sizes),
                "stock_loadable": bool(slimmed.stock_loadable),
                "parameters_before": int(slimmed.parameters_before),
                "parameters_after": int(slimmed.parameters_after)}
    finally:
        del slimmed
    _patch_config(folder, {**(entry or {}), "format": "slimmed", "slim": info,
                           "sparsity": _sparsity_entry(summary)})
    return info


# --- the export ---------------------------------------------------------------------------------


def _zip_folder(folder: Path, zip_path: Path, arcroot: str) -> None:
    # Weights and images hardly deflate; storing them keeps zipping as fast as copying.
    with zipfile.ZipFile(zip_path, "w", allowZip64=True) as archive:
        for path in sorted(_files(folder)):
            stored = path.suffix in (".safetensors", ".png", ".bin")
            archive.write(path, f"{arcroot}/{path.relative_to(folder).as_posix()}",
                          compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)


def _heatmap_figure(heatmap, table):
    if heatmap is not None:
        return heatmap
    try:
        from workbench.plots import sparsity_heatmap
    except ImportError:
        return None
    return sparsity_heatmap(table) if not table.empty else None


def _evaluation_json(evaluation: dict | None) -> dict | None:
    return json.loads(json.dumps(evaluation, default=str)) if evaluation else None


def export_model(model: nn.Module, tokenizer, root: str | Path, name: str,
                 formats: Sequence[str] = ("masked",), result=None, evaluation: dict | None = None,
                 source=None, overwrite: bool = False, make_zip: bool = True, heatmap=None, *,
                 push_to: str | None = None, token: str | None = None, private: bool = True,
                 round_to: int | None = None, uniform: bool = False, recipe: dict | None = None,
                 progress: Callable[[float, str], None] | None = None) -> ExportResult:
    """Write `model` as `root/name` in the given formats, with recipe, model card and zip.

    `result`: the PruneResult (its config and calibration go into the recipe and card).
    `evaluation`: {"dense": evaluate(...), "sparse": evaluate(...)} or one evaluate() dict.
    `source`: where the model came from (a LoadedModel, `model_info(...)` dict, or a string).
    `heatmap`: a matplotlib Figure; by default `workbench.plots.sparsity_heatmap` draws one.
    `recipe`: a recipe dict to record when there is no `result` (e.g. the one of an earlier
    export being converted to another format).
    `push_to` + `token`: also upload the export to that hub repo (private unless told). The
    token is used for that call only; it is never logged nor written into the export.
    """
    def step(fraction: float, message: str) -> None:
        log.info(message)
        if progress is not None:
            progress(fraction, message)

    formats = list(dict.fromkeys(str(f).strip().lower() for f in formats))
    unknown = [f for f in formats if f not in FORMATS]
    if not formats or unknown:
        raise ExportError(f"unknown export format(s) {unknown or formats}: choose from {', '.join(FORMATS)}")
    if "slimmed" in formats:
        _check_slimmed(result)
    if push_to is not None:
        _check_repo_id(push_to)
        if not token:
            raise ExportError("pushing to the hub needs a token with write access (token=...); it "
                              "is used for the upload only and written nowhere")
    root, dest, zip_path = export_destination(root, name, overwrite, make_zip)
    check_free_space(root, estimate_bytes(model, formats, make_zip))

    table = sparsity_table(model)
    summary = sparsity_summary(model, table=table)
    if result is not None or not recipe:
        recipe = make_recipe(result, source)
    config = recipe.get("prune") or {}
    entry = {"version": __version__, "sparsity": _sparsity_entry(summary),
             "method": config.get("method"), "pattern": config.get("pattern"),
             "target_sparsity": config.get("sparsity")}
    structure = "2:4" if str(config.get("pattern")) == "2:4" else "unstructured"

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    tmp_zip = None
    backup = None
    placed = False
    sizes: dict[str, int] = {}
    folders: dict[str, dict] = {}
    try:
        for index, fmt in enumerate(formats):
            folder = tmp if index == 0 else tmp / fmt
            before = _files(tmp)
            step(index / (len(formats) + 2), f"writing the {fmt} format")
            extra = {}
            if fmt == "masked":
                save_masked(model, folder, tokenizer, entry)
            elif fmt == "compact":
                save_compact(model, folder, tokenizer, structure, entry)
            else:
                extra = save_slimmed_format(model, result, folder, tokenizer, round_to, uniform, entry)
            sizes[fmt] = _bytes(_files(tmp) - before)
            folders[fmt] = {"folder": "." if index == 0 else fmt, "bytes": sizes[fmt],
                            **(extra if fmt == "slimmed" else {})}

        step(len(formats) / (len(formats) + 2), "writing recipe, sparsity table and model card")
        table.to_csv(tmp / TABLE_FILE, index=False)
        figure = _heatmap_figure(heatmap, table)
        if figure is not None:
            from workbench.plots import RENDER_LOCK  # matplotlib rendering is not thread-safe

            with RENDER_LOCK:
                figure.savefig(tmp / HEATMAP_FILE, format="png", dpi=100, bbox_inches="tight")
        if evaluation:
            (tmp / "evaluation.json").write_text(json.dumps(_evaluation_json(evaluation), indent=2) + "\n",
                                                 encoding="utf-8")
        write_recipe(tmp / RECIPE_FILE, recipe)
        card = model_card(recipe, summary, table, evaluation, folders,
                          HEATMAP_FILE if figure is not None else None)
        (tmp / CARD_FILE).write_text(card, encoding="utf-8")

        if zip_path is not None:
            step((len(formats) + 1) / (len(formats) + 2), "zipping")
            fd, tmp_zip_name = tempfile.mkstemp(prefix=f".{name}.zip.tmp-", dir=root)
            os.close(fd)
            tmp_zip = Path(tmp_zip_name)
            _zip_folder(tmp, tmp_zip, name)

        if dest.exists():  # overwrite was checked: keep the old export until the new one is in place
            backup = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root)) / name
            dest.rename(backup)
        tmp.rename(dest)
        placed = True
        if tmp_zip is not None:
            os.replace(tmp_zip, zip_path)
            tmp_zip = None
    except BaseException:
        shutil.rmtree(dest if placed else tmp, ignore_errors=True)
        if tmp_zip is not None:
            tmp_zip.unlink(missing_ok=True)
        if backup is not None and backup.exists():
            backup.rename(dest)
        raise
    finally:
        if backup is not None:
            shutil.rmtree(backup.parent, ignore_errors=True)

    stale_zip = root / f"{name}.zip"
    if zip_path is None and overwrite and stale_zip.is_file() and not stale_zip.is_symlink():
        stale_zip.unlink()  # it held the export just replaced
    files = sorted(_files(dest))
    sizes["total"] = _bytes(files)
    if zip_path is not None:
        sizes["zip"] = zip_path.stat().st_size
    exported = ExportResult(path=dest, files=files, zip_path=zip_path, sizes=sizes)
    step(1.0, f"exported {', '.join(formats)} to {dest} ({sizes['total'] / 2**20:.1f} MiB)")
    if push_to is not None:
        exported.hub_url = push_to_hub(dest, push_to, token, private=private)
    return exported


# --- the hub --------------------------------------------------------------------------------------


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise ExportError(f"hub repo id {repo_id!r} is not valid; use 'owner/name'")


def push_to_hub(folder: str | Path, repo_id: str, token: str, private: bool = True,
                commit_message: str = "Upload pruned model (prune-workbench)") -> str:
    """Upload an export folder to a hub model repo (created private unless told); returns its URL.

    The token is used for these calls only: never logged, never written to disk, and scrubbed
    from any error message.
    """
    _check_repo_id(repo_id)
    if not token:
        raise ExportError("pushing to the hub needs a token with write access")
    folder = Path(folder)
    if not (folder / CARD_FILE).is_file():
        raise ExportError(f"{folder} is not an export folder (no {CARD_FILE}); export first")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=commit_message)
    except Exception as error:  # network, auth, quota: one clear message, token scrubbed
        text = str(error).replace(token, "***")
        raise ExportError(f"pushing {folder.name} to {repo_id} failed ({type(error).__name__}: "
                          f"{text}). Check that the token has write access and the hub is "
                          "reachable") from None
    log.info("pushed %s to the hub repo %s (private=%s)", folder.name, repo_id, private)
    return f"https://huggingface.co/{repo_id}"


__all__ = ["ExportError", "ExportExistsError", "ExportResult", "FORMATS", "export_model",
           "load_compact", "push_to_hub", "save_compact", "save_masked", "source_info"]
