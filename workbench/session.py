"""Per-user state: a `Session` holding one user's loaded model and a snapshot of its dense block weights.

Loading and freeing a model, putting the dense weights back (`restore_dense`, `dense_weights_in`) and
greedy generation, dense vs pruned, live here; the orchestration over a session is `workbench.workflow`.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from workbench import snapshot
from workbench.limits import Limits
from workbench.models import LoadedModel, ModelLoadError, _looks_like_hub_id, load_model, model_info
from workbench.progress import Progress, within
from workbench.prune import PruneResult

log = logging.getLogger(__name__)

# transformers' from_pretrained patches torch's module initialisation process-wide while it
# builds a model on the meta device, so two loads in parallel threads break each other.
_LOAD_LOCK = threading.Lock()


class SettingsError(ValueError):
    """A setting a user gave cannot work; the message names it and says what to give instead."""


class NoModelError(SettingsError):
    """An action needs a loaded model and there is none."""


@dataclass
class Session:
    """One user's workbench state. Holds live objects: never share one between users."""

    loaded: LoadedModel | None = None
    info: dict = field(default_factory=dict)
    dense_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    result: PruneResult | None = None  # the last finished pruning, whose weights the model holds
    dense_eval: dict | None = None
    dense_eval_key: tuple | None = None  # (tasks, limit) that dense_eval was computed for
    pruned_eval: dict | None = None
    sweep: pd.DataFrame | None = None
    last_export: object | None = None  # workbench.export.ExportResult
    stop_requested: bool = False
    busy: str = ""  # what is running now, for a clear 'wait' message
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # separates exports per session
    limits: Limits | None = None  # what one request may ask (workbench.limits); None: unbounded
    data_dir: str | Path | None = None  # where evaluation and calibration files come from (None: the default)
    keep_dense: bool = True  # False for one-shot jobs (the CLI): no dense copy, nothing to restore

    def require_model(self) -> LoadedModel:
        """The loaded model, or NoModelError saying how to load one."""
        if self.loaded is None:
            raise NoModelError("no model loaded: load one first (the bundled default, a hub id, "
                               "a local folder or a .gguf file)")
        return self.loaded

    @property
    def model(self):
        return self.require_model().model

    @property
    def tokenizer(self):
        return self.require_model().tokenizer

    @property
    def is_pruned(self) -> bool:
        return self.result is not None

    def request_stop(self) -> None:
        """Ask the running prune or sweep to stop at the next block; cleared when that job ends."""
        self.stop_requested = True

    def should_stop(self) -> bool:
        return self.stop_requested


# --- validation, load and restore ---------------------------------------------------------


def check_source(source: str, limits: Limits | None = None) -> str:
    """The stripped model source, or a SettingsError naming what is wrong with it."""
    text = str(source or "").strip()
    if not text:
        raise SettingsError("no model given: type 'default', a hub id such as "
                            "'HuggingFaceTB/SmolLM2-135M', a local folder, or a .gguf path")
    if text == "default":
        return text
    path = Path(text).expanduser()
    if limits is not None and limits.public and (path.exists() or not _looks_like_hub_id(text)):
        limits.check_model_path(text)  # before any existence check: say nothing about the server's files
    if path.exists():
        if path.is_file() and path.suffix.lower() != ".gguf":
            raise SettingsError(f"{text} is a file but not a .gguf model; give a .gguf file or a "
                                "folder written by save_pretrained")
        return text
    if text.lower().endswith(".gguf"):
        raise SettingsError(f"GGUF file not found: {text}. Check the path or upload the file.")
    if text.startswith(("/", "./", "../", "~")) or "\\" in text:
        raise SettingsError(f"no such folder or file: {text}. Check the path.")
    if not _looks_like_hub_id(text):
        raise SettingsError(f"{text!r} is neither an existing path nor a valid hub id: a hub id looks "
                            "like 'owner/name' (letters, digits, '-', '_', '.')")
    return text


def free(session: Session) -> None:
    """Drop the session's model and everything computed from it."""
    session.loaded = None
    session.info = {}
    session.dense_state = {}
    session.result = None
    session.dense_eval = session.dense_eval_key = session.pruned_eval = None
    session.sweep = None
    session.last_export = None
    gc.collect()


