"""Perplexity on the WikiText-2 test split (the GPTQ / SpinQuant convention).

The test rows are joined with ``"\\n\\n"``, tokenized once, and cut into non-overlapping windows
of ``seq_len`` tokens (the tail shorter than a window is dropped). Each window is scored on its
own (no context carried over); perplexity is ``exp`` of the mean next-token negative
log-likelihood over all scored tokens. Every window scores ``seq_len - 1`` tokens, so this equals
the reference code's ``exp(mean over windows of the window's mean loss)``.

The whole test split is about 140 windows of 2048 tokens for a Llama 3 tokenizer: hours for a bf16
model on a CPU. With ``resume=True`` each window's NLL sum is kept on disk as soon as it is scored,
under ``<cache dir>/perplexity/<key>.json``, where the key hashes the model (its tensors, module
tree and config), the token ids, the window length and the numerics (quantkit and torch versions,
kernel backend and its SIMD level: each can change the float sums; the thread count does not). A
stopped evaluation starts again at the first window not yet scored, and its result is bit for bit
the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from quantkit import __version__
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
    window_nll: list[float] = field(default_factory=list)  # each window's NLL sum (nats), in text order

    def to_dict(self) -> dict:
        return asdict(self)


def _numerics() -> str:
    """What a window's float sums depend on besides the model and the text."""
    import platform

    from quantkit.kernels import Backend, backend_for

    backend = backend_for(torch.empty(0))
    if backend is Backend.CPU:  # its SIMD level is chosen at run time, and sums in its own order
        from quantkit.kernels import cpu

        backend = f"{backend.value} isa {cpu.isa()}"
    else:
        backend = backend.value
    # not the thread count: torch's CPU ops and the fast kernel split a forward pass across rows and
    # columns, not along a sum, so a window scores the same floats on 1 and 2 threads (checked on
    # SmolLM2, bf16 and packed): a run stopped on one thread resumes on two
    return f"quantkit {__version__}, torch {torch.__version__}, {platform.machine()}, kernel {backend}"


def _fingerprint(model: torch.nn.Module, ids: torch.Tensor, seq_len: int) -> str:
    """sha256 of everything a window's score depends on (the module tree, config, tensors, text, numerics)."""
    h = hashlib.sha256(f"{seq_len}\0{_numerics()}\0{model!r}\0".encode())
    config = getattr(model, "config", None)
    if config is not None:
        h.update(config.to_json_string().encode())
    for name, t in model.state_dict(keep_vars=False).items():
        h.update(f"\0{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy())  # bytes of any dtype
    h.update(ids.to(torch.int64).contiguous().numpy())
    return h.hexdigest()


def windows_dir() -> Path:
    """Where each model's kept window scores live (``resume``)."""
    from quantkit.settings import cache_dir

    return cache_dir() / "perplexity"


class _WindowLog:
    """The per-window NLL sums scored so far, kept on disk after every window (see the module doc)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.nll: list[float] = []
        if path is not None and path.is_file():
            try:
                self.nll = [float(v) for v in json.loads(path.read_text())["window_nll"]]
            except (OSError, ValueError, KeyError, TypeError):  # unreadable: score again
                self.nll = []

    def add(self, value: float) -> None:
        self.nll.append(value)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_file(lambda tmp: tmp.write_text(json.dumps({"window_nll": self.nll}) + "\n"), self.path)


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int = 2048,
               max_windows: int | None = None, description: str = "perplexity",
               resume: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D token ids ``ids``, in windows of ``seq_len``.

    ``resume``: keep each window's score on disk and reuse the ones already there (module doc).
    """
    if seq_len < 2:
        raise QuantkitError(f"--seq-len must be at least 2, got {seq_len}")
    if max_windows is not None and max_windows <= 0:
        raise QuantkitError(f"--max-windows must be positive, got {max_windows}")
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise QuantkitError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}")
    log = _WindowLog(windows_dir() / f"{_fingerprint(model, ids, seq_len)}.json" if resume else None)
    with progress_bar(description, n) as advance:
        advance(min(len(log.nll), n))
        for i in range(len(log.nll), n):
            window = ids[i * seq_len : (i + 1) * seq_len].unsqueeze(0)  # [1, L]
            logits = model(window, use_cache=False).logits[0].float()  # [L, V]
            log.add(torch.nn.functional.cross_entropy(logits[:-1], window[0, 1:], reduction="sum").item())
            advance()
    window_nll = log.nll[:n]
    total = sum(window_nll)  # left to right, as the loop would add them: a resumed run sums the same floats
    scored = n * (seq_len - 1)
    return PerplexityResult(math.exp(total / scored), total / scored, n, scored, seq_len, window_nll)


def wikitext2_perplexity(model: torch.nn.Module, tokenizer, seq_len: int = 2048, max_windows: int | None = None,
                         data_dir=None, description: str = "wikitext-2 ppl", resume: bool = False) -> PerplexityResult:
    if tokenizer is None:
        raise QuantkitError("this model has no tokenizer, so it cannot be scored on text; "
                            "put tokenizer files next to it or use a model that has them")
    return perplexity(model, encode(tokenizer, wikitext2_test_text(data_dir)), seq_len, max_windows, description,
                      resume)


def selection_perplexity(model: torch.nn.Module, held_out: torch.Tensor, path: Path, description: str) -> float:
    """A best-of-N draw's perplexity on held-out windows ``[n, L]`` (each scored alone), kept in
    ``path`` as JSON: a resumed run reads it back instead of scoring the same model again."""
    if path.is_file():
        return json.loads(path.read_text())["perplexity"]
    n, seq_len = held_out.shape
    ppl = perplexity(model.eval(), held_out.flatten(), seq_len, n, description).perplexity
    atomic_file(lambda tmp: tmp.write_text(json.dumps({"perplexity": ppl}) + "\n"), path)
    return ppl
