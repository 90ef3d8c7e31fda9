import json
import subprocess
import sys
from pathlib import Path

import pytest
import test_workflow
import torch
import torch.nn.functional as F
from tiny_models import tiny_model, token_batch

from workbench import snapshot, workflow
from workbench import sweep as sweep_module
from workbench.cli import main as cli_main
from workbench.prune import CalibrationCache, PruneConfig, collect_dense_stats, prune
from workbench.runs import load_run
from workbench.slim import slim_model
from workbench.sweep import SweepConfig, restore_weights, run_sweep, snapshot_weights

tiny_folder = test_workflow.tiny_folder  # the workflow tests' fixtures: a tiny llama folder, a session on it
session = test_workflow.session

CALIB = token_batch(8, 16)
EVAL = token_batch(4, 16, seed=1)
ROOT = Path(__file__).resolve().parents[1]


def token_perplexity(model) -> dict:
    with torch.no_grad():
        logits = model(input_ids=EVAL).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), EVAL[:, 1:].reshape(-1))
    return {"tokens": {"perplexity": float(loss.exp()), "n": EVAL.shape[0]}}


def small_config(**overrides) -> SweepConfig:
    fields = dict(methods=("magnitude", "wanda"), sparsities=(0.3, 0.6), extra_patterns=("2:4",),
                  nsamples=8, seqlen=16, batch_size=4)
    fields.update(overrides)
    return SweepConfig(**fields)


