"""LoRALinear: a no-op at init, the unmerged side path equals the merged math, bad ranks refused."""

import pytest
import torch

from quantkit.checkpoint import load_checkpoint, save_checkpoint
from quantkit.errors import QuantkitError
from quantkit.model import LoadedModel, tiny_tokenizer
from quantkit.modules import InputTransform, Int4Linear
from quantkit.primitives import choose_scales, quantize
from quantkit.scheme import Scheme
from quantkit.training.loops import train
from quantkit.training.lora import (LoRALinear, add_averaged_lora, add_lora, check_rank, init_from_error_,
                                    lora_metadata, lora_modules, lora_parameters, merge_lora_, pop_lora)
from quantkit.training.qat import QATLinear, convert_qat, prepare_qat
from quantkit.training.records import Tokenized, collate
from quantkit.training.sft import sft_loss


def _int4(w):
    scales = choose_scales(w, 4, 32, torch.bfloat16)
    return Int4Linear.from_codes(quantize(w, scales, 4, 32), scales, 32, 8)


def _bases():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    return {"float": lin, "qat": QATLinear.from_linear(lin, 4, 32, 8, torch.bfloat16),
            "int4": _int4(lin.weight.detach())}


@pytest.fixture(autouse=True, params=["reference", "auto"])
def _kernel(request, monkeypatch):
    """Every test on the reference kernel and on the default one (the fast kernel fuses the side path)."""
    monkeypatch.setenv("QUANTKIT_KERNEL", request.param)


@pytest.mark.parametrize("kind", ["float", "qat", "int4"])
def test_zero_init_b_changes_nothing(kind):
    base = _bases()[kind]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        assert torch.equal(LoRALinear(base, 8, 16)(x), base(x))


@pytest.mark.parametrize("kind", ["float", "int4"])
def test_unmerged_side_path_equals_merged_math(kind):
    base = _bases()[kind]
    lora = LoRALinear(base, 8, 16)
    torch.nn.init.normal_(lora.lora_B, std=0.1)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        got = lora(x)
        want = base(x) + x @ (lora.alpha / lora.rank * lora.lora_B @ lora.lora_A).T  # the one-matrix update
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if kind == "float":  # and merging gives one matrix that computes the same
            merged = torch.nn.functional.linear(x, base.weight + lora.delta_weight())
            torch.testing.assert_close(got, merged, rtol=1e-5, atol=1e-5)


def test_side_path_sees_the_untransformed_input_under_an_online_hadamard():
    torch.manual_seed(0)
    base = _int4(torch.randn(48, 64))
    base.input_transform = InputTransform.HADAMARD  # SpinQuant's R4: the kernel sees H x, the adapter x
    lora = LoRALinear(base, 8, 16)
    torch.nn.init.normal_(lora.lora_B, std=0.1)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        want = base(x) + x @ (lora.scaling * lora.lora_B @ lora.lora_A).T
        torch.testing.assert_close(lora(x), want, rtol=1e-5, atol=1e-5)


def test_merge_lora_folds_adapters_into_weights(tiny, ids):
    tiny.float()
    add_lora(tiny, 4, 8)
    for m in tiny.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    with torch.no_grad():
        before = tiny(ids).logits
        merge_lora_(tiny)
        assert not any(isinstance(m, LoRALinear) for m in tiny.modules())
        torch.testing.assert_close(tiny(ids).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [0, -1, 65])
def test_bad_rank_is_refused(rank, tiny):
    with pytest.raises(QuantkitError, match="rank"):
        LoRALinear(torch.nn.Linear(64, 128), rank, 16)
    with pytest.raises(QuantkitError, match="--lora-rank"):
        check_rank(tiny, rank)
    check_rank(tiny, 32)  # the smallest block linears, k_proj / v_proj, are 64 -> 32


def test_rank_larger_than_the_smallest_layer_is_refused(tiny):
    # k_proj / v_proj are 64 -> 32 with 2 KV heads of 16: rank 33 fits q but not k
    with pytest.raises(QuantkitError, match="k_proj"):
        check_rank(tiny, 33)


def test_runs_x_rank_larger_than_the_smallest_layer_is_refused(tiny):
    check_rank(tiny, 16, runs=2)  # averaged into rank 32: fits k_proj / v_proj's 32
    with pytest.raises(QuantkitError, match="--lora-runs 3 at --lora-rank 16 .* rank 48"):
        check_rank(tiny, 16, runs=3)


