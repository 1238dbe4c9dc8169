import math

import pytest
import torch

from quantkit.errors import QuantkitError
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
