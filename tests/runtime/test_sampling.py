"""Sampling: the kept tokens and their probabilities (temperature, top-k, top-p) against a
direct computation, the draws' frequencies, seeds (same seed same tokens, other seeds other
tokens), the greedy limits (top-k 1, temperature 0), and the `run` command's options."""

from __future__ import annotations

import numpy as np
import pytest

from pangu_light.runtime.errors import RuntimeUserError
from pangu_light.runtime.generate import generate, greedy_generate
from pangu_light.runtime.sampling import Sampling
from pangu_light.runtime.session import create_session
from pangu_light.tools import cli

PROMPTS = [
    [5, 17, 33, 48, 64, 80, 97, 113, 130],
    [9, 44, 71, 101, 150],
    [12, 25, 38, 51, 77, 90, 140],
]
LOGITS = np.array([1.0, 5.0, 3.0, 4.0, 2.0, 4.0])  # token 3 and 5 tie


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_candidates_temperature_only():
    ids, probs = Sampling(temperature=0.5).candidates(LOGITS)
    assert ids.tolist() == list(range(6))
    np.testing.assert_allclose(probs, softmax(LOGITS / 0.5), rtol=1e-12)


def test_candidates_top_k_keeps_the_k_largest_in_order():
    ids, probs = Sampling(temperature=1.0, top_k=3).candidates(LOGITS)
    assert ids.tolist() == [1, 3, 5]  # 5.0, then the tie 4.0 / 4.0 by index
    np.testing.assert_allclose(probs, softmax(np.array([5.0, 4.0, 4.0])), rtol=1e-12)


def test_candidates_top_p_keeps_the_smallest_nucleus():
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3]))
    for top_p, kept in ((0.4, [1]), (0.75, [1, 3]), (0.85, [1, 3, 2]), (0.99, [1, 3, 2, 0])):
        ids, probs = Sampling(temperature=1.0, top_p=top_p).candidates(logits)
        assert ids.tolist() == kept, top_p
        full = np.array([0.05, 0.5, 0.15, 0.3])[kept]
        np.testing.assert_allclose(probs, full / full.sum(), rtol=1e-9)
    # top-k first, then top-p over what is left (renormalised): 0.5 / 0.8 = 0.625 >= 0.6
    ids, _ = Sampling(temperature=1.0, top_k=2, top_p=0.6).candidates(logits)
    assert ids.tolist() == [1]


def test_draw_frequencies_follow_the_kept_probabilities():
    sampling = Sampling(temperature=0.7, top_k=4)
    generator = np.random.default_rng(123)
    draws = [sampling.sample_row(LOGITS, generator) for _ in range(20000)]
    ids, probs = sampling.candidates(LOGITS)
    counts = np.bincount(draws, minlength=6) / len(draws)
    assert set(np.flatnonzero(counts)) == set(ids.tolist())  # nothing outside the top 4
    # 20000 draws: the standard error of a frequency is at most 0.0036; 0.015 is over 4 of them.
    np.testing.assert_allclose(counts[ids], probs, atol=0.015)


def test_same_seed_same_tokens_other_seed_other_tokens(exported_graph):
    _, path = exported_graph("gemma3", True)
    info = create_session(path, provider="cpu")
    sampling = Sampling(temperature=1.5, top_p=0.95, seed=7)
    first = generate(info, PROMPTS, 16, select=sampling).tokens
    assert generate(info, PROMPTS, 16, select=sampling).tokens == first
    assert generate(info.session, PROMPTS, 16, select=sampling, io_binding=False).tokens == first
    others = [generate(info, PROMPTS, 16, select=Sampling(temperature=1.5, top_p=0.95, seed=s)).tokens
              for s in (8, 9)]
    assert all(tokens != first for tokens in others)
    assert first != greedy_generate(info, PROMPTS, 16)
    # Each row has its own stream: rows stay the same when another row changes.
    changed = generate(info, [PROMPTS[0], [3, 4, 5], PROMPTS[2]], 16, select=sampling).tokens
    assert changed[0] == first[0] and changed[2] == first[2]


def test_greedy_limits_of_sampling(exported_graph):
    _, path = exported_graph("gemma3", True)
    info = create_session(path, provider="cpu")
    greedy = greedy_generate(info, PROMPTS, 12)
    for sampling in (Sampling(temperature=2.0, top_k=1, seed=3), Sampling(temperature=0.0, seed=3)):
        assert sampling.greedy
        assert generate(info, PROMPTS, 12, select=sampling).tokens == greedy
    # A very low temperature is the arg-max in all but name.
    assert generate(info, PROMPTS, 12, select=Sampling(temperature=1e-4, seed=0)).tokens == greedy


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature=-1.0), "temperature must be 0"),
        (dict(top_k=-2), "top_k must be"),
        (dict(top_p=0.0), "top_p must be in"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(seed=-1), "seed must be"),
    ],
)
def test_bad_sampling_settings(options, message):
    with pytest.raises(RuntimeUserError, match=message):
        Sampling(**options)


def test_run_command_sampling(exported_graph, tiny_tokenizer_dir, capsys):
    _, path = exported_graph("gemma3", True)
    words = " ".join(f"w{i}" for i in PROMPTS[0])
    argv = ["run", str(path), "--prompt", words, "--provider", "cpu", "--tokenizer", str(tiny_tokenizer_dir),
            "--max-new-tokens", "10", "--temperature", "1.5", "--top-k", "20", "--seed", "4"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    expected = generate(create_session(path, provider="cpu"), [PROMPTS[0]], 10, stop_tokens=[2],
                        select=Sampling(temperature=1.5, top_k=20, seed=4)).tokens[0]
    text = " ".join(f"w{i}" for i in expected if i != 2)
    assert out.startswith(f"[1] {words}\n{text}\n")
    assert "sampling: temperature 1.5, top-k 20, top-p 1, seed 4" in out.strip().splitlines()[-1]
    assert cli.main(argv) == 0 and capsys.readouterr().out.split("\n")[:2] == out.split("\n")[:2]

    rc = cli.main(["run", str(path), "--prompt", words, "--provider", "cpu", "--tokenizer", str(tiny_tokenizer_dir),
                   "--top-p", "0.9"])
    err = capsys.readouterr().err
    assert rc == 2 and "--top-p only apply when sampling" in err
