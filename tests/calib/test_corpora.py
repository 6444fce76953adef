"""Corpora: the installed wiki and LAMBADA text loads clean, user files parse, calibration and
evaluation splits never share a document, token windows are seeded and honest about shortfalls.

Most tests encode text as its UTF-8 bytes (fast, and every window can be checked against the text);
one test uses SmolLM2's real tokenizer. The wiki dump is parsed once into the cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pangu_light.calib import corpora
from pangu_light.calib.corpora import (
    describe,
    lambada_examples,
    load_documents,
    split_documents,
    token_sequences,
)
from pangu_light.calib.wiki import wiki_prose
from pangu_light.core.errors import PanguLightError

MARKUP = ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "</", "/>", "<!--", "&nbsp;", "thumb|", "==")


def byte_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def write_text(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- wiki


def test_wiki_prose_keeps_sentences_and_drops_markup():
    wikitext = """{{Infobox thing|name=X}}
[[File:X.png|thumb|200px|A caption that is long enough to look like a sentence.]]
'''X''' ({{IPA|/x/}}) is a [[letter (alphabet)|letter]] used in [[algebra]] for an unknown value.<ref>{{cite book|title=Y}}</ref>
<!-- a hidden note that must not survive at all in any form -->

==History==
{| class="wikitable"
|-
| A table cell holding a sentence which must never be kept as prose.
|}
<gallery>
File:A.png|A gallery caption that reads like a whole sentence of prose.
</gallery>
* A list item that is a whole sentence of prose stays in the text.
* Short item
See [http://example.com the example site] for a page with more words about it.

==References==
{{reflist}}
* Smith, John. A book about the letter X that is cited here. Publisher, 1990.
[[Category:Letters]]
[[de:X]]
"""  # noqa: E501 (wikitext as articles have it: one long line)
    assert wiki_prose(wikitext) == (
        "X is a letter used in algebra for an unknown value.\n\n"
        "A list item that is a whole sentence of prose stays in the text.\n\n"
        "See the example site for a page with more words about it."
    )


def test_wiki_documents_are_clean_articles():
    documents = load_documents("wiki")
    assert 100 <= len(documents) <= 106  # 106 articles in the dump, 103 with prose
    assert sum(len(d) > 2000 for d in documents) >= 85
    assert 2_300_000 < sum(map(len, documents)) < 2_900_000
    for document in documents:
        leftovers = [mark for mark in MARKUP if mark in document]
        assert not leftovers, (leftovers, document[:200])
    first = documents[0]
    assert first.startswith("Anarchism is a political philosophy")


def test_wiki_parse_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("PANGU_LIGHT_CACHE", str(tmp_path))
    corpora._wiki_documents.cache_clear()
    try:
        parsed = load_documents("wiki")
        (cache,) = (tmp_path / "corpora").iterdir()
        assert cache.name.startswith("wiki-") and cache.suffix == ".json"
        assert json.loads(cache.read_text(encoding="utf-8")) == parsed

        def no_parsing(_):
            raise AssertionError("the cache should have been read")

        monkeypatch.setattr(corpora, "wiki_prose", no_parsing)
        corpora._wiki_documents.cache_clear()
        assert load_documents("wiki") == parsed
    finally:
        corpora._wiki_documents.cache_clear()


def test_missing_wheel_names_the_pip_command(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gensim" else real_find_spec(name))
    corpora._wiki_documents.cache_clear()
    try:
        with pytest.raises(PanguLightError, match=r"run `pip install --no-deps gensim==4\.4\.0`"):
            load_documents("wiki")
    finally:
        corpora._wiki_documents.cache_clear()


# ----------------------------------------------------------------------------- lambada


def test_lambada_passages_and_examples():
    passages = load_documents("lambada")
    assert len(passages) == 5153
    assert len(split_documents(passages, "all")) == 5151  # two passages repeat
    examples = lambada_examples("eval")
    assert len(examples) == len(split_documents(passages, "eval")) == 1288
    for context, continuation in examples:
        assert continuation.startswith(" ") and len(continuation.split()) == 1
        assert context + continuation in passages
    calib_examples = lambada_examples("calib")
    assert len(calib_examples) == len(split_documents(passages, "calib"))  # repeats count once
    assert not {c + w for c, w in calib_examples} & {c + w for c, w in examples}


# ----------------------------------------------------------------------------- user files


def test_text_file_documents_are_blank_line_separated(tmp_path):
    path = write_text(tmp_path, "a.txt", "first line\nsame block\n\n \t\nsecond\n\n\n\nthird\n")
    assert load_documents(path) == ["first line\nsame block", "second", "third"]


def test_jsonl_file_documents(tmp_path):
    lines = [json.dumps({"text": "one", "id": 1}), "", json.dumps({"text": "two"})]
    assert load_documents(write_text(tmp_path, "a.jsonl", "\n".join(lines))) == ["one", "two"]


@pytest.mark.parametrize(
    "bad_line, problem",
    [('{"body": "no text field"}', "no string field 'text'"), ("{not json", "not valid JSON")],
)
def test_jsonl_bad_line_names_its_number(tmp_path, bad_line, problem):
    path = write_text(tmp_path, "bad.jsonl", '{"text": "fine"}\n\n' + bad_line + "\n")
    with pytest.raises(PanguLightError, match=rf"bad.jsonl:3 (has|is) .*{problem}"):
        load_documents(path)


@pytest.mark.parametrize(
    "name, text, problem",
    [("a.csv", "x", "extension '.csv'"), ("empty.txt", "\n\n  \n", "holds no text")],
)
def test_unusable_files_are_errors(tmp_path, name, text, problem):
    with pytest.raises(PanguLightError, match=problem):
        load_documents(write_text(tmp_path, name, text))


def test_unknown_source_is_an_error(tmp_path):
    with pytest.raises(PanguLightError, match="neither a named source .*wiki.* nor a file"):
        load_documents(str(tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------- splits


def test_splits_are_disjoint_and_cover_the_deduplicated_documents():
    documents = load_documents("wiki") + load_documents("lambada")
    documents += [documents[0], "  " + documents[5].replace(" ", "\n", 3)]  # repeats
    calib = split_documents(documents, "calib")
    evaluation = split_documents(documents, "eval")
    everything = split_documents(documents, "all")
    assert len(everything) == len(documents) - 2 - 2  # 2 added repeats, 2 LAMBADA repeats
    assert not set(calib) & set(evaluation)
    assert sorted(calib + evaluation) == sorted(everything)
    assert 0.2 < len(evaluation) / len(everything) < 0.3
    # A document's side depends on its text alone, not on what else is in the list.
    assert split_documents(list(reversed(evaluation)) + calib[:10], "eval") == evaluation[::-1]


def test_wiki_calib_keeps_most_of_the_text():
    documents = load_documents("wiki")
    calib_chars = sum(map(len, split_documents(documents, "calib")))
    assert calib_chars > 0.7 * sum(map(len, documents))


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"split": "train"}, "unknown split 'train'"),
        ({"split": "eval", "eval_fraction": 1.0}, "between 0 and 1"),
    ],
)
def test_bad_split_arguments(kwargs, problem):
    with pytest.raises(PanguLightError, match=problem):
        split_documents(["text"], **kwargs)


# ----------------------------------------------------------------------------- sequences


def test_windows_are_cut_from_the_joined_stream(tmp_path):
    path = write_text(tmp_path, "a.txt", "abcdef\n\nghij\n\nklmnopq")
    everything = token_sequences(path, byte_encode, samples=None, seq_len=4, split="all", eos_id=0)
    stream = byte_encode("abcdef") + [0] + byte_encode("ghij") + [0] + byte_encode("klmnopq")
    assert everything.dtype == np.int64 and everything.shape == (4, 4)
    assert everything.ravel().tolist() == stream[:16]
    # Without eos_id, documents are joined by the encoding of a blank line.
    joined = token_sequences(path, byte_encode, samples=None, seq_len=4, split="all")
    assert joined.ravel().tolist() == byte_encode("abcdef\n\nghij\n\nklmnopq")[:20]
    picked = token_sequences(path, byte_encode, samples=2, seq_len=4, split="all", seed=3, eos_id=0)
    rows = [everything.tolist().index(row) for row in picked.tolist()]
    assert rows == sorted(set(rows))  # distinct windows, in corpus order


def test_seed_decides_the_sample():
    def draw(seed):
        return token_sequences("wiki", byte_encode, samples=16, seq_len=64, split="calib", seed=seed)

    first = draw(0)
    assert first.shape == (16, 64)
    assert np.array_equal(first, draw(0))
    assert not np.array_equal(first, draw(1))
    calib_text = "\n\n".join(split_documents(load_documents("wiki"), "calib")).encode("utf-8")
    for row in first:
        assert bytes(row.tolist()) in calib_text


def test_too_little_text_says_how_much_there_is(tmp_path):
    path = write_text(tmp_path, "small.txt", "abcd\n\nefgh")
    with pytest.raises(PanguLightError) as error:
        token_sequences(path, byte_encode, samples=3, seq_len=4, split="all", eos_id=0)
    assert str(error.value) == (
        f"{path!r} has 9 tokens = 2 sequences of 4; asked for 3: lower --samples or --seq-len, "
        "or pass a larger text file"
    )
    shortfall = (
        r"the calib split of 'lambada' has [\d,]+ tokens = [\d,]+ sequences of 100,000; "
        "asked for 5,000"
    )
    with pytest.raises(PanguLightError, match=shortfall):
        token_sequences("lambada", byte_encode, samples=5000, seq_len=100_000, split="calib")


def test_a_mixture_shares_the_windows_evenly_between_its_sources(tmp_path):
    path = write_text(tmp_path, "a.txt", "\n\n".join(f"{i:05d} words here" for i in range(200)))
    mixed = token_sequences(f"lambada+{path}", byte_encode, samples=5, seq_len=8, split="calib", seed=2)
    own = [token_sequences(source, byte_encode, samples=n, seq_len=8, split="calib", seed=2)
           for source, n in (("lambada", 3), (path, 2))]  # the first source takes the odd one
    assert np.array_equal(mixed, np.concatenate(own))
    everything = token_sequences(f"{path}+{path}", byte_encode, samples=None, seq_len=8, split="all")
    alone = token_sequences(path, byte_encode, samples=None, seq_len=8, split="all")
    assert np.array_equal(everything, np.concatenate([alone, alone]))
    # a file whose name holds a '+' is one source
    plus = write_text(tmp_path, "a+b.txt", "abcdefgh\n\nijklmnop")
    assert token_sequences(plus, byte_encode, samples=None, seq_len=8, split="all").shape == (2, 8)


@pytest.mark.parametrize(
    "source, samples, problem",
    [
        ("wiki+", 4, "a mixture is names or files joined by '\\+', e.g. wiki\\+lambada"),
        ("wiki+lambada", 1, "1 sequences cannot be shared by the 2 sources of 'wiki\\+lambada': ask for at least 2"),
        ("wiki+nothing-here", 4, "nothing-here"),
    ],
)
def test_bad_mixtures_are_errors(source, samples, problem):
    with pytest.raises(PanguLightError, match=problem):
        token_sequences(source, byte_encode, samples=samples, seq_len=16, split="calib")


@pytest.mark.parametrize(
    "samples, seq_len, problem",
    [
        (0, 16, "samples must be at least 1, got 0"),
        (4, 1, "seq_len must be at least 2 tokens, got 1"),
    ],
)
def test_bad_sizes(samples, seq_len, problem):
    with pytest.raises(PanguLightError, match=problem):
        token_sequences("lambada", byte_encode, samples=samples, seq_len=seq_len, split="eval")


def test_describe():
    assert describe("lambada") == "'lambada': 5,151 documents, 1,655,422 characters"
    assert describe("lambada", "eval").startswith("'lambada' (eval split): 1,288 documents, ")


@pytest.mark.real_model
def test_real_tokenizer_windows_decode_to_the_split_text(smollm2_dir):
    from pangu_light.frontend.loading import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    eos = tokenizer.eos_token_id

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False)

    windows = token_sequences("lambada", encode, samples=None, seq_len=256, split="eval", eos_id=eos)
    assert windows.shape[1] == 256 and 350 < windows.shape[0] < 450  # about 101k tokens
    assert windows.max() < len(tokenizer)
    decoded = tokenizer.decode(windows.ravel().tolist())
    expected = tokenizer.decode([eos]).join(split_documents(load_documents("lambada"), "eval"))
    assert expected.startswith(decoded[:-1])  # the last window may end inside a character
