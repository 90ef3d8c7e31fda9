"""Out-of-core WikiText-2 perplexity: onloading one block at a time from the safetensors
checkpoint must give the in-memory `workbench.evaluate.perplexity` figure on the same windows."""

import json
import random
import string

import pytest
import torch
import transformers as T
from conftest import CHARS, char_tokenizer
from tiny_models import VOCAB, tiny_config

from workbench.cli import main
from workbench.evaluate import perplexity
from workbench.offload import OffloadError
from workbench.offload_eval import check_offload_tasks, perplexity_from_disk

SEQLEN = 24  # longer than the sliding window below, so sliding and full attention differ
TEXT = "".join(random.Random(0).choice(CHARS) for _ in range(SEQLEN * 7 + 5))  # 7 windows and a partial one


def family_config(family: str):
    if family == "gemma3_text":  # layer types: sliding vs full attention, each with its own rotary base
        return T.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                               "sliding_attention"])
    return tiny_config(family)


def saved(tmp_path, family="llama", dtype=torch.float32):
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(family_config(family)).to(dtype)
    folder = tmp_path / f"{family}-{str(dtype)[6:]}"
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def in_memory(folder, **kwargs):
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return perplexity(model, char_tokenizer(), TEXT, seqlen=SEQLEN, batch_size=3, **kwargs)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("activations_in_memory", [True, False])
def test_out_of_core_equals_in_memory(tmp_path, family, activations_in_memory):
    folder = saved(tmp_path, family)
    expected = in_memory(folder)
    got = perplexity_from_disk(folder, TEXT, seqlen=SEQLEN, batch_size=3,
                               activations_in_memory=activations_in_memory, spill_dir=tmp_path)
    assert got.keys() == expected.keys()
    assert got["windows"] == expected["windows"] == 7
    assert got["tokens"] == expected["tokens"] and got["convention"] == expected["convention"]
    assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert got["items"]["nll"] == pytest.approx(expected["items"]["nll"], rel=1e-5)
    assert list(tmp_path.glob("offload-eval-*")) == []  # spilled activations are removed


def test_bf16_checkpoint_runs_in_fp32(tmp_path):
    folder = saved(tmp_path, "llama", torch.bfloat16)
    expected = in_memory(folder, limit=4)  # the bf16 weights, loaded as fp32
    got = perplexity_from_disk(folder, TEXT, seqlen=SEQLEN, batch_size=3, limit=4)
    assert got["windows"] == 4
    assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)


def test_token_ids(tmp_path):
    folder = saved(tmp_path, "qwen2")
    ids = torch.randint(0, VOCAB, (5 * SEQLEN + 3,), generator=torch.Generator().manual_seed(1))
    model = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    from workbench.evaluate import _window_nll

    windows = ids[: 5 * SEQLEN].view(5, SEQLEN)
    with torch.no_grad():
        expected = _window_nll(model, windows)
    got = perplexity_from_disk(folder, ids, seqlen=SEQLEN, batch_size=2)
    assert got["windows"] == 5
    assert got["items"]["nll"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        perplexity_from_disk(folder, windows[:, :-1], seqlen=SEQLEN)


def test_out_of_core_tasks_are_checked():
    check_offload_tasks(["wikitext2", "lambada", "lambada-last-token"])
    with pytest.raises(OffloadError, match="--offload none"):
        check_offload_tasks(["lm-eval:hellaswag", "wikitext2"])


def _json_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_evaluates_out_of_core(tmp_path, capsys, data_dir):
    folder = saved(tmp_path, "llama")
    common = ["evaluate", "--model", str(folder), "--task", "wikitext2", "--limit", "2", "--seqlen", "32",
              "--data-dir", str(data_dir), "--json"]
    assert main(common + ["--offload", "none"]) == 0
    expected = _json_line(capsys)["results"]["wikitext2"]
    assert main(common) == 0  # auto: this model fits in memory
    assert "offload" not in _json_line(capsys)
    assert main(common + ["--offload", "disk"]) == 0
    out = _json_line(capsys)
    assert out["offload"] is True
    got = out["results"]["wikitext2"]
    assert got["windows"] == expected["windows"] == 2
    assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)


def test_cli_evaluates_lambada_out_of_core(tmp_path, capsys, data_dir):
    folder = saved(tmp_path, "llama")
    common = ["evaluate", "--model", str(folder), "--task", "lambada,lambada-last-token", "--limit", "6",
              "--data-dir", str(data_dir), "--json"]
    assert main(common + ["--offload", "none"]) == 0
    expected = _json_line(capsys)["results"]
    assert main(common + ["--offload", "disk"]) == 0
    out = _json_line(capsys)
    assert out["offload"] is True and out["results"].keys() == expected.keys()
    for task in ("lambada", "lambada-last-token"):
        assert out["results"][task]["n"] == expected[task]["n"] == 6
        assert out["results"][task]["accuracy"] == expected[task]["accuracy"]
    assert out["results"]["lambada"]["perplexity"] == pytest.approx(expected["lambada"]["perplexity"], rel=1e-5)


def test_cli_refuses_other_tasks_out_of_core(tmp_path, capsys):
    folder = saved(tmp_path, "llama")
    capsys.readouterr()  # saving prints a progress bar
    assert main(["evaluate", "--model", str(folder), "--task", "lm-eval:hellaswag", "--offload", "disk"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "hellaswag" in err and "--offload none" in err
    assert "\n" not in err


# --- LAMBADA ---------------------------------------------------------------------------------

PASSAGES = [" ".join("".join(random.Random(seed * 100 + word).choice(string.ascii_lowercase)
                             for _ in range(1 + (seed + word) % 5)) for word in range(3 + seed % 7))
            for seed in range(11)]  # passages of different lengths: batches are right-padded


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("activations_in_memory", [True, False])
def test_lambada_out_of_core_equals_in_memory(tmp_path, family, activations_in_memory):
    from workbench.evaluate import _lambada
    from workbench.offload_eval import lambada_from_disk

    folder = saved(tmp_path, family)
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = _lambada(model, char_tokenizer(), PASSAGES, 4, None, None, last_word=True, last_token=True)
    got = lambada_from_disk(folder, PASSAGES, batch_size=4, activations_in_memory=activations_in_memory,
                            spill_dir=tmp_path)
    assert got.keys() == expected.keys() == {"lambada", "lambada-last-token"}
    for task in got:
        assert got[task].keys() == expected[task].keys()
        assert got[task]["items"]["accuracy"] == expected[task]["items"]["accuracy"]
        assert got[task]["n"] == expected[task]["n"] == len(PASSAGES)
        assert got[task]["tokens"] == expected[task]["tokens"]
    assert got["lambada"]["items"]["nll"] == pytest.approx(expected["lambada"]["items"]["nll"], rel=1e-5)
    assert got["lambada"]["perplexity"] == pytest.approx(expected["lambada"]["perplexity"], rel=1e-5)
    only_token = lambada_from_disk(folder, PASSAGES, batch_size=4, last_word=False, limit=5)
    assert only_token.keys() == {"lambada-last-token"}
    assert only_token["lambada-last-token"]["items"]["accuracy"] == expected["lambada-last-token"]["items"][
        "accuracy"][:5]
    assert list(tmp_path.glob("offload-eval-*")) == []
