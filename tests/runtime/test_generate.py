"""Greedy generation over decode graphs against transformers' generate (also on a graph whose
layers keep different numbers of KV heads), the pre-allocated KV buffers, per-layer KV shapes
read from the graph, stop tokens, user errors, and the `pangu-light run` command."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import transformers

from pangu_light.passes.infra.pipeline import format_value
from pangu_light.runtime import kv_runners
from pangu_light.runtime.errors import RuntimeUserError
from pangu_light.runtime.generate import generate, greedy_generate, left_pad
from pangu_light.runtime.layout import DecodeLayout
from pangu_light.runtime.session import create_session
from pangu_light.tools import cli

from reference import compile_graph, float32_bound
from reference_width import torch_prune_kv_groups

# Lengths 9, 5, 7: all longer than gemma3's sliding window of 4, and different, so the batch is
# left-padded and sliding layers see windows that cross the padding.
PROMPTS = [
    [5, 17, 33, 48, 64, 80, 97, 113, 130],
    [9, 44, 71, 101, 150],
    [12, 25, 38, 51, 77, 90, 140],
]
NEW_TOKENS = 12


def hf_greedy(model, prompts, max_new_tokens, pad=0):
    """transformers' greedy generate on the same left-padded batch; eos disabled so that HF
    runs exactly max_new_tokens steps, like greedy_generate without stop tokens."""
    ids, mask = left_pad(prompts, pad)
    config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=None, bos_token_id=None
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), generation_config=config
        )
    return out[:, ids.shape[1]:].tolist()


def assert_greedy_equal_up_to_ties(model, prompts, got, expected) -> None:
    """Real models only: ``got`` equals transformers' ``expected`` tokens, except that a row may
    part from them where torch's two candidates are a float32 near-tie (their logits within
    twice ``float32_bound`` at the prefix where they part); float32 kernels differ by CPU, so
    such a pair can rank either way. Once parted, a row's later tokens can't be compared."""
    for prompt, row_got, row_expected in zip(prompts, got, expected):
        assert len(row_got) == len(row_expected)
        if row_got == row_expected:
            continue
        step = next(i for i, (a, b) in enumerate(zip(row_got, row_expected)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([list(prompt) + row_expected[:step]])).logits[0, -1].float().numpy()
        gap = abs(float(logits[row_got[step]] - logits[row_expected[step]]))
        assert gap <= 2 * float32_bound(logits), (
            f"greedy tokens part at step {step} where torch's logits differ by {gap:.3g}: not a near-tie")


# Families whose random tiny models give informative greedy tokens: the tiny Llama (tied
# embeddings) just repeats the last prompt token, which a broken loop could match too; Llama
# itself is covered by SmolLM2 (real_model).
INFORMATIVE = ["mistral", "gemma3", "qwen2", "glm4"]


@pytest.mark.parametrize("family", INFORMATIVE)
def test_greedy_matches_transformers(exported_graph, family):
    model, path = exported_graph(family, True)
    expected = hf_greedy(model, PROMPTS, NEW_TOKENS)
    info = create_session(path, provider="cpu")
    got = greedy_generate(info, PROMPTS, NEW_TOKENS)
    assert got == expected
    # The rows differ from each other, and within a row the tokens change: a loop that mixed
    # rows up or ignored the cache could not pass by chance.
    assert len({tuple(row) for row in expected}) == len(PROMPTS)
    assert len(set(sum(expected, []))) > 2 * len(PROMPTS)


# Tiny models have 2 KV groups of 2 query heads: layers keep 2, 1, 1 and 2 groups.
KV_KEEP = [[0, 1], [0], [1], [0, 1]]


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_greedy_on_layers_with_different_kv_heads(exported_graph, family, tmp_path):
    """The loop reads each layer's KV head count from the pruned graph: its tokens equal
    transformers' generate on the same groups removed from the PyTorch module, and the plain
    numpy loop on the same graph."""
    model, path = exported_graph(family, True)
    pruned = tmp_path / "kv-pruned.onnx"
    compile_graph(path, f"prune-kv-groups{{keep={format_value(KV_KEEP)}}}", pruned)
    info = create_session(pruned, provider="cpu")
    layout = DecodeLayout.from_session(info.session)
    assert [layer.kv_heads for layer in layout.layers] == [len(groups) for groups in KV_KEEP]

    expected = hf_greedy(torch_prune_kv_groups(model, KV_KEEP), PROMPTS, NEW_TOKENS)
    got = greedy_generate(info, PROMPTS, NEW_TOKENS)
    assert got == expected
    assert generate(info.session, PROMPTS, NEW_TOKENS, io_binding=False).tokens == expected
    # The pruning changed the function: equal tokens are not the unpruned model's by accident.
    assert expected != hf_greedy(model, PROMPTS, NEW_TOKENS)


def test_kv_cache_is_written_into_the_preallocated_buffers(exported_graph):
    """ONNX Runtime writes every present tensor into the loop's two buffers (it allocates no
    new ones), and after each step the buffer holds exactly what the numpy loop's cache holds."""
    _, path = exported_graph("gemma3", True)
    info = create_session(path, provider="cpu")
    layout = DecodeLayout.from_session(info.session)
    ids, mask = left_pad(PROMPTS, 0)
    batch, length = ids.shape
    steps = 5
    bound = kv_runners.BoundRunner(info.session, layout, "cpu", 0, batch, length + steps)
    plain = kv_runners.NumpyRunner(info.session, layout, batch)
    pointers = [tuple(value.data_ptr() for value in pair) for pair in bound.buffers]
    token = None
    for step in range(steps + 1):
        feed = ids if step == 0 else token
        full_mask = np.concatenate([mask, np.ones((batch, step), np.int64)], axis=1)
        logits_bound = bound.run(feed, full_mask).copy()
        logits_plain = plain.run(feed, full_mask)
        np.testing.assert_array_equal(logits_bound, logits_plain)
        token = np.argmax(logits_plain[:, -1], axis=-1).reshape(batch, 1)
        outputs = bound.binding.get_outputs()
        for index, (past_name, _, _, (kv, dim)) in enumerate(bound.tensors):
            written = bound.buffers[index][bound.current]
            assert outputs[1 + index].data_ptr() == written.data_ptr() == pointers[index][bound.current]
            size = batch * kv * bound.length * dim
            cache = written.numpy().reshape(-1)[:size].reshape(batch, kv, bound.length, dim)
            np.testing.assert_array_equal(cache, plain.past[past_name])
    assert bound.length == length + steps
    with pytest.raises(RuntimeUserError, match="KV buffers hold"):
        bound.run(token, np.ones((batch, length + steps + 1), np.int64))