def load(session: Session, source: str = "default", dtype: str = "fp32",
         progress: Progress | None = None, device: str = "cpu") -> dict:
    """Load a model into the session (replacing any other) and return `model_info` plus timing."""
    source = check_source(source, session.limits)
    free(session)
    started = time.perf_counter()
    if progress is not None:
        progress(0.0, f"Loading {source} ...")
    try:
        with _LOAD_LOCK:
            loaded = load_model(source, dtype=dtype, device=device,
                                progress=within(progress, 0.0, 0.9))
    except (ModelLoadError, ValueError) as error:
        raise SettingsError(str(error)) from None
    except OSError as error:
        raise SettingsError(f"could not load {source!r}: {error}") from None
    session.loaded = loaded
    session.info = model_info(loaded)
    if "unsupported" not in session.info:
        session.dense_state = snapshot.take(loaded.model)
    session.info["load_s"] = round(time.perf_counter() - started, 2)
    if progress is not None:
        progress(1.0, "Loaded")
    return session.info


def restore_dense(session: Session) -> None:
    """Put the dense block weights back (after a pruning, a sweep, or a cancelled run)."""
    model = session.model
    if not session.keep_dense:  # a one-shot job prunes once and exits: the model is never made dense again
        return
    if not session.dense_state:
        raise SettingsError(f"{session.info.get('class', 'this model')} cannot be pruned: "
                            f"{session.info.get('unsupported', 'unsupported architecture')}")
    reshaped = snapshot.mismatches(model, session.dense_state)
    if reshaped:  # physically slimmed: the dense tensors no longer fit, so reload (a fresh dense copy comes with it)
        log.info("model was slimmed (%d tensors changed shape); reloading", len(reshaped))
        load(session, session.loaded.source, session.loaded.dtype)
        return
    snapshot.put_back(model, session.dense_state)
    session.result = None
    session.pruned_eval = None


@contextmanager
def dense_weights_in(session: Session) -> Iterator[snapshot.Weights]:
    """The dense weights in the model while the body runs (a sweep, the dense half of `generate`),
    then the weights it held before put back, whatever happened: a pruned model stays pruned, with
    its `session.result` and evaluation. Yields the session's dense copy (restore it as often as
    needed, it is never modified). A pruned model costs one CPU copy of its block weights meanwhile."""
    model = session.model
    if not session.dense_state:
        reason = ("this session keeps no dense copy of the weights" if not session.keep_dense
                  else f"{session.info.get('class', 'this model')} cannot be pruned: "
                       f"{session.info.get('unsupported', 'unsupported architecture')}")
        raise SettingsError(f"{reason}: there are no dense weights to run on")
    if snapshot.mismatches(model, session.dense_state):
        raise SettingsError("the model was slimmed after loading, so its dense weights no longer fit: export it "
                            "to keep it, then load the model again")
    kept = snapshot.take(model) if session.is_pruned else None
    snapshot.put_back(model, session.dense_state)
    try:
        yield session.dense_state
    finally:
        snapshot.put_back(model, kept if kept is not None else session.dense_state)


# --- generation -----------------------------------------------------------------------------


@torch.inference_mode()
def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


def generate(session: Session, prompt: str, max_new_tokens: int = 40) -> tuple[str, str | None]:
    """(dense continuation, pruned continuation) for `prompt`, greedy. The pruned text is None
    when nothing has been pruned. The dense text comes from swapping the dense weights in."""
    if not str(prompt or "").strip():
        raise SettingsError("type a prompt first")
    try:
        max_new_tokens = int(max_new_tokens)
    except (TypeError, ValueError):
        raise SettingsError(f"max new tokens must be a whole number, got {max_new_tokens!r}") from None
    if not 1 <= max_new_tokens <= 512:
        raise SettingsError(f"max new tokens must be between 1 and 512, got {max_new_tokens}")
    if session.limits is not None:
        session.limits.check("max_new_tokens", max_new_tokens)
    model, tokenizer = session.model, session.tokenizer
    if not session.is_pruned:
        return _greedy(model, tokenizer, prompt, max_new_tokens), None
    pruned_text = _greedy(model, tokenizer, prompt, max_new_tokens)
    with dense_weights_in(session):
        dense_text = _greedy(model, tokenizer, prompt, max_new_tokens)
    return dense_text, pruned_text
