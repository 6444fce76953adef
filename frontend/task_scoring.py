"""Zero-shot task accuracy of a PyTorch Hugging Face model (a checkpoint, before export).

Everything but the forward call is ``calib.scoring``'s: the same items, tokenisation, batching,
log-likelihoods and metrics, so a model and the graph exported from it get the same numbers (up
to the float32 rounding of the two runtimes; tests/calib/test_task_scoring.py checks this).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pangu_light.calib.scoring import Encode, LogitsFn, score_tasks

__all__ = ["score_model_tasks", "torch_logits"]


def torch_logits(model: torch.nn.Module) -> LogitsFn:
    """The float32 logits of ``model`` (eval mode, no gradients) for numpy inputs."""
    device = next(model.parameters()).device

    def logits(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            output = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device))
        return output.logits.float().cpu().numpy()

    return logits


def score_model_tasks(
    model: torch.nn.Module,
    encode: Encode,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    label: str = "",
) -> dict[str, dict[str, float]]:
    """``calib.scoring.score_tasks`` through the model's forward pass."""
    model.eval()
    return score_tasks(tasks, torch_logits(model), encode, limit=limit, batch_size=batch_size,
                       progress=progress, label=label)
