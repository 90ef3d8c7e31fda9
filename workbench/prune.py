"""The single layer-wise pruning driver, and its config and result.

    result = prune(model, PruneConfig(method="sparsegpt", pattern="2:4"), tokenizer=tokenizer)

The driver captures the inputs of decoder block 0 on the calibration batch, then for each block:
hooks the linears in scope to accumulate input statistics, lets the method decide masks (and new
weights), re-runs the pruned block to produce the next block's inputs, and frees memory. Every
method plugs into this one loop; only one block's activations are alive at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from workbench import distributed, guards
from workbench.arch import BlockInfo, LinearInfo, ModelLayout, describe, in_out_features, replace_weight, weight_of
from workbench.devices import place_activations
from workbench.flops import flops_budget_to_sparsity, lm_head_params
from workbench.jsonio import dataclass_from
from workbench.methods import METHODS, Method, method_record, structured_methods
from workbench.methods.unit_plan import (
    ALLOCATIONS,
    StructuredPlan,
    plan_structured,
    resolve_allocation,
)
from workbench.methods.unit_plan import check_scope as check_structured_scope
from workbench.patterns import Pattern, PatternError, check_divides, check_sparsity, parse_pattern
from workbench.progress import Progress
from workbench.solve_groups import solve_by_input
from workbench.sparsity import sparsity_summary, sparsity_table
from workbench.stats import InputStats
from workbench.structured import UNIT_NOUNS, BlockGeometry, Structure, model_geometry

log = logging.getLogger(__name__)

SCOPES = ("all", "mlp", "attention")
BUDGETS = ("units", "flops")


class PruneCancelled(RuntimeError):
    """Raised between blocks when the caller asked to stop; the model is partly pruned."""


@dataclass
class PruneConfig:
    method: str = "sparsegpt"  # magnitude | wanda | sparsegpt (structured: see retrain-free)
    pattern: str = "unstructured"  # unstructured | N:M | channel | head
    sparsity: float = 0.5  # ignored by N:M patterns, which fix it
    scope: str = "all"  # all | mlp | attention
    exclude: str | None = None  # regex over full linear names, e.g. "layers\.0\."
    calibration: str = "wikitext2"  # a data name or a local path (see workbench.data)
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 8  # calibration windows per block forward
    blocksize: int = 128  # SparseGPT lazy-update block
    percdamp: float = 0.01  # SparseGPT dampening, a fraction of the mean Hessian diagonal
    block_sparsity: list[float] | None = None  # per-block targets (non-uniform allocation)
    # collect X^T X for every layer to report its output error; None: only when the method
    # reads calibration data anyway (a data-free method then runs no calibration pass at all)
    record_error: bool | None = None
    # Structured patterns (channel/head) only; see workbench.methods.retrain_free.
    mask_tuning: bool | None = None  # least-squares refit of down/o; None: on for retrain-free
    # how the units to remove spread over blocks: auto | global (ranked across blocks) | uniform
    # (the same count per block); distinct from a sweep's per-block sparsity rule (SweepConfig.allocation)
    unit_allocation: str = "auto"
    # units | flops (structured only: sparsity is then the fraction of the dense model's forward
    # FLOPs per token, at `seqlen`, to remove; see workbench.flops.flops_budget_to_sparsity)
    budget: str = "units"
    # auto | none | disk: onload blocks one at a time from the checkpoint on disk (out of core);
    # 'auto' decides from the memory estimate (workbench.memory). Acts where a model is loaded
    # from a folder (CLI, workflow, workbench.offload.prune_from_disk), not on a model in memory.
    offload: str = "auto"

    def validate(self) -> Pattern:
        """Check every field; return the parsed pattern. Errors name the problem and the fix."""
        record = method_record(self.method)  # unknown names: the error lists the known ones
        pattern = parse_pattern(self.pattern)
        if self.budget not in BUDGETS:
            raise ValueError(f"unknown budget {self.budget!r}: choose one of {BUDGETS} ('units': "
                             "sparsity is the fraction of weights or units removed; 'flops': the "
                             "fraction of forward FLOPs per token, for channel/head patterns)")
        if self.budget == "flops" and not pattern.structured:
            raise PatternError(f"budget 'flops' is for the channel/head patterns, which remove "
                               f"whole matmul rows and columns; pattern {pattern} zeroes single "
                               "weights and leaves dense FLOPs unchanged: use budget 'units'")
        if self.budget == "flops" and self.block_sparsity is not None:
            raise ValueError("block_sparsity gives per-block unit fractions; budget 'flops' takes "
                             "one model-wide FLOPs fraction: drop block_sparsity or use budget "
                             "'units'")
        if pattern.structured:
            if not record.structured:
                raise PatternError(f"{pattern} pruning works with methods {tuple(structured_methods())}; "
                                   f"{self.method} prunes element-wise patterns")
            check_structured_scope(pattern.kind, self.scope)
            if self.unit_allocation not in ALLOCATIONS:
                raise ValueError(f"unknown unit_allocation {self.unit_allocation!r}: choose one of "
                                 f"{ALLOCATIONS}")
            resolve_allocation(self.method, self.unit_allocation)
        elif not record.elementwise:
            raise PatternError(f"{self.method} removes whole MLP channels or attention heads: use "
                               "pattern 'channel' (scope 'mlp') or 'head' (scope 'attention')")
        check_sparsity(self.sparsity)
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}: choose one of {SCOPES}")
        if self.exclude:
            try:
                re.compile(self.exclude)
            except re.error as err:
                raise ValueError(f"exclude {self.exclude!r} is not a valid regex: {err}") from None
        for name in ("nsamples", "seqlen", "batch_size", "blocksize"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.offload not in ("auto", "none", "disk"):
            raise ValueError(f"unknown offload {self.offload!r}: choose 'auto' (decide from the memory "
                             "estimate), 'none' (in memory) or 'disk' (one block at a time from disk)")
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"percdamp must be in [0, 1), got {self.percdamp!r}")
        for value in self.block_sparsity or []:
            check_sparsity(value)
        return pattern

    @property
    def method_record(self) -> Method:
        """The record of `method` (`workbench.methods.Method`); ValueError for an unknown name."""
        return method_record(self.method)

    # The properties below also answer before validate(): an unknown method counts as reading
    # everything, an unparsable pattern as element-wise (validate() names the problem).

    @property
    def tunes_masks(self) -> bool:
        """Whether a channel/head prune refits down / o (mask_tuning, or the method's default): the
        driver then collects X^T X whatever the method reads."""
        record = METHODS.get(self.method)
        try:
            structured = parse_pattern(self.pattern).structured
        except PatternError:
            return False
        if record is None or not structured:
            return False
        return record.mask_tuning_default if self.mask_tuning is None else bool(self.mask_tuning)

    @property
    def reports_error(self) -> bool:
        """Whether the layer output errors are measured (record_error, or its default)."""
        if self.record_error is not None:
            return bool(self.record_error)
        record = METHODS.get(self.method)
        return record is None or record.needs_calibration

    @property
    def collects_gram(self) -> bool:
        """Whether the statistics pass accumulates X^T X."""
        record = METHODS.get(self.method)
        return record is None or record.stats == "gram" or self.tunes_masks or self.reports_error

    @property
    def uses_calibration(self) -> bool:
        """Whether pruning with this config reads calibration data at all."""
        record = METHODS.get(self.method)
        return record is None or record.needs_calibration or self.tunes_masks or self.reports_error

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PruneConfig:
        """A config from `to_dict()`; recipes and runs written before the rename say "allocation"."""
        return dataclass_from(cls, data, renamed={"allocation": "unit_allocation"})


@dataclass
class PruneResult:
    config: PruneConfig
    masks: dict[str, torch.Tensor]  # full linear name -> keep mask (out, in), bool, on CPU
    sparsity: pd.DataFrame  # workbench.sparsity.sparsity_table after pruning
    summary: dict  # workbench.sparsity.sparsity_summary after pruning
    errors: pd.DataFrame  # per linear: block, name, kind, relative output error on calibration
    timings: pd.DataFrame  # per block: stats_s, solve_s, rerun_s
    seconds: float = 0.0
    calibration: dict = field(default_factory=dict)  # source, sha256, nsamples, seqlen, seed
    structure: Structure | None = None  # channel/head patterns: kept units per block (slim.py)


@dataclass
class CalibrationCache:
    """Calibration work that stays valid across several prunes of one model (a sweep).

    `block_inputs` is what block 0 receives: the embeddings are never pruned, so it holds for
    every point as long as the calibration ids and batch size are the same. `dense_stats` holds
    every scoped linear's input statistics measured on the dense network; when set, `prune` uses
    them instead of re-running each block on the pruned network's inputs (fast mode: one
    statistics pass for many sparsity levels, at the cost of ignoring earlier blocks' pruning).
    """

    info: dict = field(default_factory=dict)
    batch_size: int | None = None
    block_inputs: tuple[list[torch.Tensor], BlockArgs] | None = None
    dense_stats: dict[str, InputStats] | None = None
    gram: bool = False


# --- calibration plumbing -------------------------------------------------------------------


class _StopForward(Exception):
    pass


def _to_device(obj, device, dtype: torch.dtype | None = None):
    """Move tensors in `obj` to `device`; floating ones also to `dtype` when given."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device, dtype)
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device, dtype) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device, dtype) for k, v in obj.items()}
    return obj


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


