"""The shared workflow core on tiny models saved as local folders (a char tokenizer, no downloads)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import char_tokenizer
from tiny_models import tiny_model

from workbench import snapshot, workflow
from workbench.prune import PruneCancelled

SMALL = {"nsamples": 4, "seqlen": 32}


def save_tiny(folder, family: str = "llama", seed: int = 0) -> str:
    tiny_model(family, seed=seed).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def session(tiny_folder) -> workflow.Session:
    session = workflow.Session()
    workflow.load(session, tiny_folder)
    return session


def block_weights(session) -> dict[str, torch.Tensor]:
    return snapshot.take(session.model)


def test_load_reports_the_model(session, tiny_folder):
    info = session.info
    assert info["kind"] == "folder" and info["class"] == "LlamaForCausalLM"
    assert info["blocks"] == 2
    assert info["params"] == sum(p.numel() for p in session.model.parameters())
    assert "q_proj" in info["prunable_linears_per_block"]
    assert set(session.dense_state) == set(snapshot.block_parameters(session.model))


def test_load_bad_sources_say_what_is_wrong(tmp_path):
    session = workflow.Session()
    with pytest.raises(workflow.SettingsError, match="no such folder"):
        workflow.load(session, str(tmp_path / "missing"))
    with pytest.raises(workflow.SettingsError, match="no config.json"):
        workflow.load(session, str(tmp_path))
    assert session.loaded is None


def test_prune_starts_from_dense_every_time(session):
    first = workflow.run_prune(session, {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.7, **SMALL})
    assert first.result.summary["blocks"] == pytest.approx(0.7, abs=0.01)
    second = workflow.run_prune(session, {"method": "magnitude", "pattern": "2:4", **SMALL})
    # Counted from the weights: pruning on top of the 70% model would leave far more than half zero.
    assert second.result.summary["blocks"] == pytest.approx(0.5, abs=1e-6)
    for name, mask in second.result.masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), name


def test_outcome_holds_seed_table_figures_and_timings(session):
    outcome = workflow.run_prune(session, {"method": "sparsegpt", "pattern": "2:4", **SMALL},
                                 eval_tasks=["lambada"], limit=2)
    table = outcome.table
    assert list(table.columns) == workflow.SUMMARY_COLUMNS
    assert list(table["Metric"]) == ["LAMBADA last-word accuracy", "LAMBADA last-word perplexity"]
    assert set(table["Over MLP block sparsity"]) == {f"{outcome.result.summary['mlp']:.4f}"}
    assert set(table["Sparsity pattern"]) == {"2:4"}
    assert all(re.fullmatch(r"[+-]\d+\.\d\d%|n/a", drop) for drop in table["Relative drop"])
    dense_ppl = outcome.dense_eval["lambada"]["perplexity"]
    sparse_ppl = outcome.pruned_eval["lambada"]["perplexity"]
    assert table["Relative drop"].iloc[1] == f"{(sparse_ppl - dense_ppl) / dense_ppl * 100:+.2f}%"
    assert set(outcome.figures) == {"heatmap", "mask_zoom", "error_heatmap"}
    assert all(fig is not None for fig in outcome.figures.values())
    assert outcome.zoom_layer in outcome.result.masks
    assert {"dense_eval_s", "prune_s", "sparse_eval_s", "total_s"} <= set(outcome.timings)
    assert "prune: solve (all blocks)" in set(workflow.timings_table(outcome)["stage"])


def test_dense_evaluation_is_cached(session):
    workflow.run_prune(session, {"method": "magnitude", "pattern": "2:4", **SMALL}, ["lambada"], 2)
    cached = session.dense_eval
    again = workflow.run_prune(session, {"method": "wanda", "pattern": "2:4", **SMALL}, ["lambada"], 2)
    assert again.dense_eval is cached and again.timings["dense_eval_s"] == 0.0


def test_dense_evaluation_of_a_pruned_session_keeps_the_pruned_model(session):
    dense_first = workflow.evaluate_dense(session, ["wikitext2"], 2)
    outcome = workflow.run_prune(session, {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.6, **SMALL})
    pruned = block_weights(session)
    session.dense_eval = None  # force a second dense evaluation while the model is pruned
    again = workflow.evaluate_dense(session, ["wikitext2"], 2)
    assert again["wikitext2"]["perplexity"] == pytest.approx(dense_first["wikitext2"]["perplexity"], rel=1e-6)
    assert session.result is outcome.result
    after = block_weights(session)
    assert all(torch.equal(after[name], pruned[name]) for name in pruned)


def test_cancel_stops_between_blocks_and_restores_dense(session):
    dense = block_weights(session)
    calls = {"n": 0}

    def stop_after_first_block():
        calls["n"] += 1
        return calls["n"] > 1

    with pytest.raises(PruneCancelled):
        workflow.run_prune(session, {"method": "magnitude", "pattern": "2:4", **SMALL},
                           should_stop=stop_after_first_block)
    assert calls["n"] == 2  # polled before block 0 and before block 1, then stopped
    assert session.result is None
    for name, tensor in block_weights(session).items():
        assert torch.equal(tensor, dense[name]), name


def test_generate_compares_dense_and_pruned(session):
    dense_before, pruned = workflow.generate(session, "hello world", 6)
    assert pruned is None and isinstance(dense_before, str)
    outcome = workflow.run_prune(session, {"method": "magnitude", "pattern": "unstructured", "sparsity": 0.9, **SMALL})
    pruned_weights = block_weights(session)
    dense_text, pruned_text = workflow.generate(session, "hello world", 6)
    assert dense_text == dense_before  # the dense weights really were swapped in
    assert isinstance(pruned_text, str)
    for name, tensor in block_weights(session).items():  # and swapped back out
        assert torch.equal(tensor, pruned_weights[name]), name
    assert session.result is outcome.result


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"settings": {"pattern": "4:4"}}, "1 <= N < M"),
    ({"settings": {"pattern": "unstructured", "sparsity": 1.2}}, "outside \\[0, 1\\)"),
    ({"settings": {"pattern": "diagonal"}}, "unknown pattern"),
    ({"settings": {"method": "optimal-brain"}}, "unknown method"),
    ({"settings": {"nsamples": "lots"}}, "nsamples must be a whole number"),
    ({"source": "/no/such/folder"}, "no such folder"),
    ({"source": "weights.gguf"}, "GGUF file not found"),
    ({"source": "not a hub id!"}, "valid hub id"),
    ({"source": ""}, "no model given"),
    ({"eval_tasks": ["mmlu"]}, "unknown evaluation task"),
    ({"eval_tasks": ["lambada"], "limit": 0}, "at least 1"),
])
def test_validate_settings_messages(kwargs, message):
    problems = workflow.validate_settings(**kwargs)
    assert len(problems) == 1 and re.search(message, problems[0]), problems


def test_validate_settings_accepts_good_input(tiny_folder):
    assert workflow.validate_settings("default", {"method": "wanda", "pattern": "2:4"}, ["lambada"], 8) == []
    assert workflow.validate_settings("HuggingFaceTB/SmolLM2-135M") == []
    assert workflow.validate_settings(tiny_folder) == []


def test_actions_need_a_model():
    session = workflow.Session()
    with pytest.raises(workflow.NoModelError, match="load one first"):
        workflow.run_prune(session, {"pattern": "2:4"})
    with pytest.raises(workflow.NoModelError):
        workflow.generate(session, "hi", 4)


def test_sessions_keep_their_own_models(tmp_path, tiny_folder):
    first, second = workflow.Session(), workflow.Session()
    workflow.load(first, tiny_folder)
    workflow.load(second, save_tiny(tmp_path / "opt", "opt"))
    second_dense = block_weights(second)
    workflow.run_prune(first, {"method": "magnitude", "pattern": "2:4", **SMALL})
    assert first.is_pruned and not second.is_pruned
    assert second.info["family"] == "opt" and first.info["family"] == "llama"
    for name, tensor in block_weights(second).items():
        assert torch.equal(tensor, second_dense[name]), name


def test_export_writes_zip_and_card_and_refuses_to_overwrite(session, tmp_path):
    with pytest.raises(workflow.SettingsError, match="prune the model first"):
        workflow.export(session, tmp_path)
    workflow.run_prune(session, {"method": "magnitude", "pattern": "2:4", **SMALL}, ["lambada"], 2)
    exported = workflow.export(session, tmp_path, "tiny-2of4")
    assert exported.zip_path is not None and exported.zip_path.is_file()
    card = workflow.model_card(exported)
    assert "2:4" in card and "magnitude" in card
    with pytest.raises(workflow.SettingsError, match="overwrite"):
        workflow.export(session, tmp_path, "tiny-2of4")
    assert workflow.export(session, tmp_path, "tiny-2of4", overwrite=True).zip_path.is_file()


def test_record_run_lands_in_the_run_store(session, tmp_path):
    outcome = workflow.run_prune(session, {"method": "magnitude", "pattern": "2:4", **SMALL}, ["lambada"], 2)
    path = workflow.record_run(session, outcome, tmp_path)
    table = workflow.runs_table(tmp_path)
    assert list(table["name"]) == [path.name]
    assert table["status"].iloc[0] == "done" and table["pattern"].iloc[0] == "2:4"
    assert (path / "heatmap.png").is_file() and (path / "summary.csv").is_file()


def test_sweep_streams_points_and_leaves_a_dense_model_dense(session, tmp_path):
    # a pruned model stays pruned through a sweep: tests/test_sweep.py
    dense = block_weights(session)
    tables = list(workflow.iter_sweep(session, ["magnitude"], [0.5], ["2:4"], ["lambada"], 2,
                                      run_dir=tmp_path / "sweep", **SMALL))
    assert [len(t) for t in tables] == [1, 2, 3, 3]  # dense, two points, then the final table
    final = tables[-1]
    assert list(final["method"]) == ["dense", "magnitude", "magnitude"]
    assert final["sparsity_blocks"].iloc[1] == pytest.approx(0.5, abs=0.01)
    assert "lambada/accuracy" in final.columns
    assert session.sweep is final and not session.is_pruned
    for name, tensor in block_weights(session).items():
        assert torch.equal(tensor, dense[name]), name


def test_sweep_rejects_bad_settings(session):
    with pytest.raises(workflow.SettingsError, match="unknown method"):
        workflow.run_sweep(session, ["nope"], [0.5], eval_tasks=["lambada"], limit=2)
    with pytest.raises(workflow.SettingsError, match="at least one evaluation task"):
        workflow.run_sweep(session, ["magnitude"], [0.5], eval_tasks=[], limit=2)


def test_structured_channel_pruning_goes_through_the_same_run(session):
    if "retrain-free" not in workflow.available_methods():
        pytest.skip("the retrain-free structured pipeline is not available")
    outcome = workflow.run_prune(session, {"method": "retrain-free", "pattern": "channel", "sparsity": 0.25,
                                           "scope": "mlp", **SMALL})
    assert outcome.result.summary["mlp"] == pytest.approx(0.25, abs=0.01)
    assert set(outcome.table["Sparsity pattern"]) == {"channelx1"}
    ups = [mask for name, mask in outcome.result.masks.items() if name.endswith("up_proj")]
    for up in ups:  # whole rows go: channels, not elements
        assert bool((up.all(dim=1) | ~up.any(dim=1)).all())
    removed = sum(int((~up.any(dim=1)).sum()) for up in ups) / sum(up.shape[0] for up in ups)
    assert removed == pytest.approx(0.25, abs=0.01)  # blocks may differ, the total is the target
    after = workflow.run_prune(session, {"method": "magnitude", "pattern": "2:4", **SMALL})
    assert after.result.summary["blocks"] == pytest.approx(0.5, abs=1e-6)  # from dense, not on top


def test_first_stage_message_shows_time_and_memory_estimates(session):
    messages = []
    workflow.run_prune(session, {"method": "wanda", "pattern": "2:4", **SMALL},
                       progress=lambda fraction, message: messages.append(message))
    first = messages[0]
    assert first.startswith("Calibrating on 4 x 32 tokens")
    assert re.search(r"pruning takes about \d", first) and "estimated peak memory" in first
    assert "(in memory)" in first  # a tiny model never onloads from disk
