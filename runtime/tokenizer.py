"""The tokenizer of a deployed graph: found from ``--tokenizer`` or the graph's metadata, loaded
with transformers' ``AutoTokenizer`` when installed, else with the ``tokenizers`` library.

Both libraries are imported lazily, only when a tokenizer is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from pangu_light.core.contract import TOKENIZER
from pangu_light.runtime.errors import RuntimeUserError

__all__ = ["Tokenizer", "find_tokenizer_dir", "load_tokenizer"]


def find_tokenizer_dir(
    model_path: str | os.PathLike, metadata: Mapping[str, str], override: str | os.PathLike | None = None
) -> Path:
    """The tokenizer directory: ``override`` if given, else the graph's ``pangu_light.tokenizer``
    metadata (a relative path is read relative to the graph's folder)."""
    if override is not None:
        path = Path(override).expanduser()
        source = "--tokenizer"
    else:
        recorded = metadata.get(TOKENIZER)
        if not recorded:
            raise RuntimeUserError(
                f"{str(model_path)!r} does not record its tokenizer (no {TOKENIZER} "
                "metadata): pass --tokenizer DIR, the Hugging Face model directory it was exported from"
            )
        path = Path(recorded).expanduser()
        if not path.is_absolute():
            path = Path(model_path).parent / path
        source = f"the graph's {TOKENIZER} metadata"
    if not path.is_dir():
        raise RuntimeUserError(
            f"tokenizer directory {str(path)!r} (from {source}) does not exist: pass --tokenizer DIR "
            "with the Hugging Face model directory holding tokenizer.json"
        )
    return path


class Tokenizer:
    """encode / decode / chat template over either backend, plus the stop tokens it knows."""

    def __init__(self, backend, *, hf: bool, directory: Path):
        self.backend = backend
        self.hf = hf
        self.directory = directory

    def encode(self, text: str) -> list[int]:
        if self.hf:
            return list(self.backend(text, add_special_tokens=True)["input_ids"])
        return list(self.backend.encode(text).ids)

    def encode_chat(self, text: str) -> list[int]:
        """The prompt as one user turn of the tokenizer's chat template, ready for the reply."""
        if not self.hf or not getattr(self.backend, "chat_template", None):
            raise RuntimeUserError(
                f"the tokenizer in {str(self.directory)!r} has no chat template: drop --chat to use the "
                "plain prompt"
            )
        ids = self.backend.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, Mapping) or hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    @property
    def pad_token_id(self) -> int | None:
        if self.hf:
            return self.backend.pad_token_id
        return _read_json(self.directory / "config.json").get("pad_token_id")

    def stop_token_ids(self) -> list[int]:
        """EOS ids from the tokenizer, generation_config.json and config.json."""
        ids: set[int] = set()
        if self.hf and self.backend.eos_token_id is not None:
            ids.add(int(self.backend.eos_token_id))
        for name in ("generation_config.json", "config.json"):
            eos = _read_json(self.directory / name).get("eos_token_id")
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, list):
                ids.update(int(t) for t in eos)
        return sorted(ids)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    directory = Path(directory)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        AutoTokenizer = None
    if AutoTokenizer is not None:
        try:
            return Tokenizer(AutoTokenizer.from_pretrained(str(directory)), hf=True, directory=directory)
        except Exception as error:  # transformers raises many types for a bad directory
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise RuntimeUserError(
                f"could not load a tokenizer from {str(directory)!r} ({reason}): "
                "pass --tokenizer with a Hugging Face model directory holding tokenizer.json"
            ) from None
    try:
        from tokenizers import Tokenizer as RawTokenizer
    except ImportError:
        raise RuntimeUserError(
            "no tokenizer library is installed: `pip install tokenizers` (or transformers)"
        ) from None
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise RuntimeUserError(
            f"{str(directory)!r} has no tokenizer.json: pass --tokenizer with a Hugging Face model directory"
        )
    return Tokenizer(RawTokenizer.from_file(str(file)), hf=False, directory=directory)
