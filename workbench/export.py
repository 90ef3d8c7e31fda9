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
- compact: sparse weights as values + bitmask, `workbench.compact`; `load_compact(folder)` reads it.
- slimmed: channels/heads physically removed through `workbench.slim`.

Safety: the destination is a plain name inside the export root (no `..`, no absolute paths, no
symbolic links); an existing export is replaced only with `overwrite=True` and only when it is
one of ours (`workbench.saving`: marker, backup-then-swap), so a failure or a kill leaves no
half-written export behind. The hub upload lives in `workbench.hub`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from workbench import __version__, jsonio
from workbench.compact import COMPACT_WEIGHTS, load_compact, save_compact, unique_tensors
from workbench.hub import CARD_FILE, check_repo_id, push_to_hub
from workbench.model_card import model_card
from workbench.plots import sparsity_heatmap
from workbench.recipe import RECIPE_FILE, make_recipe, source_info, write_recipe
from workbench.saving import (
    MARKER,
    ExportError,
    UnsafeDestinationError,
    check_destination,
    check_writable,
    clean_stale,
    create_temp_file,
    patch_config,
    saveable,
    staged_folder,
    unwritable,
)
from workbench.slim import slim_model, write_slimmed
from workbench.sparsity import sparsity_summary, sparsity_table

log = logging.getLogger(__name__)

FORMATS = ("masked", "compact", "slimmed")
HEATMAP_FILE = "sparsity_heatmap.png"
TABLE_FILE = "sparsity.csv"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+@=-]*")
_SLACK_BYTES = 64 * 2**20  # tokenizer, config, card, figure, and filesystem overhead


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


def _is_export_zip(path: Path, name: str) -> bool:
    """A zip we wrote for export `name`: every member inside the `name/` folder."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return bool(members) and all(member.startswith(f"{name}/") for member in members)


def export_destination(root: str | Path, name: str, overwrite: bool = False,
                       make_zip: bool = True, create: bool = True) -> tuple[Path, Path, Path | None]:
    """(resolved root, export folder, zip path), after every check, including that the root is
    writable; creates only the root (and not even that with `create=False`: the preflight)."""
    check_name(name)
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise ExportError(f"export root {root} is a file, not a folder; choose a folder")
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise unwritable(root, error) from None
    root = root.resolve()
    clean_stale(root)  # what a killed export left: temporary folders, zips, backups
    dest = root / name
    zip_path = root / f"{name}.zip" if make_zip else None
    for path in filter(None, (dest, zip_path)):
        if path.is_symlink():
            raise ExportError(f"{path} is a symbolic link; exports never write through links. "
                              "Remove the link or choose another name")
        if not _inside(path, root):
            raise ExportError(f"{path} resolves outside the export root {root}; choose another name")
    check_destination(dest, overwrite=True)  # what is not ours is refused, overwrite or not
    stale_zip = root / f"{name}.zip"
    if stale_zip.exists() and not _is_export_zip(stale_zip, name):
        raise UnsafeDestinationError(f"{stale_zip} exists and is not a zip of the export {name!r}, so it is "
                                     "never replaced; move it away yourself or choose another name")
    for path in filter(None, (dest, zip_path)):
        if path.exists() and not overwrite and not (path.is_dir() and not any(path.iterdir())):
            raise ExportExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to "
                                    "replace it, or choose another name")
    check_writable(dest, overwrite=True)  # the root (or where it will be created) takes files
    return root, dest, zip_path


def estimate_bytes(model: nn.Module, formats: Sequence[str], make_zip: bool) -> int:
    """An upper bound of what the export writes: each format at most the dense size, zip again."""
    state, _ = unique_tensors(model)
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
    """The export's files; the marker of ours is bookkeeping, neither zipped nor listed."""
    return {p for p in folder.rglob("*") if p.is_file() and p.name != MARKER}


def _bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths)


# --- masked: the dense layout -----------------------------------------------------------------


def _sparsity_entry(summary: dict) -> dict:
    keys = ("mlp", "attention", "blocks", "matmul", "parameters", "by_kind")
    return {k: summary[k] for k in keys if k in summary}


