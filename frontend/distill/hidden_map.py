"""The map P [H, k] from the teacher's residual stream to the pruned student's, and which teacher
layers each student layer stands for.

Hidden map. Every pruning pass that changes the residual stream does so by a linear map of it
that the embedding undergoes too: slice-hidden keeps channels K (P = I[:, K], a selection), a
rotation keeps k principal directions (P = Q, orthonormal columns). So P is read off the two
embeddings, E_s = E_t P (row vectors h_s = h_t P)::

    selection   column c of E_s equals column K_c of E_t exactly        P[K_c, c] = 1
    otherwise   P = argmin ||E_t P - E_s||_F (float64 least squares),  accepted when the
                relative residual is below 1e-6 (E_t [V, H] has full column rank: V >> H)

and the student's residual stream at a boundary is trained towards the teacher's there, h_t P.
Gemma's constant embedding scale is the same number on both sides, so it does not enter P.

Spans. The student's layer j kept the teacher's layer origin[j]; teacher layers that were dropped
are covered by the kept layer before them (by the first kept layer for a dropped layer 0), so
student layer j maps the teacher's residual stream at boundary a_j to boundary b_j::

    a_0 = 0,  a_j = origin[j] (j > 0);   b_j = a_{j+1},  b_{n-1} = N  (the input of the final norm)

teacher layers [a_j, b_j) are what layer j reproduces: itself and the dropped layers after it.
"""

from __future__ import annotations

import torch

from pangu_light.core.errors import PanguLightError

__all__ = ["hidden_map", "layer_spans"]


@torch.no_grad()
def hidden_map(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """P [H, k] (float32) with ``student_embedding`` = ``teacher_embedding`` @ P."""
    e_s, e_t = student_embedding.detach().float().cpu(), teacher_embedding.detach().float().cpu()
    if e_s.shape[0] != e_t.shape[0]:
        raise PanguLightError(f"student vocabulary {e_s.shape[0]} != teacher vocabulary {e_t.shape[0]}: "
                              "pass the teacher the pruned graph was made from")
    hidden, kept = e_t.shape[1], e_s.shape[1]
    selection = _selection(e_s, e_t)
    if selection is not None:
        p = torch.zeros(hidden, kept)
        p[selection, torch.arange(kept)] = 1.0
        return p
    a, b = e_t.double(), e_s.double()
    p = torch.linalg.lstsq(a, b).solution
    residual = float(torch.linalg.norm(a @ p - b) / max(float(torch.linalg.norm(b)), 1e-30))
    if residual > 1e-6:
        raise PanguLightError(
            f"the student's embedding is not a linear map of the teacher's (relative residual {residual:.2e}); "
            "local reconstruction needs the teacher the pruned graph was made from"
        )
    return p.float()


def _selection(e_s: torch.Tensor, e_t: torch.Tensor) -> list[int] | None:
    """Teacher column of each student column when every student column is a teacher column."""
    rows = min(e_t.shape[0], 64)
    where = {e_t[:rows, c].numpy().tobytes(): c for c in range(e_t.shape[1])}
    found = [where.get(e_s[:rows, c].numpy().tobytes()) for c in range(e_s.shape[1])]
    if any(c is None for c in found) or not torch.equal(e_t[:, found], e_s):
        return None
    return found


def layer_spans(origin: list[int], teacher_layers: int) -> list[tuple[int, int]]:
    """(a_j, b_j) for each student layer (module docstring): the teacher boundaries it maps between."""
    if not origin or sorted(set(origin)) != list(origin) or origin[-1] >= teacher_layers:
        raise PanguLightError(f"layer origins {origin} are not increasing indices below {teacher_layers}")
    starts = [0] + list(origin[1:])
    return [(a, b) for a, b in zip(starts, starts[1:] + [teacher_layers])]
