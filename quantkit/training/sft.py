"""Training losses of the SFT-style stages: response-only cross-entropy, distillation, or both.

Cross-entropy computes logits only where a response token is predicted: skipping the head on
prompt and padding positions matters on CPU (SmolLM2's head is 576 x 49152, a fifth of a
training step when run on every position). Distillation needs the teacher's distribution at
every position it is applied to, so it runs the head on every real token.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

from quantkit.training.records import Batch


class StageLoss(str, enum.Enum):
    """What an SFT-style stage (QAT, LoRA) minimizes."""

    CE = "ce"  # next-token cross-entropy on the response tokens (labels), the plain SFT loss
    KD = "kd"  # KL(teacher || student) of the next-token distributions at every real token
    MIXED = "mixed"  # (CE + KD) / 2

    @property
    def needs_teacher(self) -> bool:
        return self is not StageLoss.CE


def response_token_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every response token ``[T]`` and the row each belongs to ``[T]``."""
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         use_cache=False).last_hidden_state  # [B, L, H]
    targets = batch.labels[:, 1:]  # position t predicts token t + 1
    where = targets != -100  # [B, L-1]
    logits = model.get_output_embeddings()(hidden[:, :-1][where]).float()  # [T, V]
    logps = torch.log_softmax(logits, dim=-1).gather(-1, targets[where].unsqueeze(-1)).squeeze(-1)  # [T]
    rows = where.nonzero()[:, 0]  # [T]
    return logps, rows


def sft_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of the batch."""
    logps, _ = response_token_logps(model, batch)
    return -logps.mean()


def sequence_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Sum of response-token log-probabilities per sequence ``[B]``."""
    logps, rows = response_token_logps(model, batch)
    return torch.zeros(batch.input_ids.shape[0], dtype=logps.dtype).index_add(0, rows, logps)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student), from logits ``[T, V]`` (float32 math).

    ``sum_v p_t(v) (log p_t(v) - log p_s(v))``: zero exactly when the two distributions agree,
    and its gradient in the student's logits is ``(p_s - p_t) / T``, the soft-label cross-entropy's.
    """
    t = torch.log_softmax(teacher_logits.float(), dim=-1)  # [T, V]
    s = torch.log_softmax(student_logits.float(), dim=-1)  # [T, V]
    return (t.exp() * (t - s)).sum(-1).mean()


def stage_loss(model: nn.Module, batch: Batch, kind: StageLoss, teacher: nn.Module | None = None) -> torch.Tensor:
    """The loss ``kind`` of ``model`` on ``batch``; ``teacher`` (frozen) is needed for KD and MIXED.

    KD is applied at every position whose next token is a real token (prompt and response alike:
    the teacher has a distribution everywhere), CE only where the next token is a response token.
    """
    if kind is StageLoss.CE:
        return sft_loss(model, batch)
    if teacher is None:
        raise ValueError(f"the {kind.value} loss needs a teacher model")
    where = batch.attention_mask[:, 1:].bool()  # [B, L-1]: position t predicts the real token t + 1
    student = _logits_at(model, batch, where)  # [T, V]
    with torch.no_grad():
        target = _logits_at(teacher, batch, where)  # [T, V]
    kd = kd_loss(student, target)
    if kind is StageLoss.KD:
        return kd
    labels = batch.labels[:, 1:][where]  # [T], -100 on prompt tokens
    response = labels != -100
    ce = nn.functional.cross_entropy(student[response].float(), labels[response])
    return (ce + kd) / 2


def _logits_at(model: nn.Module, batch: Batch, where: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``[T, V]`` at the positions ``where`` ``[B, L-1]`` selects."""
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         use_cache=False).last_hidden_state  # [B, L, H]
    return model.get_output_embeddings()(hidden[:, :-1][where])
