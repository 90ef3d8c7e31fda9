"""The library versions a run, a recipe or a crash report records."""

from __future__ import annotations

import importlib.metadata as md
import platform

from workbench import __version__

VERSIONED = ("torch", "transformers", "datasets", "safetensors", "numpy", "pandas", "matplotlib",
             "compressed-tensors")


def library_versions() -> dict[str, str]:
    """{"python", "workbench", and each installed package of VERSIONED: its version}."""
    versions = {"python": platform.python_version(), "workbench": __version__}
    for name in VERSIONED:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions
