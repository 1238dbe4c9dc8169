"""Response-only language-model losses: logits are computed only where a response token is predicted.

Skipping the head on prompt and padding positions matters on CPU: SmolLM2's head is
576 x 49152, a fifth of a training step when run on every position.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.training.records import Batch


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
