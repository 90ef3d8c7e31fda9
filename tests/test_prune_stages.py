"""What a prune does before its first block, and what it skips when there is nothing to do."""

import time

import pytest
import torch
from tiny_models import tiny_model, token_batch

from workbench.arch import describe, weight_of
from workbench.limits import Deadline
from workbench.prune import PruneCancelled, PruneConfig, prune


def test_magnitude_runs_no_calibration_pass_by_default():
    model = tiny_model("llama")
    messages = []
    # no tokenizer and no ids: any attempt to read calibration data would raise
    result = prune(model, PruneConfig(method="magnitude", sparsity=0.5),
                   progress=lambda fraction, message: messages.append(message))
    assert result.calibration == {}
    assert result.errors["error"].isna().all()
    assert result.summary["blocks"] == pytest.approx(0.5)
    assert not any("calibration" in message or "capturing" in message for message in messages)


def test_magnitude_error_report_when_asked_for():
    result = prune(tiny_model("llama"), PruneConfig(method="magnitude", record_error=True),
                   calibration=token_batch(4, 16))
    assert result.calibration["nsamples"] == 4
    assert result.errors["error"].notna().all()


def test_data_methods_keep_reporting_errors_by_default():
    config = PruneConfig(method="wanda")
    assert config.reports_error and config.uses_calibration
    assert not PruneConfig(method="magnitude").uses_calibration
    result = prune(tiny_model("llama"), config, calibration=token_batch(4, 16))
    assert result.errors["error"].notna().all()


def test_stage_messages_arrive_before_the_first_block_is_done():
    model = tiny_model("llama")
    calls = []
    prune(model, PruneConfig(method="sparsegpt", pattern="2:4"), calibration=token_batch(4, 16),
          progress=lambda fraction, message: calls.append((fraction, message)))
    blocks = describe(model).num_blocks
    assert calls[:2] == [(0.0, "loading calibration"), (0.0, "capturing block inputs (4 x 16 tokens)")]
    assert calls[2] == (0.0, f"block 1/{blocks}, time left known after this block")
    after_blocks = calls[3:]
    assert [fraction for fraction, _ in after_blocks] == pytest.approx([done / blocks for done in range(1, blocks + 1)])
    assert all(message.startswith(f"block {done}/{blocks}") and "left" in message
               for done, (_, message) in enumerate(after_blocks, start=1))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_sparsity_zero_returns_at_once_with_the_model_unchanged(method):
    model = tiny_model("llama")
    before = {name: p.clone() for name, p in model.named_parameters()}
    # no calibration given: a prune that tried to calibrate would raise for want of a tokenizer
    result = prune(model, PruneConfig(method=method, sparsity=0.0))
    assert result.summary["blocks"] == 0.0
    assert result.calibration == {}
    assert result.errors.empty
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    layout = describe(model)
    assert set(result.masks) == {lin.full_name for block in layout.blocks for lin in block.linears}
    assert all(mask.all() and mask.shape == weight_of(lin.module).shape
               for block in layout.blocks for lin in block.linears
               for mask in [result.masks[lin.full_name]])


def test_sparsity_zero_in_some_blocks_only_still_prunes():
    model = tiny_model("llama")
    blocks = describe(model).num_blocks
    result = prune(model, PruneConfig(method="magnitude", sparsity=0.0,
                                      block_sparsity=[0.0] * (blocks - 1) + [0.5]))
    assert 0 < result.summary["blocks"] < 0.5


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_out_of_range_sparsity_is_refused_not_clamped(sparsity):
    with pytest.raises(ValueError, match="outside"):
        prune(tiny_model("llama"), PruneConfig(method="magnitude", sparsity=sparsity))


def test_workflow_says_a_data_free_prune_needs_no_calibration(tmp_path):
    from conftest import char_tokenizer

    from workbench import workflow

    tiny_model("llama").save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    session = workflow.Session()
    workflow.load(session, str(tmp_path))
    said = []
    outcome = workflow.run_prune(session, {"method": "magnitude", "sparsity": 0.5},
                                 progress=lambda fraction, message: said.append(message))
    assert set(outcome.table["Calibration dataset"]) == {"none (data-free method)"}
    assert said[0].startswith("Pruning with magnitude (no calibration data needed); pruning takes about")
    assert not any("alibrat" in message for message in said[1:])
    sparsegpt = workflow.run_prune(session, {"method": "sparsegpt", "nsamples": 4, "seqlen": 32},
                                   progress=lambda fraction, message: said.append(message))
    assert set(sparsegpt.table["Calibration dataset"]) == {"wikitext2 (4x32)"}
    assert "Pruning: loading calibration" in said


def test_a_stop_request_ends_the_capture_between_calibration_batches():
    model = tiny_model("llama")
    before = {name: p.clone() for name, p in model.named_parameters()}
    embedded = []
    model.get_input_embeddings().register_forward_hook(lambda *_: embedded.append(1))
    polls = []

    def stop_on_second_poll() -> bool:
        polls.append(1)
        return len(polls) >= 2

    with pytest.raises(PruneCancelled, match="capturing the calibration inputs"):
        prune(model, PruneConfig(method="sparsegpt", pattern="2:4", batch_size=2),
              calibration=token_batch(8, 16), should_stop=stop_on_second_poll)
    assert len(embedded) == 1  # one of the four calibration batches ran, then the capture stopped
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_a_spent_time_budget_stops_the_capture_before_any_batch():
    model = tiny_model("llama")
    embedded = []
    model.get_input_embeddings().register_forward_hook(lambda *_: embedded.append(1))
    deadline = Deadline(0.0, started=time.monotonic() - 1.0)
    with pytest.raises(PruneCancelled, match="capturing"):
        prune(model, PruneConfig(method="wanda"), calibration=token_batch(8, 16),
              should_stop=deadline.expired)
    assert embedded == []