_DROPPED_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache_position", "cache")


def block_kinds(model: nn.Module, num_blocks: int) -> list[str]:
    """One label per block; blocks with the same label receive the same keyword arguments.
    Configs with `layer_types` (sliding-window vs full attention, each with its own mask and
    rotary base) give one kind per type; other models have a single kind."""
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None and len(layer_types) >= num_blocks:
        return [str(kind) for kind in layer_types[:num_blocks]]
    return ["block"] * num_blocks


@dataclass
class BlockArgs:
    """The keyword arguments (attention mask, rotary embeddings, ...) each block receives, per
    calibration micro-batch: captured once per block kind, since blocks of one kind get the same."""

    per_kind: list[dict[str, dict]]  # micro-batch -> block kind -> kwargs
    kinds: list[str]  # block index -> kind

    def for_block(self, index: int) -> list[dict]:
        kind = self.kinds[index]
        return [batch[kind] for batch in self.per_kind]


class _PassThrough(tuple):
    """What a stubbed block returns during capture: indexes like a layer's output tuple, and is
    unwrapped when the next block receives it as its hidden states."""


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layout: ModelLayout, ids: torch.Tensor, batch_size: int,
                         should_stop: Callable[[], bool] | None = None, attention_mask: torch.Tensor | None = None
                         ) -> tuple[list[torch.Tensor], BlockArgs]:
    """Hidden states that block 0 receives, per calibration micro-batch, and the keyword
    arguments of every block kind. `should_stop()` is polled before each micro-batch and raises
    PruneCancelled (a time budget ends here too, not only between blocks).

    The blocks' forwards are replaced by pass-throughs for the capture, so no block computes
    (their weights may not even be loaded): each records its keyword arguments if it is the first
    of its kind, and the forward stops once every kind is seen."""
    kinds = block_kinds(model, layout.num_blocks)
    firsts = {}
    for index, kind in enumerate(kinds):
        firsts.setdefault(kind, index)
    last_needed = max(firsts.values())
    inputs: list[torch.Tensor] = []
    per_kind: list[dict[str, dict]] = []

    def make_stub(index: int):
        def stub(*args, **kw):
            hidden = args[0] if args else kw.pop("hidden_states")
            if isinstance(hidden, _PassThrough):
                hidden = hidden[0]
            if index == 0:
                inputs.append(hidden.detach())
                per_kind.append({})
            if firsts[kinds[index]] == index:
                per_kind[-1][kinds[index]] = {k: v for k, v in kw.items() if k not in _DROPPED_KWARGS}
            if index == last_needed:
                raise _StopForward
            return _PassThrough((hidden,))
        return stub

    stubbed = [block.module for block in layout.blocks[:last_needed + 1]]
    for index, module in enumerate(stubbed):
        module.forward = make_stub(index)
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    try:
        for start in range(0, ids.shape[0], batch_size):
            if should_stop is not None and should_stop():
                raise PruneCancelled(f"stopped while capturing the calibration inputs (window {start} "
                                     f"of {ids.shape[0]}); nothing is pruned")
            try:
                mask = attention_mask[start:start + batch_size].to(device) if attention_mask is not None else None
                model(input_ids=ids[start:start + batch_size].to(device), attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
    finally:
        for module in stubbed:
            del module.forward
    return inputs, BlockArgs(per_kind, kinds)


def _run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: list[dict],
               device: str, outputs: list | None = None) -> list:
    """The block's outputs on every micro-batch, computed in the block's own dtype, appended to
    `outputs` (a list, or an activation store that spills to disk)."""
    outputs = [] if outputs is None else outputs
    dtype = _dtype_of(block)
    for hidden, kw in zip(inputs, kwargs):
        out = _hidden(block(hidden.to(device, dtype), **_to_device(kw, device, dtype)))
        outputs.append(out.to(hidden.device))
    return outputs


