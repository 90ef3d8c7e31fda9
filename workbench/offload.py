"""Out-of-core pruning: sequential onloading of decoder blocks from a safetensors checkpoint.

    result = prune_from_disk("llama-7b/", "llama-7b-wanda/", PruneConfig(method="wanda"),
                             calibration=ids)

The model is built as a skeleton on the meta device; the embeddings, final norm and LM head are
loaded once. The driver (`workbench.prune.prune`, the same loop as in memory) asks `DiskBlocks`
for each block: it is materialised from the memory-mapped shards as an fp32 working copy, pruned,
cast back to the checkpoint's dtype, written to the output folder as its own safetensors shard,
and freed. Peak memory is the non-block weights + one block + its statistics + the calibration
activations, whatever the number of blocks.

The output folder is marked incomplete (the `.prune-workbench` marker with `complete: false`,
and no config.json) until the last step, and holds the progress of the prune: after every block,
the block's shard, the next block's calibration inputs and a small progress file. The same call
with `resume=True` continues from the first unfinished block; the result is bit-identical to an
uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from workbench.arch import BlockInfo, ModelLayout, describe, is_linear, weight_of
from workbench.guards import check_finite_parameters
from workbench.prune import PruneConfig, PruneResult, prune
from workbench.sparsity import count_zeros, sparsity_table

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
PROGRESS_DIR = ".progress"
PROGRESS_FILE = "progress.json"
# Files of the source folder that are weights or config, i.e. not copied as they are.
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_NOT_COPIED_NAMES = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json"}


class OffloadError(ValueError):
    """An out-of-core prune cannot run as asked; the message names the problem and the fix."""


class IncompleteFolderError(ValueError):
    """A folder holds an interrupted prune, not a model."""


# --- the checkpoint ---------------------------------------------------------------------------


class CheckpointReader:
    """Tensor names and lazily read tensors of a safetensors checkpoint folder (one file, or
    shards with an index). Each read opens the shard memory-mapped and copies out the tensor."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            self.file_of = dict(json.loads(index.read_text())["weight_map"])
        elif (self.folder / "model.safetensors").is_file():
            try:
                with safe_open(self.folder / "model.safetensors", framework="pt") as handle:
                    self.file_of = {name: "model.safetensors" for name in handle.keys()}
            except Exception as error:  # SafetensorError: an empty, truncated or foreign file
                raise OffloadError(f"{self.folder / 'model.safetensors'} is not a readable safetensors "
                                   f"file ({error}); re-save or re-download the model folder") from error
        else:
            raise OffloadError(f"{self.folder} has no model.safetensors or {INDEX_NAME}: out-of-core "
                               "pruning reads safetensors checkpoints. Re-save the model with "
                               "save_pretrained(folder, safe_serialization=True)")

        self.stored_name: dict[str, str] = {}  # model name -> name in the file, where they differ

    def adopt_names(self, model: nn.Module) -> None:
        """Read the checkpoint under the names `model` uses: transformers renames some weights
        between file and model (GPT-NeoX stores `lm_head` as `embed_out`)."""
        import re

        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        renames = [(source, target) for transform in get_model_conversion_mapping(model)
                   if type(transform) is WeightRenaming
                   for source, target in zip(transform.source_patterns, transform.target_patterns)]
        known = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
        for stored in list(self.file_of):
            renamed = stored
            for source, target in renames:
                renamed = re.sub(source, target, renamed)
            if renamed != stored and renamed in known and renamed not in self.file_of:
                self.file_of[renamed] = self.file_of.pop(stored)
                self.stored_name[renamed] = stored

    def names(self) -> list[str]:
        return list(self.file_of)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        tensors = {}
        for file, wanted in by_file.items():
            with safe_open(self.folder / file, framework="pt") as handle:
                for name in wanted:
                    tensors[name] = handle.get_tensor(self.stored_name.get(name, name))
            _drop_cached(self.folder / file)  # each block is read once: keep the page cache small
        return tensors

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating tensors (of the first one found)."""
        from safetensors import safe_open

        for name, file in self.file_of.items():
            with safe_open(self.folder / file, framework="pt") as handle:
                tensor = handle.get_slice(name)
                dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(
                    tensor.get_dtype())
            if dtype is not None:
                return dtype
        return torch.float32


def skeleton(folder: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of `folder` with every parameter on the meta device (buffers such as rotary
    frequencies are real). Nothing is read but config.json."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _block_prefix(layout: ModelLayout, index: int) -> str:
    return f"{layout.blocks_name}.{index}."


def load_outside_blocks(model: nn.Module, layout: ModelLayout, reader: CheckpointReader) -> None:
    """Load every parameter that is not in a decoder block (embeddings, final norm, LM head)."""
    prefix = layout.blocks_name + "."
    reader.adopt_names(model)
    wanted = [name for name, _ in model.named_parameters() if not name.startswith(prefix)]
    present = [name for name in wanted if name in reader.file_of]
    model.load_state_dict(reader.read(present), strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False) or any(
            n not in reader.file_of for n in wanted):
        model.tie_weights()
    still = [name for name, p in model.named_parameters() if p.device.type == "meta"
             and not name.startswith(prefix)]
    if still:
        raise OffloadError(f"{reader.folder}: no tensor named {still[0]} in the checkpoint (and "
                           f"{len(still) - 1} more missing); out-of-core pruning needs the weight "
                           "names the model uses. Re-save the model with save_pretrained")


# --- calibration activations ------------------------------------------------------------------


class Activations:
    """A block's outputs, one tensor per calibration micro-batch: kept in memory, written to
    `folder` (one file per micro-batch) as the resume checkpoint, and read back from there when
    they do not fit in memory (`in_memory=False`)."""

    def __init__(self, folder: Path, in_memory: bool):
        self.folder = folder
        self.in_memory = in_memory
        self.kept: list[torch.Tensor] = []
        self.count = 0
        folder.mkdir(parents=True, exist_ok=True)

    def append(self, tensor: torch.Tensor) -> None:
        torch.save(tensor, self.folder / f"{self.count:06d}.pt")
        if self.in_memory:
            self.kept.append(tensor)
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.in_memory:
            yield from self.kept
            return
        for index in range(self.count):
            yield torch.load(self.folder / f"{index:06d}.pt", weights_only=True)

    @classmethod
    def reopen(cls, folder: Path, in_memory: bool) -> Activations:
        store = cls(folder, in_memory=False)
        store.count = len(list(folder.glob("*.pt")))
        if in_memory:
            store.kept, store.in_memory = list(store), True
        return store


# --- the output folder ------------------------------------------------------------------------


def is_incomplete(folder: str | Path) -> bool:
    from workbench.saving import read_marker

    marker = read_marker(folder)
    return marker is not None and marker.get("complete") is False


def check_complete(folder: str | Path) -> None:
    """Refuse a folder that holds an interrupted out-of-core prune."""
    if is_incomplete(folder):
        progress = _read_progress(Path(folder))
        done = f" ({progress['done']} of {progress['blocks']} blocks pruned)" if progress else ""
        raise IncompleteFolderError(
            f"{folder} holds an unfinished prune{done}, not a model. Finish it with the same command "
            "and --resume (PruneConfig: prune_from_disk(..., resume=True)), or delete the folder")


def _read_progress(folder: Path) -> dict | None:
    try:
        return json.loads((folder / PROGRESS_DIR / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def _unique_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tensors that share storage with an earlier one (tied weights): safetensors refuses
    them, and from_pretrained ties them back from the config."""
    seen, kept = set(), {}
    for name, tensor in named.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        kept[name] = tensor.contiguous()
    return kept


