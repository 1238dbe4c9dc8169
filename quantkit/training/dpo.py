"""Direct preference optimization against an explicit, frozen reference model.

The reference is the stage-2 model (QAT backbone + SFT adapters), not "the policy with adapters
switched off": DPO here trains the backbone too, so only a separate frozen copy is a fixed
reference. It is frozen, so its log-probabilities are computed once, before training, and kept
(``reference_logps``) — the same numbers an on-the-fly reference forward would give.

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

with ``pi_*`` / ``ref_*`` the summed response log-probabilities of the chosen / rejected answer
under the policy / reference; ``beta * (pi - ref)`` is each answer's implicit reward.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from quantkit.training.records import Tokenized, collate
from quantkit.training.sft import sequence_logps


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards ``[B]``, rejected rewards ``[B]``) from summed log-probs ``[B]``."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -nn.functional.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def pair_logps(model: nn.Module, pairs: list[tuple[Tokenized, Tokenized]],
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen ``[B]`` and rejected ``[B]`` answers, in one forward."""
    batch = collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    logps = sequence_logps(model, batch)  # [2B]
    return logps[: len(pairs)], logps[len(pairs):]


@torch.inference_mode()
def reference_logps(model: nn.Module, pairs: list[tuple[Tokenized, Tokenized]], pad_id: int,
                    batch_size: int, advance=lambda n=1: None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected log-probs ``[P]`` of every pair under the frozen ``model``."""
    chosen, rejected = [torch.zeros(0)], [torch.zeros(0)]  # [0] each when there are no pairs
    for i in range(0, len(pairs), batch_size):
        c, r = pair_logps(model, pairs[i : i + batch_size], pad_id)
        chosen.append(c)
        rejected.append(r)
        advance(len(pairs[i : i + batch_size]))
    return torch.cat(chosen), torch.cat(rejected)


@dataclass
class PreferenceMetrics:
    """Held-out preference metrics of a policy against the reference."""

    pairs: int
    preference_accuracy: float  # share of pairs where log p(chosen) > log p(rejected)
    logp_margin: float  # mean log p(chosen) - log p(rejected) (nats)
    reward_accuracy: float  # share where the implicit reward of chosen > rejected (0 when policy == reference)
    reward_margin: float  # mean implicit reward margin beta * (...)

    def to_dict(self) -> dict:
        return asdict(self)


def preference_metrics(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                       ref_rejected: torch.Tensor, beta: float) -> PreferenceMetrics:
    _, rc, rr = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return PreferenceMetrics(
        pairs=len(policy_chosen),
        preference_accuracy=(policy_chosen > policy_rejected).float().mean().item(),
        logp_margin=(policy_chosen - policy_rejected).mean().item(),
        reward_accuracy=(rc > rr).float().mean().item(),
        reward_margin=(rc - rr).mean().item(),
    )
