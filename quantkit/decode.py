"""A lean greedy decode loop: one prefill call, then one forward per token into a static KV cache.

``model.generate`` re-plans its cache, logits processors and stopping criteria on every token;
at 135M parameters that bookkeeping costs as much as the matmuls. This loop does only what
decoding needs: the model's own forward (no forked model code) with a preallocated
``StaticCache`` and explicit cache positions, and an argmax. It is what ``quantkit generate``
and ``quantkit bench model`` run, so their speed is the kernels' speed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [1, new] generated ids (prompt excluded)
    prefill_s: float  # time of the prompt forward pass = time to first token
    step_s: list[float] = field(default_factory=list)  # time of each later token's forward

    @property
    def decode_tok_s(self) -> float:
        return len(self.step_s) / sum(self.step_s) if self.step_s else float("nan")


@torch.inference_mode()
def greedy_decode(model: torch.nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int,
                  eos_token_id: int | None = None) -> DecodeResult:
    """Greedy continuation of ``prompt_ids [1, P]`` by up to ``max_new_tokens`` tokens."""
    from transformers import StaticCache

    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1:
        raise ValueError(f"greedy_decode takes one prompt [1, P], got {tuple(prompt_ids.shape)}")
    p = prompt_ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=p + max_new_tokens)
    t0 = time.perf_counter()
    # logits of the last position only: [1, 1, V] instead of [1, P, V] (less head work and memory)
    logits = model(prompt_ids, cache=cache, cache_position=torch.arange(p), use_cache=True, logits_to_keep=1).logits
    token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
    result = DecodeResult(token, time.perf_counter() - t0)
    out = [token]
    for pos in range(p, p + max_new_tokens - 1):
        if eos_token_id is not None and token.item() == eos_token_id:
            break
        t0 = time.perf_counter()
        logits = model(token, cache=cache, cache_position=torch.tensor([pos]), use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        result.step_s.append(time.perf_counter() - t0)
        out.append(token)
    result.tokens = torch.cat(out, dim=1)
    return result
