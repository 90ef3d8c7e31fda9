"""LAMBADA last-word and last-token accuracy, WikiText-2 perplexity; batched and padding-correct.

Sequences are padded on the right with an attention mask. In a causal LM a real token never
attends to the padding after it, so the figures do not depend on the batch size (up to float
rounding, ~1e-6).

- `lambada_last_word` follows lm-eval 0.4's `lambada_openai` task: context is the passage up to
  its last space, target is " " + last word; the pair is tokenized like lm-eval 0.4.13's
  `_encode_pair` (encode context+target and context with the tokenizer's default special tokens,
  so a BOS-adding tokenizer gets its BOS; the target tokens are what the whole has beyond the
  context); a passage counts as correct when greedy decoding reproduces every
  target token; perplexity is exp(-mean over passages of the target's total log-likelihood).
- `last_token_accuracy` is the "last token accuracy" of the retrain-free pruning results: tokenize
  the whole passage (the tokenizer's own special tokens included) and predict its last token.
- `perplexity` is the SparseGPT/Wanda convention: non-overlapping windows of `seqlen` tokens,
  exp of the mean of each window's mean next-token NLL (optionally BOS at every window).
- `lm-eval:<task>` is any lm-eval task, run in process on the model in memory
  (`workbench.lmeval`); `zero-shot` is the papers' seven-task suite plus its mean.

`TASKS` holds each task's loader, scorer, metric labels and dataset name; the CLI, the sweep, the
workflow and both UIs read their task lists and labels from it.

Every result keeps its per-item scores ("items": 0/1 "accuracy" and/or "nll" per passage, window
or document; "item_ids") and intervals (`workbench.intervals`), so `compare` can pair two models
item by item. The LM head never runs on a whole batch: the model is run to its final hidden
states and the head + log-softmax are applied to a bounded number of positions at a time
(`LOGITS_CHUNK_BYTES`), so a 262k-token vocabulary costs about the memory of a 49k one.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench.data import load_lambada, load_wikitext2_test, tokenize_text
from workbench.intervals import (
    Paired,
    accuracy_summary,
    format_interval,
    paired_accuracy,
    paired_perplexity,
    paired_task_mean,
    perplexity_summary,
    task_mean_summary,
)
from workbench.lmeval import PREFIX as LM_EVAL_PREFIX
from workbench.lmeval import ZERO_SHOT, run_tasks
from workbench.progress import Progress

log = logging.getLogger(__name__)

# A preset runs its member tasks and adds their mean accuracy under its own name.
PRESETS = {"zero-shot": tuple(LM_EVAL_PREFIX + name for name in ZERO_SHOT)}
METRIC_KEYS = ("accuracy", "perplexity")  # the figures compared, paired and put in sweep tables
COMPARE_COLUMNS = ["metric", "dense", "sparse", "relative drop (%)"]
INTERVAL_COLUMNS = ["dense 95% CI", "sparse 95% CI", "difference", "difference 95% CI", "significant"]


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _first_token_id(tokenizer, *names: str) -> int:
    """The first of the tokenizer's `names` (e.g. "pad_token_id") that is set; 0 when none is."""
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _pad_id(tokenizer) -> int:
    return _first_token_id(tokenizer, "pad_token_id", "eos_token_id")


def _prefix_id(tokenizer) -> int:
    """What lm-eval puts before an empty context: BOS if the tokenizer has one, else EOS."""
    return _first_token_id(tokenizer, "bos_token_id", "eos_token_id")


