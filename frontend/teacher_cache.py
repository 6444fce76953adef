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

``TopKCache`` (``--kd topk``) holds instead, per position, the teacher's top-k log-probabilities
at the distillation temperature T, their token ids and the remaining probability mass
(``kd_topk.teacher_topk`` of the teacher's own logits, soft-cap included): three arrays
``[W, L, k]``, ``[W, L, k]`` (int32), ``[W, L]``, keyed also by k and T. For SmolLM2 at k = 64 that
is 516 bytes a position against 2304 for the hidden states, and no teacher matmul per step.
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

__all__ = ["TeacherCache", "TopKCache", "teacher_hidden", "teacher_identity"]

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


class TopKCache:
    """``cache[rows]`` -> ``TopKTeacher`` with log_p, index [len(rows), L, k] and tail [len(rows), L]."""

    PARTS = ("log_p", "index", "tail")

    def __init__(self, arrays: dict[str, np.ndarray], path: Path):
        self.arrays = arrays
        self.path = path  # the tail array, written last

    def __len__(self) -> int:
        return self.arrays["tail"].shape[0]

    def __getitem__(self, rows):
        from pangu_light.frontend.kd_topk import TopKTeacher

        a = self.arrays
        return TopKTeacher(torch.from_numpy(np.asarray(a["log_p"][rows], dtype=np.float32)),
                           torch.from_numpy(np.asarray(a["index"][rows], dtype=np.int64)),
                           torch.from_numpy(np.asarray(a["tail"][rows], dtype=np.float32)))

    @classmethod
    def open_or_build(cls, directory: str | os.PathLike, *, teacher, identity: str, windows: np.ndarray, k: int,
                      temperature: float, dtype: str = "float32", batch_size: int = 4, build: bool = True,
                      quiet: bool = False) -> TopKCache:
        """The top-k cache of ``teacher`` over ``windows`` [W, L] in ``directory``, built if missing."""
        if dtype not in DTYPES:
            raise PanguLightError(f"teacher cache dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        key = TeacherCache.key(f"{identity}:topk{k}:T{temperature!r}", windows, dtype)
        paths = {part: Path(directory) / f"teacher-topk-{key}.{part}.npy" for part in cls.PARTS}
        if not all(p.is_file() for p in paths.values()):
            if not build:
                raise PanguLightError(f"teacher cache {paths['tail']} is missing (rank 0 should have built it)")
            cls._build(paths, teacher=teacher, windows=windows, k=k, temperature=temperature, dtype=dtype,
                       batch_size=batch_size, quiet=quiet)
        arrays = {part: np.load(p, mmap_mode="r") for part, p in paths.items()}
        if arrays["tail"].shape != windows.shape:
            raise PanguLightError(f"teacher cache {paths['tail']} has shape {arrays['tail'].shape}, expected "
                                  f"{windows.shape}; delete it")
        return cls(arrays, paths["tail"])

    @staticmethod
    @torch.no_grad()
    def _build(paths: dict[str, Path], *, teacher, windows: np.ndarray, k: int, temperature: float, dtype: str,
               batch_size: int, quiet: bool) -> None:
        from tqdm import tqdm

        from pangu_light.frontend.kd_topk import teacher_topk

        count, length = windows.shape
        k = min(k, int(teacher.get_output_embeddings().weight.shape[0]))
        out = {"log_p": np.zeros((count, length, k), DTYPES[dtype]),
               "index": np.zeros((count, length, k), np.int32), "tail": np.zeros((count, length), np.float32)}
        device = next(teacher.parameters()).device
        size_gb = sum(a.nbytes for a in out.values()) / 1e9
        with tqdm(total=count * length, unit="tok", desc=f"teacher top-{k} cache ({size_gb:.2f} GB)",
                  disable=quiet, file=sys.stderr) as bar:
            for start in range(0, count, batch_size):
                ids = torch.from_numpy(np.ascontiguousarray(windows[start:start + batch_size], dtype=np.int64))
                logits = teacher(input_ids=ids.to(device), use_cache=False).logits
                top = teacher_topk(logits.reshape(-1, logits.shape[-1]), k, temperature)
                rows = slice(start, start + len(ids))
                out["log_p"][rows] = top.log_p.reshape(len(ids), length, k).cpu().numpy()
                out["index"][rows] = top.index.reshape(len(ids), length, k).cpu().numpy()
                out["tail"][rows] = top.tail.reshape(len(ids), length).cpu().numpy()
                bar.update(int(ids.numel()))
        for part in TopKCache.PARTS:  # the tail last: its presence marks a whole cache
            with atomic_write(paths[part]) as temporary:
                with open(temporary, "wb") as handle:
                    np.save(handle, out[part])