def _linears_in_scope(block: BlockInfo, config: PruneConfig, pattern: Pattern) -> list[LinearInfo]:
    chosen = block.select(config.scope)
    if config.exclude:
        chosen = [lin for lin in chosen if not re.search(config.exclude, lin.full_name)]
    for lin in chosen:
        check_divides(pattern, in_out_features(lin.module)[0], lin.full_name)
    return chosen


def _attach_stats(linears: list[LinearInfo], gram: bool, device: str):
    """Forward pre-hooks feeding each linear's input into its InputStats. Linears that receive
    the very same input tensor (q/k/v, gate/up) share one accumulator.

    Returns (stats, detach, stop_early). After one full forward, `stop_early()` makes later
    forwards raise _StopForward at the last linear they reach, once its input is recorded: when
    only the statistics are wanted, the rest of the block (down_proj and the residual, about a
    fifth of a LLaMA block's work) is skipped."""
    stats: dict[str, InputStats] = {}
    last: dict = {"tensor": None, "stats": None}
    calls: list[str] = []
    stop: dict = {"recording": True, "at": None}
    handles = []

    def make_hook(name: str, in_features: int):
        def hook(_module, args):
            x = args[0]
            if stop["recording"]:
                calls.append(name)
            if last["tensor"] is x:  # the same object, so the same statistics
                stats[name] = last["stats"]
            else:
                if name not in stats:
                    stats[name] = InputStats(in_features, gram=gram, device=device)
                stats[name].add_batch(x)
                last.update(tensor=x, stats=stats[name])
            if stop["at"] == name:
                raise _StopForward
        return hook

    for lin in linears:
        in_features = in_out_features(lin.module)[0]
        handles.append(lin.module.register_forward_pre_hook(make_hook(lin.full_name, in_features)))

    def stop_early():
        stop["recording"] = False
        # a linear called twice per forward (shared weights) would stop the forward too soon
        if calls and calls.count(calls[-1]) == 1:
            stop["at"] = calls[-1]

    def detach():
        for handle in handles:
            handle.remove()
        last.update(tensor=None, stats=None)

    return stats, detach, stop_early