def _max_length(model) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _right_padded(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _logits_at(model, ids: torch.Tensor, mask: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Logits at `positions` of every row, (batch, len(positions), vocab)."""
    if _accepts_logits_to_keep(model):
        keep = torch.as_tensor(positions, device=ids.device)
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
    return model(input_ids=ids, attention_mask=mask).logits[:, positions]


# Full-vocabulary logits are never built for a whole batch: the LM head runs on at most this many
# bytes of float32 logits at a time (a 262k vocabulary gets fewer positions per chunk than 49k).
LOGITS_CHUNK_BYTES = 64 * 2**20
_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> head can be split off


class _HiddenCaptured(Exception):
    """Raised by the LM head's pre-hook to stop a forward once the final hidden states are in."""


def _logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor]:
    """What some families do to the LM head's output (Gemma soft-capping, Cohere and Granite scales)."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        if isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and divisor:
            logits = logits / divisor
        if isinstance(cap, (int, float)) and cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def _final_hidden(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """The hidden states the LM head would see, (batch, seq, hidden), without running the head;
    None when the model has no separate head module to stop at."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return None
    captured: dict[str, torch.Tensor] = {}

    def grab(_module, args):
        captured["hidden"] = args[0]
        raise _HiddenCaptured

    handle = head.register_forward_pre_hook(grab)
    try:
        model(input_ids=ids, attention_mask=mask)
    except _HiddenCaptured:
        pass
    finally:
        handle.remove()
    return captured.get("hidden")


def _head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits of a few hidden-state rows (..., hidden) -> (..., vocab)."""
    return _logit_transform(model.config)(model.get_output_embeddings()(hidden)).float()


def _positions_per_chunk(model) -> int:
    get_head = getattr(model, "get_output_embeddings", None)
    weight = getattr(get_head() if callable(get_head) else None, "weight", None)
    vocab = int(weight.shape[0]) if weight is not None else int(getattr(model.config, "vocab_size", 0) or 1)
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab))


def _head_splits(model, ids: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether head(final hidden) reproduces the model's own logits; checked once per model on a
    few positions of the first row, so a family with an unknown post-head step falls back."""
    if model in _HEAD_CHECKED:
        return _HEAD_CHECKED[model]
    length = int(mask[0].sum().clamp(min=1, max=min(8, _positions_per_chunk(model))))  # within the budget
    row, row_mask = ids[:1, :length], mask[:1, :length]
    hidden = _final_hidden(model, row, row_mask)
    ok = False
    if hidden is not None:
        full = model(input_ids=row, attention_mask=row_mask).logits.float()
        split = _head_logits(model, hidden)
        # bf16/fp16 matmuls of a different shape round differently; a missed post-head step
        # (soft-capping, a scale) is far larger than either tolerance
        tolerance = 1e-4 if hidden.dtype == torch.float32 else 5e-2
        ok = full.shape == split.shape and torch.allclose(split, full, rtol=tolerance, atol=tolerance)
    if not ok:
        log.warning("%s: the LM head cannot be split off; evaluating with full logits per batch",
                    type(model).__name__)
    try:
        _HEAD_CHECKED[model] = ok
    except TypeError:  # not weak-referenceable: check again next time
        pass
    return ok


def _score_tokens(model, ids: torch.Tensor, mask: torch.Tensor, rows: list[int], positions: list[int],
                  targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of token targets[i] at (rows[i], positions[i]) and whether it is the argmax.

    The LM head and log-softmax run on a bounded number of positions at a time."""
    if _head_splits(model, ids, mask):
        return scores_from_hidden(model, _final_hidden(model, ids, mask), rows, positions, targets)
    target = torch.as_tensor(targets, device=ids.device)
    union = sorted(set(positions))
    column_of = {position: column for column, position in enumerate(union)}
    logits = _logits_at(model, ids, mask, union)
    scores = logits[torch.as_tensor(rows), torch.as_tensor([column_of[p] for p in positions])].float()
    logprobs = F.log_softmax(scores, dim=-1).gather(-1, target[:, None])[:, 0]
    return logprobs, scores.argmax(dim=-1) == target


def scores_from_hidden(model, hidden: torch.Tensor, rows: list[int], positions: list[int],
                       targets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`_score_tokens` from the final hidden states (batch, seq, hidden): the LM head and
    log-softmax of `model` run on a bounded number of positions at a time."""
    device = hidden.device
    picked = hidden[torch.as_tensor(rows, device=device), torch.as_tensor(positions, device=device)]
    target = torch.as_tensor(targets, device=device)
    step = _positions_per_chunk(model)
    logprobs, greedy = [], []
    for start in range(0, len(targets), step):
        logits = _head_logits(model, picked[start : start + step])
        chunk_target = target[start : start + step]
        greedy.append(logits.argmax(dim=-1) == chunk_target)
        logprobs.append(F.log_softmax(logits, dim=-1).gather(-1, chunk_target[:, None])[:, 0])
    return torch.cat(logprobs), torch.cat(greedy)


def _window_nll(model, inputs: torch.Tensor) -> list[float]:
    """Mean next-token NLL of each full row of `inputs` (no padding), head applied in chunks."""
    mask = torch.ones_like(inputs)
    if not _head_splits(model, inputs, mask):
        logits = model(input_ids=inputs, attention_mask=mask).logits
        return [F.cross_entropy(logits[row, :-1].float(), inputs[row, 1:], reduction="mean").item()
                for row in range(inputs.shape[0])]
    return window_nll_from_hidden(model, _final_hidden(model, inputs, mask), inputs)


def window_nll_from_hidden(model, hidden: torch.Tensor, inputs: torch.Tensor) -> list[float]:
    """Mean next-token NLL of each row of `inputs` from its final hidden states (batch, seq,
    hidden): the LM head and log-softmax of `model` run on a bounded number of positions at a time."""
    step = _positions_per_chunk(model)
    out = []
    for row in range(inputs.shape[0]):
        total, count = 0.0, inputs.shape[1] - 1
        for start in range(0, count, step):
            stop = min(start + step, count)
            logits = _head_logits(model, hidden[row, start:stop])
            total += F.cross_entropy(logits, inputs[row, start + 1 : stop + 1], reduction="sum").item()
        out.append(total / count)
    return out


def _batches(order: list[int], batch_size: int) -> Iterable[list[int]]:
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


class _Reporter:
    """tqdm bar plus the optional (fraction, message) callback."""

    def __init__(self, total: int, desc: str, progress: Progress | None, unit: str):
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
        self.total, self.done, self.desc, self.progress = max(total, 1), 0, desc, progress

    def update(self, n: int) -> None:
        self.bar.update(n)
        self.done += n
        if self.progress is not None:
            self.progress(self.done / self.total, f"{self.desc}: {self.done}/{self.total}")

    def close(self) -> None:
        self.bar.close()


def split_last_word(text: str) -> tuple[str, str]:
    """(context, target) as lambada_openai builds them: target = " " + the last word."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def _lm_eval_encode(tokenizer, text: str) -> list[int]:
    """lm-eval 0.4.13 `HFLM.tok_encode`: the tokenizer's own special tokens (BOS for Llama-2
    style tokenizers, nothing for GPT-2 style ones), unless the text already starts with BOS."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids the way lm-eval 0.4 `loglikelihood`/`_encode_pair` make them."""
    if context == "":
        continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = _prefix_id(tokenizer)
        if continuation_ids and continuation_ids[0] == prefix:
            return continuation_ids[:1], continuation_ids[1:]
        return [prefix], continuation_ids
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:  # trailing spaces of the context belong to the continuation
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _lm_eval_encode(tokenizer, context + continuation)
    context_ids = _lm_eval_encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def lambada_last_word(model, tokenizer, texts: Sequence[str], batch_size: int = 16, limit: int | None = None,
                      progress: Progress | None = None) -> dict:
    """LAMBADA last-word accuracy and perplexity, as lm-eval's `lambada_openai`."""
    return _lambada(model, tokenizer, texts, batch_size, limit, progress, last_word=True)["lambada"]


def last_token_accuracy(model, tokenizer, texts: Sequence[str], batch_size: int = 16, limit: int | None = None,
                        progress: Progress | None = None) -> dict:
    """Share of passages whose last token is the argmax prediction from all tokens before it."""
    return _lambada(model, tokenizer, texts, batch_size, limit, progress, last_token=True)["lambada-last-token"]


LambadaJob = tuple[str, int, int, list[int]]  # (metric "word"/"token", passage, first target position, targets)


def lambada_sequences(tokenizer, texts: Sequence[str], max_length: int, last_word: bool, last_token: bool
                      ) -> tuple[list[list[int]], list[list[LambadaJob]]]:
    """The token sequences the LAMBADA metrics run, each once (the last-word input is usually the
    same sequence as the last-token input), and per sequence the jobs it serves."""
    sequences: list[list[int]] = []
    row_of: dict[tuple[int, ...], int] = {}
    jobs: list[list[LambadaJob]] = []

    def add(inputs: list[int], job: LambadaJob) -> None:
        key = tuple(inputs)
        if key not in row_of:
            row_of[key] = len(sequences)
            sequences.append(inputs)
            jobs.append([])
        jobs[row_of[key]].append(job)

    for index, text in enumerate(texts):
        if last_word:
            context_ids, target_ids = encode_pair(tokenizer, *split_last_word(text))
            inputs = (context_ids + target_ids)[-(max_length + 1) :][:-1]
            add(inputs, ("word", index, len(inputs) - len(target_ids), target_ids))
        if last_token:
            ids = tokenizer(text)["input_ids"][-(max_length + 1) :]
            if len(ids) < 2:
                raise ValueError(f"passage {index} has fewer than two tokens: nothing to predict")
            add(ids[:-1], ("token", index, len(ids) - 2, ids[-1:]))
    return sequences, jobs


@torch.inference_mode()
def _lambada(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int,
    limit: int | None,
    progress: Progress | None,
    last_word: bool = False,
    last_token: bool = False,
) -> dict:
    """Both LAMBADA metrics from one set of forward passes.

    The last-word input (context + target minus its final token) is usually the same token
    sequence as the last-token input (the passage minus its final token); such a sequence is run
    once and serves both metrics.
    """
    texts = list(texts[:limit] if limit is not None else texts)
    if not texts:
        raise ValueError("no LAMBADA passages to evaluate")
    started = time.perf_counter()
    device, pad_id = _device_of(model), _pad_id(tokenizer)
    sequences, jobs = lambada_sequences(tokenizer, texts, _max_length(model), last_word, last_token)

    scores = LambadaScores.empty(len(texts))
    # Longest first, like lm-eval: similar lengths share a batch and the first batch shows peak memory.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    desc = "lambada " + " + ".join(n for n, on in (("last-word", last_word), ("last-token", last_token)) if on)
    reporter = _Reporter(len(sequences), desc, progress, "seq")
    for batch in _batches(order, batch_size):
        ids, mask = _right_padded([sequences[i] for i in batch], pad_id, device)
        # Only the target positions are scored: the LM head runs on those few hidden states.
        rows, positions, targets, spans = batch_targets(batch, jobs)
        scores.record(spans, *_score_tokens(model, ids, mask, rows, positions, targets))
        reporter.update(len(batch))
    reporter.close()
    return scores.results(last_word, last_token, tokens=sum(len(s) for s in sequences),
                          seconds=time.perf_counter() - started)


def batch_targets(batch: list[int], jobs: list[list[LambadaJob]]) -> tuple[list[int], list[int], list[int], list]:
    """For the sequences `batch` (indices into `jobs`), padded as rows 0.. of one batch: the (row,
    position, target token) of every token to score, and per job (metric, passage, its first
    entry, its length)."""
    rows, positions, targets, spans = [], [], [], []
    for row, sequence_index in enumerate(batch):
        for metric, passage, first, target_ids in jobs[sequence_index]:
            spans.append((metric, passage, len(targets), len(target_ids)))
            rows += [row] * len(target_ids)
            positions += [first + k for k in range(len(target_ids))]
            targets += list(target_ids)
    return rows, positions, targets, spans


@dataclass
class LambadaScores:
    """Per-passage LAMBADA outcomes, filled batch by batch (in memory or block by block from disk)."""

    loglikelihoods: list[float]
    word_correct: list[bool]
    token_correct: list[bool]

    @classmethod
    def empty(cls, passages: int) -> LambadaScores:
        return cls([0.0] * passages, [False] * passages, [False] * passages)

    def record(self, spans: list, logprobs: torch.Tensor, hits: torch.Tensor) -> None:
        """Take one batch's scored tokens (`batch_targets`' spans index into them)."""
        for metric, passage, start, count in spans:
            greedy = bool(hits[start : start + count].all())
            if metric == "token":
                self.token_correct[passage] = greedy
                continue
            self.loglikelihoods[passage] = logprobs[start : start + count].sum().item()
            self.word_correct[passage] = greedy

    def results(self, last_word: bool, last_token: bool, tokens: int, seconds: float) -> dict:
        """evaluate()'s "lambada" and/or "lambada-last-token" figures."""
        passages = len(self.loglikelihoods)
        common = {"n": passages, "tokens": tokens, "seconds": seconds}
        results = {}
        if last_word:
            nll = [-value for value in self.loglikelihoods]
            word = [float(c) for c in self.word_correct]
            results["lambada"] = {**accuracy_summary(word), **perplexity_summary(nll), **common,
                                  "items": {"accuracy": word, "nll": nll}, "item_ids": list(range(passages))}
            results["lambada"]["perplexity"] = math.exp(-sum(self.loglikelihoods) / passages)
        if last_token:
            token = [float(c) for c in self.token_correct]
            results["lambada-last-token"] = {**accuracy_summary(token), **common, "items": {"accuracy": token},
                                             "item_ids": list(range(passages))}
        return results


@torch.inference_mode()
def perplexity(
    model,
    tokenizer,
    text: str,
    seqlen: int = 512,
    batch_size: int = 8,
    limit: int | None = None,
    progress: Progress | None = None,
    bos_per_window: bool = False,
) -> dict:
    """Token-level perplexity over non-overlapping `seqlen` windows (the last partial one dropped).

    Default (SparseGPT/Wanda): the text is tokenized once with the tokenizer's own special tokens
    and cut into windows of `seqlen` tokens. `bos_per_window=True` (what Gemma-style models need):
    every window is BOS + `seqlen - 1` text tokens. Either way each window scores its
    `seqlen - 1` next-token predictions. The result's "convention" says which was used.
    """
    started = time.perf_counter()
    all_windows = perplexity_windows(tokenizer, text, seqlen, limit, bos_per_window)
    windows = all_windows.shape[0]
    device = _device_of(model)
    window_nll: list[float] = []
    reporter = _Reporter(windows, f"perplexity ({seqlen}-token windows)", progress, "window")
    for batch in _batches(list(range(windows)), batch_size):
        window_nll += _window_nll(model, all_windows[batch].to(device))
        reporter.update(len(batch))
    reporter.close()
    return perplexity_result(window_nll, seqlen, bos_per_window, time.perf_counter() - started)


def perplexity_windows(tokenizer, text: str, seqlen: int, limit: int | None = None,
                       bos_per_window: bool = False) -> torch.Tensor:
    """The (windows, seqlen) token ids `perplexity` scores (see its docstring for the conventions)."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {seqlen}")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos_per_window:
        if bos is None:
            raise ValueError("per-window BOS needs a tokenizer with a BOS token; this one has none: "
                             "use the default window convention")
        ids = tokenize_text(tokenizer, text, add_special_tokens=False)
        if ids.numel() and int(ids[0]) == bos:
            ids = ids[1:]
        stride = seqlen - 1
    else:
        ids = tokenize_text(tokenizer, text, add_special_tokens=True)
        stride = seqlen
    windows = ids.numel() // stride
    if windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        windows = min(windows, limit)
    all_windows = ids[: windows * stride].view(windows, stride)
    if bos_per_window:
        all_windows = torch.cat([torch.full((windows, 1), int(bos), dtype=all_windows.dtype), all_windows], dim=1)
    return all_windows


def perplexity_result(window_nll: list[float], seqlen: int, bos_per_window: bool, seconds: float) -> dict:
    """`perplexity`'s result from each window's mean next-token NLL."""
    windows = len(window_nll)
    return {
        **perplexity_summary(window_nll),
        "perplexity": math.exp(sum(window_nll) / windows),
        "windows": windows,
        "seqlen": seqlen,
        "tokens": windows * seqlen,
        "convention": window_convention(seqlen, bos_per_window),
        "seconds": seconds,
        "items": {"nll": window_nll},
        "item_ids": list(range(windows)),
    }


def window_convention(seqlen: int, bos_per_window: bool) -> str:
    """How a perplexity figure's windows were built, to print next to it."""
    if bos_per_window:
        return f"{seqlen}-token windows, BOS at the start of every window"
    return f"{seqlen}-token windows, no per-window BOS (SparseGPT/Wanda)"


# --- the task table --------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """evaluate()'s options, as every task's loader and scorer read them."""

    limit: int | None = None
    data_dir: str | Path | None = None
    batch_size: int | None = None
    seqlen: int = 512
    bos_per_window: bool = False
    include_path: str | Path | Sequence[str | Path] | None = None
    num_fewshot: int | None = None
    progress: Progress | None = None


@dataclass(frozen=True)
class Task:
    """One evaluation task.

    `load(settings)` reads its data; `score(model, tokenizer, data, settings, names)` returns
    {task name: figures} for `names`, the asked-for tasks that share this loader and scorer (they
    run together: both LAMBADA metrics from one set of forward passes, all lm-eval tasks in one
    go). `labels`: {metric key: what a table calls it}; `dataset`: what it is scored on; `unit`:
    what `limit` counts ("window" tasks are sized by a sweep's `ppl_windows`)."""

    load: Callable[[EvalSettings], object]
    score: Callable[..., dict]
    labels: dict[str, str] = field(default_factory=dict)
    dataset: str = ""
    unit: str = "document"


def _load_lambada(settings: EvalSettings) -> list[str]:
    return load_lambada(settings.data_dir, settings.limit)


def _score_lambada(model, tokenizer, texts: list[str], settings: EvalSettings, names: Sequence[str]) -> dict:
    return _lambada(model, tokenizer, texts, settings.batch_size or 16, None, settings.progress,
                    last_word="lambada" in names, last_token="lambada-last-token" in names)


def _load_wikitext2(settings: EvalSettings) -> str:
    return load_wikitext2_test(settings.data_dir)


def _score_perplexity(model, tokenizer, text: str, settings: EvalSettings, names: Sequence[str]) -> dict:
    figures = perplexity(model, tokenizer, text, seqlen=settings.seqlen, batch_size=settings.batch_size or 8,
                         limit=settings.limit, progress=settings.progress, bos_per_window=settings.bos_per_window)
    return dict.fromkeys(names, figures)


def _load_nothing(settings: EvalSettings) -> None:
    """lm-eval reads each task's data itself, checking names and data before any model work."""


def _score_lm_eval(model, tokenizer, _data, settings: EvalSettings, names: Sequence[str]) -> dict:
    found = run_tasks(model, tokenizer, [name[len(LM_EVAL_PREFIX):] for name in names], limit=settings.limit,
                      include_path=settings.include_path, data_dir=settings.data_dir,
                      batch_size=settings.batch_size or 8, num_fewshot=settings.num_fewshot,
                      progress=settings.progress)
    return {LM_EVAL_PREFIX + leaf: figures for leaf, figures in found.items()}  # a group adds its subtasks


# A new task is a loader, a scorer (or an existing one) and one entry here. The LM_EVAL_PREFIX
# entry is a family: "lm-eval:NAME" is any task lm-eval knows (see `task_for`).
TASKS: dict[str, Task] = {
    "lambada": Task(_load_lambada, _score_lambada, dataset="lambada_openai", unit="passage",
                    labels={"accuracy": "LAMBADA last-word accuracy", "perplexity": "LAMBADA last-word perplexity"}),
    "lambada-last-token": Task(_load_lambada, _score_lambada, dataset="lambada_openai", unit="passage",
                               labels={"accuracy": "LAMBADA last-token accuracy"}),
    "wikitext2": Task(_load_wikitext2, _score_perplexity, dataset="wikitext-2-raw-v1 test", unit="window",
                      labels={"perplexity": "WikiText-2 perplexity"}),
    LM_EVAL_PREFIX: Task(_load_nothing, _score_lm_eval),
}
BUILTIN_TASKS = tuple(name for name in TASKS if name != LM_EVAL_PREFIX)  # a sweep's default


def _own_tasks() -> list[str]:
    return [name for name in TASKS if name != LM_EVAL_PREFIX]


def task_for(name: str) -> Task | None:
    """The table entry that runs task `name` ("lm-eval:NAME" -> the lm-eval family); None for a
    preset or an unknown name."""
    if name in TASKS and name != LM_EVAL_PREFIX:
        return TASKS[name]
    if name.startswith(LM_EVAL_PREFIX) and len(name) > len(LM_EVAL_PREFIX):
        return TASKS[LM_EVAL_PREFIX]
    return None


def task_names() -> list[str]:
    """The tasks a user picks from: the table's own, the presets and their members (any other
    lm-eval task can be typed as lm-eval:NAME)."""
    listed = _own_tasks()
    for preset, members in PRESETS.items():
        listed += [preset, *members]
    return list(dict.fromkeys(listed))


def dataset_name(task: str) -> str:
    """What `task` is scored on, for summary tables ("lambada_openai"); the task's name when unknown."""
    found = task_for(task)
    return found.dataset if found is not None and found.dataset else task


def windowed(task: str) -> bool:
    """Whether `task`'s `limit` counts perplexity windows (a sweep sizes those by `ppl_windows`)."""
    found = task_for(task)
    return found is not None and found.unit == "window"


def _task_progress(progress: Progress | None, position: int, count: int) -> Progress | None:
    """Map one task's 0..1 progress onto its share of the whole evaluation."""
    if progress is None:
        return None
    return lambda fraction, message: progress((position + fraction) / count, message)


def check_tasks(names: Sequence[str]) -> list[str]:
    """Validate task names; returns them with presets expanded (the preset's own name follows its
    members, for the mean). Our tasks, `lm-eval:<task>` (any lm-eval task, checked when it runs)
    and the `zero-shot` preset. Unknown names raise, listing close matches."""
    resolved: list[str] = []
    for raw in names:
        name = raw.strip()
        if name in PRESETS:
            members = list(PRESETS[name])
        elif task_for(name) is not None:
            members = []
        else:
            known = [*_own_tasks(), *PRESETS]
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ValueError(f"unknown task {name!r}{hint}: choose from {', '.join(known)}, or any lm-eval task "
                             f"as {LM_EVAL_PREFIX}<name> (e.g. {LM_EVAL_PREFIX}{name or 'hellaswag'})")
        for task in [*members, name]:
            if task not in resolved:
                resolved.append(task)
    return resolved


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str] = ("lambada", "wikitext2"),
    limit: int | None = None,
    data_dir: str | Path | None = None,
    batch_size: int | None = None,
    seqlen: int = 512,
    progress: Progress | None = None,
    bos_per_window: bool = False,
    include_path: str | Path | Sequence[str | Path] | None = None,
    num_fewshot: int | None = None,
) -> dict:
    """Run the named tasks; `limit` caps LAMBADA passages, WikiText-2 windows and lm-eval documents.

    Returns {task: figures}: "lambada" (last word), "lambada-last-token", "wikitext2",
    "lm-eval:<task>" for any lm-eval task (`include_path`: folders of extra task YAMLs), and
    "zero-shot" (the papers' seven tasks and their mean accuracy). When both LAMBADA metrics are
    asked for they share their forward passes, and "seconds" is the shared time. Every figure
    comes with its interval ("accuracy_stderr", "accuracy_ci", "perplexity_ci") and the per-item
    scores behind it ("items", "item_ids"), which `compare` pairs. `bos_per_window` puts a BOS
    token at the start of every perplexity window (see `perplexity`).
    """
    tasks = check_tasks(tasks)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    settings = EvalSettings(limit=limit, data_dir=data_dir, batch_size=batch_size, seqlen=seqlen,
                            bos_per_window=bos_per_window, include_path=include_path, num_fewshot=num_fewshot)
    results: dict = {}
    done: set[str] = set()
    for position, name in enumerate(tasks):
        if name in done:  # scored together with an earlier task
            continue
        if name in PRESETS:
            results[name] = _preset_mean(name, results)
        else:
            task = task_for(name)
            together = [t for t in tasks if t not in done and (found := task_for(t)) is not None
                        and (found.load, found.score) == (task.load, task.score)]
            step = dataclasses.replace(settings, progress=_task_progress(progress, position, len(tasks)))
            results.update(task.score(model, tokenizer, task.load(step), step, together))
            done.update(together)
        if name in results:
            log.info("%s: %s", name, {k: v for k, v in results[name].items() if k not in ("items", "item_ids")})
    return results


