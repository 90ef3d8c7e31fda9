"""Calibration and evaluation text: local files first, `datasets` hub names beside them.

The evaluation data lives in a data folder (the argument, else env `WORKBENCH_DATA_DIR`, else a
`shared/data` folder beside the checkout):

- `lambada_openai_test.jsonl`: LAMBADA as lm-eval's `lambada_openai` uses it, field `text`.
- `wikitext2_test.raw`: the WikiText-2 raw test split with its blank rows dropped.
- `wikitext2_valid.tokens`: the WikiText-2 validation split, used as calibration text.

When no local file serves, the same data comes from the hub through `datasets.load_dataset`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.errors import FILE_READ_ERRORS, DataError, describe_error

log = logging.getLogger(__name__)

LAMBADA_FILE = "lambada_openai_test.jsonl"
WIKITEXT2_TEST_FILE = "wikitext2_test.raw"
WIKITEXT2_CALIBRATION_FILE = "wikitext2_valid.tokens"
TEXT_SUFFIXES = (".txt", ".raw", ".tokens")
JSON_SUFFIXES = (".jsonl", ".json")

# name -> (local file names tried first, hub dataset arguments used otherwise)
CALIBRATION_SOURCES = {
    "wikitext2": (
        [WIKITEXT2_CALIBRATION_FILE],
        {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "train"},
    ),
    "pile10k": (["pile10k.jsonl", "pile-10k.jsonl"], {"path": "NeelNanda/pile-10k", "split": "train"}),
    "c4": (
        ["c4.jsonl"],
        {
            "path": "allenai/c4",
            "data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
            "split": "train",
        },
    ),
    "lambada": ([LAMBADA_FILE], {"path": "EleutherAI/lambada_openai", "name": "default", "split": "test"}),
}
# Calibration needs far fewer tokens than a large corpus holds: stop reading after this many
# characters per requested token (about 5x the tokens asked for at ~4 characters per token).
_CHARS_PER_TOKEN_BUDGET = 20


@dataclass
class CalibrationData:
    ids: torch.LongTensor = field(repr=False)  # (nsamples, seqlen)
    source: str
    sha256: str  # of the raw text the windows were cut from
    nsamples: int
    seqlen: int
    seed: int


def _find_data_dir() -> Path | None:
    env = os.environ.get("WORKBENCH_DATA_DIR")
    if env:
        return Path(env).expanduser()
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The evaluation data folder: the argument, else $WORKBENCH_DATA_DIR, else ../shared/data."""
    if data_dir is not None:
        path, origin = Path(data_dir).expanduser(), "the data_dir argument"
    else:
        path = _find_data_dir()
        origin = "WORKBENCH_DATA_DIR" if os.environ.get("WORKBENCH_DATA_DIR") else "the shared/data search"
        if path is None:
            raise FileNotFoundError(
                "no evaluation data folder: set WORKBENCH_DATA_DIR to a folder holding "
                f"{LAMBADA_FILE} and {WIKITEXT2_TEST_FILE}, pass --data-dir, or place them in a "
                "shared/data folder beside the checkout."
            )
    if not path.is_dir():
        raise FileNotFoundError(f"data folder {path} (from {origin}) does not exist")
    return path


def _local_file(name: str, data_dir: str | Path | None) -> Path | None:
    """`name` inside the data folder, or None when there is no folder or no such file."""
    if data_dir is not None:
        folder = resolve_data_dir(data_dir)
    else:
        folder = _find_data_dir()
        if folder is None:
            return None
    path = folder / name
    return path if path.is_file() else None


def _hub_dataset(what: str, **kwargs):
    from datasets import load_dataset

    try:
        return load_dataset(**kwargs)
    except Exception as error:  # offline, unknown name, gated: all end the same way for the user
        raise FileNotFoundError(
            f"{what}: no local file and the hub dataset {kwargs.get('path')!r} could not be loaded "
            f"({type(error).__name__}: {error}). Put the file in the data folder "
            "(WORKBENCH_DATA_DIR or --data-dir) or check the network."
        ) from error