def _block_stats(block: nn.Module, linears: list[LinearInfo], inputs: list[torch.Tensor],
                 kwargs: list[dict], gram: bool, device: str) -> dict[str, InputStats]:
    """Input statistics of `linears` over every calibration micro-batch; the block's outputs
    are not needed, so each forward after the first stops at the last linear."""
    stats, detach, stop_early = _attach_stats(linears, gram=gram, device=device)
    dtype = _dtype_of(block)
    try:
        with torch.no_grad():
            for index, (hidden, kw) in enumerate(zip(inputs, kwargs)):
                try:
                    block(hidden.to(device, dtype), **_to_device(kw, device, dtype))
                except _StopForward:
                    pass
                if index == 0:
                    stop_early()
    finally:
        detach()
    return stats


# --- where blocks come from and go to ------------------------------------------------------


class InMemoryBlocks:
    """The driver's default block source: the whole model is in memory. `fetch` moves a block to
    the working device as an fp32 working copy (low-precision weights are up-cast for statistics
    and solves), `put` casts it back to its own dtype and place. An out-of-core source
    (`workbench.offload.DiskBlocks`) materialises blocks from disk and writes them out instead."""

    first_block = 0  # resumed prunes start later
    keeps_masks = True

    def __init__(self):
        self._before: dict[str, tuple[torch.device, torch.dtype]] = {}

    def fetch(self, block: BlockInfo, device: str) -> None:
        self._before = {name: (p.device, p.dtype) for name, p in block.module.named_parameters()}
        block.module.to(device)
        for param in block.module.parameters():
            if param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.to(torch.float32)

    def put(self, block: BlockInfo, next_inputs, records: dict) -> None:
        for name, param in block.module.named_parameters():
            device, dtype = self._before[name]
            if param.device != device or param.dtype != dtype:
                param.data = param.data.to(device, dtype)

    def new_activations(self) -> list:
        return []

    def resumed(self):
        """(inputs, errors, timings) of a resumed prune; None when starting from block 0."""
        return None

    def sparsity(self, model: nn.Module, layout: ModelLayout) -> tuple[pd.DataFrame, dict]:
        table = sparsity_table(model, layout)
        return table, sparsity_summary(model, layout, table)


# --- the driver -----------------------------------------------------------------------------