def _preset_mean(name: str, results: dict) -> dict:
    members = [t for t in PRESETS[name] if t in results and "items" in results[t]]
    per_task = [results[t]["items"]["accuracy"] for t in members if "accuracy" in results[t]["items"]]
    if not per_task:
        raise ValueError(f"{name}: none of its tasks produced an accuracy")
    return {**task_mean_summary(per_task), "tasks": members, "n": sum(len(items) for items in per_task),
            "seconds": sum(results[t].get("seconds", 0.0) for t in members)}


def _flat_metrics(results: dict) -> dict[tuple[str, str], float]:
    """{(task, metric): value} from evaluate()'s nested dict or one task's flat dict."""
    if any(isinstance(v, dict) for v in results.values()):
        return {
            (task, metric): value
            for task, figures in results.items()
            if isinstance(figures, dict)
            for metric, value in figures.items()
            if metric in METRIC_KEYS
        }
    return {("", metric): value for metric, value in results.items() if metric in METRIC_KEYS}


def _same_items(a: dict, b: dict, task: str, strict: bool) -> bool:
    if a.get("item_ids") == b.get("item_ids"):
        return True
    message = f"{task}: the two results were scored on different items, so they cannot be paired"
    if strict:
        raise ValueError(message + ": evaluate both on the same data and limit")
    log.warning(message)
    return False


