"""Run-time estimates before a prune: from shapes, config and this machine's measured speed."""

import pytest
from tiny_models import tiny_model

from workbench import workflow
from workbench.estimate import MachineSpeed, estimate_prune, format_seconds, machine_speed
from workbench.models import LoadedModel
from workbench.prune import PruneConfig

SPEED = MachineSpeed(gflops=10.0, op_seconds=2e-6)


def test_machine_speed_is_probed_once_per_process():
    first = machine_speed()
    assert first is machine_speed()
    assert first.gflops > 0 and first.op_seconds > 0


def test_magnitude_counts_no_calibration_and_sparsegpt_the_most_solve():
    model = tiny_model("llama")
    magnitude = estimate_prune(model, PruneConfig(method="magnitude"), SPEED)
    wanda = estimate_prune(model, PruneConfig(method="wanda"), SPEED)
    sparsegpt = estimate_prune(model, PruneConfig(method="sparsegpt", pattern="2:4"), SPEED)
    assert set(magnitude.parts) == {"solve"}
    assert {"calibration forwards", "statistics", "solve"} <= set(sparsegpt.parts)
    assert magnitude.seconds < wanda.seconds < sparsegpt.seconds
    assert sparsegpt.parts["solve"] > wanda.parts["solve"]


def test_more_calibration_or_a_slower_machine_takes_longer():
    model = tiny_model("llama")
    small = estimate_prune(model, PruneConfig(method="wanda", nsamples=8, seqlen=64), SPEED)
    large = estimate_prune(model, PruneConfig(method="wanda", nsamples=32, seqlen=64), SPEED)
    assert large.parts["calibration forwards"] == pytest.approx(4 * small.parts["calibration forwards"], rel=0.02)
    slow = estimate_prune(model, PruneConfig(method="wanda", nsamples=8, seqlen=64),
                          MachineSpeed(gflops=1.0, op_seconds=2e-6))
    assert slow.seconds == pytest.approx(10 * small.seconds, rel=0.05)


def test_sparsity_zero_is_instant_and_bad_settings_are_refused():
    model = tiny_model("llama")
    assert estimate_prune(model, PruneConfig(method="sparsegpt", sparsity=0.0), SPEED).seconds == 0.0
    with pytest.raises(ValueError, match="outside"):
        estimate_prune(model, PruneConfig(method="sparsegpt", sparsity=1.5), SPEED)


@pytest.mark.parametrize("seconds, text", [(0.2, "about 1 s"), (7.4, "about 7 s"), (42, "about 40 s"),
                                           (200, "about 3 min"), (4000, "about 1 h 7 min"),
                                           (7200, "about 2 h")])
def test_estimates_read_as_rounded_durations(seconds, text):
    assert format_seconds(seconds) == text


def test_workflow_estimate_for_the_loaded_model():
    session = workflow.Session()
    with pytest.raises(workflow.NoModelError):
        workflow.estimate_prune_time(session, {"method": "wanda"})
    session.loaded = LoadedModel(tiny_model("llama"), None, "tiny", "folder", "tiny", None, "fp32")
    estimate = workflow.estimate_prune_time(session, {"method": "sparsegpt", "pattern": "2:4",
                                                      "nsamples": 4, "seqlen": 32})
    assert estimate.seconds > 0 and estimate.text.startswith("about")
    with pytest.raises(workflow.SettingsError, match="outside"):
        workflow.estimate_prune_time(session, {"method": "wanda", "sparsity": 1.5})
