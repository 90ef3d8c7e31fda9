"""Malformed files of every kind the workbench reads, thrown at the CLI entry point.

Each case must end in exactly one `error: ...` line on stderr, exit status 2, no traceback, and
nothing written to the --out folder or export root.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import char_tokenizer

from workbench.cli import main

CALIB_TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs.\n" * 30
LAMBADA_ROWS = [{"text": "the cat sat on the mat and looked at the cat"},
                {"text": "a dog ran to the park and played with the dog"}]
WIKITEXT = " = Title = \n" + "Some words of text that go on for a while .\n" * 40


def _good_folder(path: Path, family: str = "llama", **config) -> Path:
    from tiny_models import tiny_config

    settings = tiny_config(family)
    for key, value in config.items():
        setattr(settings, key, value)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(settings)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _copy_without_weights(good: Path, path: Path) -> Path:
    path.mkdir()
    for item in good.iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, path / item.name)
    return path


def _data_dir(path: Path, lambada: str | bytes | None = None, wikitext: str | bytes | None = None) -> Path:
    path.mkdir()
    lambada = lambada if lambada is not None else "".join(json.dumps(r) + "\n" for r in LAMBADA_ROWS)
    wikitext = wikitext if wikitext is not None else WIKITEXT
    for name, content in (("lambada_openai_test.jsonl", lambada), ("wikitext2_test.raw", wikitext)):
        if isinstance(content, bytes):
            (path / name).write_bytes(content)
        else:
            (path / name).write_text(content, encoding="utf-8")
    return path


def _recipe(path: Path, calib: Path, **fields) -> Path:
    from workbench.recipe import RECIPE_FORMAT

    raw = {"format": RECIPE_FORMAT, "version": 1,
           "prune": {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5,
                     "calibration": str(calib), "nsamples": 2, "seqlen": 16},
           "model": {}, "calibration": {}}
    raw.update(fields)
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def _nan_folder(good: Path, path: Path, value: float) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(good, path)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = value
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good files to start from: a tiny model folder, calibration text and a data folder."""
    root = tmp_path_factory.mktemp("hostile")
    good = _good_folder(root / "good")
    calib = root / "calib.txt"
    calib.write_text(CALIB_TEXT, encoding="utf-8")
    return {"root": root, "good": good, "calib": calib, "data": _data_dir(root / "data")}


def _prune(model, calib, *extra) -> list[str]:
    return ["prune", "--model", str(model), "--method", "wanda", "--calib", str(calib),
            "--nsamples", "2", "--seqlen", "16", *extra]


def _model_cases(world, root: Path) -> dict:
    good, calib = world["good"], world["calib"]
    weights = (good / "model.safetensors").read_bytes()
    cases = {}

    def folder(name, config=None, safetensors=None):
        path = _copy_without_weights(good, root / name)
        if config is not None:
            (path / "config.json").write_bytes(config)
        if safetensors is not None:
            (path / "model.safetensors").write_bytes(safetensors)
        cases[name] = _prune(path, calib)

    folder("config-only")
    folder("config-not-json", config=b"{\"model_type\": \"llama\", oops")
    folder("config-a-list", config=b"[1, 2, 3]")
    folder("config-binary", config=bytes(range(256)) * 4)
    folder("config-no-model-type", config=b"{\"hidden_size\": 4}")
    folder("config-bad-values", config=json.dumps({"model_type": "llama", "hidden_size": "big",
                                                   "num_hidden_layers": -3}).encode())
    folder("safetensors-empty", safetensors=b"")
    folder("safetensors-truncated", safetensors=weights[: len(weights) // 2])
    folder("safetensors-random", safetensors=os.urandom(4096))
    folder("safetensors-header-too-large", safetensors=struct.pack("<Q", 1 << 60) + b"{}")
    folder("safetensors-header-cut", safetensors=weights[:100])
    from safetensors.torch import save_file

    other = _copy_without_weights(good, root / "safetensors-foreign-names")
    save_file({"something.else": torch.zeros(3)}, other / "model.safetensors", metadata={"format": "pt"})
    cases["safetensors-foreign-names"] = _prune(other, calib)
    shaped = _copy_without_weights(good, root / "safetensors-wrong-shapes")
    save_file({"model.embed_tokens.weight": torch.zeros(7, 3)}, shaped / "model.safetensors",
              metadata={"format": "pt"})
    cases["safetensors-wrong-shapes"] = _prune(shaped, calib)

    for name, content in (("gguf-empty", b""), ("gguf-random", os.urandom(2048)),
                          ("gguf-magic-only", b"GGUF" + struct.pack("<I", 3) + b"\xff" * 64),
                          ("gguf-text", b"GGUF is not what this is\n" * 50)):
        path = root / f"{name}.gguf"
        path.write_bytes(content)
        cases[name] = _prune(path, calib)

    bert = root / "bert"
    T.BertForMaskedLM(T.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64)).save_pretrained(bert)
    char_tokenizer().save_pretrained(bert)
    cases["bert-masked-lm"] = _prune(bert, calib)
    t5 = root / "t5"
    T.T5ForConditionalGeneration(T.T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=1,
                                            num_heads=2, d_kv=16)).save_pretrained(t5)
    char_tokenizer().save_pretrained(t5)
    cases["t5-encoder-decoder"] = _prune(t5, calib)
    return cases


