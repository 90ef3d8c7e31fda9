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
  exp of the mean of each window's mean next-token NLL.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench.data import load_lambada, load_wikitext2_test, tokenize_text

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]  # (fraction done, message); gr.Progress fits
TASKS = ("lambada", "lambada-last-token", "wikitext2")
METRIC_LABELS = {
    ("lambada", "accuracy"): "LAMBADA last-word accuracy",
    ("lambada", "perplexity"): "LAMBADA last-word perplexity",
    ("lambada-last-token", "accuracy"): "LAMBADA last-token accuracy",
    ("wikitext2", "perplexity"): "WikiText-2 perplexity",
}
_COMPARED_METRICS = ("accuracy", "perplexity")


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _prefix_id(tokenizer) -> int:
    """What lm-eval puts before an empty context: BOS if the tokenizer has one, else EOS."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


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


def lambada_last_word(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 16,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """LAMBADA last-word accuracy and perplexity, as lm-eval's `lambada_openai`."""
    return _lambada(model, tokenizer, texts, batch_size, limit, progress, last_word=True)["lambada"]


def last_token_accuracy(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 16,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict:
    """Share of passages whose last token is the argmax prediction from all tokens before it."""
    return _lambada(model, tokenizer, texts, batch_size, limit, progress, last_token=True)["lambada-last-token"]


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
    device, pad_id, max_length = _device_of(model), _pad_id(tokenizer), _max_length(model)

    sequences: list[list[int]] = []
    row_of: dict[tuple[int, ...], int] = {}
    jobs: list[list[tuple[str, int, int, list[int]]]] = []  # per sequence: (metric, passage, first, targets)

    def add(inputs: list[int], job: tuple[str, int, int, list[int]]) -> None:
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

    loglikelihoods, word_correct, token_correct = [0.0] * len(texts), [False] * len(texts), [False] * len(texts)
    # Longest first, like lm-eval: similar lengths share a batch and the first batch shows peak memory.
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    desc = "lambada " + " + ".join(n for n, on in (("last-word", last_word), ("last-token", last_token)) if on)
    reporter = _Reporter(len(sequences), desc, progress, "seq")
    for batch in _batches(order, batch_size):
        ids, mask = _right_padded([sequences[i] for i in batch], pad_id, device)
        # Only the target positions are scored: the LM head and the logits tensor shrink from
        # every position of the batch to the union of those few.
        positions = sorted({first + k for i in batch for _, _, first, targets in jobs[i]
                            for k in range(len(targets))})
        column_of = {position: column for column, position in enumerate(positions)}
        logits = _logits_at(model, ids, mask, positions)
        for row, sequence_index in enumerate(batch):
            for metric, passage, first, target_ids in jobs[sequence_index]:
                target = torch.as_tensor(target_ids, device=device)
                columns = [column_of[first + k] for k in range(len(target_ids))]
                scores = logits[row, columns].float()
                greedy = bool((scores.argmax(dim=-1) == target).all())
                if metric == "token":
                    token_correct[passage] = greedy
                    continue
                logprobs = F.log_softmax(scores, dim=-1)
                loglikelihoods[passage] = logprobs.gather(-1, target[:, None]).sum().item()
                word_correct[passage] = greedy
        reporter.update(len(batch))
    reporter.close()

    seconds = time.perf_counter() - started
    tokens = sum(len(s) for s in sequences)
    results = {}
    if last_word:
        results["lambada"] = {
            "accuracy": sum(word_correct) / len(texts),
            "perplexity": math.exp(-sum(loglikelihoods) / len(texts)),
            "n": len(texts),
            "tokens": tokens,
            "seconds": seconds,
        }
    if last_token:
        results["lambada-last-token"] = {
            "accuracy": sum(token_correct) / len(texts),
            "n": len(texts),
            "tokens": tokens,
            "seconds": seconds,
        }
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
) -> dict:
    """Token-level perplexity over non-overlapping `seqlen` windows (the last partial one dropped)."""
    started = time.perf_counter()
    ids = tokenize_text(tokenizer, text, add_special_tokens=True)
    windows = ids.numel() // seqlen
    if windows == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        windows = min(windows, limit)
    device = _device_of(model)
    all_windows = ids[: windows * seqlen].view(windows, seqlen)
    window_nll = []
    reporter = _Reporter(windows, f"perplexity ({seqlen}-token windows)", progress, "window")
    for batch in _batches(list(range(windows)), batch_size):
        inputs = all_windows[batch].to(device)
        logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
        for row in range(len(batch)):  # one row at a time keeps the float32 copy of logits small
            nll = F.cross_entropy(logits[row, :-1].float(), inputs[row, 1:], reduction="mean")
            window_nll.append(nll.item())
        reporter.update(len(batch))
    reporter.close()
    return {
        "perplexity": math.exp(sum(window_nll) / len(window_nll)),
        "windows": windows,
        "seqlen": seqlen,
        "tokens": windows * seqlen,
        "seconds": time.perf_counter() - started,
    }