def _first_bad_line(path: Path, json_lines: bool) -> str | None:
    """Why a text or JSON-lines file cannot be read, naming its first bad line; None if none is."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                return (f"{path} is not UTF-8 text: line {number} has the byte 0x{raw[bad.start]:02x} "
                        f"at column {bad.start + 1}. Save it as UTF-8 (Latin-1 text: iconv -f latin1 "
                        "-t utf-8 FILE), or check that it is a text file at all")
            if json_lines and line.strip():
                try:
                    row = json.loads(line)
                except ValueError as bad:
                    return (f"{path} line {number} is not valid JSON ({bad}); each line of a .jsonl file "
                            'must be one JSON object such as {"text": "..."}: fix or delete that line')
                if not isinstance(row, dict):
                    return (f"{path} line {number} is a JSON {type(row).__name__}, not an object with a "
                            '"text" field such as {"text": "..."}')
    return None


def _check_rows(path: Path, rows: list) -> list[str]:
    for number, row in enumerate(rows, 1):
        if not isinstance(row, str):
            what = "no 'text' field" if row is None else f"a 'text' field of type {type(row).__name__}"
            raise DataError(f"{path}: row {number} has {what}, where every row needs a string of "
                            "text; fix or delete that row")
    return rows


def _text_rows(path: Path) -> list[str]:
    """Rows of a .txt/.raw/.tokens file (one per line) or the `text` field of a .jsonl/.json file."""
    from datasets import load_dataset

    suffix = path.suffix.lower()
    if suffix not in JSON_SUFFIXES + TEXT_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl or .json")
    try:
        empty = path.stat().st_size == 0
    except OSError as error:
        raise DataError(f"{path} cannot be read ({describe_error(error)})") from error
    if empty:
        raise DataError(f"{path} is empty: give a file with text in it")
    try:
        if suffix in JSON_SUFFIXES:
            dataset = load_dataset("json", data_files=str(path), split="train")
            if "text" not in dataset.column_names:
                raise DataError(f"{path} has no 'text' field (fields: {dataset.column_names})")
            return _check_rows(path, list(dataset["text"]))
        return _check_rows(path, list(load_dataset("text", data_files=str(path), split="train")["text"]))
    except DataError:
        raise
    except (*FILE_READ_ERRORS, StopIteration) as error:
        why = _first_bad_line(path, json_lines=suffix == ".jsonl")
        if why is None and suffix == ".json":
            why = (f"{path} is not a JSON file that holds rows with a 'text' field (a list of "
                   '{"text": "..."} objects, or one JSON object per line in a .jsonl file)')
        raise DataError(why or f"{path} cannot be read as {suffix} text ({describe_error(error)}); "
                        "check that it is a complete UTF-8 text file") from error


def _local_rows(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES
        )
        if not files:
            raise DataError(f"{path} holds no .txt, .jsonl or .json files")
        return [row for f in files for row in _text_rows(f)]
    return _text_rows(path)


def _join_until(rows, budget_chars: int) -> str:
    """Rows joined with blank lines, stopping once `budget_chars` characters are collected."""
    kept, total = [], 0
    for row in rows:
        kept.append(row)
        total += len(row) + 2
        if total >= budget_chars:
            break
    return "\n\n".join(kept)


def calibration_text(source: str, budget_chars: int | None = None, data_dir=None) -> tuple[str, str]:
    """(text, where it came from) for a calibration source name or a local path."""
    budget = budget_chars or 1 << 62
    if source in CALIBRATION_SOURCES:
        files, hub = CALIBRATION_SOURCES[source]
        for name in files:
            path = _local_file(name, data_dir)
            if path is not None:
                return _join_until(_local_rows(path), budget), str(path)
        dataset = _hub_dataset(f"calibration source {source!r}", **hub)
        label = f"hub:{hub['path']}"
        return _join_until((row["text"] for row in dataset), budget), label
    path = Path(source).expanduser()
    if not path.exists():
        names = ", ".join(CALIBRATION_SOURCES)
        raise DataError(f"unknown calibration source {source!r}: use one of {names}, or a .txt/.jsonl path")
    return _join_until(_local_rows(path), budget), str(path)


def tokenize_text(tokenizer, text: str, add_special_tokens: bool = False) -> torch.Tensor:
    """One long 1-D tensor of token ids (no length warning: we cut windows ourselves)."""
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)
    return torch.tensor(encoded["input_ids"], dtype=torch.long)


def load_calibration(
    tokenizer,
    source: str = "wikitext2",
    nsamples: int = 64,
    seqlen: int = 512,
    seed: int = 0,
    data_dir: str | Path | None = None,
) -> CalibrationData:
    """`nsamples` random windows of `seqlen` tokens from the concatenated, tokenized text."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive (got {nsamples}, {seqlen})")
    text, origin = calibration_text(source, nsamples * seqlen * _CHARS_PER_TOKEN_BUDGET, data_dir)
    ids = tokenize_text(tokenizer, text)
    if ids.numel() < seqlen:
        raise DataError(
            f"calibration text from {origin} has {ids.numel()} tokens, fewer than one window of "
            f"{seqlen}; give more text or a smaller seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator)
    windows = torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
    log.info("calibration: %d x %d tokens from %s (%d tokens of text)", nsamples, seqlen, origin, ids.numel())
    return CalibrationData(
        ids=windows,
        source=source,
        sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
    )


def load_lambada(data_dir: str | Path | None = None, limit: int | None = None) -> list[str]:
    """LAMBADA passages (OpenAI's test set, 5153), the last word of each being the target."""
    path = _local_file(LAMBADA_FILE, data_dir)
    if path is not None:
        texts = _text_rows(path)
    else:
        hub = CALIBRATION_SOURCES["lambada"][1]
        texts = list(_hub_dataset("LAMBADA", **hub)["text"])
    texts = texts[:limit] if limit is not None else texts
    for number, text in enumerate(texts, 1):
        if not isinstance(text, str) or len(text.split()) < 2:
            raise DataError(f"LAMBADA passage {number} ({str(text)[:40]!r}) from {path or 'the hub'} "
                            "has no context before its last word: every passage needs at least two "
                            "words; fix or delete that row")
    return texts


def load_wikitext2_test(data_dir: str | Path | None = None) -> str:
    """The WikiText-2 raw test split as one string, rows joined with "\\n\\n".

    This follows the usual `"\\n\\n".join(test["text"])` convention. The local file has the blank
    rows dropped and each row's trailing newline is removed on reading, so the local text has
    fewer newlines than the hub version and yields slightly fewer tokens (and slightly different
    512-token windows); the words are the same. The hub path reproduces the convention exactly.
    """
    path = _local_file(WIKITEXT2_TEST_FILE, data_dir)
    if path is not None:
        return "\n\n".join(_text_rows(path))
    hub = {"path": "wikitext", "name": "wikitext-2-raw-v1", "split": "test"}
    return "\n\n".join(_hub_dataset("WikiText-2 test", **hub)["text"])