class DiskBlocks:
    """The driver's block source for out-of-core prunes (see `workbench.prune.InMemoryBlocks`)."""

    keeps_masks = False  # a 7B model's masks alone are 6.5 GB; they are the zeros of the output

    def __init__(self, model: nn.Module, layout: ModelLayout, reader: CheckpointReader, out: Path,
                 fingerprint: dict, activations_in_memory: bool, resume: bool, slim: dict | None = None):
        self.model, self.layout, self.reader, self.out = model, layout, reader, out
        # channel/head prunes: {"round_to": int | None, "size": int | None (one size for every
        # block)}; each block is written with its removed units cut out
        self.slim = slim
        self.slim_sizes: dict[str, int] = {}  # block index -> units kept in its shard
        self.fingerprint = fingerprint
        self.activations_in_memory = activations_in_memory
        self.shards = layout.num_blocks + 1
        self.rows: list[dict] = []
        self.other_counts = {"zeros": 0, "numel": 0}  # block parameters other than the linears
        self.first_block = 0
        self._resumed = None
        self._dtypes: dict[str, torch.dtype] = {}
        progress_dir = out / PROGRESS_DIR
        progress = _read_progress(out) if resume else None
        if progress is not None:
            if progress["fingerprint"] != fingerprint:
                changed = sorted(k for k in fingerprint if progress["fingerprint"].get(k) != fingerprint[k])
                raise OffloadError(f"{out} holds a prune with other settings ({', '.join(changed)} differ); "
                                   "resume with the same settings, or start over in a new folder")
            self.first_block = int(progress["done"])
            self.rows = progress["rows"]
            self.other_counts = progress["other_counts"]
            self.slim_sizes = progress.get("slim_sizes", {})
            inputs = None
            if self.first_block < layout.num_blocks and progress.get("activations"):
                inputs = Activations.reopen(progress_dir / progress["activations"], activations_in_memory)
            self._resumed = (inputs, progress["errors"], progress["timings"])
            log.info("resuming %s at block %d of %d", out, self.first_block, layout.num_blocks)
        self._next = progress_dir / f"inputs-{self.first_block + 1}"
        if self._next.exists():
            shutil.rmtree(self._next)

    def resumed(self):
        return self._resumed

    def fetch(self, block: BlockInfo, device: str) -> None:
        prefix = _block_prefix(self.layout, block.index)
        names = {name: prefix + name for name, _ in block.module.named_parameters()}
        missing = [full for full in names.values() if full not in self.reader.file_of]
        if missing:
            raise OffloadError(f"{self.reader.folder}: no tensor named {missing[0]} in the checkpoint; "
                               "out-of-core pruning needs the weight names the model uses. Re-save the "
                               "model with save_pretrained")
        tensors = self.reader.read(list(names.values()))
        state = {}
        for name, full in names.items():
            tensor = tensors.pop(full)
            self._dtypes[name] = tensor.dtype
            # the working copy: fp32 for statistics and solves, whatever the checkpoint stores
            state[name] = tensor.to(device, torch.float32) if tensor.is_floating_point() else tensor.to(device)
        block.module.load_state_dict(state, strict=False, assign=True)
        block.module.to(device)  # buffers (e.g. per-block rotary tables) too
        check_finite_parameters(block.module, prefix=block.name)

    def put(self, block: BlockInfo, next_inputs, records: dict) -> None:
        prefix = _block_prefix(self.layout, block.index)
        tensors = {}
        for name, param in block.module.named_parameters():
            tensors[prefix + name] = param.data.to("cpu", self._dtypes[name])
        sub = ModelLayout(**{**self.layout.__dict__, "blocks": [block]})
        for name, param in block.module.named_parameters():
            param.data = tensors[prefix + name]  # count zeros on what is written
        rows = sparsity_table(self.model, sub).to_dict("records")
        linear_ptrs = {weight_of(lin.module).data_ptr() for lin in block.linears}
        for tensor in tensors.values():
            if tensor.data_ptr() not in linear_ptrs:
                self.other_counts["zeros"] += count_zeros(tensor)
                self.other_counts["numel"] += tensor.numel()
        if self.slim is not None and records.get("plan") is not None:
            tensors = self._slimmed(block, records["plan"], prefix)
        _write_atomic(self.out / _shard_name(block.index + 1, self.shards),
                      lambda path: _save(_unique_tensors(tensors), path))
        block.module.to("meta")  # free the block; it is on disk now
        self.rows.extend(rows)
        done = block.index + 1
        activations = None
        if done < self.layout.num_blocks and isinstance(next_inputs, Activations):
            activations = next_inputs.folder.name
        progress = {"done": done, "blocks": self.layout.num_blocks, "fingerprint": self.fingerprint,
                    "activations": activations, "rows": self.rows, "other_counts": self.other_counts,
                    "slim_sizes": self.slim_sizes,
                    "errors": records["errors"], "timings": records["timings"]}
        progress_dir = self.out / PROGRESS_DIR
        progress_dir.mkdir(exist_ok=True)
        _write_atomic(progress_dir / PROGRESS_FILE,
                      lambda path: path.write_text(json.dumps(progress, default=float)))
        for old in progress_dir.glob("inputs-*"):  # earlier blocks' inputs are no longer needed
            if old.name != activations and old != self._next:
                shutil.rmtree(old, ignore_errors=True)
        self._next = progress_dir / f"inputs-{done + 1}"
        if self._next.exists():
            shutil.rmtree(self._next)

    def new_activations(self) -> Activations:
        return Activations(self._next, self.activations_in_memory)

    def _slimmed(self, block: BlockInfo, plan, prefix: str) -> dict[str, torch.Tensor]:
        """The block's tensors (as written: counted already) with the removed units cut out,
        padded back with zero units to the rounded or common size, as `workbench.slim` does."""
        from workbench.slim import pad_keep, rounded_size, slice_block

        geometry = plan.geometries[block.index]
        keep = plan.chosen.get(block.index, torch.ones(geometry.num_units, dtype=torch.bool))
        size = self.slim.get("size") or rounded_size(
            int(keep.sum()), geometry.num_units, self.slim.get("round_to") if plan.kind == "channel" else None)
        slice_block(self.layout, geometry, pad_keep(keep, size))
        self.slim_sizes[str(block.index)] = size
        return {prefix + name: param.data for name, param in block.module.named_parameters()}

    def sparsity(self, model: nn.Module, layout: ModelLayout) -> tuple[pd.DataFrame, dict]:
        from workbench.sparsity import TABLE_COLUMNS

        table = pd.DataFrame(self.rows, columns=TABLE_COLUMNS)
        return table, _summary(model, layout, table, self.other_counts)