def test_io_binding_and_numpy_loops_agree(exported_graph):
    _, path = exported_graph("gemma3", True)
    info = create_session(path, provider="cpu")
    bound = generate(info, PROMPTS, NEW_TOKENS, io_binding=True)
    plain = generate(info.session, PROMPTS, NEW_TOKENS, io_binding=False)
    assert bound.tokens == plain.tokens
    assert bound.decode_steps == NEW_TOKENS - 1 and bound.batch == 3
    assert bound.new_tokens == 3 * NEW_TOKENS


def test_single_prompt_equals_its_row_in_a_batch(exported_graph):
    _, path = exported_graph("gemma3", True)
    info = create_session(path, provider="cpu")
    batch = greedy_generate(info, PROMPTS, NEW_TOKENS)
    for prompt, row in zip(PROMPTS, batch):
        assert greedy_generate(info, [prompt], NEW_TOKENS) == [row]


def test_kv_shapes_are_read_from_the_graph(hetero_graph):
    path, kv_shapes = hetero_graph
    info = create_session(path, provider="cpu")
    layout = DecodeLayout.from_session(info.session)
    assert len({shape for shape in kv_shapes}) == len(kv_shapes)  # every layer differs
    assert [(layer.kv_heads, layer.head_dim) for layer in layout.layers] == list(kv_shapes)
    declared = {arg.name: arg.shape for arg in info.session.get_inputs()}
    for name, array in layout.empty_past(3).items():
        assert [3, declared[name][1], 0, declared[name][3]] == list(array.shape)

    # The toy graph's next token is (sum of every token fed so far) % 50: it holds only if each
    # step's past is the previous present, with each layer's own shape.
    prompts = [[3, 4], [9], [11, 12, 13]]
    got = greedy_generate(info, prompts, 6)
    expected = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(6):
            seq.append(sum(seq) % 50)
        expected.append(seq[len(prompt):])
    assert got == expected
    assert len({tuple(row) for row in expected}) == 3


