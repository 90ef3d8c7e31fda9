"""A recipe: everything needed to prune the same model the same way again.

    recipe.json
      format, version, created        what this file is and when it was written
      workbench, versions             library versions (python, torch, transformers, ...)
      model                           source as the user gave it, kind, resolved path/id, revision, dtype
      prune                           the full PruneConfig
      calibration                     data name, sha256 of its text, nsamples, seqlen, seed
      result                          counted sparsity totals and a digest of the masks

`python -m workbench prune --recipe recipe.json` (or `export --recipe ... --name again`) reloads
the model, re-reads the calibration text (refusing when its sha256 differs, since other text
gives other masks), prunes with the same config and checks the masks against the recorded digest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workbench import __version__
from workbench.errors import WorkbenchError
from workbench.jsonio import dumps, plain
from workbench.progress import Progress
from workbench.versions import library_versions

log = logging.getLogger(__name__)

RECIPE_FORMAT = "prune-workbench-recipe"
RECIPE_VERSION = 1
RECIPE_FILE = "recipe.json"
_MODEL_FIELDS = ("source", "kind", "resolved", "revision", "dtype")
_SUMMARY_FIELDS = ("mlp", "attention", "blocks", "matmul", "parameters", "by_kind")


class RecipeError(WorkbenchError):
    """A recipe cannot be read or reproduced; the message says why and what to do."""


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def masks_digest(masks: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, shape, packed bits) of every mask, in name order."""
    digest = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name].detach().to("cpu", torch.bool).contiguous()
        digest.update(name.encode())
        digest.update(json.dumps(list(mask.shape)).encode())
        digest.update(np.packbits(mask.numpy(), axis=None).tobytes())
    return digest.hexdigest()


def source_info(source) -> dict:
    """A plain dict describing where the model came from, from a LoadedModel, a dict or a string."""
    if source is None:
        return {}
    if isinstance(source, str):
        return {"source": source}
    if isinstance(source, dict):
        info = dict(source)
    else:
        info = {name: getattr(source, name, None) for name in _MODEL_FIELDS}
    model = getattr(source, "model", None)
    if model is not None:
        info.setdefault("class", type(model).__name__)
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))}


def make_recipe(result=None, source=None, config=None, created: str | None = None) -> dict:
    """The recipe of a prune: from its PruneResult (config, calibration, masks), or just a config."""
    config = config if config is not None else getattr(result, "config", None)
    recipe = {
        "format": RECIPE_FORMAT,
        "version": RECIPE_VERSION,
        "created": created or now_utc(),
        "workbench": __version__,
        "versions": library_versions(),
        "model": source_info(source),
        "prune": config.to_dict() if hasattr(config, "to_dict") else (dict(config) if config else None),
        "calibration": dict(getattr(result, "calibration", None) or {}),
        "result": None,
    }
    if result is not None:
        summary = getattr(result, "summary", {}) or {}
        recipe["result"] = {
            "sparsity": {k: plain(summary[k]) for k in _SUMMARY_FIELDS if k in summary},
            "seconds": float(getattr(result, "seconds", 0.0) or 0.0),
            "masks": len(result.masks),
            "masks_sha256": masks_digest(result.masks),
        }
    return recipe


def write_recipe(path: str | Path, recipe: dict) -> Path:
    path = Path(path)
    path.write_text(dumps(recipe, indent=2) + "\n", encoding="utf-8")
    return path


@dataclass
class Recipe:
    config: object  # PruneConfig
    model: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    result: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)


