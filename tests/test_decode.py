import torch

from quantkit.decode import greedy_decode
from quantkit.modules import quantize_
from quantkit.scheme import Scheme


def _generate(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:]


def test_lean_loop_equals_transformers_generate(tiny):
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    r = greedy_decode(tiny, ids, 10)
    assert torch.equal(r.tokens, _generate(tiny, ids, 10))
    assert len(r.step_s) == 9 and r.prefill_s > 0 and r.decode_tok_s > 0


def test_lean_loop_on_a_quantized_model(tiny):
    quantize_(tiny, Scheme())
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    assert torch.equal(greedy_decode(tiny, ids, 6).tokens, _generate(tiny, ids, 6))


def test_stops_at_eos(tiny):
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(5))
    first = greedy_decode(tiny, ids, 1).tokens.item()
    r = greedy_decode(tiny, ids, 8, eos_token_id=first)
    assert r.tokens.tolist() == [[first]]
