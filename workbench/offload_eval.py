"""WikiText-2 perplexity and LAMBADA accuracy of a model larger than memory, onloading one
decoder block at a time.

    result = perplexity_from_disk("llama-70b/", text, seqlen=2048)
    results = lambada_from_disk("llama-70b/", passages)  # {"lambada": ..., "lambada-last-token": ...}

The same block onloading as the out-of-core prune (`workbench.offload`): a meta-device skeleton
with the embeddings, final norm and LM head loaded once; block 0's inputs are captured for every
evaluation window (spilled to disk when they do not fit), then each block is read from the
memory-mapped shards as an fp32 working copy, run over all windows and freed. The final hidden
states are scored by `workbench.evaluate.window_nll_from_hidden` (chunked LM head and
log-softmax), so the figure and the result's keys are those of `workbench.evaluate.perplexity`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.arch import ModelLayout, describe
from workbench.offload import (
    Activations,
    CheckpointReader,
    DiskBlocks,
    OffloadError,
    check_complete,
    load_outside_blocks,
    skeleton,
)
from workbench.prune import BlockArgs, _hidden, _PassThrough, _to_device, capture_block_inputs

log = logging.getLogger(__name__)

OUT_OF_CORE_TASKS = ("wikitext2", "lambada", "lambada-last-token")


def check_offload_tasks(tasks: Sequence[str]) -> None:
    """Refuse tasks that cannot be evaluated out of core, naming the workaround."""
    refused = [task for task in tasks if task not in OUT_OF_CORE_TASKS]
    if refused:
        raise OffloadError(f"{', '.join(refused)} cannot be evaluated out of core (wikitext2, lambada and "
                           "lambada-last-token run one block at a time from disk): evaluate those with "
                           "--offload disk, or run the other tasks with --offload none on a machine that "
                           "holds the model")


def _as_windows(folder: Path, texts_or_ids, seqlen: int, limit: int | None, bos_per_window: bool,
                tokenizer) -> torch.Tensor:
    """(windows, seqlen) token ids: from text as `workbench.evaluate.perplexity` builds them, or
    from ids already cut into windows (2-D) or to be cut (1-D, the last partial window dropped)."""
    from workbench.evaluate import perplexity_windows

    if isinstance(texts_or_ids, torch.Tensor):
        ids = texts_or_ids.long()
        if ids.dim() == 1:
            if ids.numel() < seqlen:
                raise ValueError(f"{ids.numel()} token ids, fewer than one window of {seqlen}")
            ids = ids[: ids.numel() // seqlen * seqlen].view(-1, seqlen)
        if ids.dim() != 2 or ids.shape[1] != seqlen or ids.shape[0] == 0:
            raise ValueError(f"token ids of shape {tuple(ids.shape)}: give (windows, {seqlen}) or a 1-D sequence")
        return ids[:limit] if limit is not None else ids
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    text = texts_or_ids if isinstance(texts_or_ids, str) else "\n\n".join(texts_or_ids)
    return perplexity_windows(tokenizer, text, seqlen, limit, bos_per_window)


def _fp32_outside_blocks(model: nn.Module, layout: ModelLayout, device: str) -> None:
    """The embeddings, final norm and LM head as fp32 working copies on `device`, like the blocks
    (and the loaded buffers, e.g. rotary tables, on `device` too)."""
    prefix = layout.blocks_name + "."
    for name, param in model.named_parameters():
        if not name.startswith(prefix) and param.device.type != "meta":
            param.data = param.data.to(device, torch.float32) if param.is_floating_point() else param.data.to(device)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(device)


def _activations_fit(windows: int, seqlen: int, hidden_size: int, available: int | None = None) -> bool:
    from workbench.memory import HEADROOM, available_memory

    available = available_memory() if available is None else available
    return 2 * windows * seqlen * hidden_size * 4 <= HEADROOM * available / 4


@torch.no_grad()
def _final_hidden_states(model: nn.Module, layout: ModelLayout, ids: torch.Tensor,
                         hidden: torch.Tensor, tuple_output: bool) -> torch.Tensor:
    """What the LM head sees when the last block's output is `hidden`: the model's own forward
    with every block replaced by a pass-through (block 0 hands over `hidden`), stopped at the
    head, so the final norm (and any family's post-block step) is the model's own.
    `tuple_output`: the blocks return tuples (hidden states first), as some families' do."""
    from workbench.evaluate import _final_hidden

    def wrap(tensor: torch.Tensor):
        return _PassThrough((tensor,)) if tuple_output else tensor

    def first(*args, **kw):
        return wrap(hidden)

    def rest(*args, **kw):
        given = args[0] if args else kw["hidden_states"]
        return wrap(given[0] if isinstance(given, _PassThrough) else given)

    modules = [block.module for block in layout.blocks]
    for index, module in enumerate(modules):
        module.forward = first if index == 0 else rest
    try:
        out = _final_hidden(model, ids, torch.ones_like(ids))
    finally:
        for module in modules:
            del module.forward
    if out is None:
        raise OffloadError(f"{type(model).__name__} has no separate LM head module, which out-of-core "
                           "evaluation applies to the final hidden states; evaluate it in memory (--offload none)")
    return out


@torch.no_grad()
def _through_blocks(model: nn.Module, layout: ModelLayout, reader: CheckpointReader, batches: list[torch.Tensor],
                    masks: list[torch.Tensor | None], device: str, activations_in_memory: bool, scratch: Path,
                    progress: Callable[[float, str], None] | None, what: str) -> tuple[list, bool]:
    """The last block's output for every batch of token ids (with its attention mask, or None),
    one block in memory at a time; returns (outputs per batch, whether the blocks return tuples)."""
    def store(index: int):
        return [] if activations_in_memory else Activations(scratch / f"hidden-{index}", in_memory=False)

    # one micro-batch at a time, so spilled embeddings are never all in memory at once
    inputs, per_kind = store(0), []
    for ids, mask in zip(batches, masks):
        captured, batch_args = capture_block_inputs(model, layout, ids, ids.shape[0], attention_mask=mask)
        inputs.append(captured[0] if activations_in_memory else captured[0].cpu())
        per_kind += batch_args.per_kind
    args = BlockArgs(per_kind, batch_args.kinds)
    # a prune's block source, used here only to read blocks; nothing is written to `scratch`
    source = DiskBlocks(model, layout, reader, scratch, {}, activations_in_memory, resume=False)
    steps, tuple_output = layout.num_blocks + 1, False
    for block in tqdm(layout.blocks, desc=f"{what} out of core", unit="block", leave=False):
        source.fetch(block, device)
        outputs = store(block.index + 1)
        for hidden, kw in zip(inputs, args.for_block(block.index)):
            raw = block.module(hidden.to(device), **_to_device(kw, device, torch.float32))
            tuple_output, out = isinstance(raw, (tuple, list)), _hidden(raw)
            outputs.append(out if activations_in_memory else out.cpu())
        block.module.to("meta")  # freed: the next block takes its place
        inputs = outputs
        if progress is not None:
            progress((block.index + 1) / steps, f"block {block.index + 1}/{layout.num_blocks}")
    return inputs, tuple_output


@torch.no_grad()
def perplexity_from_disk(folder: str | Path, texts_or_ids, seqlen: int = 512, batch_size: int = 8,
                         limit: int | None = None, bos_per_window: bool = False, tokenizer=None,
                         device: str = "cpu", activations_in_memory: bool | None = None,
                         spill_dir: str | Path | None = None,
                         progress: Callable[[float, str], None] | None = None) -> dict:
    """Perplexity of the safetensors checkpoint in `folder` over non-overlapping `seqlen` windows,
    with one decoder block in memory at a time; the result is `workbench.evaluate.perplexity`'s.

    `texts_or_ids`: the text (or texts, joined by blank lines) tokenized with `tokenizer` (default:
    the folder's), or token ids, 1-D or (windows, seqlen). `activations_in_memory`: None decides
    from free memory; False keeps every window's hidden states on disk (under `spill_dir`, default
    a temporary folder) and one micro-batch in memory. `progress(fraction, message)` is optional.
    """
    from workbench.evaluate import perplexity_result, window_nll_from_hidden

    started = time.perf_counter()
    folder = Path(folder).expanduser()
    check_complete(folder)
    reader = CheckpointReader(folder)
    windows = _as_windows(folder, texts_or_ids, seqlen, limit, bos_per_window, tokenizer)
    model = skeleton(folder, dtype=torch.float32)
    layout = describe(model)
    load_outside_blocks(model, layout, reader)
    _fp32_outside_blocks(model, layout, device)  # the blocks stay on meta until fetched
    if activations_in_memory is None:
        activations_in_memory = _activations_fit(windows.shape[0], seqlen, layout.hidden_size)
    batches = [windows[start:start + batch_size] for start in range(0, windows.shape[0], batch_size)]
    with tempfile.TemporaryDirectory(prefix="offload-eval-", dir=spill_dir) as scratch:
        inputs, tuple_output = _through_blocks(model, layout, reader, batches, [None] * len(batches), device,
                                               activations_in_memory, Path(scratch), progress, "perplexity")
        window_nll: list[float] = []
        for ids, hidden in zip(batches, inputs):
            ids = ids.to(device)
            final = _final_hidden_states(model, layout, ids, hidden.to(device), tuple_output)
            window_nll += window_nll_from_hidden(model, final, ids)
    if progress is not None:
        progress(1.0, "scored")
    return perplexity_result(window_nll, seqlen, bos_per_window, time.perf_counter() - started)


@torch.no_grad()
def lambada_from_disk(folder: str | Path, texts, batch_size: int = 16, limit: int | None = None,
                      tokenizer=None, device: str = "cpu", last_word: bool = True, last_token: bool = True,
                      activations_in_memory: bool | None = None, spill_dir: str | Path | None = None,
                      progress: Callable[[float, str], None] | None = None) -> dict:
    """LAMBADA last-word accuracy (and perplexity) and last-token accuracy of the safetensors
    checkpoint in `folder`, one decoder block in memory at a time. The same sequences, batches
    (longest first, right-padded) and scoring as `workbench.evaluate`; returns its results under
    the keys "lambada" and "lambada-last-token" (those asked for)."""

    from workbench.evaluate import (
        LambadaScores,
        _max_length,
        _pad_id,
        _right_padded,
        batch_targets,
        lambada_sequences,
        scores_from_hidden,
    )

    if not (last_word or last_token):
        raise ValueError("nothing to evaluate: ask for last_word and/or last_token")
    started = time.perf_counter()
    folder = Path(folder).expanduser()
    check_complete(folder)
    texts = list(texts[:limit] if limit is not None else texts)
    if not texts:
        raise ValueError("no LAMBADA passages to evaluate")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    reader = CheckpointReader(folder)
    model = skeleton(folder, dtype=torch.float32)
    layout = describe(model)
    load_outside_blocks(model, layout, reader)
    _fp32_outside_blocks(model, layout, device)
    sequences, jobs = lambada_sequences(tokenizer, texts, _max_length(model), last_word, last_token)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    padded = [_right_padded([sequences[i] for i in batch], _pad_id(tokenizer), "cpu") for batch in batches]
    if activations_in_memory is None:
        tokens = sum(ids.numel() for ids, _ in padded)
        activations_in_memory = _activations_fit(tokens, 1, layout.hidden_size)
    scores = LambadaScores.empty(len(texts))
    with tempfile.TemporaryDirectory(prefix="offload-eval-", dir=spill_dir) as scratch:
        outputs, tuple_output = _through_blocks(model, layout, reader, [ids for ids, _ in padded],
                                                [mask for _, mask in padded], device, activations_in_memory,
                                                Path(scratch), progress, "lambada")
        for batch, (ids, _), hidden in zip(batches, padded, outputs):
            ids = ids.to(device)
            final = _final_hidden_states(model, layout, ids, hidden.to(device), tuple_output)
            rows, positions, targets, spans = batch_targets(batch, jobs)
            scores.record(spans, *scores_from_hidden(model, final, rows, positions, targets))
    if progress is not None:
        progress(1.0, "scored")
    return scores.results(last_word, last_token, tokens=sum(len(s) for s in sequences),
                          seconds=time.perf_counter() - started)


def in_memory_need(folder: str | Path, load_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(bytes an in-memory evaluation needs, bytes it may use): the weights in `load_dtype`
    (default: the checkpoint's) plus the fixed overhead, against free memory with headroom."""
    from workbench.evaluate import LOGITS_CHUNK_BYTES
    from workbench.memory import HEADROOM, OVERHEAD, _unique_params, available_memory

    dtype = load_dtype or CheckpointReader(folder).dtype()
    weights = _unique_params(skeleton(folder, dtype=dtype)) * torch.empty(0, dtype=dtype).element_size()
    return weights + OVERHEAD + LOGITS_CHUNK_BYTES, int(HEADROOM * available_memory())