class CountingPrune:
    """Wraps workbench.prune.prune; optionally raises once `fail_after` calls have finished."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, *args, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("injected crash")
        self.calls += 1
        return prune(*args, **kwargs)


def test_sweep_rows_and_weights_restored(tmp_path):
    model = tiny_model("llama")
    before = snapshot_weights(model)
    seen, ticks = [], []
    table = run_sweep(model, None, small_config(), run_dir=tmp_path / "run",
                      evaluate_fn=token_perplexity, calibration=CALIB,
                      on_point=seen.append, progress=lambda fraction, message: ticks.append((fraction, message)))
    assert len(table) == 1 + 2 * 3 and len(seen) == 7 and ticks[-1][0] == 1.0 and ticks[-1][1].endswith("(7/7)")
    assert [fraction for fraction, _ in ticks] == pytest.approx([done / 7 for done in range(1, 8)])
    assert table.iloc[0]["method"] == "dense" and table.iloc[0]["sparsity_blocks"] == 0.0
    assert "tokens/perplexity" in table.columns and "tokens/n" not in table.columns
    points = table[table["method"] != "dense"]
    for _, row in points.iterrows():
        assert row["sparsity_blocks"] == pytest.approx(row["target"], abs=0.02)
        assert row["prune_s"] > 0 and row["eval_s"] > 0
    assert set(points["pattern"]) == {"unstructured", "2:4"}
    # the model is dense again afterwards
    for name, weight in snapshot_weights(model).items():
        assert torch.equal(weight, before[name])
    run = load_run(tmp_path / "run")
    assert run.status == "done" and len(run.points()) == 7
    assert (run.path / "curve.png").is_file()
    assert (run.path / "heatmap-wanda-2_4-0.5000-uniform.png").is_file()
    assert len(run.load_table("results")) == 7


def test_crash_then_resume_does_not_redo_points(tmp_path, monkeypatch):
    model = tiny_model("llama")
    crashing = CountingPrune(fail_after=2)
    monkeypatch.setattr(sweep_module, "prune", crashing)
    with pytest.raises(RuntimeError, match="injected"):
        run_sweep(model, None, small_config(), run_dir=tmp_path / "run",
                  evaluate_fn=token_perplexity, calibration=CALIB)
    run = load_run(tmp_path / "run")
    assert run.status == "failed" and "injected" in run.meta["error"]
    assert len(run.points()) == 1 + 2  # dense + the two finished points
    dense_after_crash = snapshot_weights(model)
    fresh = tiny_model("llama")
    assert all(torch.equal(w, snapshot_weights(fresh)[n]) for n, w in dense_after_crash.items())

    counting = CountingPrune()
    monkeypatch.setattr(sweep_module, "prune", counting)
    table = run_sweep(model, None, small_config(), run_dir=tmp_path / "run",
                      evaluate_fn=token_perplexity, calibration=CALIB)
    assert counting.calls == 6 - 2
    assert len(table) == 7 and load_run(tmp_path / "run").status == "done"

    counting.calls = 0  # a finished sweep resumed again prunes nothing
    run_sweep(model, None, small_config(), run_dir=tmp_path / "run",
              evaluate_fn=token_perplexity, calibration=CALIB)
    assert counting.calls == 0


def test_should_stop_keeps_finished_points(tmp_path, monkeypatch):
    model = tiny_model("llama")
    rows = []
    table = run_sweep(model, None, small_config(), run_dir=tmp_path / "run",
                      evaluate_fn=token_perplexity, calibration=CALIB, on_point=rows.append,
                      should_stop=lambda: len(rows) >= 3)
    assert len(table) == 3
    stopped = load_run(tmp_path / "run")
    assert stopped.status == "stopped" and len(stopped.load_table("results")) == 3
    assert (stopped.path / "curve.png").is_file()
    counting = CountingPrune()
    monkeypatch.setattr(sweep_module, "prune", counting)
    table = run_sweep(model, None, small_config(), run_dir=tmp_path / "run",
                      evaluate_fn=token_perplexity, calibration=CALIB)
    assert counting.calls == 6 - 2 and len(table) == 7


def test_resume_refuses_a_different_sweep(tmp_path):
    model = tiny_model("llama")
    config = small_config(methods=("magnitude",), sparsities=(0.5,), extra_patterns=())
    run_sweep(model, None, config, run_dir=tmp_path / "run", evaluate_fn=token_perplexity,
              calibration=CALIB)
    with pytest.raises(ValueError, match="different config"):
        run_sweep(model, None, small_config(methods=("wanda",)), run_dir=tmp_path / "run",
                  evaluate_fn=token_perplexity, calibration=CALIB)


def test_fast_mode_is_close_to_exact():
    model = tiny_model("llama")
    config = dict(methods=("wanda", "sparsegpt"), sparsities=(0.5,), extra_patterns=())
    exact = run_sweep(model, None, small_config(mode="exact", **config),
                      evaluate_fn=token_perplexity, calibration=CALIB)
    fast = run_sweep(model, None, small_config(mode="fast", **config),
                     evaluate_fn=token_perplexity, calibration=CALIB)
    assert list(exact["key"]) == list(fast["key"])
    assert exact.iloc[0]["tokens/perplexity"] == fast.iloc[0]["tokens/perplexity"]
    for column in ("sparsity_blocks", "tokens/perplexity"):
        for a, b in zip(exact[column], fast[column]):
            assert b == pytest.approx(a, rel=0.02)


def test_dense_stats_cache_matches_the_driver_on_block_zero():
    """Fast mode differs from exact mode only after block 0: block 0 sees the same inputs."""
    config = PruneConfig(method="wanda", sparsity=0.5, nsamples=8, seqlen=16, batch_size=4)
    exact_model, fast_model = tiny_model("llama"), tiny_model("llama")
    exact = prune(exact_model, config, calibration=CALIB)
    cache = collect_dense_stats(fast_model, config, calibration=CALIB, gram=True)
    fast = prune(fast_model, config, calibration=CALIB, cache=cache)
    block0 = [name for name in exact.masks if ".layers.0." in name]
    assert block0 and all(torch.equal(exact.masks[n], fast.masks[n]) for n in block0)
    assert exact.summary["blocks"] == pytest.approx(fast.summary["blocks"])
    assert fast.errors["error"].notna().all()
    later = [name for name in exact.masks if ".layers.1." in name]
    agreement = sum((exact.masks[n] == fast.masks[n]).float().mean() for n in later) / len(later)
    assert agreement > 0.8


def test_cache_reuses_block_zero_inputs(monkeypatch):
    import workbench.prune as prune_module

    captures = []
    real = prune_module.capture_block_inputs
    monkeypatch.setattr(prune_module, "capture_block_inputs",
                        lambda *a, **k: captures.append(1) or real(*a, **k))
    model = tiny_model("llama")
    snapshot = snapshot_weights(model)
    cache = CalibrationCache()
    first = prune(model, PruneConfig(method="wanda", sparsity=0.5, batch_size=4),
                  calibration=CALIB, cache=cache)
    restore_weights(model, snapshot)
    second = prune(model, PruneConfig(method="wanda", sparsity=0.5, batch_size=4),
                   calibration=CALIB, cache=cache)
    assert len(captures) == 1
    assert all(torch.equal(first.masks[n], second.masks[n]) for n in first.masks)


def test_fast_cache_without_gram_is_refused_for_sparsegpt():
    model = tiny_model("llama")
    config = PruneConfig(method="wanda", sparsity=0.5, batch_size=4)
    cache = collect_dense_stats(model, config, calibration=CALIB, gram=False)
    with pytest.raises(ValueError, match="gram=True"):
        prune(model, PruneConfig(method="sparsegpt", sparsity=0.5), calibration=CALIB, cache=cache)


def test_owl_sweep_allocates_non_uniformly(tmp_path):
    model = tiny_model("llama")
    config = small_config(methods=("wanda",), sparsities=(0.5,), extra_patterns=(),
                          allocation="owl", mode="fast")
    table = run_sweep(model, None, config, run_dir=tmp_path / "run",
                      evaluate_fn=token_perplexity, calibration=CALIB)
    row = table.iloc[1]
    assert row["allocation"] == "owl"
    assert row["sparsity_blocks"] == pytest.approx(0.5, abs=0.02)
    allocation = load_run(tmp_path / "run").load_json("allocation-wanda-unstructured-0.5000-owl")
    assert len(allocation) == 2 and max(allocation) - min(allocation) > 0.05
    sparsity = load_run(tmp_path / "run").load_table("sparsity-wanda-unstructured-0.5000-owl")
    per_block = sparsity.groupby("block")["zeros"].sum() / sparsity.groupby("block")["numel"].sum()
    assert per_block.to_numpy() == pytest.approx(allocation, abs=0.02)


@pytest.mark.parametrize("overrides, message", [
    ({"methods": ("prune-it",)}, "unknown method"),
    ({"extra_patterns": ("unstructured",)}, "not N:M"),
    ({"mode": "quick"}, "unknown mode"),
    ({"allocation": "random"}, "unknown allocation"),
    ({"sparsities": (1.5,)}, "sparsity"),
    ({"tasks": ("mmlu",)}, "unknown task"),
])
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides).validate()


def test_config_roundtrip():
    config = small_config(mode="fast")
    again = SweepConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ValueError, match="unknown SweepConfig"):
        SweepConfig.from_dict({"methods": ["wanda"], "bogus": 1})


def test_where_a_sweep_runs_is_not_part_of_its_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    config = small_config(methods=("magnitude",), sparsities=(0.5,), extra_patterns=())
    assert config.address == "ray://head:10001" and config.backend == "local"
    run_sweep(tiny_model("llama"), None, config, run_dir=tmp_path / "run", evaluate_fn=token_perplexity,
              calibration=CALIB)
    elsewhere = small_config(methods=("magnitude",), sparsities=(0.5,), extra_patterns=(), backend="ray",
                             address="auto", device="cuda")
    assert elsewhere.run_config() == config.run_config() and "backend" not in config.run_config()
    with pytest.raises(ValueError, match="unknown backend"):
        small_config(backend="slurm").validate()


def test_a_local_sweep_never_imports_ray(tmp_path):
    script = f"""