def test_stop_tokens_end_sequences_independently(exported_graph):
    _, path = exported_graph("gemma3", True)
    info = create_session(path, provider="cpu")
    free = greedy_generate(info, PROMPTS, NEW_TOKENS)

    def cut(row, stops):
        for index, token in enumerate(row):
            if token in stops:
                return row[: index + 1]
        return row

    # Two stop tokens, taken from rows 0 and 1, that end the three rows at three different
    # lengths (one row may run to the limit): the first such pair in a fixed search order.
    stops = next(
        {a, b}
        for a in free[0][1:]
        for b in free[1][1:]
        if len({len(cut(row, {a, b})) for row in free}) == 3
    )
    expected = [cut(row, stops) for row in free]
    result = generate(info, PROMPTS, NEW_TOKENS, stop_tokens=stops)
    assert result.tokens == expected
    assert result.decode_steps == max(len(row) for row in expected) - 1


def test_loop_ends_when_every_sequence_stopped(exported_graph):
    _, path = exported_graph("llama", True)
    info = create_session(path, provider="cpu")
    free = greedy_generate(info, PROMPTS, 4)
    first = {row[0] for row in free}
    result = generate(info, PROMPTS, 50, stop_tokens=first)
    assert result.tokens == [[row[0]] for row in free]
    assert result.decode_steps == 0


def test_custom_selector_plugs_in(hetero_graph):
    info = create_session(hetero_graph[0], provider="cpu")
    calls = []

    def lowest(logits):
        calls.append(logits.shape)
        return np.argmin(logits, axis=-1)

    result = generate(info, [[3], [4]], 3, select=lowest)
    assert calls == [(2, 50)] * 3
    assert result.tokens != greedy_generate(info, [[3], [4]], 3)


def test_no_cache_graph_is_refused(exported_graph):
    _, path = exported_graph("llama", False)
    info = create_session(path, provider="cpu")
    with pytest.raises(RuntimeUserError, match="--kv-cache"):
        greedy_generate(info, [[5, 6]], 2)


def test_bad_prompts(exported_graph):
    _, path = exported_graph("llama", True)
    info = create_session(path, provider="cpu")
    with pytest.raises(RuntimeUserError, match="prompt 1 is empty"):
        greedy_generate(info, [[5], []], 2)
    with pytest.raises(RuntimeUserError, match="at least one prompt"):
        greedy_generate(info, [], 2)
    with pytest.raises(RuntimeUserError, match="vocabulary of 160"):
        greedy_generate(info, [[5, 999]], 2)
    assert greedy_generate(info, [[5]], 0) == [[]]


