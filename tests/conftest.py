"""Shared fixtures: the bundled model (loaded once), the data folder, an offline char tokenizer."""

from __future__ import annotations

import os

# Tests never touch the network: a hub lookup fails at once instead of retrying for a minute.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import string  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"


@pytest.fixture(autouse=True, scope="session")
def _runs_outside_the_repository(tmp_path_factory):
    """Commands that record runs (prune, sweep) write them under a temporary run store."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WORKBENCH_RUNS", str(tmp_path_factory.mktemp("runs")))
        yield


def char_tokenizer():
    """One token per character (vocab 97 < the tiny models' 128), built without downloads."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    vocab.update({char: index + 3 for index, char in enumerate(CHARS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>",
                                   pad_token="<pad>")


@pytest.fixture(scope="session")
def chars():
    return char_tokenizer()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The evaluation data: $WORKBENCH_DATA_DIR, else ../shared/data beside the checkout."""
    from workbench.data import resolve_data_dir

    env = os.environ.get("WORKBENCH_DATA_DIR")
    return resolve_data_dir(env or ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M, loaded once per test session (converted on first use, ~35 s)."""
    from workbench.models import load_model

    return load_model("default")