def _calibration_ids(config: PruneConfig, calibration, tokenizer) -> tuple[torch.Tensor, dict]:
    if isinstance(calibration, torch.Tensor):
        return calibration.long(), {"source": "tensor", "nsamples": int(calibration.shape[0]),
                                    "seqlen": int(calibration.shape[1])}
    if calibration is not None and hasattr(calibration, "ids"):
        data = calibration
    else:
        if tokenizer is None:
            raise ValueError("pass a tokenizer (or calibration token ids) so calibration text can "
                             "be tokenized")
        from workbench.data import load_calibration

        data = load_calibration(tokenizer, config.calibration, nsamples=config.nsamples,
                                seqlen=config.seqlen, seed=config.seed)
    info = {"source": data.source, "sha256": data.sha256, "nsamples": data.nsamples,
            "seqlen": data.seqlen, "seed": data.seed}
    return data.ids.long(), info


def _block0_inputs(model: nn.Module, layout: ModelLayout, config: PruneConfig, calibration,
                   tokenizer, cache: CalibrationCache | None,
                   progress: Progress | None = None,
                   should_stop: Callable[[], bool] | None = None):
    """Block 0's calibration inputs, taken from `cache` when it holds them, stored there if not."""
    if cache is not None and cache.block_inputs is not None and cache.batch_size == config.batch_size:
        inputs, kwargs = cache.block_inputs
        return list(inputs), kwargs, dict(cache.info)
    if progress is not None:
        progress(0.0, "loading calibration")
    ids, info = _calibration_ids(config, calibration, tokenizer)
    if progress is not None:
        progress(0.0, f"capturing block inputs ({ids.shape[0]} x {ids.shape[1]} tokens)")
    ids = distributed.local_windows(ids)  # under a process group: this rank's share only
    inputs, kwargs = capture_block_inputs(model, layout, ids, config.batch_size, should_stop=should_stop)
    if cache is not None:
        cache.block_inputs, cache.batch_size, cache.info = (list(inputs), kwargs), \
            config.batch_size, dict(info)
    return inputs, kwargs, info


@torch.no_grad()
def collect_dense_stats(model: nn.Module, config: PruneConfig, calibration=None, tokenizer=None,
                        cache: CalibrationCache | None = None, gram: bool = True,
                        progress: Progress | None = None,
                        should_stop: Callable[[], bool] | None = None) -> CalibrationCache:
    """Input statistics of every linear in `config`'s scope, measured on the (dense) model as it
    is: one forward per block, whose output is the next block's input. Nothing is pruned.
    `gram=True` collects X^T X too, which serves every method (and the error report)."""
    pattern = config.validate()
    layout = describe(model)
    cache = cache if cache is not None else CalibrationCache()
    was_training = model.training
    model.eval()
    inputs, kwargs, _ = _block0_inputs(model, layout, config, calibration, tokenizer, cache,
                                       should_stop=should_stop)
    collected: dict[str, InputStats] = {}
    try:
        for block in layout.blocks:
            if should_stop is not None and should_stop():
                raise PruneCancelled(f"stopped before block {block.index} while collecting statistics")
            device_before = next(block.module.parameters()).device
            block.module.to(config.device)
            stats, detach, _ = _attach_stats(_linears_in_scope(block, config, pattern),
                                             gram=gram, device=config.device)
            try:
                inputs = _run_block(block.module, inputs, kwargs.for_block(block.index), config.device)
            finally:
                detach()
            block.module.to(device_before)
            distributed.all_reduce_stats(stats)
            collected.update(stats)
            if progress is not None:
                progress((block.index + 1) / layout.num_blocks, f"statistics {block.index + 1}/{layout.num_blocks}")
    finally:
        model.train(was_training)
    cache.dense_stats, cache.gram = collected, gram
    return cache


def _unit_sparsity(model: nn.Module, layout: ModelLayout, config: PruneConfig,
                   geometries: list[BlockGeometry]) -> float:
    """The unit fraction to remove from `geometries`: `config.sparsity` itself, or for budget
    'flops' the fraction that removes at least that share of the forward FLOPs per token."""
    if config.budget != "flops":
        return config.sparsity
    allocation = resolve_allocation(config.method, config.unit_allocation)
    sparsity = flops_budget_to_sparsity(geometries, layout, config.sparsity, config.seqlen,
                                        lm_head_params=lm_head_params(model),
                                        allocation=allocation)
    log.info("FLOPs budget %.4g of the forward FLOPs per token (seqlen %d): removing %.4g of "
             "the %s (%s allocation)", config.sparsity, config.seqlen, sparsity,
             UNIT_NOUNS[geometries[0].unit], allocation)
    return sparsity