def _drop_cached(path: Path) -> None:
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a shard durably (a resumed prune trusts it after a power loss) and drop it from the
    page cache: a block's worth of dirty pages per block would otherwise crowd a memory cap."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _drop_cached(path)


def _ratio(frame: pd.DataFrame) -> float:
    numel = int(frame["numel"].sum())
    return int(frame["zeros"].sum()) / numel if numel else 0.0


def _summary(model: nn.Module, layout: ModelLayout, table: pd.DataFrame, other: dict) -> dict:
    """`workbench.sparsity.sparsity_summary` for a model whose blocks are on disk: the blocks'
    counts come from the table (and `other`, their remaining parameters), the rest from memory."""
    prefix = layout.blocks_name + "."
    extra_zeros = extra_numel = param_zeros = param_numel = 0
    seen = set()
    for name, module in model.named_modules():
        if is_linear(module) and not name.startswith(prefix) and weight_of(module).data_ptr() not in seen:
            seen.add(weight_of(module).data_ptr())
            extra_zeros += count_zeros(weight_of(module))
            extra_numel += weight_of(module).numel()
    seen = set()
    for name, param in model.named_parameters():
        if name.startswith(prefix) or param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        param_zeros += count_zeros(param.data)
        param_numel += param.numel()
    block_zeros, block_numel = int(table["zeros"].sum()), int(table["numel"].sum())
    by_kind = table.groupby("kind", sort=False).apply(_ratio, include_groups=False) if len(table) else {}
    all_zeros = block_zeros + other["zeros"] + param_zeros
    all_numel = block_numel + other["numel"] + param_numel
    return {
        "mlp": _ratio(table[table["group"] == "mlp"]),
        "attention": _ratio(table[table["group"] == "attention"]),
        "blocks": _ratio(table),
        "matmul": (block_zeros + extra_zeros) / (block_numel + extra_numel),
        "parameters": all_zeros / all_numel if all_numel else 0.0,
        "by_kind": {str(k): float(v) for k, v in dict(by_kind).items()},
        "linear_zeros": block_zeros + extra_zeros,
        "linear_numel": block_numel + extra_numel,
    }