def _data_cases(world, root: Path) -> dict:
    good = world["good"]
    cases = {}
    files = {
        "calib-empty.txt": b"",
        "calib-blank-lines.txt": b"\n\n\n\n",
        "calib-binary.txt": bytes(range(256)) * 16,
        "calib-latin1.txt": ("caf\xe9 na\xefve r\xe9sum\xe9 " * 60).encode("latin-1"),
        "calib-empty.jsonl": b"",
        "calib-bad-line.jsonl": (json.dumps({"text": CALIB_TEXT}) + "\n{\"text\": oops\n").encode(),
        "calib-no-text.jsonl": (json.dumps({"body": CALIB_TEXT}) + "\n").encode(),
        "calib-number-text.jsonl": (json.dumps({"text": CALIB_TEXT}) + "\n" + json.dumps({"text": 5})
                                    + "\n").encode(),
        "calib-list.json": b"[1, 2, 3]",
        "calib-binary.jsonl": os.urandom(3000),
    }
    for name, content in files.items():
        path = root / name
        path.write_bytes(content)
        cases[name] = _prune(good, path)

    good_rows = "".join(json.dumps(r) + "\n" for r in LAMBADA_ROWS)
    lambadas = {
        "lambada-bad-line": good_rows + "{\"text\": \"unfinished\n",
        "lambada-binary": os.urandom(3000),
        "lambada-empty": "",
        "lambada-not-text": good_rows + json.dumps({"text": ["a", "list"]}) + "\n",
        "lambada-no-text-field": json.dumps({"passage": "a b c"}) + "\n",
        "lambada-one-word": good_rows + json.dumps({"text": "alone"}) + "\n",
    }
    for name, content in lambadas.items():
        folder = _data_dir(root / name, lambada=content)
        cases[name] = ["evaluate", "--model", str(good), "--task", "lambada", "--data-dir", str(folder)]
    wikitexts = {"wikitext-binary": bytes(range(256)) * 16, "wikitext-empty": "",
                 "wikitext-latin1": ("caf\xe9 " * 400).encode("latin-1")}
    for name, content in wikitexts.items():
        folder = _data_dir(root / name, wikitext=content)
        cases[name] = ["evaluate", "--model", str(good), "--task", "wikitext2", "--seqlen", "16",
                       "--data-dir", str(folder)]
    return cases


def _recipe_cases(world, root: Path) -> dict:
    good, calib = world["good"], world["calib"]
    recipes = {
        "recipe-not-json": lambda p: p.write_text("{nope"),
        "recipe-binary": lambda p: p.write_bytes(os.urandom(500)),
        "recipe-a-list": lambda p: p.write_text("[1, 2]"),
        "recipe-prune-a-list": lambda p: _recipe(p, calib, prune=[1, 2]),
        "recipe-prune-a-string": lambda p: _recipe(p, calib, prune="sparsegpt"),
        "recipe-model-a-list": lambda p: _recipe(p, calib, model=["x"]),
        "recipe-calibration-a-string": lambda p: _recipe(p, calib, calibration="wikitext2"),
        "recipe-version-a-word": lambda p: _recipe(p, calib, version="one"),
        "recipe-result-a-list": lambda p: _recipe(p, calib, result=[1]),
        "recipe-bad-sparsity": lambda p: _recipe(p, calib, prune={"method": "magnitude", "sparsity": "half"}),
    }
    cases = {}
    for name, write in recipes.items():
        path = root / f"{name}.json"
        write(path)
        cases[name] = ["prune", "--recipe", str(path), "--model", str(good)]
        cases[f"export-{name}"] = ["export", "--recipe", str(path), "--model", str(good), "--name", "x"]
    return cases


