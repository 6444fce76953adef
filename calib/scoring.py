"""Zero-shot task accuracy, lm-eval-harness style, through any ``logits(input_ids, attention_mask)``.

Each choice i of an item is a request (context, continuation). Tokenised as lm-eval does
(trailing spaces of the context move to the continuation; the continuation's tokens are those of
``encode(context + continuation)`` after the first ``len(encode(context))``), its score is

    ll_i = sum_{t in continuation} log softmax(logits[t - 1])[ids[t]]        (float64)

    acc       = mean over items of [argmax_i ll_i == gold]
    acc_norm  = mean over items of [argmax_i ll_i / len(choice_i) == gold]   (choice_i: the
                continuation without its " " delimiter, in characters, as lm-eval's code does)
    LAMBADA   acc = mean of [every continuation token is the argmax of its position];
              perplexity = exp(-mean ll)
    stderr    = sqrt(p (1 - p) / (n - 1))   (lm-eval's sample standard error of a mean of 0/1)

Requests are scored longest first (lm-eval's order: batches of similar length waste little
padding), right-padded with attention_mask 0, ``batch_size`` sequences per forward call. As in
lm-eval, the model reads (context + continuation) without its last token, and a request longer
than the model's positions (``max_length``) keeps only its last ``max_length + 1`` tokens (the
context is cut from the left; a continuation that alone does not fit is an error).
``ort_logits`` runs a graph (input_ids, attention_mask -> logits) under ONNX Runtime;
``frontend.task_scoring`` passes a PyTorch model's forward instead, and everything else is shared.
Results come in lm-eval's layout (task -> {"acc,none": v, "acc_stderr,none": s, ...}).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from pangu_light.calib.tasks import LAST_WORD_TASKS, METRICS, TaskItem, load_task
from pangu_light.core.contract import ATTENTION_MASK, INPUT_IDS, LOGITS, is_past_input
from pangu_light.core.errors import PanguLightError

__all__ = [
    "Encode",
    "format_perplexity",
    "LogitsFn",
    "TaskScores",
    "loglikelihoods",
    "markdown_table",
    "ort_logits",
    "score_items",
    "score_task",
    "score_tasks",
    "task_metrics",
    "tokenize_request",
]

Encode = Callable[[str], Sequence[int]]
LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (ids [B, T], mask [B, T]) -> [B, T, V]


def ort_logits(graph_path: str | os.PathLike, *, provider: str = "cpu", threads: int | None = None) -> LogitsFn:
    """The logits of a graph under ONNX Runtime (a decode graph runs with an empty past)."""
    from pangu_light.runtime.session import create_session

    session = create_session(graph_path, provider=provider, threads=threads).session
    past_inputs = [spec for spec in session.get_inputs() if is_past_input(spec.name)]

    def logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {INPUT_IDS: ids, ATTENTION_MASK: mask}
        for spec in past_inputs:
            feeds[spec.name] = np.zeros((len(ids), spec.shape[1], 0, spec.shape[3]), np.float32)
        return session.run([LOGITS], feeds)[0]

    return logits


def tokenize_request(encode: Encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-eval's ``_encode_pair`` splits them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(encode(context + continuation))
    context_tokens = list(encode(context))
    if not context_tokens:
        raise PanguLightError(f"context {context!r} encodes to no tokens: a request needs a non-empty context")
    return whole[: len(context_tokens)], whole[len(context_tokens) :]


def loglikelihoods(
    logits_fn: LogitsFn,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(summed log-likelihood, greedy) of each (context tokens, continuation tokens) request;
    the model reads at most ``max_length`` positions (None: no limit)."""
    if batch_size < 1:
        raise PanguLightError(f"batch size must be at least 1 (got {batch_size})")
    if any(not continuation for _, continuation in requests):
        raise PanguLightError("a continuation encodes to no tokens: nothing to score")
    requests = [_fit(context, continuation, max_length) for context, continuation in requests]
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        sequences = [(requests[i][0] + requests[i][1])[:-1] for i in batch]
        width = max(len(tokens) for tokens in sequences)
        ids = np.zeros((len(batch), width), np.int64)
        mask = np.zeros((len(batch), width), np.int64)
        for row, tokens in enumerate(sequences):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        logits = logits_fn(ids, mask)
        for row, index in enumerate(batch):
            context, continuation = requests[index]
            # position t - 1 predicts token t: the continuation's predictors end one before its end
            rows = np.asarray(logits[row, len(context) - 1 : len(context) + len(continuation) - 1], np.float64)
            peak = rows.max(axis=-1, keepdims=True)
            log_probs = rows - (np.log(np.exp(rows - peak).sum(axis=-1, keepdims=True)) + peak)
            target = np.asarray(continuation)
            ll = float(log_probs[np.arange(len(target)), target].sum())
            results[index] = (ll, bool((rows.argmax(axis=-1) == target).all()))
        if on_batch is not None:
            on_batch(len(batch))
    return results