def read_recipe(path_or_dict: str | Path | dict) -> Recipe:
    """Parse and check a recipe (a path to recipe.json, a folder holding one, or the dict)."""
    from workbench.prune import PruneConfig

    if isinstance(path_or_dict, dict):
        raw, where = path_or_dict, "the recipe"
    else:
        path = Path(path_or_dict).expanduser()
        if path.is_dir():
            path = path / RECIPE_FILE
        if not path.is_file():
            raise RecipeError(f"no recipe at {path}: pass the recipe.json written into an export")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise RecipeError(f"{path} is not valid JSON ({error}); re-export to get a fresh recipe") from None
        except OSError as error:
            raise RecipeError(f"{path} cannot be read ({error.strerror or error})") from None
        where = str(path)
    if not isinstance(raw, dict) or raw.get("format") != RECIPE_FORMAT:
        raise RecipeError(f"{where} is not a prune-workbench recipe (no \"format\": \"{RECIPE_FORMAT}\")")
    for name, kind in (("version", int), ("prune", dict), ("model", dict), ("calibration", dict),
                       ("result", dict)):
        value = raw.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise RecipeError(f"{where}: its \"{name}\" is a {type(value).__name__}, where a recipe has "
                              f"{'an integer' if kind is int else 'an object'}; re-export to get a "
                              "fresh recipe")
    if int(raw.get("version", 0)) > RECIPE_VERSION:
        raise RecipeError(f"{where} has recipe version {raw.get('version')}, newer than this workbench "
                          f"reads ({RECIPE_VERSION}); upgrade prune-workbench")
    if not raw.get("prune"):
        raise RecipeError(f"{where} records no prune config (the exported model was not pruned "
                          "here), so there is nothing to reproduce")
    try:
        config = PruneConfig.from_dict(raw["prune"])
        config.validate()
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{where}: its prune config is not valid here ({error})") from None
    return Recipe(config=config, model=dict(raw.get("model") or {}),
                  calibration=dict(raw.get("calibration") or {}), result=raw.get("result"), raw=raw)


def check_calibration(recipe: Recipe, calibration) -> None:
    """Refuse calibration data whose text differs from the recipe's: it would give other masks."""
    want = recipe.calibration.get("sha256")
    if not want:
        return
    have = getattr(calibration, "sha256", None)
    if have != want:
        raise RecipeError(
            f"the calibration text {recipe.calibration.get('source')!r} found here has sha256 "
            f"{str(have)[:12]}..., the recipe was made with {want[:12]}...; masks would differ. "
            "Point --data-dir (or WORKBENCH_DATA_DIR) at the same data files the recipe used."
        )


def reproduce(recipe: Recipe | str | Path | dict, model=None, tokenizer=None,
              data_dir: str | Path | None = None, device: str | None = None,
              progress: Progress | None = None):
    """Prune again as the recipe says. Returns (model, tokenizer, PruneResult).
    `progress(fraction, message)` follows the prune (see `workbench.prune.prune`).

    Without `model`, the model is loaded from the recipe's source (same dtype and revision).
    """
    from workbench.prune import prune

    recipe = recipe if isinstance(recipe, Recipe) else read_recipe(recipe)
    config = recipe.config
    if device is not None:
        config.device = device
    if model is None:
        from workbench.models import load_model

        source = recipe.model.get("source")
        if not source:
            raise RecipeError("the recipe names no model source; pass the model to reproduce() "
                              "or --model on the command line")
        loaded = load_model(source, dtype=recipe.model.get("dtype") or "fp32",
                            revision=recipe.model.get("revision"))
        model, tokenizer = loaded.model, loaded.tokenizer
    calibration = None
    calib = recipe.calibration
    if calib and calib.get("source") == "tensor":
        raise RecipeError("the recipe was calibrated on raw token ids passed in code; they are not "
                          "recorded, so prune with the same ids through the Python API")
    # every method that reads data (gradients, statistics, mask tuning), so the recorded text is checked
    if config.uses_calibration:
        if tokenizer is None:
            raise RecipeError("reproducing needs the model's tokenizer to read calibration text")
        from workbench.data import load_calibration

        calibration = load_calibration(tokenizer, calib.get("source", config.calibration),
                                       nsamples=int(calib.get("nsamples", config.nsamples)),
                                       seqlen=int(calib.get("seqlen", config.seqlen)),
                                       seed=int(calib.get("seed", config.seed)), data_dir=data_dir)
        check_calibration(recipe, calibration)
    result = prune(model, config, calibration=calibration, tokenizer=tokenizer, progress=progress)
    return model, tokenizer, result


def masks_match(recipe: Recipe, result) -> bool | None:
    """True/False when the recipe records a mask digest, None when it does not."""
    want = (recipe.result or {}).get("masks_sha256")
    if not want:
        return None
    return masks_digest(result.masks) == want