def _finish(model: nn.Module, layout: ModelLayout, source: Path, out: Path, shards: int,
            slim_spec: dict | None = None) -> None:
    """Write the non-block shard, the index, the tokenizer and config, then mark complete.
    `slim_spec` ({"kind", "sizes", "heads_per_unit"}): the blocks were written slimmed; the
    config then describes their sizes (`workbench.slim.set_slim_config`)."""
    from workbench.saving import write_marker

    prefix = layout.blocks_name + "."
    outside = {name: tensor for name, tensor in model.state_dict().items()
               if not name.startswith(prefix) and tensor.device.type != "meta"}
    persistent = {name for name, _ in model.named_parameters()} | {
        name for name in outside if name in CheckpointReader(source).file_of}
    outside = _unique_tensors({k: v for k, v in outside.items() if k in persistent})
    _write_atomic(out / _shard_name(shards, shards), lambda path: _save(outside, path))
    weight_map, total = {}, 0
    from safetensors import safe_open

    for index in range(1, shards + 1):
        name = _shard_name(index, shards)
        with safe_open(out / name, framework="pt") as handle:
            for key in handle.keys():
                weight_map[key] = name
                piece = handle.get_slice(key)
                numel = 1
                for size in piece.get_shape():
                    numel *= size
                total += numel * {"BF16": 2, "F16": 2, "F32": 4}.get(piece.get_dtype(), 4)
    for entry in source.iterdir():  # tokenizer, generation config, ...
        if entry.is_file() and not entry.name.startswith(".") and entry.name not in _NOT_COPIED_NAMES \
                and not entry.name.endswith(_NOT_COPIED):
            shutil.copy2(entry, out / entry.name)
    _write_atomic(out / INDEX_NAME, lambda path: path.write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)))
    config = model.config
    if slim_spec is not None:
        from workbench.slim import set_slim_config, slim_skeleton

        shaped = skeleton(source, dtype=model.dtype)  # this process may not have sliced every block
        slim_skeleton(shaped, slim_spec["kind"], slim_spec["sizes"])
        set_slim_config(shaped, describe(shaped), slim_spec["kind"], slim_spec["sizes"],
                        slim_spec["heads_per_unit"])
        config = shaped.config
    config.save_pretrained(out)  # config.json last: stock loaders refuse the folder before
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    write_marker(out, "model", complete=True)


