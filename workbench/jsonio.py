"""JSON for everything the workbench writes or prints: plain types only, NaN and infinities as null.

JSON has no spelling for NaN or infinity (Python's `json` writes `NaN`, which other readers
refuse), and results hold them: a relative drop against a zero, a missing metric.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path


def plain(obj):
    """`obj` as plain JSON types: dicts (string keys), lists, str, int, float, bool, None.
    numpy/torch scalars become numbers, paths and other objects strings, NaN/inf None."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()  # numpy / torch scalars
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def dumps(obj, **options) -> str:
    """`json.dumps` of `plain(obj)`; `options` are json.dumps's (indent, sort_keys)."""
    return json.dumps(plain(obj), allow_nan=False, **options)


def dataclass_from(cls, data: dict, renamed: dict[str, str] | None = None):
    """`cls(**data)` for a dataclass read back from JSON: unknown keys are refused, naming the known
    fields; `renamed` maps a key an earlier version wrote to the field that replaced it."""
    data = {(renamed or {}).get(key, key): value for key, value in data.items()}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
    return cls(**data)
