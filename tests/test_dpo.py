"""DPO loss against hand computation; preference/SFT records, their validation and tokenization."""

import gzip
import json
import math

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.model import tiny_tokenizer
from quantkit.scheme import Scheme
from quantkit.training.dpo import dpo_loss, pair_logps, preference_metrics, reference_logps
from quantkit.training.loops import train
from quantkit.training.qat import prepare_qat
from quantkit.training.records import collate, preference_pairs, sft_records, tokenize
from quantkit.training.sft import sequence_logps


def test_dpo_loss_equals_hand_computation():
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    rc, rr = torch.tensor([-11.0, -19.0]), torch.tensor([-11.5, -16.0])
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 0: 0.5 * ((-10 + 11) - (-12 + 11.5)) = 0.75 ; pair 1: 0.5 * ((-20 + 19) - (-15 + 16)) = -1.0
    want = (math.log(1 + math.exp(-0.75)) + math.log(1 + math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert chosen_r.tolist() == [0.5, -0.5] and rejected_r.tolist() == [-0.25, 0.5]
    # policy == reference: every logit is 0 and the loss is log 2
    assert dpo_loss(pc, pr, pc, pr, 0.1)[0].item() == pytest.approx(math.log(2))


def test_preference_metrics_by_hand():
    pc, pr = torch.tensor([-1.0, -5.0, -2.0]), torch.tensor([-2.0, -4.0, -3.0])
    m = preference_metrics(pc, pr, pc - 1, pr, beta=0.1)  # policy raised every chosen answer by 1 nat
    assert m.preference_accuracy == pytest.approx(2 / 3) and m.logp_margin == pytest.approx((1 - 1 + 1) / 3)
    assert m.reward_accuracy == 1.0 and m.reward_margin == pytest.approx(0.1)


def test_sequence_logps_sum_only_response_tokens(tiny):
    tok = tiny_tokenizer()
    examples = [tokenize(tok, [{"role": "user", "content": "hi"}], "hello there", 64),
                tokenize(tok, [{"role": "user", "content": "a longer question"}], "no", 64)]
    batch = collate(examples, pad_id=1)
    with torch.no_grad():
        got = sequence_logps(tiny, batch)
        for i, e in enumerate(examples):  # one sequence at a time, no padding, full logits
            logp = torch.log_softmax(tiny(torch.tensor([e.ids])).logits[0].float(), -1)
            want = sum(logp[t - 1, e.ids[t]] for t in range(e.n_prompt, len(e.ids)))
            assert got[i].item() == pytest.approx(want.item(), abs=2e-3)


def test_tokenize_masks_the_prompt_and_truncates():
    tok = tiny_tokenizer()  # no chat template: the plain "User:/Assistant:" format
    e = tokenize(tok, [{"role": "user", "content": "2+2?"}], "4", 64)
    assert tok.decode(e.ids[: e.n_prompt]) == "User: 2+2?\n\nAssistant:"
    assert tok.decode(e.ids[e.n_prompt:-1]) == " 4\n\n" and e.ids[-1] == tok.eos_token_id
    long = tokenize(tok, [{"role": "user", "content": "x" * 100}], "y" * 100, 32)
    assert len(long.ids) == 32 and long.n_prompt == 16  # half the window each


def test_one_dpo_step_reduces_the_dpo_loss(tiny, tmp_path):
    tiny.float()
    prepare_qat(tiny, Scheme())
    tok = tiny_tokenizer()
    prompt = [{"role": "user", "content": "Say something kind."}]
    pairs = [(tokenize(tok, prompt, "You are great.", 64), tokenize(tok, prompt, "Go away.", 64)),
             (tokenize(tok, prompt, "Nice work!", 64), tokenize(tok, prompt, "Whatever.", 64))]
    rc, rr = reference_logps(tiny, pairs, 1, batch_size=2)  # the frozen reference: the model before training

    def loss(step):
        pc, pr = pair_logps(tiny, pairs, 1)
        return dpo_loss(pc, pr, rc, rr, beta=0.5)[0]

    assert loss(0).item() == pytest.approx(math.log(2), abs=1e-4)
    assert reference_logps(tiny, [], 1, batch_size=2)[0].shape == (0,)  # --dpo-steps 0 samples no pairs
    train("dpo", dict(tiny.named_parameters()), 1, 1e-3, loss, tmp_path / "p", 10)
    assert loss(0).item() < math.log(2) - 0.01


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_preference_formats_are_recognized(tmp_path):
    hh = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "wt") as fh:
        fh.write(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: sure, ...",
                             "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: no"}) + "\n")
    (pair,) = preference_pairs(str(hh))
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"] and pair.prompt[-1]["content"] == "joke?"
    assert (pair.chosen, pair.rejected) == ("sure, ...", "no")
    rows = [{"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
             "rejected": {"from": "gpt", "value": "b"}},
            {"input": {"messages": [{"role": "user", "content": "q"}]},
             "preferred_output": [{"role": "assistant", "content": "a"}],
             "non_preferred_output": [{"role": "assistant", "content": "b"}]},
            {"prompt": "q", "chosen": "a", "rejected": "b"}]
    pairs = preference_pairs(_write(tmp_path / "p.jsonl", rows))
    assert all(p.prompt[-1]["content"] == "q" and (p.chosen, p.rejected) == ("a", "b") for p in pairs)


def test_shared_data_files_parse(data_dir):
    assert len(sft_records("alpaca", data_dir)) == 999 and len(sft_records("gsm8k-chat", data_dir)) == 449
    for name in ("dpo-en-demo", "orca-dpo", "hh-rlhf-harmless"):
        assert len(preference_pairs(name, data_dir)) > 250


def test_preference_data_without_chosen_rejected_is_refused_naming_file_and_record(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                           {"prompt": "q", "answer": "a"}])
    with pytest.raises(QuantkitError, match=r"bad\.jsonl record 1 .*'chosen' and 'rejected'"):
        preference_pairs(path)


def test_sft_data_without_response_turn_is_refused_naming_file_and_record(tmp_path):
    path = _write(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]},
                                           {"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(QuantkitError, match=r"sft\.jsonl record 1 has no response turn"):
        sft_records(path)
    alpaca = tmp_path / "a.json"
    alpaca.write_text(json.dumps([{"instruction": "do", "input": "", "output": ""}]))
    with pytest.raises(QuantkitError, match=r"a\.json record 0 has no response turn"):
        sft_records(str(alpaca))


def test_unknown_source_name_is_refused():
    with pytest.raises(QuantkitError, match="neither a file nor one of"):
        sft_records("no-such-set")
    with pytest.raises(QuantkitError, match="holds preference data"):
        sft_records("orca-dpo")