def _task_progress(progress: Progress | None, position: int, count: int) -> Progress | None:
    """Map one task's 0..1 progress onto its share of the whole evaluation."""
    if progress is None:
        return None
    return lambda fraction, message: progress((position + fraction) / count, message)


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str] = ("lambada", "wikitext2"),
    limit: int | None = None,
    data_dir: str | Path | None = None,
    batch_size: int | None = None,
    seqlen: int = 512,
    progress: Progress | None = None,
) -> dict:
    """Run the named tasks; `limit` caps LAMBADA passages and WikiText-2 windows.

    Returns {task: figures}: "lambada" (last word), "lambada-last-token", "wikitext2". When both
    LAMBADA metrics are asked for they share their forward passes, and "seconds" is the shared time.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: choose from {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    results = {}
    for position, task in enumerate(tasks):
        step = _task_progress(progress, position, len(tasks))
        if task in ("lambada", "lambada-last-token"):
            if task in results:  # already computed together with the other LAMBADA metric
                continue
            both = {"lambada", "lambada-last-token"} <= set(tasks)
            results.update(
                _lambada(
                    model,
                    tokenizer,
                    load_lambada(data_dir, limit),
                    batch_size or 16,
                    None,
                    step,
                    last_word=both or task == "lambada",
                    last_token=both or task == "lambada-last-token",
                )
            )
        else:
            text = load_wikitext2_test(data_dir)
            results[task] = perplexity(
                model, tokenizer, text, seqlen=seqlen, batch_size=batch_size or 8, limit=limit, progress=step
            )
        log.info("%s: %s", task, results[task])
    return results


def _flat_metrics(results: dict) -> dict[tuple[str, str], float]:
    """{(task, metric): value} from evaluate()'s nested dict or one task's flat dict."""
    if any(isinstance(v, dict) for v in results.values()):
        return {
            (task, metric): value
            for task, figures in results.items()
            if isinstance(figures, dict)
            for metric, value in figures.items()
            if metric in _COMPARED_METRICS
        }
    return {("", metric): value for metric, value in results.items() if metric in _COMPARED_METRICS}


def compare(dense: dict, sparse: dict):
    """The seed's table shape: metric, dense, sparse, relative drop in % ((sparse-dense)/dense).

    The sign follows the seed tables: +1.50% means the sparse figure is higher. For accuracy that
    is better, for perplexity worse.
    """
    import pandas as pd

    dense_flat, sparse_flat = _flat_metrics(dense), _flat_metrics(sparse)
    rows = []
    for key, dense_value in dense_flat.items():
        if key not in sparse_flat:
            continue
        task, metric = key
        sparse_value = sparse_flat[key]
        drop = (sparse_value - dense_value) / dense_value * 100 if dense_value else float("nan")
        label = METRIC_LABELS.get(key, f"{task} {metric}".strip())
        rows.append({"metric": label, "dense": dense_value, "sparse": sparse_value, "relative drop (%)": drop})
    return pd.DataFrame(rows, columns=["metric", "dense", "sparse", "relative drop (%)"])