def _structured_plan(model: nn.Module, layout: ModelLayout, config: PruneConfig,
                     pattern: Pattern, calibration, tokenizer) -> tuple[StructuredPlan, float]:
    """Channel/head choices (for a method with gradients, e.g. retrain-free: its pre-pass over the
    full model) and the unit fraction they remove; blocks with a linear matched by `exclude` stay
    dense."""
    geometries = model_geometry(layout, pattern.kind)
    skip = set()
    if config.exclude:
        for geometry in geometries:
            if any(re.search(config.exclude, lin.full_name) for lin in geometry.linears()):
                skip.add(geometry.block)
    sparsity = _unit_sparsity(model, layout, config,
                              [g for g in geometries if g.block not in skip])
    ids, info = None, {}
    if config.method_record.needs_gradients:
        ids, info = _calibration_ids(config, calibration, tokenizer)
    plan = plan_structured(model, layout, pattern.kind, config.method, sparsity, ids,
                           allocation=config.unit_allocation, block_sparsity=config.block_sparsity,
                           mask_tuning=config.mask_tuning, percdamp=config.percdamp,
                           batch_size=config.batch_size, skip_blocks=skip, geometries=geometries)
    plan.calibration = info  # recorded even when the layer-wise pass reads no data
    return plan, sparsity