import sys
sys.path[:0] = {[str(ROOT), str(ROOT / "tests")]!r}
import workbench.sweep, workbench.cli, workbench.workflow
from test_sweep import CALIB, small_config, token_perplexity
from tiny_models import tiny_model
table = workbench.sweep.run_sweep(tiny_model("llama"), None, small_config(extra_patterns=(), sparsities=(0.5,)),
                                  run_dir={str(tmp_path / "run")!r}, evaluate_fn=token_perplexity, calibration=CALIB)
assert len(table) == 3, table
print("ray imported" if "ray" in sys.modules else "no ray")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "no ray"


def test_cli_sweep_rejects_bad_input_before_loading(capsys, tmp_path):
    code = cli_main(["sweep", "--methods", "wanda,nope", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert cli_main(["sweep", "--sparsities", "0.5,abc"]) == 2
    assert "--sparsities" in capsys.readouterr().err


def test_cli_runs_list_show_compare(tmp_path, capsys):
    model = tiny_model("llama")
    config = small_config(methods=("magnitude",), sparsities=(0.5,), extra_patterns=())
    for name in ("a", "b"):
        run_sweep(model, None, config, run_dir=tmp_path / name, evaluate_fn=token_perplexity,
                  calibration=CALIB)
    (tmp_path / "broken").mkdir()
    assert cli_main(["runs", "list", "--root", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(r["name"] for r in listed["runs"]) == ["a", "b"]
    assert cli_main(["runs", "show", "a", "--root", str(tmp_path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["status"] == "done" and len(shown["results"]) == 2
    assert cli_main(["runs", "compare", "a", "b", "--root", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert len(rows) == 4 and {r["run"] for r in rows} == {"a", "b"}
    assert cli_main(["runs", "show", "broken", "--root", str(tmp_path)]) == 2
    assert "run.json" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_on_the_bundled_model_with_the_default_evaluator(bundled, data_dir, tmp_path):
    config = SweepConfig(methods=("magnitude",), sparsities=(0.5,), extra_patterns=(),
                         tasks=("wikitext2",), ppl_windows=1, eval_seqlen=128,
                         record_error=False)
    evaluate_fn = sweep_module.default_evaluator(bundled.tokenizer, config, data_dir)
    table = run_sweep(bundled.model, bundled.tokenizer, config, run_dir=tmp_path / "run",
                      evaluate_fn=evaluate_fn)
    dense, pruned = table["wikitext2/perplexity"]
    assert 5 < dense < 200 and pruned > dense
    assert table.iloc[1]["sparsity_blocks"] == pytest.approx(0.5, abs=1e-3)


# --- a sweep from a session: on the session's dense copy, the user's pruned model kept ----------

SESSION_SWEEP = dict(methods=["magnitude"], sparsities=[0.5], eval_tasks=["lambada"], limit=2, nsamples=4, seqlen=32)


class CountingTake:
    """Wraps workbench.snapshot.take: how many copies of weights were taken, and their bytes."""

    def __init__(self, monkeypatch):
        self.calls, self.bytes, self.real = 0, 0, snapshot.take
        monkeypatch.setattr(snapshot, "take", self)

    def __call__(self, *args, **kwargs):
        copy = self.real(*args, **kwargs)
        self.calls += 1
        self.bytes += snapshot.nbytes(copy)
        return copy


@pytest.fixture()
def pruned(session) -> snapshot.Weights:
    """Prune the session (wanda 2:4, evaluated); returns a copy of its pruned block weights."""
    workflow.run_prune(session, {"method": "wanda", "pattern": "2:4", "nsamples": 4, "seqlen": 32}, ["lambada"], 2)
    assert session.is_pruned and session.pruned_eval is not None
    return snapshot.take(session.model)


def holds(model, weights: snapshot.Weights) -> bool:
    params = snapshot.block_parameters(model)
    return set(params) == set(weights) and all(torch.equal(params[n], w) for n, w in weights.items())


def test_a_sweep_runs_on_the_dense_weights_and_keeps_the_pruned_model(session, pruned, tmp_path, monkeypatch):
    result, pruned_eval = session.result, session.pruned_eval
    takes = CountingTake(monkeypatch)
    table = workflow.run_sweep(session, run_dir=tmp_path / "sweep", **SESSION_SWEEP)
    assert list(table["method"]) == ["dense", "magnitude"]
    assert table["sparsity_blocks"].tolist() == pytest.approx([0.0, 0.5], abs=0.01)  # from dense, not 2:4
    assert table["lambada/accuracy"].iloc[0] == session.dense_eval["lambada"]["accuracy"]
    # one extra copy of the weights: the pruned ones; the sweep reuses the session's dense copy
    assert takes.calls == 1 and takes.bytes == snapshot.nbytes(pruned)
    assert session.result is result and session.pruned_eval is pruned_eval and holds(session.model, pruned)
    exported = workflow.export(session, tmp_path / "exports", "after-sweep", make_zip=False)
    assert "2:4" in workflow.model_card(exported)


def test_a_sweep_of_a_dense_model_copies_nothing(session, tmp_path, monkeypatch):
    dense = snapshot.take(session.model)
    takes = CountingTake(monkeypatch)
    table = workflow.run_sweep(session, **SESSION_SWEEP)
    assert len(table) == 2 and takes.calls == 0
    assert not session.is_pruned and holds(session.model, dense)


def test_a_failed_sweep_keeps_the_pruned_model(session, pruned, monkeypatch):
    result = session.result
    monkeypatch.setattr(sweep_module, "prune", CountingPrune(fail_after=0))
    with pytest.raises(RuntimeError, match="injected"):
        workflow.run_sweep(session, **SESSION_SWEEP)
    assert session.result is result and holds(session.model, pruned)


def test_a_cancelled_sweep_keeps_the_pruned_model(session, pruned):
    result = session.result
    seen = []

    def cancel_after_first_point(table):
        seen.append(len(table))
        if len(table) == 2:
            session.request_stop()

    table = workflow.run_sweep(session, **{**SESSION_SWEEP, "sparsities": [0.3, 0.5, 0.7]},
                               on_point=cancel_after_first_point)
    assert len(table) == 2 and seen == [1, 2]
    assert session.result is result and holds(session.model, pruned) and not session.stop_requested


def test_closing_a_streamed_sweep_keeps_the_pruned_model(session, pruned):
    result = session.result
    updates = workflow.iter_sweep(session, **{**SESSION_SWEEP, "sparsities": [0.3, 0.5]})
    assert len(next(updates)) == 1  # the dense row
    updates.close()  # the browser went away: the sweep stops
    assert session.result is result and holds(session.model, pruned) and not session.busy


def test_a_slimmed_session_model_is_refused_not_reloaded(session):
    workflow.run_prune(session, {"method": "retrain-free", "pattern": "channel", "sparsity": 0.25, "scope": "mlp",
                                 "nsamples": 4, "seqlen": 32})
    slim_model(session.model, session.result)
    slimmed = snapshot.take(session.model)
    with pytest.raises(workflow.SettingsError, match="slimmed after loading.*load the model again"):
        workflow.run_sweep(session, **SESSION_SWEEP)
    assert session.is_pruned and holds(session.model, slimmed)


def test_a_given_dense_copy_is_used_and_nothing_more_is_copied(monkeypatch):
    model = tiny_model("llama")
    dense = snapshot.take(model)
    prune(model, PruneConfig(method="magnitude", sparsity=0.7, batch_size=4), calibration=CALIB)
    takes = CountingTake(monkeypatch)
    table = run_sweep(model, None, small_config(methods=("magnitude",), extra_patterns=()),
                      evaluate_fn=token_perplexity, calibration=CALIB, dense=dense)
    assert takes.calls == 0
    assert table["sparsity_blocks"].tolist() == pytest.approx([0.0, 0.3, 0.6], abs=0.02)  # dense first
    assert holds(model, dense)
