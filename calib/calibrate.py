"""The calibrate stage: a graph and a text source in, ``CalibrationStats`` out.

Encodes the calibration split of the text with the graph's own tokenizer (``calib.text``) and
runs ``calib.stats.calibrate`` over it batch by batch, with a progress bar on stderr;
``collect_graph_grams`` does the same for the projection-input Gram matrices the output refit
needs (``calib.gram``), on the very same sequences when given the same text arguments;
``collect_graph_all`` gets the statistics, the Gram matrices and the rotation moments from one
tapped run (``calib.one_pass``: one forward pass instead of three, as ``prune`` needs).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pangu_light.calib.gram import GramStats, collect_grams
from pangu_light.calib.stats import CalibrationStats, batched, calibrate
from pangu_light.calib.text import graph_tokenizer, sequences_for
from pangu_light.passes.infra.graph_io import load_model_metadata

__all__ = ["batch_size_within", "calibrate_graph", "calibration_sequences", "collect_graph_all", "collect_graph_grams"]


def calibration_sequences(model_path: Path, data: str, samples: int | None, seq_len: int, seed: int,
                          tokenizer: Path | None):
    """The calibration split of ``data`` as [N, seq_len] token windows of ``model_path``'s tokenizer, and a
    record of how they were drawn."""
    metadata = load_model_metadata(model_path)
    encode, bos_id = graph_tokenizer(model_path, metadata, tokenizer)
    sequences = sequences_for(data, encode, bos_id, samples=samples, seq_len=seq_len, seed=seed, split="calib")
    meta = {"data": data, "split": "calib", "samples": int(len(sequences)), "seq_len": seq_len, "seed": seed}
    return sequences, meta


def calibrate_graph(
    model_path: Path, *, data: str, samples: int | None, seq_len: int, seed: int, batch_size: int,
    aggregation: str = "paper", provider: str = "cpu", threads: int | None = None,
    tokenizer: Path | None = None, quiet: bool = False, max_memory: int | None = None,
) -> CalibrationStats:
    """Tokenize the calibration text for ``model_path`` and run ``calib.stats.calibrate``.

    With ``max_memory`` (bytes) the batch size is the largest the estimate of ``calib.memory``
    fits in it (``batch_size`` is then ignored), printed on stderr before the run starts."""
    from tqdm import tqdm

    sequences, meta = calibration_sequences(model_path, data, samples, seq_len, seed, tokenizer)
    if max_memory is not None:
        batch_size = batch_size_within(model_path, max_memory, len(sequences), sequences.shape[1])
        meta["max_memory"], meta["batch_size"] = int(max_memory), int(batch_size)
    with tqdm(total=int(sequences.size), unit="tok", desc="calibrate", disable=quiet, file=sys.stderr) as bar:
        return calibrate(
            model_path, batched(sequences, batch_size), aggregation=aggregation, provider=provider,
            threads=threads, meta=meta, on_batch=bar.update,
        )


def batch_size_within(model_path: Path, max_memory: int, samples: int, seq_len: int) -> int:
    """The batch size ``calib.memory`` estimates to fit ``max_memory`` bytes; the estimate is
    printed on stderr (weights, runtime, bytes per sequence, the batch chosen)."""
    from pangu_light.calib.memory import estimate_calibration_memory
    from pangu_light.passes.analysis.model_map import ModelMap
    from pangu_light.passes.infra.graph_io import load_model

    model = load_model(model_path)  # weights stay mapped: only their sizes are read
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    estimate = estimate_calibration_memory(ModelMap.from_model(model), weights, seq_len)
    del model
    batch_size = estimate.batch_size(max_memory, samples)
    print(estimate.describe(max_memory, batch_size), file=sys.stderr, flush=True)
    return batch_size


def collect_graph_grams(
    model_path: Path, *, data: str, samples: int | None, seq_len: int, seed: int, batch_size: int,
    provider: str = "cpu", threads: int | None = None, tokenizer: Path | None = None, quiet: bool = False,
) -> GramStats:
    """The o_proj/down_proj input Gram matrices of ``model_path`` over the calibration text."""
    from tqdm import tqdm

    sequences, meta = calibration_sequences(model_path, data, samples, seq_len, seed, tokenizer)
    with tqdm(total=int(sequences.size), unit="tok", desc="gram", disable=quiet, file=sys.stderr) as bar:
        return collect_grams(
            model_path, batched(sequences, batch_size), provider=provider, threads=threads, meta=meta,
            on_batch=bar.update,
        )


def collect_graph_all(
    model_path: Path, *, data: str, samples: int | None, seq_len: int, seed: int, batch_size: int,
    grams: bool, rotation: bool, aggregation: str = "paper", provider: str = "cpu",
    threads: int | None = None, tokenizer: Path | None = None, quiet: bool = False,
):
    """``calib.one_pass.Collected``: the statistics of ``model_path`` over the calibration text,
    and its Gram matrices and rotation when asked, from one tapped run; ``sequences`` holds the
    token windows (a later probe reuses them instead of tokenising the corpus again)."""
    from tqdm import tqdm

    from pangu_light.calib.one_pass import collect_all

    sequences, meta = calibration_sequences(model_path, data, samples, seq_len, seed, tokenizer)
    with tqdm(total=int(sequences.size), unit="tok", desc="calibrate", disable=quiet, file=sys.stderr) as bar:
        collected = collect_all(
            model_path, batched(sequences, batch_size), grams=grams, rotation=rotation,
            aggregation=aggregation, provider=provider, threads=threads, meta=meta, on_batch=bar.update,
        )
    collected.sequences = sequences
    return collected