def _prepare_out(source: Path, out: Path, resume: bool, overwrite: bool) -> None:
    from workbench.saving import check_destination, read_marker, write_marker

    if out.resolve() == source.resolve():
        raise OffloadError(f"the output folder {out} is the source folder; give a new folder")
    if resume:
        if not out.is_dir() or not is_incomplete(out):
            state = "does not exist" if not out.exists() else "is not an unfinished prune"
            raise OffloadError(f"cannot resume: {out} {state}. Run without --resume to start the prune")
        return
    if is_incomplete(out) and _read_progress(out) is not None:
        if not overwrite:
            raise OffloadError(f"{out} holds an unfinished prune: continue it with --resume, or pass "
                               "--overwrite to start over")
    else:
        check_destination(out, overwrite)
    if out.is_dir() and any(out.iterdir()):
        marker = read_marker(out)
        if marker is None:  # check_destination refuses this already; never delete foreign files
            raise OffloadError(f"{out} is not empty and not ours; choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "model", complete=False, resumable=True)


def check_offloadable(config: PruneConfig) -> None:
    """Refuse what cannot run block by block from disk, naming the workaround."""
    pattern = config.validate()
    if pattern.structured and config.method_record.unit_scores is None:
        raise OffloadError(
            f"{config.method} with pattern {pattern} is not supported out of core: its choice of channels "
            "or heads needs the whole model (retrain-free's Fisher pass takes gradients through every "
            "block at once). Prune it in memory (--offload none, on a machine that holds the model), or "
            "use --method wanda or magnitude, which score the units block by block, out of core")


def prune_from_disk(source: str | Path, out: str | Path, config: PruneConfig, calibration=None,
                    tokenizer=None, resume: bool = False, overwrite: bool = False,
                    activations_in_memory: bool | None = None,
                    progress: Callable[[float, str], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, slim: dict | None = None) -> PruneResult:
    """Prune the safetensors checkpoint in `source` block by block into the folder `out`.

    `calibration`/`tokenizer` as for `workbench.prune.prune` (the tokenizer is loaded from
    `source` when neither is given). `activations_in_memory`: None decides from the memory
    estimate; False keeps only the current micro-batch in memory. `resume=True` continues an
    interrupted prune of the same source and config in `out`. The result's `masks` is empty:
    the masks are the zeros of the written weights. `slim` ({"round_to": int | None, "uniform":
    bool}, as `workbench.slim.slim_model` takes them) writes a channel/head prune's blocks with
    the removed units cut out, and a config that describes the new sizes.
    """
    from workbench.memory import activations_fit

    check_offloadable(config)
    if slim is not None and not config.validate().structured:
        raise OffloadError(f"slimming removes whole channels or heads, and pattern {config.pattern} removes "
                           "single weights: use --pattern channel (scope mlp) or head (scope attention)")
    source, out = Path(source).expanduser(), Path(out).expanduser()
    check_complete(source)
    reader = CheckpointReader(source)
    if calibration is None and tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    model = skeleton(source, dtype=reader.dtype())
    layout = describe(model)
    slim_options = _slim_options(model, layout, config, slim)  # refused before anything is written
    _prepare_out(source, out, resume, overwrite)
    load_outside_blocks(model, layout, reader)
    if activations_in_memory is None:
        activations_in_memory = activations_fit(layout, config)
    fingerprint = {"source": str(source.resolve()), "config": json.dumps(config.to_dict(), sort_keys=True),
                   "calibration": _calibration_fingerprint(calibration)}
    if slim_options is not None:
        fingerprint["slim"] = json.dumps(slim_options, sort_keys=True)
    blocks = DiskBlocks(model, layout, reader, out, fingerprint, activations_in_memory, resume, slim_options)
    if blocks.first_block >= layout.num_blocks:
        log.info("%s: every block was pruned already; finishing the folder", out)
    result = prune(model, config, calibration=calibration, tokenizer=tokenizer, progress=progress,
                   should_stop=should_stop, blocks=blocks)
    slim_spec = None
    if slim_options is not None:
        slim_spec = {"kind": result.structure.kind, "heads_per_unit": result.structure.heads_per_unit,
                     "sizes": [blocks.slim_sizes[str(index)] for index in range(layout.num_blocks)]}
    _finish(model, layout, source, out, blocks.shards, slim_spec)
    return result


def _slim_options(model: nn.Module, layout: ModelLayout, config: PruneConfig, slim: dict | None) -> dict | None:
    """`slim` checked and made concrete: the rounding, and the one size of every block when
    `uniform` (known before any block is pruned: scored block by block, each block removes its
    target's count)."""
    if slim is None:
        return None
    pattern = config.validate()
    from workbench.slim import _check_slimmable, rounded_size
    from workbench.structured import StructureError

    try:
        _check_slimmable(layout, pattern.kind)
    except StructureError as error:
        raise OffloadError(f"{error}: prune without --slim (slim=None) to write it") from error
    round_to = slim.get("round_to") if pattern.kind == "channel" else None
    size = None
    if slim.get("uniform"):
        from workbench.prune import _block_target, _structured_plan
        from workbench.structured import units_to_remove

        plan, unit_sparsity = _structured_plan(model, layout, config, pattern, None, None)
        size = max(rounded_size(g.num_units if g.block in plan.skip_blocks else g.num_units - units_to_remove(
            g.num_units, _block_target(config, g.block, unit_sparsity)), g.num_units, round_to)
            for g in plan.geometries)
    return {"round_to": round_to, "size": size}


def _calibration_fingerprint(calibration) -> str:
    if isinstance(calibration, torch.Tensor):
        import hashlib

        return hashlib.sha256(calibration.long().contiguous().numpy().tobytes()).hexdigest()
    if calibration is not None and hasattr(calibration, "sha256"):
        return str(calibration.sha256)
    return "from config"