def _run_cases(world, root: Path) -> dict:
    runs = root / "runs"
    shapes = {"run-a-list": [1, 2], "run-config-a-list": {"kind": "prune", "status": "done", "config": [1]},
              "run-meta-a-string": "done", "run-status-a-dict": {"kind": "prune", "status": {"x": 1}},
              "run-results-broken": {"kind": "prune", "status": "done", "config": {}}}
    cases = {}
    for name, meta in shapes.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "run.json").write_text(json.dumps(meta))
        cases[name] = ["runs", "show", name, "--root", str(runs)]
    (runs / "run-results-broken" / "results.json").write_bytes(b"\xff\xfe{")
    (runs / "run-binary").mkdir()
    (runs / "run-binary" / "run.json").write_bytes(os.urandom(300))
    cases["run-binary"] = ["runs", "show", "run-binary", "--root", str(runs)]
    cases["runs-compare-broken"] = ["runs", "compare", "run-a-list", "run-config-a-list", "--root", str(runs)]
    return cases


def _option_cases(world, root: Path) -> dict:
    good, calib = world["good"], world["calib"]
    short = _good_folder(root / "gpt2-32-positions", family="gpt2", n_positions=32)
    nan = _nan_folder(good, root / "nan-weights", float("nan"))
    inf = _nan_folder(good, root / "inf-weights", float("inf"))
    cases = {
        "seqlen-over-positions": _prune(short, calib)[:-2] + ["--seqlen", "64"],
        "eval-seqlen-over-positions": ["evaluate", "--model", str(short), "--task", "wikitext2",
                                       "--seqlen", "64", "--data-dir", str(world["data"])],
        "device-unknown": _prune(good, calib, "--device", "tpu"),
        "device-gpu-word": _prune(good, calib, "--device", "gpu"),
        "device-cuda-absent": _prune(good, calib, "--device", "cuda:3"),
        "data-dir-missing": _prune(good, "wikitext2", "--data-dir", str(root / "no-such-dir")),
        "eval-data-dir-missing": ["evaluate", "--model", str(good), "--data-dir", str(root / "nope")],
        "round-to-without-slim": _prune(good, calib, "--round-to", "8"),
        "limit-without-eval": _prune(good, calib, "--limit", "3"),
        "overwrite-without-out": _prune(good, calib, "--overwrite"),
        "allocation-element-wise": _prune(good, calib, "--allocation", "global"),
        "no-mask-tuning-element-wise": _prune(good, calib, "--no-mask-tuning"),
        "revision-on-a-folder": _prune(good, calib, "--revision", "main"),
        "eval-seqlen-without-wikitext": ["evaluate", "--model", str(good), "--task", "lambada",
                                         "--seqlen", "64", "--data-dir", str(world["data"])],
        "export-round-to-masked": ["export", "--model", str(good), "--name", "x", "--round-to", "8"],
        "export-public-without-push": ["export", "--model", str(good), "--name", "x", "--public"],
        "export-data-dir-without-recipe": ["export", "--model", str(good), "--name", "x",
                                           "--data-dir", str(world["data"])],
        "runs-list-with-names": ["runs", "list", "somename", "--root", str(root)],
        "calib-for-data-free-magnitude": _prune(good, calib, "--method", "magnitude"),
        "eval-fewshot-without-lm-eval": ["evaluate", "--model", str(good), "--task", "lambada",
                                         "--num-fewshot", "5", "--data-dir", str(world["data"])],
        "sweep-windows-without-wikitext": ["sweep", "--model", str(good), "--tasks", "lambada",
                                           "--windows", "4", "--out", str(root / "sweep-run")],
        "sweep-address-without-ray": ["sweep", "--model", str(good), "--address", "auto",
                                      "--out", str(root / "sweep-run")],
    }
    for method in ("sparsegpt", "wanda", "magnitude"):
        for kind, folder in (("nan", nan), ("inf", inf)):
            argv = _prune(folder, calib, "--method", method)
            cases[f"{kind}-weights-{method}"] = argv if method != "magnitude" else \
                ["prune", "--model", str(folder), "--method", "magnitude"]
    return cases


