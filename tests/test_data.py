"""Calibration windows and evaluation text: local files, the data folder, clear errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from workbench.data import (
    load_calibration,
    load_lambada,
    load_wikitext2_test,
    resolve_data_dir,
)

TEXT = " ".join(f"word{i % 37} and some more text number {i}." for i in range(200))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_windows_shape_and_sha(chars, text_file):
    data = load_calibration(chars, str(text_file), nsamples=6, seqlen=32, seed=0)
    assert data.ids.shape == (6, 32) and data.ids.dtype == torch.long
    assert (data.nsamples, data.seqlen, data.seed, data.source) == (6, 32, 0, str(text_file))
    assert data.sha256 == hashlib.sha256(TEXT.encode()).hexdigest()
    # every window is a contiguous slice of the tokenized text
    full = chars(TEXT, add_special_tokens=False).input_ids
    as_text = " ".join(map(str, full))
    for window in data.ids.tolist():
        assert " ".join(map(str, window)) in as_text


def test_windows_are_seeded(chars, text_file):
    first = load_calibration(chars, str(text_file), nsamples=4, seqlen=16, seed=1)
    again = load_calibration(chars, str(text_file), nsamples=4, seqlen=16, seed=1)
    other = load_calibration(chars, str(text_file), nsamples=4, seqlen=16, seed=2)
    assert torch.equal(first.ids, again.ids)
    assert not torch.equal(first.ids, other.ids)


def test_jsonl_and_folder_sources(chars, tmp_path):
    rows = [{"text": f"document {i} " + "lorem ipsum " * 10, "id": i} for i in range(5)]
    jsonl = tmp_path / "docs" / "a.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    (jsonl.parent / "b.txt").write_text("plain text line\nanother line\n")
    (jsonl.parent / "ignored.bin").write_bytes(b"\0\1")

    from_file = load_calibration(chars, str(jsonl), nsamples=3, seqlen=20)
    assert from_file.ids.shape == (3, 20)
    expected = "\n\n".join(r["text"] for r in rows)
    assert from_file.sha256 == hashlib.sha256(expected.encode()).hexdigest()

    from_folder = load_calibration(chars, str(jsonl.parent), nsamples=3, seqlen=20)
    folder_text = expected + "\n\nplain text line\n\nanother line"
    assert from_folder.sha256 == hashlib.sha256(folder_text.encode()).hexdigest()


def test_bundled_wikitext2_calibration(chars, data_dir):
    data = load_calibration(chars, "wikitext2", nsamples=4, seqlen=64, seed=0, data_dir=data_dir)
    assert data.ids.shape == (4, 64) and data.source == "wikitext2"


def test_bad_sources(chars, tmp_path):
    with pytest.raises(ValueError, match="unknown calibration source"):
        load_calibration(chars, "no-such-source")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="fewer than one window"):
        load_calibration(chars, str(short), nsamples=2, seqlen=512)
    no_text = tmp_path / "rows.jsonl"
    no_text.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        load_calibration(chars, str(no_text))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        load_calibration(chars, str(empty))
    with pytest.raises(ValueError, match="positive"):
        load_calibration(chars, str(short), nsamples=0)


def test_hub_name_without_local_file_offline(chars, tmp_path):
    with pytest.raises(FileNotFoundError, match="pile-10k"):
        load_calibration(chars, "pile10k", nsamples=2, seqlen=8, data_dir=tmp_path)


def test_resolve_data_dir(tmp_path, monkeypatch, data_dir):
    assert resolve_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="WORKBENCH_DATA_DIR"):
        resolve_data_dir()
    monkeypatch.delenv("WORKBENCH_DATA_DIR")
    assert resolve_data_dir().resolve() == data_dir.resolve()  # found as ../shared/data
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")


def test_lambada_file(data_dir):
    texts = load_lambada(data_dir)
    assert len(texts) == 5153
    assert load_lambada(data_dir, limit=3) == texts[:3]
    assert all(" " in t for t in texts)


def test_wikitext2_test_text(data_dir):
    text = load_wikitext2_test(data_dir)
    assert text.startswith(" = Robert Boulter = \n\n Robert Boulter is an English film")
    assert "\r" not in text
    assert text.count("\n\n") == 2890  # 2891 rows, blank rows already dropped from the file


def test_missing_lambada_in_given_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="LAMBADA"):
        load_lambada(tmp_path)


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", "is empty"),
    ("binary.txt", bytes(range(256)) * 8, r"is not UTF-8 text: line 2 has the byte 0x80"),
    ("latin1.txt", "na\xefve caf\xe9".encode("latin-1"), r"line 1 has the byte 0xef at column 3"),
    ("empty.jsonl", b"", "is empty"),
    ("rows.jsonl", b'{"text": "fine"}\n{"text": "fine"}\n{"text": broken}\n', "line 3 is not valid JSON"),
    ("rows.jsonl", b'{"text": "fine"}\n[1, 2]\n', "line 2 is a JSON list"),
    ("rows.jsonl", b'{"text": "fine"}\n{"text": 7}\n', "row 2 has a 'text' field of type int"),
    ("rows.json", b"[1, 2]", "row 1 has a 'text' field of type int"),
    ("rows.csv", b"a,b\n", "unsupported file type"),
])
def test_unreadable_calibration_files_are_a_data_error(chars, tmp_path, name, content, message):
    from workbench.errors import DataError

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        load_calibration(chars, str(path), nsamples=1, seqlen=4)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("rows, message", [
    ('{"text": "a b c"}\n{"text": "half\n', "line 2 is not valid JSON"),
    ('{"text": "a b c"}\n{"text": "lonely"}\n', "passage 2 .* has no context before its last word"),
    ('{"text": "a b c"}\n{"other": "x y"}\n', "row 2 has no 'text' field"),
])
def test_a_lambada_file_with_one_bad_row_names_it(tmp_path, rows, message):
    from workbench.errors import DataError

    (tmp_path / "lambada_openai_test.jsonl").write_text(rows)
    with pytest.raises(DataError, match=message):
        load_lambada(tmp_path)
