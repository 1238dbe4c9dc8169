"""Perplexity on the WikiText-2 test split (the GPTQ / SpinQuant convention).

The test rows are joined with ``"\\n\\n"``, tokenized once, and cut into non-overlapping windows
of ``seq_len`` tokens (the tail shorter than a window is dropped). Each window is scored on its
own (no context carried over); perplexity is ``exp`` of the mean next-token negative
log-likelihood over all scored tokens. Every window scores ``seq_len - 1`` tokens, so this equals
the reference code's ``exp(mean over windows of the window's mean loss)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quantkit.checkpoint import atomic_file
from quantkit.data import encode, wikitext2_test_text
from quantkit.errors import QuantkitError
from quantkit.progress import progress_bar


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    windows: int
    tokens_scored: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int = 2048,
               max_windows: int | None = None, description: str = "perplexity") -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D token ids ``ids``, in windows of ``seq_len``."""
    if seq_len < 2:
        raise QuantkitError(f"--seq-len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows <= 0:
        raise QuantkitError(f"--max-windows must be positive, got {max_windows}")
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise QuantkitError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    total = 0.0
    with progress_bar(description, n) as advance:
        for i in range(n):
            window = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0)  # [1, L]
            logits = model(window, use_cache=False).logits[0].float()  # [L, V]
            total += torch.nn.functional.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item()
            advance()
    scored = n * (seq_len - 1)
    return PerplexityResult(math.exp(total / scored), total / scored, n, scored, seq_len)


def wikitext2_perplexity(model: torch.nn.Module, tokenizer, seq_len: int = 2048, max_windows: int | None = None,
                         data_dir=None, description: str = "wikitext-2 ppl") -> PerplexityResult:
    if tokenizer is None:
        raise QuantkitError("this model has no tokenizer, so it cannot be scored on text; "
                            "put tokenizer files next to it or use a model that has them")
    return perplexity(model, encode(tokenizer, wikitext2_test_text(data_dir)), seq_len, max_windows, description)


def selection_perplexity(model: torch.nn.Module, held_out: torch.Tensor, path: Path, description: str) -> float:
    """A best-of-N draw's perplexity on held-out windows ``[n, L]`` (each scored alone), kept in
    ``path`` as JSON: a resumed run reads it back instead of scoring the same model again."""
    if path.is_file():
        return json.loads(path.read_text())["perplexity"]
    n, seq_len = held_out.shape
    ppl = perplexity(model.eval(), held_out.flatten(), seq_len, n, description).perplexity
    atomic_file(lambda tmp: tmp.write_text(json.dumps({"perplexity": ppl}) + "\n"), path)
    return ppl
