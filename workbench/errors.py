"""The errors a user can cause, one class per kind of cause.

Every class here is a `ValueError`, so callers that catch `ValueError` keep working. The message
of each names the problem and the way out; the CLI prints it as one `error: ...` line (exit 2),
the app and the widgets show it as it is. Anything else that escapes is a bug in the workbench.

    WorkbenchError            anything the user can fix
      ModelLoadError          a model that cannot be loaded (missing or corrupt files, hub)
        UnsupportedModelError a model that loads but is not a decoder-only causal LM
      DataError               calibration or evaluation data that cannot be read
      NumericsError           NaN/inf weights or activations, a sequence longer than the model's
      OptionError             an option that does not apply, or a device that is not there
"""

from __future__ import annotations

import json
import struct

import pyarrow
from datasets.exceptions import DatasetGenerationError
from safetensors import SafetensorError


class WorkbenchError(ValueError):
    """A failure the user can fix; the message names the problem and the fix."""


class ModelLoadError(WorkbenchError):
    """A model could not be loaded; the message names the problem and a way out."""


class UnsupportedModelError(ModelLoadError):
    """The model loads, but it is not a decoder-only causal LM this workbench can prune."""


class DataError(WorkbenchError):
    """Calibration or evaluation data cannot be read or has the wrong shape."""


class NumericsError(WorkbenchError):
    """Numbers that would make every result wrong: NaN/inf values, positions the model lacks."""


class OptionError(WorkbenchError):
    """An option that the chosen command or setting does not use, or a device that is absent."""


def _library_errors() -> tuple[type[BaseException], ...]:
    """What the file readers we call raise on a corrupt, truncated or foreign file."""
    found: list[type[BaseException]] = [
        OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
        RuntimeError, struct.error, json.JSONDecodeError, UnicodeDecodeError, MemoryError,
        OverflowError, AssertionError,
    ]
    found += [
        SafetensorError,  # HeaderTooLarge, InvalidHeaderDeserialization, MetadataIncompleteBuffer, ...
        DatasetGenerationError,  # datasets wraps a reader's failure (bad UTF-8, a bad JSON line) in this
        pyarrow.ArrowException,
    ]
    return tuple(dict.fromkeys(found))


FILE_READ_ERRORS = _library_errors()


def describe_error(error: BaseException, limit: int = 300) -> str:
    """'TypeName: first line of the message', short enough for a one-line error."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if len(text) > limit:
        text = text[:limit] + " ..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
