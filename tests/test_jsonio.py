"""One JSON writer and one dataclass reader for every record the workbench keeps; renamed settings still load."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.jsonio import dataclass_from, dumps, plain


def test_plain_turns_everything_into_json_types():
    value = {1: (np.float32(0.5), torch.tensor(3)), "nan": float("nan"), "inf": [float("-inf")],
             "path": Path("a/b"), "other": object}
    out = plain(value)
    assert out["1"] == [0.5, 3] and isinstance(out["1"][1], int)
    assert out["nan"] is None and out["inf"] == [None] and out["path"] == "a/b"
    assert isinstance(out["other"], str)
    text = dumps(value, indent=1)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["nan"] is None


def test_dataclass_from_refuses_unknown_fields_and_maps_renamed_ones():
    @dataclass
    class Config:
        width: int = 1
        unit_allocation: str = "auto"

    assert dataclass_from(Config, {"width": 2}) == Config(2)
    assert dataclass_from(Config, {"allocation": "uniform"}, renamed={"allocation": "unit_allocation"}) \
        == Config(unit_allocation="uniform")
    with pytest.raises(ValueError, match=r"unknown Config fields \['widht'\]; known: \['unit_allocation', 'width'\]"):
        dataclass_from(Config, {"widht": 2})


def test_prune_config_reads_what_earlier_recipes_wrote():
    from workbench.prune import PruneConfig

    config = PruneConfig.from_dict({"method": "retrain-free", "pattern": "channel", "scope": "mlp",
                                    "allocation": "uniform"})
    assert config.unit_allocation == "uniform" and "allocation" not in config.to_dict()
    assert PruneConfig.from_dict(config.to_dict()) == config


def test_the_old_allocation_flag_still_works():
    from workbench.cli import build_parser

    parser = build_parser()
    for flag in ("--allocation", "--unit-allocation"):
        args = parser.parse_args(["prune", "--pattern", "channel", flag, "uniform"])
        assert args.unit_allocation == "uniform"
    sweep = parser.parse_args(["sweep", "--allocation", "owl"])
    assert sweep.allocation == "owl"


def test_one_record_of_library_versions():
    from workbench import recipe, runs
    from workbench.versions import library_versions

    versions = library_versions()
    assert {"python", "workbench", "torch", "transformers"} <= set(versions)
    assert recipe.library_versions is library_versions and runs.library_versions is library_versions
    assert all(isinstance(v, str) and v for v in versions.values())
