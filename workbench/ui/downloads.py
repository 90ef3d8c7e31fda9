"""Handing an export to the browser: whether to zip it, serving the zip without a second copy,
and which of its folders load in stock transformers.

Gradio copies every file an event returns into its cache unless the file already lies in that
cache or in a static path. Locally the export root is a static path, so the zip is served from
where it was written. In public mode the export root must not be readable by other sessions,
so the zip gets a hard link (no bytes copied) under a random folder in Gradio's cache, which
only the session that made it learns; a cache on another file system gets one copy instead.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# The app zips an export by default only below this model size: zipping a large model doubles
# its disk use and takes about as long as writing it.
ZIP_DEFAULT_MAX_BYTES = 500 * 10**6


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (tied weights counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def zip_by_default(model) -> bool:
    """Whether the app ticks 'zip' for this model (no model yet: yes)."""
    return model is None or model_bytes(model) <= ZIP_DEFAULT_MAX_BYTES


def serve_from_static(root: Path) -> None:
    """Serve files under `root` in place (local mode only: anyone who can reach the app may read them)."""
    import gradio as gr

    gr.set_static_paths([Path(root)])


def private_link(path: str | Path, cache: str | Path | None = None) -> Path:
    """`path` reachable inside Gradio's cache under an unguessable folder, without copying it
    where the file system allows a hard link."""
    if cache is None:
        from gradio.utils import get_upload_folder

        cache = get_upload_folder()
    path = Path(path)
    folder = Path(cache) / f"export-{secrets.token_hex(16)}"
    folder.mkdir(parents=True, mode=0o700)
    target = folder / path.name
    try:
        os.link(path, target)
    except OSError as error:  # another file system, or links not allowed: one copy
        log.info("cannot hard-link the export into Gradio's cache (%s); copying it", error)
        shutil.copyfile(path, target)
    return target


def folder_loaders(export_folder: str | Path) -> dict[str, bool]:
    """{folder inside the export ('.' for its top): loads with stock transformers}, from the
    format each folder's config.json records."""
    export_folder = Path(export_folder)
    found: dict[str, bool] = {}
    for config in sorted(export_folder.glob("*/config.json")) + [export_folder / "config.json"]:
        try:
            entry = json.loads(config.read_text(encoding="utf-8")).get("workbench") or {}
        except (OSError, ValueError):
            continue
        fmt = entry.get("format")
        if fmt is None:
            continue
        stock = fmt == "masked" or (fmt == "slimmed" and bool((entry.get("slim") or {}).get("stock_loadable")))
        name = "." if config.parent == export_folder else config.parent.name
        found[name] = stock
    return dict(sorted(found.items(), key=lambda item: item[0] != "."))


def loaders_line(export_folder: str | Path) -> str:
    """'Loads in stock transformers: the top folder, `slimmed/`. Needs workbench: `compact/` ...'"""
    loaders = folder_loaders(export_folder)

    def names(stock: bool) -> str:
        return ", ".join("the top folder" if f == "." else f"`{f}/`" for f, s in loaders.items() if s == stock)

    parts = []
    if any(loaders.values()):
        parts.append(f"Loads in stock transformers (`AutoModelForCausalLM.from_pretrained`): {names(True)}.")
    if not all(loaders.values()):
        parts.append(f"Needs workbench to load (`workbench.compact.load_compact` or "
                     f"`workbench.slim.load_slimmed`): {names(False)}.")
    return " ".join(parts)
