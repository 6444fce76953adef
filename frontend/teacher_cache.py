"""The teacher's final hidden states on disk, so distillation never runs the teacher per step.

For token ids x of a window, the teacher computes ``logits = cap(lm_head(norm(body(x))))``.
The cache stores ``h = norm(body(x))`` ([L, H] per window, after the final norm); at train time
``logits = cap(h W^T)`` is one matmul with the teacher's lm_head (``kd_loss``), which is what the
teacher's forward does last: exact in float32, and H / V of the size of the logits (576 against
49152 for SmolLM2).

A cache is one ``.npy`` array ``[windows, L, H]`` (float32, or float16 to halve it) and a JSON
sidecar, named by a key that hashes the teacher (its directory's config and weight files) and the
token ids of every window in cache order, so a cache is reused exactly when it holds the same
numbers, and a run that changes the data or the teacher builds a new one. Both files are written
atomically (``core.files``; array first), so a cache that exists is whole.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch

from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_write, write_json

__all__ = ["TeacherCache", "teacher_hidden", "teacher_identity"]

CACHE_VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16}


def teacher_identity(model_dir: str | os.PathLike) -> str:
    """A digest of a HF model directory: config.json and each weight file's name, size, mtime."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


@torch.no_grad()
def teacher_hidden(teacher, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the final norm) of ``teacher`` for ``ids`` [B, L], float32."""
    device = next(teacher.parameters()).device
    out = teacher.model(input_ids=ids.to(device), use_cache=False)
    return out.last_hidden_state.float().cpu()


class TeacherCache:
    """Read access to a built cache: ``cache[rows]`` -> float32 tensor [len(rows), L, H]."""

    def __init__(self, array: np.ndarray, path: Path):
        self.array = array
        self.path = path

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, rows) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.array[rows], dtype=np.float32))

    @staticmethod
    def key(identity: str, windows: np.ndarray, dtype: str) -> str:
        digest = hashlib.sha256(f"v{CACHE_VERSION}:{identity}:{dtype}:{windows.shape}".encode())
        digest.update(np.ascontiguousarray(windows, dtype=np.int64).tobytes())
        return digest.hexdigest()[:24]

    @classmethod
    def open_or_build(
        cls,
        directory: str | os.PathLike,
        *,
        teacher,
        identity: str,
        windows: np.ndarray,
        dtype: str = "float32",
        batch_size: int = 4,
        build: bool = True,
        quiet: bool = False,
    ) -> TeacherCache:
        """The cache of ``teacher`` over ``windows`` [W, L] in ``directory``, built if missing.

        ``build=False`` only opens it (the other ranks of a distributed run, after rank 0 built it)."""
        if dtype not in DTYPES:
            raise PanguLightError(f"teacher cache dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        directory = Path(directory)
        key = cls.key(identity, windows, dtype)
        path = directory / f"teacher-{key}.npy"
        if not path.is_file():
            if not build:
                raise PanguLightError(f"teacher cache {path} is missing (rank 0 should have built it)")
            cls._build(path, teacher=teacher, windows=windows, dtype=dtype, batch_size=batch_size, quiet=quiet)
        array = np.load(path, mmap_mode="r")
        if array.shape[:2] != windows.shape:
            raise PanguLightError(
                f"teacher cache {path} has shape {array.shape}, expected {windows.shape} x H; delete it"
            )
        return cls(array, path)

    @staticmethod
    def _build(path: Path, *, teacher, windows: np.ndarray, dtype: str, batch_size: int, quiet: bool) -> None:
        from tqdm import tqdm

        hidden = int(teacher.get_output_embeddings().weight.shape[1])
        count, length = windows.shape
        size_gb = count * length * hidden * np.dtype(DTYPES[dtype]).itemsize / 1e9
        with atomic_write(path) as temporary:
            array = np.lib.format.open_memmap(temporary, mode="w+", dtype=DTYPES[dtype], shape=(count, length, hidden))
            with tqdm(total=count * length, unit="tok", desc=f"teacher cache ({size_gb:.2f} GB)",
                      disable=quiet, file=sys.stderr) as bar:
                for start in range(0, count, batch_size):
                    ids = torch.from_numpy(np.ascontiguousarray(windows[start:start + batch_size], dtype=np.int64))
                    array[start:start + len(ids)] = teacher_hidden(teacher, ids).numpy().astype(DTYPES[dtype])
                    bar.update(int(ids.numel()))
            array.flush()
            del array
        meta = {"version": CACHE_VERSION, "windows": count, "seq_len": length, "hidden": hidden, "dtype": dtype}
        write_json(path.with_suffix(".json"), meta, indent=None)
