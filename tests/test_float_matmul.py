import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from quantkit import evaluate, float_matmul
from quantkit.cli import main
from quantkit.evaluate import perplexity
from quantkit.float_matmul import Bf16Matmul, Float32MatmulLinear, has_native_bf16, resolve, use_float32_matmuls_
from quantkit.model import tiny_llama
from quantkit.modules import quantize_
from quantkit.scheme import Scheme


def _ulp(y: torch.Tensor) -> torch.Tensor:
    """bf16's spacing at |y| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(y.float().abs().clamp_min(1e-30))) - 7)


@pytest.mark.parametrize("bias", [False, True])
@torch.no_grad()
def test_the_product_is_float32_rounded_once_within_one_ulp_of_exact_and_near_torchs_bf16(bias):
    torch.manual_seed(0)
    native = nn.Linear(1024, 512, bias=bias).to(torch.bfloat16)
    x = torch.randn(256, 1024).bfloat16()
    want_native = native(x)
    swapped = nn.Sequential(native)
    assert use_float32_matmuls_(swapped) == 1
    got = swapped(x)
    assert got.dtype == torch.bfloat16
    # exactly the float32 product (bias included) rounded to bf16 once ...
    b = native.bias.float() if bias else None
    assert torch.equal(got, F.linear(x.float(), native.weight.float(), b).bfloat16())
    if not bias:  # (torch's bf16 addmm rounds the product before adding the bias: two roundings)
        # ... so within one bf16 ulp of the exact (float64) product, plus where terms cancel the
        # float32 sum's own error, at most n * 2^-24 * sum |x_k w_k| for n = 1024 terms in any order
        # (a product rounded to bf16 in blocks of 256 breaks this bound at thousands of elements) ...
        exact = F.linear(x.double(), native.weight.double())
        slack = 1024 * 2.0 ** -24 * (x.float().abs() @ native.weight.float().abs().T)
        assert ((got.double() - exact).abs() <= (_ulp(exact) + slack).double()).all()
        # ... and differs from torch's bf16 matmul by no more than that either. (On AVX512-BF16
        # torch's product of a row that cancels to 6e-6 from terms summing to 13 is 2.3 ulps from
        # the exact one, ours 0.6: a bound of one ulp alone failed there.)
        assert ((got.float() - want_native.float()).abs() <= _ulp(want_native) + slack).all()


def test_swap_shares_the_parameters_and_keeps_the_state_dict_and_the_tie():
    model = tiny_llama(seed=0, dtype=torch.bfloat16)
    before = {k: v for k, v in model.state_dict().items()}
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    assert use_float32_matmuls_(model) == n_linear > 0
    assert not any(type(m) is nn.Linear for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert isinstance(model.lm_head, Float32MatmulLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied stays tied


def test_perplexity_is_the_same_up_to_rounding():
    ids = torch.randint(0, 256, (4 * 64,), generator=torch.Generator().manual_seed(3))
    model = tiny_llama(seed=1, dtype=torch.bfloat16)
    native = perplexity(model, ids, seq_len=64).perplexity
    use_float32_matmuls_(model)
    fast = perplexity(model, ids, seq_len=64).perplexity
    assert fast == pytest.approx(native, rel=2e-3)


@pytest.mark.parametrize("flags, machine, native", [
    ({"avx2", "fma"}, "x86_64", False),  # AVX2 only: torch's bf16 matmul is emulated
    ({"avx512f", "avx512bw"}, "x86_64", False),
    ({"avx512f", "avx512_bf16"}, "x86_64", True),
    ({"amx_tile", "amx_bf16"}, "x86_64", True),
    ({"asimd"}, "aarch64", True),  # only x86 is judged
])
def test_native_bf16_is_read_from_the_cpu_flags(flags, machine, native):
    assert has_native_bf16(flags, machine) is native


def test_unreadable_flags_leave_torchs_choice_alone(monkeypatch):
    monkeypatch.setattr(float_matmul, "cpu_flags", lambda: None)
    assert has_native_bf16(machine="x86_64") is True
    monkeypatch.setattr(float_matmul, "cpu_flags", lambda: {"avx2"})
    assert has_native_bf16(machine="x86_64") is False


def test_resolve(monkeypatch):
    bf16 = tiny_llama(seed=0, dtype=torch.bfloat16)
    monkeypatch.setattr(float_matmul, "has_native_bf16", lambda: False)
    assert resolve(Bf16Matmul.AUTO, bf16) is Bf16Matmul.FLOAT32
    assert resolve(Bf16Matmul.NATIVE, bf16) is Bf16Matmul.NATIVE
    monkeypatch.setattr(float_matmul, "has_native_bf16", lambda: True)
    assert resolve(Bf16Matmul.AUTO, bf16) is Bf16Matmul.NATIVE
    assert resolve(Bf16Matmul.FLOAT32, bf16) is Bf16Matmul.FLOAT32
    # nothing to swap: a float32 model, or a quantized one whose linears run on quantkit's kernels
    assert resolve(Bf16Matmul.FLOAT32, tiny_llama(seed=0, dtype=torch.float32)) is Bf16Matmul.NATIVE
    quantized = tiny_llama(seed=0, dtype=torch.bfloat16)
    quantize_(quantized, Scheme())
    assert resolve(Bf16Matmul.FLOAT32, quantized) is Bf16Matmul.NATIVE


def test_eval_records_the_choice_and_keeps_the_two_apart(tiny_dir, data_dir, tmp_path):
    rows = {}
    for mode in ("native", "float32"):
        js = tmp_path / f"{mode}.json"
        res = CliRunner().invoke(main, ["eval", str(tiny_dir), "--seq-len", "64", "--max-windows", "2",
                                        "--data-dir", str(data_dir), "--bf16-matmul", mode, "--json", str(js)])
        assert res.exit_code == 0, res.output
        rows[mode] = json.loads(js.read_text())["wikitext2_perplexity"][0]
        assert ("float32 matmuls" in res.output) is (mode == "float32")
    assert rows["native"]["bf16_matmul"] == "native" and rows["float32"]["bf16_matmul"] == "float32"
    assert rows["float32"]["perplexity"] == pytest.approx(rows["native"]["perplexity"], rel=2e-3)
    # each mode keeps its own windows: the float32 run did not reuse the native run's floats
    assert len(list(evaluate.windows_dir().glob("*.json"))) == 2  # (conftest: a directory per test)


def test_report_scores_the_baseline_per_choice_and_says_which(data_dir, tmp_path, monkeypatch):
    import quantkit.tasks

    # scores of this test only (not QUANTKIT_CACHE_DIR: the built kernel stays where it is)
    monkeypatch.setattr("quantkit.report.cache_dir", lambda: tmp_path / "cache")
    from quantkit.model import tiny_tokenizer

    tiny_dir = tmp_path / "tiny"
    tiny_llama(seed=0).save_pretrained(str(tiny_dir))
    tiny_tokenizer().save_pretrained(str(tiny_dir))
    ptq = tmp_path / "ptq"
    assert CliRunner().invoke(main, ["ptq", "--model", str(tiny_dir), "--output", str(ptq)]).exit_code == 0
    scored = []  # which lm_head each task run saw (lm-eval itself is tested in test_report.py)

    def run_tasks(model, tokenizer, tasks, **kwargs):
        scored.append(type(model.lm_head).__name__)
        return {t: {"source": "local", "metrics": {"acc": 0.5}, "stderr": {}} for t in tasks}

    monkeypatch.setattr(quantkit.tasks, "run_tasks", run_tasks)
    docs = {}
    for mode in ("float32", "native", "float32"):
        res = CliRunner().invoke(main, ["compare", "report", str(ptq), "--baseline", str(tiny_dir), "-o",
                                        str(tmp_path / mode), "--overwrite", "--data-dir", str(data_dir),
                                        "--tasks", "copa", "--limit", "2", "--seq-len", "64", "--max-windows", "1",
                                        "--bf16-matmul", mode])
        assert res.exit_code == 0, res.output
        docs[mode] = json.loads((tmp_path / mode / "results.json").read_text())
    # the baseline scored once per choice, on the swapped linears for float32; the checkpoint once
    assert scored == ["Float32MatmulLinear", "Int8Linear", "Linear"]
    assert [m["bf16_matmul"] for m in docs["float32"]["models"]] == ["float32", "native"]
    assert docs["native"]["models"][0]["bf16_matmul"] == "native"
    assert any("float32 matmuls" in n for n in docs["float32"]["notes"])
    assert not any("float32 matmuls" in n for n in docs["native"]["notes"])


def test_tasks_command_scores_on_the_chosen_linears(tiny_dir, data_dir, tmp_path, monkeypatch):
    import quantkit.tasks

    seen = []

    def run_tasks(model, tokenizer, tasks, **kwargs):
        seen.append(type(model.lm_head).__name__)
        return {t: {"source": "local", "metrics": {"acc": 0.5}, "stderr": {}} for t in tasks}

    monkeypatch.setattr(quantkit.tasks, "run_tasks", run_tasks)
    for mode in ("float32", "native"):
        js = tmp_path / f"{mode}.json"
        res = CliRunner().invoke(main, ["tasks", str(tiny_dir), "--tasks", "copa", "--data-dir", str(data_dir),
                                        "--bf16-matmul", mode, "--json", str(js)])
        assert res.exit_code == 0, res.output
        assert json.loads(js.read_text())["bf16_matmul"] == {str(tiny_dir): mode}
    assert seen == ["Float32MatmulLinear", "Linear"]


def test_a_baseline_loaded_before_the_choice_is_swapped_when_scored(tiny_dir):
    from quantkit.report import Role, _Model

    model = _Model("bf16", Role.BASELINE, str(tiny_dir), tiny_dir, "bf16")
    assert type(model.load().model.lm_head) is nn.Linear  # loaded early (a hub baseline's hash check)
    model.matmul = Bf16Matmul.FLOAT32
    assert type(model.load().model.lm_head) is Float32MatmulLinear
    assert model.score_key("token-ppl") == "token-ppl:matmul=float32"