def _warn_if_few_tokens(config: PruneConfig, tokens: int, scoped: list[list[LinearInfo]]) -> None:
    """X^T X from fewer tokens than a layer has inputs is singular: the solve then leans on the
    dampening alone and prunes little better than magnitude on that layer."""
    widest = max((in_out_features(lin.module)[0] for linears in scoped for lin in linears),
                 default=0)
    if tokens < widest:
        log.warning("%s: %d calibration tokens but layers with %d inputs; their Hessians are "
                    "singular and the result will be poor. Use at least %d tokens (e.g. nsamples "
                    "x seqlen = %d x %d)", config.method, tokens, widest, widest,
                    -(-2 * widest // config.seqlen), config.seqlen)


def _block_target(config: PruneConfig, index: int, unit_sparsity: float | None = None) -> float:
    if config.block_sparsity is not None:
        return config.block_sparsity[index]
    return config.sparsity if unit_sparsity is None else unit_sparsity


def _progress_message(done_here: int, left: int, done: int, total: int, seconds: float) -> str:
    """'block 5/32, 12.3 s/block, about 5 min 32 s left': the rate counts only the blocks this
    run pruned (a resumed run does not count the blocks it skipped)."""
    rate = seconds / max(done_here, 1)
    eta = rate * left
    minutes, secs = divmod(int(round(eta)), 60)
    left_text = f"about {minutes} min {secs} s left" if minutes else f"about {secs} s left"
    return f"block {done}/{total}, {rate:.1f} s/block, {left_text}"


def _prunes_nothing(config: PruneConfig) -> bool:
    """An unstructured prune at sparsity 0 in every block removes no weight."""
    targets = config.block_sparsity if config.block_sparsity is not None else [config.sparsity]
    return parse_pattern(config.pattern).kind == "unstructured" and all(t == 0 for t in targets)


def _unchanged_result(model: nn.Module, layout: ModelLayout, config: PruneConfig,
                      scoped: list[list[LinearInfo]]) -> PruneResult:
    """The result of a prune that removes nothing: all-kept masks, the model's own sparsity."""
    masks = {}
    for linears in scoped:
        for lin in linears:
            in_features, out_features = in_out_features(lin.module)
            masks[lin.full_name] = torch.ones(out_features, in_features, dtype=torch.bool)
    table = sparsity_table(model, layout)
    return PruneResult(config=config, masks=masks, sparsity=table,
                       summary=sparsity_summary(model, layout, table),
                       errors=pd.DataFrame(columns=["block", "name", "kind", "group", "error"]),
                       timings=pd.DataFrame(columns=["block", "stats_s", "solve_s", "rerun_s", "io_s"]))


def prune(model: nn.Module, config: PruneConfig, calibration=None, tokenizer=None,
          progress: Progress | None = None,
          should_stop: Callable[[], bool] | None = None,
          cache: CalibrationCache | None = None, blocks: InMemoryBlocks | None = None) -> PruneResult:
    """Prune `model` in place as `config` says and return what was done.

    `calibration`: token ids (nsamples, seqlen), a `workbench.data.CalibrationData`, or None to
    load `config.calibration` with `tokenizer`. `progress(fraction, message)` is called after
    each block (fraction: blocks done / blocks); `should_stop()` is polled between blocks and raises PruneCancelled.
    `cache` (a `CalibrationCache`) reuses block 0's inputs across calls, and when it holds dense
    statistics (`collect_dense_stats`) uses them instead of re-running the blocks.
    `blocks` says where blocks come from and go to (default: in memory; see workbench.offload
    for the out-of-core source, which also resumes an interrupted prune).
    """
    pattern = config.validate()
    blocks = blocks if blocks is not None else InMemoryBlocks()
    layout = describe(model)
    guards.check_before_prune(model, layout, config, calibration)  # NaN/inf, positions, device
    if config.block_sparsity is not None and len(config.block_sparsity) != layout.num_blocks:
        raise ValueError(f"block_sparsity has {len(config.block_sparsity)} entries but the model "
                         f"has {layout.num_blocks} blocks")
    scoped = [_linears_in_scope(block, config, pattern) for block in layout.blocks]
    if not any(scoped):
        raise ValueError(f"nothing to prune: scope {config.scope!r} with exclude "
                         f"{config.exclude!r} selects no linear layer")
    if isinstance(blocks, InMemoryBlocks) and _prunes_nothing(config):  # instant: no calibration, no solve
        log.info("sparsity 0: nothing to prune, the model is unchanged")
        return _unchanged_result(model, layout, config, scoped)

    distributed.check_supported(config.method, out_of_core=not isinstance(blocks, InMemoryBlocks))
    method = config.method_record.prune  # element-wise form; structured patterns use a plan
    if method is not None and not pattern.structured and hasattr(method, "warm_up"):
        method.warm_up()  # e.g. a compiled kernel, made ready while the calibration pass runs
    needed = config.method_record.stats
    start_time = time.perf_counter()
    plan = None
    unit_sparsity = None  # structured patterns: the unit fraction every block's target uses
    if pattern.structured:
        if config.method_record.needs_gradients and calibration is None:
            from workbench.data import load_calibration

            if tokenizer is None:
                raise ValueError("pass a tokenizer (or calibration token ids) so calibration text "
                                 "can be tokenized")
            calibration = load_calibration(tokenizer, config.calibration, nsamples=config.nsamples,
                                           seqlen=config.seqlen, seed=config.seed)
        plan, unit_sparsity = _structured_plan(model, layout, config, pattern, calibration,
                                               tokenizer)
        scoped = [plan.block_linears(block.index) for block in layout.blocks]
        needed = plan.needs_stats()
    uses_data = needed is not None or config.reports_error
    gram = needed == "gram" or config.reports_error
    device = config.device

    was_training = model.training
    model.eval()
    inputs = kwargs = None
    calib_info: dict = dict(plan.calibration) if plan is not None else {}
    dense_stats = cache.dense_stats if cache is not None and uses_data else None
    if dense_stats is not None:
        if gram and not cache.gram:
            raise ValueError(f"{config.method} (or record_error) needs X^T X, but the cached dense "
                             "statistics were collected without it: collect them with gram=True")
        missing = [lin.full_name for linears in scoped for lin in linears
                   if lin.full_name not in dense_stats]
        if missing:
            raise ValueError(f"the cached dense statistics do not cover {missing[0]} (and "
                             f"{len(missing) - 1} more): collect them with this config's scope")
        calib_info = dict(cache.info)
    elif uses_data:
        inputs, kwargs, calib_info = _block0_inputs(model, layout, config, calibration, tokenizer,
                                                    cache, progress, should_stop)
        inputs = place_activations(inputs, device)  # CUDA: on the GPU if they fit, else pinned
        if needed == "gram" and plan is None:
            _warn_if_few_tokens(config, distributed.total(sum(x.shape[:-1].numel() for x in inputs)),
                                scoped)

    masks: dict[str, torch.Tensor] = {}
    errors, timings = [], []
    resumed = blocks.resumed()
    if resumed is not None:
        inputs, errors, timings = resumed
    bar = tqdm(layout.blocks, desc=f"{config.method} {pattern}", unit="block", leave=False,
               disable=not distributed.is_main())
    loop_start = time.perf_counter()
    try:
        for block, linears in zip(bar, scoped):
            if block.index < blocks.first_block:  # done by the interrupted run being resumed
                continue
            if should_stop is not None and should_stop():
                raise PruneCancelled(f"stopped before block {block.index}; blocks before it are "
                                     "pruned, the rest are dense")
            if progress is not None and block.index == blocks.first_block:
                progress(block.index / layout.num_blocks, f"block {block.index + 1}/{layout.num_blocks}, "
                         "time left known after this block")
            t0 = time.perf_counter()
            blocks.fetch(block, device)
            t_fetched = time.perf_counter()
            block_kwargs = kwargs.for_block(block.index) if kwargs is not None else None
            if inputs is not None:
                guards.check_finite_activations(inputs, block.name)
            stats: dict[str, InputStats] = {}
            if dense_stats is not None:
                stats = {lin.full_name: dense_stats[lin.full_name] for lin in linears}
            elif uses_data and linears:
                stats = _block_stats(block.module, linears, inputs, block_kwargs, gram, device)
                distributed.all_reduce_stats(stats)  # no-op outside a process group
            t1 = time.perf_counter()
            target = _block_target(config, block.index, unit_sparsity)
            measured: dict[str, float] = {}  # output errors a solve measured itself, by layer
            if plan is not None:
                decided = plan.solve_block(block.index, stats, target) if linears else []
                # every rank decided the same from the same statistics; rank 0's copy is the one kept
                distributed.broadcast_weights([t for item in decided for t in item[2:]])
            elif not distributed.current().active:
                # one input group at a time (q/k/v, gate/up stacked where the method can, else
                # one layer): a 7B block's dense copies and solved weights all alive at once
                # would double its working memory
                decided = solve_by_input(method, linears, stats, pattern, target, config.blocksize,
                                         config.percdamp, measured if config.reports_error else None)
            else:
                denses = [weight_of(lin.module).to(torch.float32, copy=True).contiguous()
                          for lin in linears]
                # under a process group each rank solves its share and receives the rest
                solved = distributed.split_solves(method, denses, [stats.get(lin.full_name) for lin in linears],
                                                  pattern, target, blocksize=config.blocksize,
                                                  percdamp=config.percdamp)
                decided = [(lin, dense, *result) for lin, dense, result in zip(linears, denses, solved)]
                del denses, solved
            for lin, dense, new_weight, keep in decided:
                # the mask is the contract, whatever the method did (unit masks are built on CPU)
                new_weight = new_weight * keep.to(new_weight.device)
                error = measured.pop(lin.full_name) if lin.full_name in measured else \
                    stats[lin.full_name].relative_error(dense, new_weight) \
                    if config.reports_error and lin.full_name in stats else float("nan")
                stats.pop(lin.full_name, None)  # statistics (and SparseGPT's factor) freed once used
                replace_weight(lin.module, new_weight)  # the caller's copy is not used again
                if blocks.keeps_masks:
                    masks[lin.full_name] = keep.cpu()
                errors.append({"block": block.index, "name": lin.full_name, "kind": lin.kind,
                               "group": lin.group, "error": error})
                del dense, new_weight, keep  # freed before the next layer's solve
            guards.check_finite_parameters(block.module, block.name, when="after pruning")
            t2 = time.perf_counter()
            if uses_data and dense_stats is None and block.index + 1 < layout.num_blocks:
                with torch.no_grad():
                    inputs = _run_block(block.module, inputs, block_kwargs, device,
                                        outputs=blocks.new_activations())
                inputs = place_activations(inputs, device)
            t3 = time.perf_counter()
            del stats
            timings.append({"block": block.index, "stats_s": t1 - t_fetched, "solve_s": t2 - t1,
                            "rerun_s": t3 - t2, "io_s": t_fetched - t0})
            blocks.put(block, inputs, {"errors": errors, "timings": timings, "plan": plan})
            timings[-1]["io_s"] += time.perf_counter() - t3
            log.info("block %d: stats %.2fs, solve %.2fs, re-run %.2fs", block.index,
                     t1 - t_fetched, t2 - t1, t3 - t2)
            if progress is not None:
                progress((block.index + 1) / layout.num_blocks,
                         _progress_message(block.index + 1 - blocks.first_block, layout.num_blocks
                                           - block.index - 1, block.index + 1, layout.num_blocks,
                                           time.perf_counter() - loop_start))
    finally:
        bar.close()
        model.train(was_training)

    table, summary = blocks.sparsity(model, layout)
    return PruneResult(
        config=config,
        masks=masks,
        sparsity=table,
        summary=summary,
        errors=pd.DataFrame(errors, columns=["block", "name", "kind", "group", "error"]),
        timings=pd.DataFrame(timings, columns=["block", "stats_s", "solve_s", "rerun_s", "io_s"]),
        seconds=time.perf_counter() - start_time,
        calibration=calib_info,
        structure=plan.structure() if plan is not None else None,
    )