def all_cases(world) -> dict:
    root = world["root"] / "cases"
    root.mkdir(exist_ok=True)
    cases = {}
    for build in (_model_cases, _data_cases, _recipe_cases, _run_cases, _option_cases):
        folder = root / build.__name__.strip("_")
        folder.mkdir()
        cases.update(build(world, folder))
    return cases


@pytest.fixture(scope="module")
def cases(world):
    return all_cases(world)


CASE_NAMES = [
    "config-only", "config-not-json", "config-a-list", "config-binary", "config-no-model-type",
    "config-bad-values", "safetensors-empty", "safetensors-truncated", "safetensors-random",
    "safetensors-header-too-large", "safetensors-header-cut", "safetensors-foreign-names",
    "safetensors-wrong-shapes", "gguf-empty", "gguf-random", "gguf-magic-only", "gguf-text",
    "bert-masked-lm", "t5-encoder-decoder",
    "calib-empty.txt", "calib-blank-lines.txt", "calib-binary.txt", "calib-latin1.txt",
    "calib-empty.jsonl", "calib-bad-line.jsonl", "calib-no-text.jsonl", "calib-number-text.jsonl",
    "calib-list.json", "calib-binary.jsonl",
    "lambada-bad-line", "lambada-binary", "lambada-empty", "lambada-not-text", "lambada-no-text-field",
    "lambada-one-word", "wikitext-binary", "wikitext-empty", "wikitext-latin1",
    *[f"{prefix}recipe-{kind}" for prefix in ("", "export-")
      for kind in ("not-json", "binary", "a-list", "prune-a-list", "prune-a-string", "model-a-list",
                   "calibration-a-string", "version-a-word", "result-a-list", "bad-sparsity")],
    "run-a-list", "run-config-a-list", "run-meta-a-string", "run-status-a-dict", "run-results-broken",
    "run-binary", "runs-compare-broken",
    "seqlen-over-positions", "eval-seqlen-over-positions", "device-unknown", "device-gpu-word",
    "device-cuda-absent", "data-dir-missing", "eval-data-dir-missing", "round-to-without-slim",
    "limit-without-eval", "overwrite-without-out", "allocation-element-wise",
    "no-mask-tuning-element-wise", "revision-on-a-folder", "eval-seqlen-without-wikitext",
    "export-round-to-masked", "export-public-without-push", "export-data-dir-without-recipe",
    "runs-list-with-names", "eval-fewshot-without-lm-eval", "sweep-windows-without-wikitext",
    "sweep-address-without-ray", "calib-for-data-free-magnitude",
    *[f"{kind}-weights-{method}" for kind in ("nan", "inf") for method in ("sparsegpt", "wanda", "magnitude")],
]


def run_case(argv: list[str], out: Path, capsys) -> tuple[int, str]:
    """main(argv) with an --out (prune) or --root (export) that must stay absent."""
    if argv[0] == "prune" and "--overwrite" not in argv:
        argv = [*argv, "--out", str(out)]
    elif argv[0] == "export":
        argv = [*argv, "--root", str(out), "--no-zip"]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("name", CASE_NAMES)
def test_hostile_input_is_one_error_line(name, cases, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORKBENCH_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code, output = run_case(cases[name], out, capsys)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert "Traceback" not in output, output
    assert code == 2, output
    assert len(errors) == 1, output
    assert len(errors[0]) > len("error: ") + 20, output
    assert not out.exists()
    assert not (tmp_path / "logs").exists()  # a user's mistake is not an internal error
    assert list(tmp_path.iterdir()) == []  # the working folder: no runs/ or exports/ either
    if "--out" in cases[name]:
        assert not Path(cases[name][cases[name].index("--out") + 1]).exists()


def test_every_case_is_checked(cases):
    assert sorted(cases) == sorted(CASE_NAMES)


def test_module_entry_point_gives_one_line_for_a_model_without_weights(cases, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "workbench", *cases["config-only"], "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1],
                          env={**os.environ, "WORKBENCH_LOG_DIR": str(tmp_path / "logs")})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no weights file" in lines[0]
    assert not out.exists() and not (tmp_path / "logs").exists()
