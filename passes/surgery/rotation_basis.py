"""The rotation file of ``rotate-hidden``: an orthogonal basis of the residual stream and, per
hidden norm, the energy of its unit-normalised input along each basis vector (``calib.rotation``
computes them); plus the two bases the pass derives (a random one; one turned inside its kept span).

File: .npz with ``basis`` [H, H] (float64, columns by decreasing energy), ``energy.<gamma name>``
[H] (sums to 1) and ``meta`` (JSON, ``"format": "pangu-light-rotation/1"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from pangu_light.core.errors import PanguLightError
from pangu_light.core.files import atomic_write

__all__ = ["ROTATION_FORMAT", "Rotation", "diagonalising_basis", "load_rotation", "random_rotation", "save_rotation"]

ROTATION_FORMAT = "pangu-light-rotation/1"


class Rotation:
    """An orthogonal basis Q [H, H] (columns by decreasing energy) and, per hidden norm (by its
    gamma's name), the mean energy of its unit-normalised input along each column [H] (sums to 1)."""

    def __init__(self, basis: np.ndarray, energy: dict[str, np.ndarray] | None = None, meta: dict | None = None):
        self.basis = np.asarray(basis, dtype=np.float64)
        self.energy = {k: np.asarray(v, dtype=np.float64) for k, v in (energy or {}).items()}
        self.meta = dict(meta or {})

    def kept_fraction(self, gamma: str, kept: int) -> float:
        return float(np.sum(self.energy[gamma][:kept]))


def save_rotation(path: str | os.PathLike, rotation: Rotation) -> None:
    arrays = {"basis": rotation.basis, "meta": np.array(json.dumps({"format": ROTATION_FORMAT, **rotation.meta}))}
    arrays.update({f"energy.{name}": e for name, e in rotation.energy.items()})
    with atomic_write(path, suffix=".npz") as temporary:
        np.savez(temporary, **arrays)


def load_rotation(path: str | os.PathLike, pass_name: str = "rotate-hidden") -> Rotation:
    path = Path(path)
    if not path.is_file():
        raise PanguLightError(f"pass {pass_name}: cannot read the rotation file {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.pop("format", None) != ROTATION_FORMAT:
                raise ValueError(f"format is not {ROTATION_FORMAT!r}")
            energy = {k[len("energy."):]: data[k] for k in data.files if k.startswith("energy.")}
            return Rotation(data["basis"], energy, meta)
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise PanguLightError(
            f"pass {pass_name}: {path} is not a rotation file written by pangu-light ({error})"
        ) from None


def random_rotation(size: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((size, size)))
    return q * np.sign(np.diag(r))


def diagonalising_basis(basis: np.ndarray, gamma: np.ndarray, kept: int) -> np.ndarray:
    """``basis`` turned inside its first ``kept`` columns (and inside the rest) so that
    basis_k^T diag(gamma) basis_k is diagonal: the same spans, a vector gamma for the final norm."""
    turned = basis.copy()
    for block in (slice(0, kept), slice(kept, basis.shape[0])):
        part = basis[:, block]
        if part.shape[1]:
            _, r = np.linalg.eigh(part.T @ (gamma[:, None] * part))
            turned[:, block] = part @ r
    return turned