def test_averaged_adapters_compute_the_mean_of_the_runs_side_paths(tiny):
    tiny.float()
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(9))  # down_proj's input: intermediate 128
    runs, outputs, deltas = [], [], []
    for seed in range(3):
        torch.manual_seed(seed)
        add_lora(tiny, 4, 8)
        for m in lora_modules(tiny).values():
            torch.nn.init.normal_(m.lora_B, std=0.05)
        with torch.no_grad():
            outputs.append(tiny.model.layers[0].mlp.down_proj(x))
        deltas.append({n: m.delta_weight() for n, m in lora_modules(tiny).items()})
        runs.append(pop_lora(tiny))
        assert not lora_modules(tiny)  # the plain linears are back
    add_averaged_lora(tiny, runs, 8)
    mods = lora_modules(tiny)
    assert {m.rank for m in mods.values()} == {12} and {m.alpha for m in mods.values()} == {8}
    for n, m in mods.items():
        torch.testing.assert_close(m.delta_weight(), sum(d[n] for d in deltas) / 3, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # base + mean side path = the mean of the three runs' outputs
        got = tiny.model.layers[0].mlp.down_proj(x)
    torch.testing.assert_close(got, sum(outputs) / 3, rtol=1e-5, atol=1e-6)


def test_adapters_round_trip_through_the_checkpoint_bit_exactly(tiny, ids, tmp_path):
    scheme = Scheme()
    prepare_qat(tiny, scheme)
    add_lora(tiny, 4, 8, dtype=torch.bfloat16)
    for m in tiny.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    plan = convert_qat(tiny, scheme)
    tiny.requires_grad_(False)
    meta_lora = lora_metadata(tiny)
    assert meta_lora["rank"] == 4 and len(meta_lora["modules"]) == 14 and meta_lora["dtype"] == "bfloat16"
    save_checkpoint(LoadedModel(tiny, tiny_tokenizer(), "tiny", ""), plan, scheme, tmp_path / "ck", pipeline="qlora",
                    method="qat", lora=meta_lora)
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta["lora"] == meta_lora and "model.layers.0.self_attn.q_proj" in meta["modules"]
    got, want = loaded.model.state_dict(), tiny.state_dict()
    assert got.keys() == want.keys() and any(".lora_B" in k for k in got)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, tiny(ids).logits)


def test_one_lora_step_reduces_the_loss(tiny, tmp_path):
    tiny.float()
    prepare_qat(tiny, Scheme())
    tiny.requires_grad_(False)
    add_lora(tiny, 8, 16)
    gen = torch.Generator().manual_seed(4)
    batch = collate([Tokenized(torch.randint(0, 256, (20,), generator=gen).tolist(), 5) for _ in range(2)], 1)
    before = sft_loss(tiny, batch).item()
    params = {str(i): p for i, p in enumerate(lora_parameters(tiny))}
    train("lora", params, 1, 1e-2, lambda step: sft_loss(tiny, batch), tmp_path / "p", 10)
    assert sft_loss(tiny, batch).item() < before - 0.01


@pytest.mark.parametrize("weighted", [False, True])
def test_error_init_at_full_rank_restores_the_error_and_is_best_in_its_norm(weighted):
    torch.manual_seed(0)
    base = torch.nn.Linear(48, 32, bias=False)
    error = torch.randn(32, 48)
    x = torch.randn(500, 48) * torch.linspace(0.1, 3, 48)  # uneven input channels
    gram = x.T @ x if weighted else None
    full = LoRALinear(base, 32, 8.0, dtype=torch.float32)
    init_from_error_(full, error, gram, damp=0.0)
    torch.testing.assert_close(full.delta_weight(), error, atol=1e-4, rtol=1e-4)  # rank 32 = rank of E

    def residual(wrapper):  # what the outputs see of the error the adapter leaves
        return ((error - wrapper.delta_weight()) @ x.T).norm()

    low = {}
    for name, g in (("plain", None), ("weighted", x.T @ x)):
        low[name] = LoRALinear(base, 4, 8.0, dtype=torch.float32)
        init_from_error_(low[name], error, g, damp=0.0)
    assert residual(low["weighted"]) < residual(low["plain"])  # the weighted init is best in its norm
    assert residual(low["plain"]) < (error @ x.T).norm()  # and either removes part of the error