def paired_differences(reference: dict, other: dict, strict: bool = False) -> dict[tuple[str, str], Paired]:
    """{(task, metric): Paired} for every accuracy/perplexity both results kept per-item scores for
    (evaluate()'s "items"); a preset's mean is paired task by task. `strict`: items that differ
    raise instead of being skipped."""
    out: dict[tuple[str, str], Paired] = {}
    for task, a in reference.items():
        b = other.get(task)
        if not isinstance(a, dict) or not isinstance(b, dict):
            continue
        if task in PRESETS:
            members = [t for t in a.get("tasks", []) if t in b.get("tasks", [])]
            pairs = [(reference[t]["items"]["accuracy"], other[t]["items"]["accuracy"]) for t in members
                     if "items" in reference.get(t, {}) and "items" in other.get(t, {})
                     and _same_items(reference[t], other[t], t, strict)]
            if pairs:
                out[(task, "accuracy")] = paired_task_mean(pairs)
            continue
        items_a, items_b = a.get("items") or {}, b.get("items") or {}
        if not items_a or not items_b or not _same_items(a, b, task, strict):
            continue
        if "accuracy" in items_a and "accuracy" in items_b:
            out[(task, "accuracy")] = paired_accuracy(items_a["accuracy"], items_b["accuracy"])
        if "nll" in items_a and "nll" in items_b:
            out[(task, "perplexity")] = paired_perplexity(items_a["nll"], items_b["nll"])
    return out