def _fit(context: list[int], continuation: list[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """lm-eval's left truncation: keep the last ``max_length + 1`` tokens of the request."""
    if max_length is None or len(context) + len(continuation) <= max_length + 1:
        return context, continuation
    room = max_length + 1 - len(continuation)
    if room < 1:
        raise PanguLightError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                              f"{max_length} positions: drop that task or use a model with more positions")
    return context[-room:], continuation


@dataclasses.dataclass
class TaskScores:
    """Per-item scores of one task: the log-likelihood (and greedy flag) of every choice."""

    task: str
    items: list[TaskItem]
    lls: list[list[float]]
    greedy: list[list[bool]]

    def metrics(self) -> dict[str, float]:
        return task_metrics(self)


def score_task(
    task: str,
    items: Sequence[TaskItem],
    logits_fn: LogitsFn,
    encode: Encode,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    label: str | None = None,
) -> TaskScores:
    """Score every choice of every item (one forward row per choice) with a progress bar."""
    from tqdm import tqdm

    if not items:
        raise PanguLightError(f"task {task!r} has no items to score")
    requests = [
        tokenize_request(encode, context, continuation)
        for item in items
        for context, continuation in zip(item.contexts, item.continuations, strict=True)
    ]
    with tqdm(total=len(requests), desc=label or task, unit="req", disable=not progress, leave=False) as bar:
        flat = loglikelihoods(logits_fn, requests, batch_size=batch_size, max_length=max_length,
                              on_batch=bar.update)
    lls, greedy, start = [], [], 0
    for item in items:
        chunk = flat[start : start + len(item.continuations)]
        lls.append([ll for ll, _ in chunk])
        greedy.append([flag for _, flag in chunk])
        start += len(item.continuations)
    return TaskScores(task, list(items), lls, greedy)


def _stderr(values: Sequence[float]) -> float:
    """lm-eval's ``mean_stderr`` of 0/1 values: sqrt(p (1 - p) / (n - 1))."""
    n = len(values)
    if n < 2:
        return float("nan")
    p = sum(values) / n
    return math.sqrt(p * (1.0 - p) / (n - 1))


def _with_stderr(metrics: dict[str, float], name: str, values: Sequence[float]) -> None:
    metrics[f"{name},none"] = float(np.mean(values))
    metrics[f"{name}_stderr,none"] = _stderr(values)


def task_metrics(scores: TaskScores) -> dict[str, float]:
    """lm-eval's metric names for the task: acc (+ acc_norm for choices, perplexity for LAMBADA)."""
    metrics: dict[str, float] = {}
    if scores.task in LAST_WORD_TASKS:
        _with_stderr(metrics, "acc", [float(all(flags)) for flags in scores.greedy])
        metrics["perplexity,none"] = math.exp(-float(np.mean([sum(lls) for lls in scores.lls])))
        return metrics
    correct = [float(np.argmax(lls) == item.gold) for item, lls in zip(scores.items, scores.lls, strict=True)]
    _with_stderr(metrics, "acc", correct)
    if "acc_norm" in METRICS[scores.task]:
        lengths = [np.array([len(c.removeprefix(" ")) for c in item.continuations], float) for item in scores.items]
        normed = [
            float(np.argmax(np.array(lls) / length) == item.gold)
            for item, lls, length in zip(scores.items, scores.lls, lengths, strict=True)
        ]
        _with_stderr(metrics, "acc_norm", normed)
    return metrics


def score_items(
    task_items: Mapping[str, Sequence[TaskItem]],
    logits_fn: LogitsFn,
    encode: Encode,
    *,
    metrics: Mapping[str, Sequence[str]] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    label: str = "",
) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` section for one model on the given items: task -> {"alias": task,
    "acc,none": v, "acc_stderr,none": s, ...}; with ``metrics``, only those metrics of a task."""
    results: dict[str, dict[str, float]] = {}
    for task, items in task_items.items():
        scores = score_task(task, items, logits_fn, encode, batch_size=batch_size, max_length=max_length,
                            progress=progress, label=f"{label} {task}".strip())
        wanted = METRICS[task] if metrics is None else metrics[task]
        values = {k: v for k, v in task_metrics(scores).items() if k.split(",")[0].removesuffix("_stderr") in wanted}
        results[task] = {"alias": task, **values}
    return results


def score_tasks(
    tasks: Sequence[str],
    logits_fn: LogitsFn,
    encode: Encode,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = True,
    label: str = "",
) -> dict[str, dict[str, float]]:
    """``score_items`` on the first ``limit`` items of each task's split (every call with the same
    ``limit`` scores the same items, so the results of several models line up)."""
    task_items = {task: load_task(task, limit) for task in tasks}
    return score_items(task_items, logits_fn, encode, batch_size=batch_size, max_length=max_length,
                       progress=progress, label=label)


def format_perplexity(value: float) -> str:
    """Two decimals, or three significant digits once a perplexity passes a million (a broken
    model's 1e120 stays one short cell)."""
    return f"{value:.2f}" if abs(value) < 1e6 else f"{value:.3g}"


def markdown_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per model (name -> its ``score_tasks`` results), one column per task metric:
    accuracies as percentages with their standard error, perplexity as a number."""
    columns: list[tuple[str, str]] = []
    for model_results in results.values():
        for task, metrics in model_results.items():
            for metric in METRICS[task]:
                if f"{metric},none" in metrics and (task, metric) not in columns:
                    columns.append((task, metric))
    header = ["model", *(f"{task} {metric}" for task, metric in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, model_results in results.items():
        cells = [name]
        for task, metric in columns:
            metrics = model_results.get(task, {})
            value = metrics.get(f"{metric},none")
            if value is None:
                cells.append("")
            elif metric == "perplexity":
                cells.append(format_perplexity(value))
            else:
                cells.append(f"{100 * value:.1f} ± {100 * metrics[f'{metric}_stderr,none']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
