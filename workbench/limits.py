"""What one request may ask of a shared server, and what a public server accepts at all.

The operator sets these through environment variables; the defaults fit a free CPU Space (two
cores, 16 GB). `Limits.from_env()` reads them once; the workflow checks every request against
them and refuses an out-of-range value with a message that names the variable raising the bound
(nothing is clamped silently). A `Session` without limits (the Python API) is unbounded.

Public mode (on by default on a Hugging Face Space) additionally accepts models only from the
hub, the bundled default or allow-listed folders, calibration text only from the named datasets
or an uploaded file, and keeps messages free of server paths.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class LimitError(ValueError):
    """A request asks for more than this server allows, or for something a public server refuses."""


class TimeBudgetExceeded(LimitError):
    """A job ran past its time budget and was stopped; the model is left dense."""


# variable -> (Limits field, default, what it bounds); 0 means "no bound" for the numeric ones
SETTINGS = {
    "WORKBENCH_MAX_SAMPLES": ("max_nsamples", 64, "calibration samples"),
    "WORKBENCH_MAX_SEQLEN": ("max_seqlen", 512, "tokens per calibration sample"),
    "WORKBENCH_MAX_EVAL": ("max_eval", 200, "evaluation size"),
    "WORKBENCH_MAX_SWEEP_POINTS": ("max_sweep_points", 12, "sweep points"),
    "WORKBENCH_MAX_NEW_TOKENS": ("max_new_tokens", 128, "generated tokens"),
    "WORKBENCH_SESSION_JOBS": ("session_jobs", 2, "jobs waiting or running per browser session"),
    "WORKBENCH_JOB_SECONDS": ("job_seconds", 600, "seconds per job"),
}
PUBLIC_VARIABLE = "WORKBENCH_PUBLIC"
MODEL_DIRS_VARIABLE = "WORKBENCH_MODEL_DIRS"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def variable_for(name: str) -> str:
    """The environment variable that sets the `Limits` field `name`."""
    return next(variable for variable, (field_name, _, _) in SETTINGS.items() if field_name == name)


def on_space(environ: Mapping[str, str] | None = None) -> bool:
    """True when running on a Hugging Face Space (Spaces set SYSTEM=spaces and SPACE_ID)."""
    environ = os.environ if environ is None else environ
    return environ.get("SYSTEM") == "spaces" or bool(environ.get("SPACE_ID"))


@dataclass(frozen=True)
class Limits:
    max_nsamples: int = 64
    max_seqlen: int = 512
    max_eval: int = 200
    max_sweep_points: int = 12
    max_new_tokens: int = 128
    session_jobs: int = 2
    job_seconds: int = 600
    public: bool = False
    model_dirs: tuple[Path, ...] = ()  # allow-listed model folders in public mode
    upload_dirs: tuple[Path, ...] = field(default=(), compare=False)  # where a UI keeps uploaded files

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Limits:
        """The operator's settings; a malformed value is an error naming the variable."""
        environ = os.environ if environ is None else environ
        values: dict = {}
        for variable, (name, default, what) in SETTINGS.items():
            text = str(environ.get(variable, "")).strip()
            if not text:
                values[name] = default
                continue
            try:
                values[name] = int(text)
            except ValueError:
                raise LimitError(f"{variable}={text!r}: give a whole number of {what} (0 for no bound)") from None
            if values[name] < 0:
                raise LimitError(f"{variable}={text!r}: give a whole number >= 0 (0 for no bound)")
        flag = str(environ.get(PUBLIC_VARIABLE, "")).strip().lower()
        if flag and flag not in _TRUE | _FALSE:
            raise LimitError(f"{PUBLIC_VARIABLE}={flag!r}: give 1 (public mode) or 0 (local mode)")
        values["public"] = flag in _TRUE if flag else on_space(environ)
        dirs = [d for d in str(environ.get(MODEL_DIRS_VARIABLE, "")).split(os.pathsep) if d.strip()]
        values["model_dirs"] = tuple(Path(d.strip()).expanduser().resolve() for d in dirs)
        return cls(**values)

    # --- bounds ---------------------------------------------------------------------------------
    def check(self, name: str, value: int | None, label: str | None = None) -> None:
        """Refuse `value` above the bound `name` (a field); None stands for 'everything'."""
        bound = getattr(self, name)
        if not bound:
            return
        label = label or SETTINGS[variable_for(name)][2]
        if value is None:
            raise LimitError(f"{label}: 'all' is not allowed on this server; give at most {bound} "
                             f"(the operator can raise this with {variable_for(name)})")
        if value > bound:
            raise LimitError(f"{label} is {value}, above this server's limit of {bound}: give at most "
                             f"{bound} (the operator can raise this with {variable_for(name)})")

    def deadline(self) -> Deadline:
        return Deadline(self.job_seconds or None)

    # --- public mode ----------------------------------------------------------------------------
    def allows_path(self, path: str | Path, dirs: tuple[Path, ...]) -> bool:
        """Whether `path` resolves (links followed) inside one of `dirs`."""
        try:
            resolved = Path(path).expanduser().resolve()
        except (OSError, RuntimeError):
            return False
        return any(resolved == d or d in resolved.parents for d in (Path(x).resolve() for x in dirs))

    def check_model_path(self, path: str) -> None:
        """In public mode, a local model path must lie in an allow-listed folder or the upload folder."""
        if self.public and not self.allows_path(path, self.model_dirs + self.upload_dirs):
            raise LimitError("local paths are not accepted on this server: load the bundled default, a hub id "
                             "such as 'HuggingFaceTB/SmolLM2-135M', or upload a .gguf file"
                             + (" (or a folder the operator allow-listed)" if self.model_dirs else ""))

    def check_calibration(self, source: str, named: tuple[str, ...]) -> None:
        """In public mode, calibration text comes from a named dataset or an uploaded file only."""
        if self.public and source not in named and not self.allows_path(source, self.upload_dirs):
            raise LimitError(f"calibration data on this server comes from a named dataset ({', '.join(named)}) "
                             "or an uploaded .txt/.jsonl file; server paths are not accepted")


@dataclass
class Deadline:
    """A job's time budget; `expired()` is what a `should_stop` polls between blocks."""

    seconds: float | None
    started: float = field(default_factory=time.monotonic)

    def expired(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.started > self.seconds

    def message(self, what: str, outcome: str = "the model is dense again") -> str:
        return (f"{what} ran past this server's time budget of {self.seconds:g} s per job and was stopped; "
                f"{outcome}. Use fewer calibration samples, shorter samples or a smaller "
                f"evaluation (the operator can raise the budget with {variable_for('job_seconds')})")


_PATH = re.compile(r"""(?<![\w.:/-])(?:~|\.{1,2})?/(?!/)[^\s'"`,;()\[\]{}<>]*""")


def scrub(message: str, max_chars: int = 400) -> str:
    """A message fit to show on a public server: no file system paths, bounded length."""
    text = _PATH.sub("<path>", str(message))
    return text if len(text) <= max_chars else text[:max_chars - 3].rstrip() + "..."
