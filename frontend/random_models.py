"""``random:<arch>``: a model of a real architecture's shape with seeded random weights.

For tests and benchmarks at real sizes without downloading anything::

    pangu-light export random:llama-1.1b -o model.onnx       # TinyLlama's shape, 1.1B parameters
    pangu-light export random:llama-8b@7 -o model.onnx       # Llama-3-8B's shape, seed 7

The spec resolves to a directory under the cache (``models/random-<arch>-seed<N>/``) that holds
a ``config.json``, a tokenizer and a marker (``pangu_light_random.json``), but no weights: the
export traces the structure on empty weights (``weights.empty_model``) and attaches one lazy
tensor per parameter, generated only when the graph is saved, one at a time, from its own seed
(``seed`` and the CRC32 of its name), so a weight never depends on the order of generation and
the whole model is never in memory. Linear and embedding weights are N(0, 0.02^2) (the usual
initialiser range), norm gammas N(1, 0.05^2), biases 0. The weights exist only in exported graphs:
loading such a directory with transformers (e.g. as a distillation teacher) is refused.

Tokenizer: byte-level (one token per UTF-8 byte, ids 0-255, plus ``<s>`` 256 and ``</s>`` 257),
so every id fits any vocabulary of at least 258 and real text can be calibrated and evaluated.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import onnx_ir as ir

from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_directory, write_json

__all__ = ["ARCHITECTURES", "PREFIX", "RANDOM_MARKER", "is_random_dir", "random_tensor", "resolve_random"]

PREFIX = "random:"
RANDOM_MARKER = "pangu_light_random.json"
_STD = 0.02

ARCHITECTURES: dict[str, dict] = {
    # TinyLlama-1.1B
    "llama-1.1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, intermediate_size=5632, vocab_size=32000, rope_theta=10000.0,
                       tie_word_embeddings=False, max_position_embeddings=2048),
    # Llama-3-8B
    "llama-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                     tie_word_embeddings=False, max_position_embeddings=8192),
    # Qwen2.5-3B
    "qwen2.5-3b": dict(model_type="qwen2", hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, intermediate_size=11008, vocab_size=151936, rope_theta=1000000.0,
                       tie_word_embeddings=True, max_position_embeddings=32768),
    # for tests: a Llama small enough to export in seconds
    "llama-tiny": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=512, rope_theta=10000.0,
                       tie_word_embeddings=True, max_position_embeddings=512),
}


def resolve_random(spec: str, cache_dir: Path) -> Path:
    """The directory of ``random:<arch>[@seed]`` (created once under ``cache_dir/models``)."""
    arch, seed = _parse(spec)
    target = cache_dir / "models" / f"random-{arch}-seed{seed}"
    if (target / RANDOM_MARKER).is_file():
        return target
    with atomic_directory(target) as work:
        _write_config(work, arch)
        _write_tokenizer(work)
        write_json(work / RANDOM_MARKER, {"architecture": arch, "seed": seed, "std": _STD})
    return target


def is_random_dir(model_dir: Path) -> bool:
    return (Path(model_dir) / RANDOM_MARKER).is_file()


def random_tensor(model_dir: Path, name: str, shape: tuple[int, ...], dtype: ir.DataType) -> ir.TensorProtocol:
    """The lazy, seeded tensor ``name`` of the random model in ``model_dir``."""
    seed = json.loads((Path(model_dir) / RANDOM_MARKER).read_text())["seed"]

    def generate() -> ir.Tensor:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        if name.endswith(".bias"):
            array = np.zeros(shape, np.float32)
        elif "norm" in name:
            array = rng.normal(1.0, 0.05, size=shape).astype(np.float32)
        else:
            array = rng.standard_normal(size=shape, dtype=np.float32)
            array *= _STD
        return ir.tensor(array.astype(dtype.numpy(), copy=False), name=name)

    return ir.LazyTensor(generate, dtype=dtype, shape=ir.Shape(shape), name=name)


def _parse(spec: str) -> tuple[str, int]:
    body = spec[len(PREFIX):]
    arch, _, seed = body.partition("@")
    if arch not in ARCHITECTURES:
        raise PanguLightError(
            f"unknown random architecture {arch!r} in {spec!r}: use one of "
            f"{', '.join(PREFIX + a for a in ARCHITECTURES)} (optionally @SEED, e.g. random:llama-1.1b@1)"
        )
    if seed and not seed.isdigit():
        raise PanguLightError(f"seed {seed!r} in {spec!r} is not a non-negative integer; write e.g. {PREFIX}{arch}@1")
    return arch, int(seed or 0)


def _write_config(work: Path, arch: str) -> None:
    import transformers

    fields = dict(ARCHITECTURES[arch])
    model_type = fields.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, bos_token_id=256, eos_token_id=257, **fields)
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]]
    config.save_pretrained(str(work))


def _write_tokenizer(work: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of))}
    vocab.update({"<s>": 256, "</s>": 257})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(str(work))


def _byte_of(char: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's bytes_to_unicode inverse)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    code = ord(char)
    if code in printable:
        return code
    missing = [b for b in range(256) if b not in printable]
    return missing[code - 256]
