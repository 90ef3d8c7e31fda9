"""Recipes: what they record, that they are checked on reading, and that they reproduce masks."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
import torch
from tiny_models import tiny_model

from workbench.prune import PruneConfig, prune
from workbench.recipe import (
    RECIPE_FORMAT,
    RecipeError,
    make_recipe,
    masks_digest,
    masks_match,
    read_recipe,
    reproduce,
    source_info,
    write_recipe,
)

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n") * 40


@pytest.fixture()
def saved_tiny(tmp_path, chars):
    """A tiny llama with a character tokenizer saved as a folder, and a calibration text file."""
    from workbench.models import load_model

    folder = tmp_path / "tiny"
    tiny_model("llama", seed=1).save_pretrained(folder)
    chars.save_pretrained(folder)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    return load_model(str(folder)), text


def _config(text, method="wanda", pattern="unstructured"):
    return PruneConfig(method=method, pattern=pattern, sparsity=0.5, calibration=str(text),
                       nsamples=4, seqlen=32, seed=3, batch_size=4)


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_recipe_reproduces_the_same_masks(saved_tiny, tmp_path, method, pattern):
    loaded, text = saved_tiny
    result = prune(loaded.model, _config(text, method, pattern), tokenizer=loaded.tokenizer)
    path = write_recipe(tmp_path / "recipe.json", make_recipe(result, loaded))

    recipe = read_recipe(path)
    assert recipe.config == result.config
    model, _, again = reproduce(recipe)  # loads the model from the recorded folder
    assert model is not loaded.model
    assert again.masks.keys() == result.masks.keys()
    assert all(torch.equal(again.masks[k], result.masks[k]) for k in result.masks)
    assert masks_match(recipe, again) is True
    assert again.calibration["sha256"] == result.calibration["sha256"]


def test_recipe_records_config_versions_source_and_calibration(saved_tiny, tmp_path):
    loaded, text = saved_tiny
    result = prune(loaded.model, _config(text), tokenizer=loaded.tokenizer)
    recipe = json.loads(write_recipe(tmp_path / "r.json", make_recipe(result, loaded)).read_text())
    assert recipe["format"] == RECIPE_FORMAT
    assert recipe["prune"] == result.config.to_dict()
    assert recipe["model"]["kind"] == "folder" and recipe["model"]["source"] == loaded.source
    assert recipe["model"]["class"] == "LlamaForCausalLM"
    calib = recipe["calibration"]
    assert calib["source"] == str(text) and calib["nsamples"] == 4 and calib["seqlen"] == 32
    assert calib["seed"] == 3 and len(calib["sha256"]) == 64
    assert {"python", "torch", "transformers", "workbench"} <= set(recipe["versions"])
    assert recipe["versions"]["torch"] == importlib.metadata.version("torch")
    assert recipe["created"].endswith("+00:00")
    assert recipe["result"]["masks_sha256"] == masks_digest(result.masks)
    assert recipe["result"]["sparsity"]["mlp"] == pytest.approx(result.summary["mlp"])


def test_changed_calibration_text_is_refused(saved_tiny, tmp_path):
    loaded, text = saved_tiny
    result = prune(loaded.model, _config(text), tokenizer=loaded.tokenizer)
    path = write_recipe(tmp_path / "recipe.json", make_recipe(result, loaded))
    text.write_text(TEXT.replace("fox", "cat"))
    with pytest.raises(RecipeError, match="sha256"):
        reproduce(path)


def test_digest_changes_when_one_mask_bit_changes():
    masks = {"a": torch.tensor([[True, False], [False, True]]), "b": torch.ones(3, 5, dtype=torch.bool)}
    flipped = {k: v.clone() for k, v in masks.items()}
    flipped["b"][2, 4] = False
    assert masks_digest(masks) == masks_digest({k: v.clone() for k, v in masks.items()})
    assert masks_digest(masks) != masks_digest(flipped)


def test_magnitude_recipe_reproduces_without_data():
    model = tiny_model("llama")
    config = PruneConfig(method="magnitude", sparsity=0.3, record_error=False)
    result = prune(model, config)
    recipe = read_recipe(make_recipe(result, {"source": "tiny"}))
    _, _, again = reproduce(recipe, model=tiny_model("llama"))
    assert masks_match(recipe, again) is True


@pytest.mark.parametrize("content,match", [
    ("not json", "not valid JSON"),
    (json.dumps({"prune": {}}), "not a prune-workbench recipe"),
    (json.dumps({"format": RECIPE_FORMAT, "version": 1, "prune": None}), "no prune config"),
    (json.dumps({"format": RECIPE_FORMAT, "version": 99, "prune": {"method": "wanda"}}), "newer"),
    (json.dumps({"format": RECIPE_FORMAT, "version": 1, "prune": {"method": "wanda", "colour": 1}}),
     "colour"),
    (json.dumps({"format": RECIPE_FORMAT, "version": 1, "prune": {"method": "nope"}}), "unknown method"),
])
def test_bad_recipes_are_refused_clearly(tmp_path, content, match):
    path = tmp_path / "recipe.json"
    path.write_text(content)
    with pytest.raises(RecipeError, match=match):
        read_recipe(path)


def test_missing_recipe_and_folder_lookup(tmp_path):
    with pytest.raises(RecipeError, match="no recipe"):
        read_recipe(tmp_path / "nowhere.json")
    recipe = make_recipe(config=PruneConfig(method="magnitude"))
    write_recipe(tmp_path / "recipe.json", recipe)
    assert read_recipe(tmp_path).config.method == "magnitude"  # a folder holding recipe.json


def test_tensor_calibration_cannot_be_reproduced():
    model = tiny_model("llama")
    from tiny_models import token_batch

    result = prune(model, PruneConfig(method="wanda", nsamples=2, seqlen=8), calibration=token_batch(2, 8))
    with pytest.raises(RecipeError, match="token ids"):
        reproduce(make_recipe(result), model=tiny_model("llama"))


def test_source_info_accepts_objects_dicts_and_strings():
    from types import SimpleNamespace

    loaded = SimpleNamespace(source="default", kind="default", resolved="/cache/x", revision=None,
                             dtype="fp32", model=torch.nn.Linear(1, 1), tokenizer=None)
    assert source_info(loaded) == {"source": "default", "kind": "default", "resolved": "/cache/x",
                                   "revision": None, "dtype": "fp32", "class": "Linear"}
    assert source_info("org/model") == {"source": "org/model"}
    assert source_info({"source": "a", "params": 3, "nested": {"x": 1}}) == {"source": "a", "params": 3}


# --- the command line -----------------------------------------------------------------------


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cli_export_from_a_recipe_reproduces_and_converts(saved_tiny, tmp_path, capsys):
    from workbench.cli import main

    loaded, text = saved_tiny
    result = prune(loaded.model, _config(text), tokenizer=loaded.tokenizer)
    path = write_recipe(tmp_path / "recipe.json", make_recipe(result, loaded))
    root = tmp_path / "exports"
    assert main(["export", "--recipe", str(path), "--name", "again", "--root", str(root), "--json"]) == 0
    out = _last_json(capsys)
    assert out["masks_match_recipe"] is True
    assert out["formats"] == ["masked"] and (root / "again.zip").is_file()
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(root / "again")
    for name, mask in result.masks.items():
        weight = again.get_submodule(name).weight
        assert torch.equal(weight != 0, mask), name

    # converting that export to the compact format keeps its recipe
    assert main(["export", "--model", str(root / "again"), "--name", "compact", "--root", str(root),
                 "--format", "compact", "--no-zip", "--json"]) == 0
    out = _last_json(capsys)
    assert out["zip"] is None and "compact" in out["sizes"]
    carried = json.loads((root / "compact" / "recipe.json").read_text())
    assert carried["prune"] == result.config.to_dict()
    assert carried["result"]["masks_sha256"] == masks_digest(result.masks)


def test_cli_export_errors_are_one_line(saved_tiny, tmp_path, capsys):
    from workbench.cli import main

    loaded, _ = saved_tiny
    folder = loaded.resolved
    assert main(["export", "--model", folder, "--name", "../up", "--root", str(tmp_path / "e")]) == 2
    assert "error: export name '../up'" in capsys.readouterr().err
    assert main(["export", "--model", folder, "--name", "x", "--format", "onnx"]) == 2
    assert "unknown format 'onnx'" in capsys.readouterr().err
    assert main(["export", "--recipe", str(tmp_path / "missing.json"), "--name", "x"]) == 2
    assert "no recipe" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_cli_push_reads_the_token_from_the_environment_only(saved_tiny, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    from workbench.cli import main

    token = "hf_FromTheEnvironment42"
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(token)

        def create_repo(self, **kwargs):
            calls.append(kwargs)

        def upload_folder(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    loaded, _ = saved_tiny
    args = ["export", "--model", loaded.resolved, "--name", "hub", "--root", str(tmp_path / "e"),
            "--push-to", "someone/tiny", "--token-env", "MY_HF_TOKEN", "--json"]
    monkeypatch.delenv("MY_HF_TOKEN", raising=False)
    assert main(args) == 2
    assert "MY_HF_TOKEN" in capsys.readouterr().err
    monkeypatch.setenv("MY_HF_TOKEN", token)
    assert main(args) == 0
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err
    assert calls[0] == token and calls[1]["private"] is True
    assert _last_json_from(captured.out)["hub_url"] == "https://huggingface.co/someone/tiny"
    for path in (tmp_path / "e").rglob("*"):
        assert not path.is_file() or token.encode() not in path.read_bytes()


def _last_json_from(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_cli_prune_recipe_reproduces_the_masks(saved_tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from workbench.cli import main

    loaded, text = saved_tiny
    result = prune(loaded.model, _config(text, "sparsegpt"), tokenizer=loaded.tokenizer)
    path = write_recipe(tmp_path / "recipe.json", make_recipe(result, loaded))
    out = tmp_path / "pruned"
    assert main(["prune", "--recipe", str(path), "--out", str(out), "--json"]) == 0
    report = _last_json(capsys)
    assert report["masks_match_recipe"] is True
    assert report["config"] == result.config.to_dict()
    again = AutoModelForCausalLM.from_pretrained(out)
    for name, mask in result.masks.items():
        assert torch.equal(again.get_submodule(name).weight != 0, mask), name

    # a recipe whose recorded masks differ: the run says so and exits 1
    tampered = json.loads(path.read_text())
    tampered["result"]["masks_sha256"] = "0" * 64
    (tmp_path / "tampered.json").write_text(json.dumps(tampered))
    assert main(["prune", "--recipe", str(tmp_path / "tampered.json")]) == 1
    assert "masks DIFFER" in capsys.readouterr().out

    # the recipe fixes the config: contradicting flags are refused
    assert main(["prune", "--recipe", str(path), "--sparsity", "0.7"]) == 2
    assert "drop --sparsity" in capsys.readouterr().err


@pytest.mark.parametrize("method,pattern,scope", [
    ("magnitude", "unstructured", "all"), ("wanda", "2:4", "all"), ("sparsegpt", "unstructured", "all"),
    ("retrain-free", "channel", "mlp"), ("retrain-free", "head", "attention"), ("wanda", "channel", "mlp"),
])
def test_every_method_round_trips_through_a_recipe_and_the_cli(saved_tiny, tmp_path, capsys, method,
                                                               pattern, scope):
    from workbench.cli import main

    loaded, text = saved_tiny
    config = _config(text, method, pattern)
    config.scope = scope
    result = prune(loaded.model, config, tokenizer=loaded.tokenizer)
    path = write_recipe(tmp_path / "recipe.json", make_recipe(result, loaded))

    _, _, again = reproduce(read_recipe(path))
    assert masks_match(read_recipe(path), again) is True

    assert main(["prune", "--recipe", str(path), "--json"]) == 0
    assert _last_json(capsys)["masks_match_recipe"] is True
    assert main(["export", "--recipe", str(path), "--name", "again", "--root", str(tmp_path / "exports"),
                 "--no-zip", "--json"]) == 0
    assert _last_json(capsys)["masks_match_recipe"] is True


@pytest.mark.parametrize("field,value", [("prune", [1]), ("model", ["x"]), ("calibration", "wikitext2"),
                                         ("version", "one"), ("result", [1]), ("version", True)])
def test_recipe_fields_of_the_wrong_shape_are_refused(tmp_path, field, value):
    raw = {"format": RECIPE_FORMAT, "version": 1, "prune": {"method": "magnitude"}, field: value}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(RecipeError, match=f'"{field}" is a'):
        read_recipe(path)


def _round_trip_cases() -> list:
    """Every method on each pattern kind it prunes (from the method table, so a new method is
    covered at once), plus the structured settings a recipe must carry."""
    from workbench.methods import METHODS

    cases = []
    for name, method in METHODS.items():
        if method.elementwise:
            cases += [(name, "unstructured", "all", {}), (name, "2:4", "all", {})]
        if method.structured:
            cases += [(name, "channel", "mlp", {}), (name, "head", "attention", {})]
    return cases + [
        # retrain-free whose layer-wise pass reads no data: only its Fisher pass saw the text
        ("retrain-free", "channel", "mlp", {"mask_tuning": False, "record_error": False}),
        ("retrain-free", "channel", "mlp", {"unit_allocation": "uniform", "block_sparsity": [0.25, 0.5]}),
        ("retrain-free", "head", "attention", {"budget": "flops", "sparsity": 0.05}),
        ("wanda", "channel", "mlp", {"exclude": r"layers\.0\."}),
        # a data-free unit score with the least-squares refit still reads calibration text
        ("magnitude", "channel", "mlp", {"mask_tuning": True}),
        ("sparsegpt", "unstructured", "all", {"block_sparsity": [0.3, 0.6], "record_error": False}),
    ]


@pytest.mark.parametrize("method,pattern,scope,extra", _round_trip_cases())
def test_recipe_round_trip_gives_the_same_config_and_masks(saved_tiny, tmp_path, method, pattern, scope,
                                                           extra):
    loaded, text = saved_tiny
    config = _config(text, method, pattern)
    config.scope = scope
    for name, value in extra.items():
        setattr(config, name, value)
    result = prune(loaded.model, config, tokenizer=loaded.tokenizer)
    path = write_recipe(tmp_path / "recipe.json", make_recipe(result, loaded))

    recipe = read_recipe(path)
    assert recipe.config == result.config == config
    if config.uses_calibration:  # the text is recorded, so a different one is caught
        assert recipe.calibration["sha256"] == result.calibration["sha256"]
    model, _, again = reproduce(recipe)
    assert model is not loaded.model
    assert again.masks.keys() == result.masks.keys()
    assert all(torch.equal(again.masks[k], result.masks[k]) for k in result.masks)
    assert masks_match(recipe, again) is True
    assert again.calibration == result.calibration
    if result.structure is not None:
        assert again.structure == result.structure


@pytest.mark.parametrize("extra", [{"mask_tuning": False, "record_error": False}, {}])
def test_retrain_free_recipe_refuses_other_calibration_text(saved_tiny, tmp_path, extra):
    loaded, text = saved_tiny
    config = _config(text, "retrain-free", "channel")
    config.scope = "mlp"
    for name, value in extra.items():
        setattr(config, name, value)
    result = prune(loaded.model, config, tokenizer=loaded.tokenizer)
    assert result.calibration["source"] == str(text) and result.calibration["sha256"]
    path = write_recipe(tmp_path / "recipe.json", make_recipe(result, loaded))
    text.write_text(TEXT.replace("fox", "cat"))
    with pytest.raises(RecipeError, match="sha256"):
        reproduce(path)