def metric_label(task: str, metric: str, figures: dict | None = None) -> str:
    """"WikiText-2 perplexity", "lm-eval:hellaswag accuracy"; a perplexity's window convention follows it."""
    found = task_for(task)
    label = (found.labels if found is not None else {}).get(metric) or f"{task} {metric}".strip()
    convention = (figures or {}).get("convention")
    return f"{label} ({convention})" if metric == "perplexity" and convention else label


def compare(dense: dict, sparse: dict):
    """The seed's table shape: metric, dense, sparse, relative drop in % ((sparse-dense)/dense).

    The sign follows the seed tables: +1.50% means the sparse figure is higher. For accuracy that
    is better, for perplexity worse.

    When the results carry intervals and per-item scores (evaluate() keeps them), more columns
    follow: each side's 95% interval, the paired difference (sparse - dense) with its 95%
    interval, and whether the difference is significant (exact McNemar for accuracies, paired
    bootstrap for perplexity; identical scores never are).
    """
    dense_flat, sparse_flat = _flat_metrics(dense), _flat_metrics(sparse)
    nested = any(isinstance(v, dict) for v in dense.values())
    paired = paired_differences(dense, sparse) if nested else {}
    with_intervals = nested and any(f"{m}_ci" in f for f in dense.values() if isinstance(f, dict)
                                    for m in METRIC_KEYS)
    rows = []
    for key, dense_value in dense_flat.items():
        if key not in sparse_flat:
            continue
        task, metric = key
        sparse_value = sparse_flat[key]
        drop = (sparse_value - dense_value) / dense_value * 100 if dense_value else float("nan")
        figures = dense.get(task) if nested else None
        row = {"metric": metric_label(task, metric, figures), "dense": dense_value, "sparse": sparse_value,
               "relative drop (%)": drop}
        if with_intervals:
            pair = paired.get(key)
            row.update({
                "dense 95% CI": format_interval((figures or {}).get(f"{metric}_ci")),
                "sparse 95% CI": format_interval(sparse.get(task, {}).get(f"{metric}_ci")),
                "difference": pair.difference if pair else float("nan"),
                "difference 95% CI": format_interval(pair.ci) if pair else "",
                "significant": (pair.significant if pair else None),
            })
        rows.append(row)
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS + (INTERVAL_COLUMNS if with_intervals else []))


def item_scores(results: dict) -> dict:
    """What each figure of evaluate()'s result was scored on: {task: {"item_ids", "items"}} (a
    preset keeps its "tasks"). Small enough to store beside a sweep point, enough to pair it."""
    kept = {}
    for task, figures in results.items():
        if isinstance(figures, dict) and ("items" in figures or "tasks" in figures):
            kept[task] = {k: figures[k] for k in ("item_ids", "items", "tasks") if k in figures}
    return kept


def paired_columns(reference: dict, other: dict) -> dict:
    """Flat sweep-table columns of `other` against `reference` (evaluate() results or
    item_scores): "task/metric_diff", "_diff_lo", "_diff_hi" and "_significant". Items that
    differ raise: a sweep point must be scored on the dense model's items."""
    columns: dict = {}
    for (task, metric), pair in paired_differences(reference, other, strict=True).items():
        prefix = f"{task}/{metric}"
        columns.update({f"{prefix}_diff": pair.difference, f"{prefix}_diff_lo": pair.ci[0],
                        f"{prefix}_diff_hi": pair.ci[1], f"{prefix}_significant": pair.significant})
    return columns
