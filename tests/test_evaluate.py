import json
import math

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit import evaluate
from quantkit.evaluate import perplexity, wikitext2_perplexity
from quantkit.model import tiny_tokenizer


def _direct_ppl(model, ids, seq_len, windows):
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            chunk = ids[w * seq_len : (w + 1) * seq_len]
            logp = torch.log_softmax(model(chunk[None]).logits[0].double(), dim=-1)
            for t in range(seq_len - 1):
                nll -= logp[t, chunk[t + 1]].item()
                count += 1
    return math.exp(nll / count)


def test_perplexity_matches_a_direct_computation(tiny):
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0))
    result = perplexity(tiny, ids, seq_len=32)
    assert result.windows == 3 and result.tokens_scored == 3 * 31  # the 4-token tail is dropped
    assert result.perplexity == pytest.approx(_direct_ppl(tiny, ids, 32, 3), rel=1e-4)
    assert perplexity(tiny, ids, seq_len=32, max_windows=1).windows == 1


def test_bad_window_options(tiny):
    ids = torch.arange(10)
    with pytest.raises(QuantkitError):
        perplexity(tiny, ids, seq_len=1)
    with pytest.raises(QuantkitError):
        perplexity(tiny, ids, seq_len=4, max_windows=-1)
    with pytest.raises(QuantkitError, match="fewer than one window"):
        perplexity(tiny, ids, seq_len=64)


def test_wikitext2_perplexity_on_tiny_model(tiny, data_dir):
    result = wikitext2_perplexity(tiny, tiny_tokenizer(), seq_len=64, max_windows=2, data_dir=data_dir)
    assert result.windows == 2 and 1 < result.perplexity < 1e4


class _Calls:
    """A forward pre-hook that counts the model's calls and raises KeyboardInterrupt at call ``stop_at``
    (a hook, so the model's fingerprint is the same with and without it)."""

    def __init__(self, model, stop_at=None):
        self.n, self.stop_at = 0, stop_at
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.n += 1
        if self.n == self.stop_at:
            raise KeyboardInterrupt

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_a_stopped_evaluation_resumes_at_its_first_unscored_window_bit_for_bit(tiny):
    ids = torch.randint(0, 256, (5 * 32,), generator=torch.Generator().manual_seed(1))
    whole = perplexity(tiny, ids, seq_len=32)  # resume off: nothing kept
    assert not any(evaluate.windows_dir().iterdir())
    assert len(whole.window_nll) == 5 and sum(whole.window_nll) == pytest.approx(whole.nll * whole.tokens_scored, rel=1e-12)

    with _Calls(tiny, stop_at=3), pytest.raises(KeyboardInterrupt):  # Ctrl-C in the third window
        perplexity(tiny, ids, seq_len=32, resume=True)
    (kept,) = evaluate.windows_dir().iterdir()
    assert json.loads(kept.read_text())["window_nll"] == whole.window_nll[:2]
    with _Calls(tiny) as calls:
        resumed = perplexity(tiny, ids, seq_len=32, resume=True)
    assert calls.n == 3  # windows 3-5 only
    assert resumed == whole  # the same floats, summed in the same order
    with _Calls(tiny) as calls:
        assert perplexity(tiny, ids, seq_len=32, resume=True) == whole
        assert perplexity(tiny, ids, seq_len=32, max_windows=2, resume=True) == perplexity(tiny, ids, 32, 2)
    assert calls.n == 2  # only the run without resume scored (its 2 windows)


def test_kept_windows_belong_to_one_model_text_and_window_length(tiny):
    ids = torch.randint(0, 256, (2 * 32,), generator=torch.Generator().manual_seed(2))
    perplexity(tiny, ids, seq_len=32, resume=True)
    with _Calls(tiny) as calls:
        perplexity(tiny, ids.flip(0), seq_len=32, resume=True)  # other text
        perplexity(tiny, ids, seq_len=16, max_windows=2, resume=True)  # other windows
        with torch.no_grad():
            tiny.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3  # other weights
        changed = perplexity(tiny, ids, seq_len=32, resume=True)
    assert calls.n == 2 + 2 + 2
    assert changed == perplexity(tiny, ids, seq_len=32)
    assert len(list(evaluate.windows_dir().iterdir())) == 4


def test_an_unreadable_kept_file_is_scored_again(tiny):
    ids = torch.randint(0, 256, (2 * 32,), generator=torch.Generator().manual_seed(3))
    whole = perplexity(tiny, ids, seq_len=32, resume=True)
    (kept,) = evaluate.windows_dir().iterdir()
    kept.write_text('{"window_nll": [1.0, ')  # cut off mid-write by something other than quantkit
    with _Calls(tiny) as calls:
        assert perplexity(tiny, ids, seq_len=32, resume=True) == whole
    assert calls.n == 2


def test_a_run_stopped_on_one_thread_resumes_on_two(tiny):
    ids = torch.randint(0, 256, (3 * 32,), generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with _Calls(tiny, stop_at=2), pytest.raises(KeyboardInterrupt):
            perplexity(tiny, ids, seq_len=32, resume=True)
        torch.set_num_threads(2)
        with _Calls(tiny) as calls:
            resumed = perplexity(tiny, ids, seq_len=32, resume=True)
        assert calls.n == 2 and resumed == perplexity(tiny, ids, seq_len=32)
    finally:
        torch.set_num_threads(threads)
