"""Sweep points are scored on the dense model's items, paired with dense, and stored."""

from __future__ import annotations

import pytest
from tiny_models import token_batch

from workbench.evaluate import perplexity
from workbench.runs import load_run
from workbench.sweep import SweepConfig, run_sweep

TEXT = " ".join(["the cat sat on the mat and looked at the dog", "numbers 1 2 3 4 5 6 7 8 9"] * 12)


def _config() -> SweepConfig:
    return SweepConfig(methods=("magnitude",), sparsities=(0.2, 0.8), extra_patterns=(), nsamples=4,
                       seqlen=16, batch_size=4, tasks=("wikitext2",))


def test_points_are_paired_with_dense_and_stored(chars, tmp_path):
    from tiny_models import tiny_model

    model = tiny_model("llama")
    table = run_sweep(model, chars, _config(), run_dir=tmp_path / "run", calibration=token_batch(4, 16),
                      evaluate_fn=lambda m: {"text": perplexity(m, chars, TEXT, seqlen=32, limit=6)})
    assert {"text/perplexity_lo", "text/perplexity_hi", "text/perplexity_diff", "text/perplexity_diff_lo",
            "text/perplexity_significant"} <= set(table.columns)
    dense, points = table.iloc[0], table.iloc[1:]
    assert dense["text/perplexity_lo"] <= dense["text/perplexity"] <= dense["text/perplexity_hi"]
    for _, row in points.iterrows():
        assert row["text/perplexity_diff"] == pytest.approx(row["text/perplexity"] - dense["text/perplexity"])
        assert row["text/perplexity_diff_lo"] <= row["text/perplexity_diff"] <= row["text/perplexity_diff_hi"]
    run = load_run(tmp_path / "run")
    stored = {key: run.load_json(f"items-{key}") for key in
              ("dense", "magnitude-unstructured-0.2000-uniform", "magnitude-unstructured-0.8000-uniform")}
    ids = {key: items["text"]["item_ids"] for key, items in stored.items()}
    assert all(value == list(range(6)) for value in ids.values())  # every point on dense's six windows
    assert len(stored["dense"]["text"]["items"]["nll"]) == 6


def test_a_point_scored_on_other_items_is_refused(chars):
    from tiny_models import tiny_model

    calls = {"n": 0}

    def shifting(model):
        calls["n"] += 1
        return {"text": perplexity(model, chars, TEXT, seqlen=32, limit=6 if calls["n"] == 1 else 5)}

    with pytest.raises(ValueError, match="different items"):
        run_sweep(tiny_model("llama"), chars, _config(), calibration=token_batch(4, 16), evaluate_fn=shifting)