def test_left_pad():
    ids, mask = left_pad([[7, 8, 9], [4]], pad_token_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == np.int64 and mask.dtype == np.int64


# --- pangu-light run -------------------------------------------------------------------------


def _words(ids):
    return " ".join(f"w{i}" for i in ids)


def test_run_command_prints_greedy_text(exported_graph, tiny_tokenizer_dir, add_metadata, tmp_path, capsys):
    _, path = exported_graph("gemma3", True)
    graph = add_metadata(path, tmp_path / "with-tok.onnx", **{"pangu_light.tokenizer": str(tiny_tokenizer_dir)})
    prompts = PROMPTS[:2]
    rc = cli.main(
        ["run", str(graph), "--prompt", _words(prompts[0]), "--prompt", _words(prompts[1]),
         "--max-new-tokens", "8", "--provider", "cpu", "--threads", "1"]
    )
    out = capsys.readouterr().out
    assert rc == 0
    # Reference: the same graph through the library, eos 2 as the stop token, decoded to words.
    expected = greedy_generate(create_session(path, provider="cpu"), prompts, 8, stop_tokens=[2])
    assert 2 not in sum(expected, [])  # so the printed text is the whole completion
    blocks = out.split("\n\n")
    assert blocks[0] == f"[1] {_words(prompts[0])}\n{_words(expected[0])}"
    assert blocks[1] == f"[2] {_words(prompts[1])}\n{_words(expected[1])}"
    last = out.strip().splitlines()[-1]
    assert last.startswith("providers: CPUExecutionProvider (requested cpu)")
    assert re.search(r"2 prompt\(s\), 16 new tokens in [\d.]+ s \([\d.]+ tokens/s", last)


def test_run_command_tokenizer_flag_and_errors(exported_graph, tiny_tokenizer_dir, capsys):
    _, path = exported_graph("llama", True)  # no tokenizer metadata
    rc = cli.main(["run", str(path), "--prompt", "w5 w6", "--provider", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "--tokenizer" in err

    rc = cli.main(["run", str(path), "--prompt", "w5 w6", "--provider", "cpu", "--max-new-tokens", "3",
                   "--tokenizer", str(tiny_tokenizer_dir)])
    assert rc == 0
    expected = greedy_generate(create_session(path, provider="cpu"), [[5, 6]], 3, stop_tokens=[2])
    assert f"[1] w5 w6\n{_words(expected[0])}\n" in capsys.readouterr().out

    rc = cli.main(["run", str(path), "--prompt", "w5", "--provider", "cpu", "--chat",
                   "--tokenizer", str(tiny_tokenizer_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "no chat template" in err

    rc = cli.main(["run", str(path), "--prompt", "w5", "--provider", "npu", "--tokenizer", str(tiny_tokenizer_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown provider 'npu'" in err


def test_run_command_refuses_no_cache_graph(exported_graph, tiny_tokenizer_dir, capsys):
    _, path = exported_graph("llama", False)
    rc = cli.main(["run", str(path), "--prompt", "w5", "--provider", "cpu", "--tokenizer", str(tiny_tokenizer_dir)])
    assert rc == 2 and "--kv-cache" in capsys.readouterr().err


# --- the real model ----------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2_decode, smollm2_dir, capsys):
    model, path = smollm2_decode
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    texts = [
        "The capital of France is",
        "Once upon a time, in a small village by the sea, there lived",
        "def fibonacci(n):",
    ]
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    assert len({len(prompt) for prompt in prompts}) == 3
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    expected = hf_greedy(model, prompts, 20, pad=pad)
    got = greedy_generate(create_session(path, provider="cpu"), prompts, 20, pad_token_id=pad)
    assert_greedy_equal_up_to_ties(model, prompts, got, expected)
    assert len({tuple(row) for row in expected}) == 3

    # The command prints the same completion (stopping at eos, which these 20 tokens do not reach).
    rc = cli.main(["run", str(path), "--prompt", texts[0], "--max-new-tokens", "20", "--provider", "cpu",
                   "--tokenizer", str(smollm2_dir)])
    out = capsys.readouterr().out
    assert rc == 0
    if not set(expected[0]) & {tokenizer.eos_token_id}:  # ours or transformers' (they agree up to near-ties)
        assert any(f"[1] {texts[0]}\n{tokenizer.decode(row[0], skip_special_tokens=True)}\n" in out
                   for row in (expected, got))


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_pruned_kv_groups_greedy_matches_transformers(smollm2_decode, tmp_path):
    """SmolLM2 (3 KV groups of 3 heads) with layers keeping 3, 2 or 1 groups, batch of 3."""
    model, path = smollm2_decode
    keep = [[0, 1, 2], [0, 2], [1]] * 10
    pruned = tmp_path / "smollm2-kv-pruned.onnx"
    compile_graph(path, f"prune-kv-groups{{keep={format_value(keep)}}}", pruned)
    info = create_session(pruned, provider="cpu")
    assert [layer.kv_heads for layer in DecodeLayout.from_session(info.session).layers] == [3, 2, 1] * 10
    prompts = [[504, 3575, 282, 4649, 314], [1078, 2056, 253, 655, 28, 30, 253, 1165, 3384], [1812, 28]]
    reference = torch_prune_kv_groups(model, keep)
    expected = hf_greedy(reference, prompts, 12)
    assert_greedy_equal_up_to_ties(reference, prompts, greedy_generate(info, prompts, 12), expected)