def save_masked(model: nn.Module, folder: Path, tokenizer=None, entry: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with saveable(model):
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    patch_config(folder, {"format": "masked", **(entry or {})})


# --- slimmed ------------------------------------------------------------------------------------


def _check_slimmed(result) -> None:
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

    slimmed = slim_model(copy.deepcopy(model), result, round_to=round_to, uniform=uniform)
    try:
        with saveable(slimmed.model):
            write_slimmed(slimmed.model, tokenizer, folder)
        table = sparsity_table(slimmed.model, reference_shapes=slimmed.reference_shapes)
        summary = sparsity_summary(slimmed.model, table=table, reference_shapes=slimmed.reference_shapes)
        info = {"kind": slimmed.kind, "sizes": list(slimmed.sizes),
                "stock_loadable": bool(slimmed.stock_loadable),
                "parameters_before": int(slimmed.parameters_before),
                "parameters_after": int(slimmed.parameters_after)}
    finally:
        del slimmed
    patch_config(folder, {**(entry or {}), "format": "slimmed", "slim": info,
                           "sparsity": _sparsity_entry(summary)})
    return info


# --- the export ---------------------------------------------------------------------------------


_ZIP_CHUNK_BYTES = 8 * 2**20


def zip_message(done: int, total: int) -> str:
    """'zipping 312 / 540 MB': what the zip step reports after each chunk."""
    return f"zipping {done / 1e6:.0f} / {total / 1e6:.0f} MB"


def _zip_folder(folder: Path, zip_path: Path, arcroot: str,
                progress: Callable[[int, int], None] | None = None) -> None:
    """Zip `folder`'s files under `arcroot/`; `progress(bytes done, bytes in all)` after every chunk
    (an exception raised there stops the zip)."""
    paths = sorted(_files(folder))
    total, done = _bytes(paths), 0
    with zipfile.ZipFile(zip_path, "w", allowZip64=True) as archive:
        for path in paths:
            info = zipfile.ZipInfo.from_file(path, f"{arcroot}/{path.relative_to(folder).as_posix()}")
            # Weights and images hardly deflate; storing them keeps zipping as fast as copying.
            stored = path.suffix in (".safetensors", ".png", ".bin")
            info.compress_type = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            with path.open("rb") as source, archive.open(info, "w") as target:
                while chunk := source.read(_ZIP_CHUNK_BYTES):
                    target.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)


def _heatmap_figure(heatmap, table):
    if heatmap is not None:
        return heatmap
    return sparsity_heatmap(table) if not table.empty else None


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
        check_repo_id(push_to)
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

    tmp_zip = None
    sizes: dict[str, int] = {}
    folders: dict[str, dict] = {}
    try:
        # written beside the old export, swapped in only when complete (workbench.saving)
        with staged_folder(dest, "export", overwrite) as tmp:
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
                (tmp / "evaluation.json").write_text(jsonio.dumps(evaluation, indent=2) + "\n",
                                                     encoding="utf-8")
            write_recipe(tmp / RECIPE_FILE, recipe)
            card = model_card(recipe, summary, table, evaluation, folders,
                              HEATMAP_FILE if figure is not None else None)
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")

            if zip_path is not None:
                zip_start, zip_share = (len(formats) + 1) / (len(formats) + 2), 1 / (len(formats) + 2)
                step(zip_start, "zipping")
                tmp_zip = create_temp_file(zip_path)

                def zipped(done: int, total: int) -> None:
                    if progress is not None:  # per chunk: to the caller only, not the log
                        progress(zip_start + zip_share * done / max(total, 1), zip_message(done, total))

                _zip_folder(tmp, tmp_zip, name, zipped)
        if tmp_zip is not None:
            try:
                os.replace(tmp_zip, zip_path)
            except OSError as error:
                raise unwritable(zip_path, error) from error
            tmp_zip = None
    finally:
        if tmp_zip is not None:
            tmp_zip.unlink(missing_ok=True)

    stale_zip = root / f"{name}.zip"
    if zip_path is None and overwrite and stale_zip.is_file() and _is_export_zip(stale_zip, name):
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


# load_compact, push_to_hub, save_compact, saveable: re-exported from their modules for existing callers
__all__ = ["COMPACT_WEIGHTS", "ExportError", "ExportExistsError", "ExportResult", "FORMATS", "export_model",
           "load_compact", "push_to_hub", "save_compact", "save_masked", "saveable", "source_info"]
