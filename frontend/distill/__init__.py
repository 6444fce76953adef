"""Knowledge distillation of a pruned student from its unpruned teacher (paper section 3.4).

The student is the pruned graph re-imported into PyTorch (``frontend.reimport``); the teacher is
the original Hugging Face model. Per optimizer step, over a global batch of G = micro_batch x
grad_accum x world_size windows of L tokens::

    loss   = (1 - a) T^2 KL(softmax(z_t / T) || softmax(z_s / T)) + a CE(z_s, next token)
             over the full vocabulary, every position (kd_loss: fused with both heads, chunked)
    update = AdamW(lr(t), betas, weight_decay) after clipping the global gradient norm
    lr(t)  = lr * warm(t) * (r + (1 - r) (1 + cos(pi p(t))) / 2)        (r = min_lr_ratio)
             warm rises linearly over the warm-up (W steps at least, a fraction F of the run),
             p from 0 after it to 1 at the last step or at the end of the time budget (``schedule``)

The teacher runs online, or (default) is replaced by its cached final hidden states, from which
``kd_loss`` recomputes its logits with one matmul (``frontend.teacher_cache``). With ``kd = "topk"``
the KL is taken over the teacher's top-k tokens plus one tail bucket, from a cache of its top-k
(``frontend.kd_topk``: the bound on the error, and k = V is the full loss); held-out evaluation is
always the full-vocabulary KL and perplexity, so runs of either loss are compared on one scale.

With a time budget (``time_budget``, ``budget``) the run stops after the last step that fits,
with complete outputs, and the cosine's progress is max(t / S, elapsed / budget); the teacher
cache is then built in chunks as the steps reach them (``data``). Every ``metrics.jsonl`` entry
carries ``elapsed_s`` (training seconds), ``wall_s`` and ``cpu_s`` (``usage``) beside ``tokens``.

Micro-batch k of a step goes to rank k mod world, so 1 process with grad_accum = 2 and 2
processes with grad_accum = 1 see the same global batch and, since each micro-batch loss is a
mean and gradients are averaged over micro-batches and ranks, compute the same update. The data
order is a function of the step alone, so a checkpoint (weights, AdamW and schedule state,
history) resumes the same curve exactly. Matmuls run under bfloat16 autocast when ``bf16``
(weights, optimizer, softmax and KL stay fp32).

Modules (each imports torch, numpy, ``core`` and the frontend modules it names; ``outputs`` also
the exporter and ``runtime``'s session and decode layout for the parity check):

- ``config``: ``DistillConfig``, ``DistillResult``, the checks on the numbers, the fingerprint.
- ``data``: the seeded window order (``schedule_windows``), the teacher's states.
- ``schedule``: the learning rate's warm-up and cosine (``lr_factor``), ``--warmup``'s parser.
- ``distributed``: the ``torchrun`` process group; DDP or FSDP2 around the student.
- ``budget``: the wall-clock budget, the clock (rank 0's, broadcast), ``parse_duration``.
- ``objective``: ``DistillObjective`` (student forward + fused loss), ``next_token_targets``.
- ``checkpoint``: the checkpoint format, writing (rank 0, atomic, the last few kept), resuming.
- ``loop``: ``distill(config)``: set-up, training steps, evaluation, metrics.
- ``outputs``: the model directory, the re-export checked under ONNX Runtime, ``summary.json``.
- ``hidden_map``: the map P [H, k] from the teacher's residual stream to the student's (read off the
  embeddings: a selection or any linear map, e.g. a rotation) and the teacher layers each student
  layer stands for.
- ``local``: local reconstruction, each layer trained alone towards the teacher's residual stream
  across its span (the first stage of ``pangu-light recover``).
- ``usage``: the process clocks every metrics entry carries (``wall_s``, ``cpu_s``) and ``Stages``,
  the timings of the set-up in ``summary.json``.
- ``evaluation``: held-out evaluation over several sources, each reported apart.
- ``reexport``: the distilled student's graph from a structure traced before for its shape.

A run can start from given weights (``init_weights``, what ``recover`` passes after local
reconstruction) and keep the embedding and lm_head fixed (``freeze_embeddings``, when the hidden
size was not pruned).

The loss plot (``loss.png``) is drawn by ``pangu_light.reports.loss_plot``.
"""

from pangu_light.frontend.distill.config import DistillConfig, DistillResult
from pangu_light.frontend.distill.data import schedule_windows
from pangu_light.frontend.distill.loop import distill
from pangu_light.frontend.distill.objective import DistillObjective, next_token_targets
from pangu_light.frontend.distill.schedule import lr_factor

__all__ = [
    "DistillConfig", "DistillObjective", "DistillResult", "distill", "lr_factor", "next_token_targets",
    "schedule_windows",
]
