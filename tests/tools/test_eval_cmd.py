"""`eval --tasks` through the CLI on a tiny model with a character tokenizer: the lm-eval JSON
layout, the same items for every model, ORT and PyTorch agreeing on the same weights, and bad
input as one clear line."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from pangu_light.calib.scoring import ort_logits, score_items
from pangu_light.calib.task_report import task_hash
from pangu_light.calib.tasks import load_task, task_size
from pangu_light.tools.cli import main

from families import tiny_model
from reference import save_char_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF directory, its exported graph, a distill-shaped output folder holding the same weights)."""
    root = tmp_path_factory.mktemp("tiny-eval")
    directory = root / "hf"
    tiny_model("llama").save_pretrained(directory)
    save_char_tokenizer(directory)
    graph = root / "model.onnx"
    assert main(["export", str(directory), "-o", str(graph), "--quiet"]) == 0
    distilled = root / "distill"
    shutil.copytree(directory, distilled / "model")
    (distilled / "summary.json").write_text("{}\n")
    return directory, graph, distilled


TASKS = "lambada_acc,winogrande,arc_easy"
LIMIT = 3


def test_json_layout_same_items_and_backends_agree(tiny, tmp_path, capsys):
    directory, graph, distilled = tiny
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["eval", str(graph), str(directory), str(distilled), "--tasks", TASKS, "--limit", str(LIMIT),
            "--json", str(out_json), "--markdown", str(out_md), "--quiet"]
    assert main(argv) == 0
    report = json.loads(out_json.read_text())
    assert report["tasks"] == ["lambada", "winogrande", "arc_easy"] and report["limit"] == LIMIT
    runs = report["models"]
    assert [r["config"]["backend"] for r in runs] == ["onnxruntime", "pytorch", "pytorch"]
    assert runs[2]["config"]["path"].endswith("model")  # the distill folder's model/
    for run in runs:
        results = run["results"]
        assert set(results["lambada"]) == {"alias", "acc,none", "acc_stderr,none"}  # lambada_acc only
        assert set(results["winogrande"]) == {"alias", "acc,none", "acc_stderr,none"}
        assert set(results["arc_easy"]) == {"alias", "acc,none", "acc_stderr,none", "acc_norm,none",
                                            "acc_norm_stderr,none"}
        for task in report["tasks"]:
            assert run["n-samples"][task] == {"original": task_size(task), "effective": LIMIT}
            assert run["n-shot"][task] == 0
            assert run["task_hashes"][task] == task_hash(load_task(task, LIMIT))
            acc = results[task]["acc,none"]
            assert acc in (0, 1 / 3, 2 / 3, 1)
            assert results[task]["acc_stderr,none"] == pytest.approx(math.sqrt(acc * (1 - acc) / (LIMIT - 1)))
        assert run["higher_is_better"]["arc_easy"] == {"acc": True, "acc_norm": True}
    # the same weights through ONNX Runtime and PyTorch: the same accuracies
    assert runs[0]["results"] == runs[1]["results"] == runs[2]["results"]
    # and the numbers are the library's for the graph, with its tokenizer and 256 positions
    from pangu_light.frontend.task_scoring import model_encoder, open_model

    opened = open_model(str(graph))
    assert opened.max_length == 256  # the LAMBADA passages are longer: cut from the left
    items = {task: load_task(task, LIMIT) for task in report["tasks"]}
    expected = score_items(items, ort_logits(graph), model_encoder(opened), max_length=256, progress=False,
                           metrics={"lambada": ("acc",), "winogrande": ("acc",), "arc_easy": ("acc", "acc_norm")})
    assert runs[0]["results"] == expected
    table = out_md.read_text().splitlines()
    assert table[0] == "| model | lambada acc | winogrande acc | arc_easy acc | arc_easy acc_norm |"
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| {graph}", f"| {directory}", f"| {distilled}"]
    assert capsys.readouterr().out.strip().splitlines() == table


def test_lambada_metrics_and_json_on_stdout(tiny, capsys):
    _, graph, _ = tiny
    capsys.readouterr()
    assert main(["eval", str(graph), "--tasks", "lambada_ppl", "--limit", "2", "--json", "--quiet"]) == 0
    only_ppl = json.loads(capsys.readouterr().out)["models"][0]["results"]["lambada"]
    assert set(only_ppl) == {"alias", "perplexity,none"} and only_ppl["perplexity,none"] > 1
    assert main(["eval", str(graph), "--tasks", "lambada_acc, lambada_ppl", "--limit", "2", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    both = report["models"][0]["results"]["lambada"]
    assert report["tasks"] == ["lambada"]
    assert set(both) == {"alias", "perplexity,none", "acc,none", "acc_stderr,none"}
    assert both["perplexity,none"] == only_ppl["perplexity,none"]
    assert report["models"][0]["higher_is_better"]["lambada"] == {"acc": True, "perplexity": False}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{graph}", "--tasks", "piqa,mmlu"], "unknown task 'mmlu' in --tasks: choose from lambada_ppl, lambada_acc"),
        (["{graph}", "--tasks", " , "], "--tasks is empty"),
        (["{graph}", "--tasks", "winogrande", "--limit", "99999"],
         "--limit 99,999 is more than the 1,267 items of winogrande: lower --limit"),
        (["{graph}", "--tasks", "winogrande", "--limit", "0"], "--limit must be at least 1"),
        (["{graph}", "--limit", "5"], "--limit applies to task scoring: add --tasks"),
        (["{dir}", "--samples", "2"], "perplexity (no --tasks) takes .onnx graphs"),
        (["{tmp}/nothing", "--tasks", "piqa", "--limit", "1"], "pass an .onnx graph, a Hugging Face model directory"),
        (["{graph}", "--tasks", "piqa", "--limit", "1", "--json", "{graph}"], "inputs are never overwritten"),
    ],
)
def test_bad_input_is_one_clear_line(tiny, tmp_path, capsys, argv, message):
    values = {"graph": str(tiny[1]), "dir": str(tiny[0]), "tmp": str(tmp_path)}
    assert main(["eval", *(a.format(**values) for a in argv), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
