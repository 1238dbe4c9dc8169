"""GPTQ: reconstruction error on calibration inputs is at most RTN's; the format is unchanged."""

from __future__ import annotations

import pytest
import torch

from quantkit.algorithms.gptq import (HessianHook, capture_layer_inputs, gptq_layer, gptq_model_, gptq_quantize,
                                     group_statistics, layer_outputs, propagation_target, refit_scales)
from quantkit.model import tiny_llama
from quantkit.primitives import choose_scales, dequantize, quantize_dequantize
from quantkit.scheme import WeightClip


def _correlated(n_tokens: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_tokens, k, generator=gen) @ torch.randn(k, k, generator=gen) + 3 * torch.randn(1, k, generator=gen)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip", [WeightClip.AMAX, WeightClip.MSE])
def test_gptq_error_is_at_most_rtn_and_codes_fit_the_format(act_order, clip):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    x = _correlated(512, 96, 1)
    h = x.double().T @ x.double() / len(x)
    codes, scales = gptq_quantize(w, h, bits=4, group_size=32, scale_dtype=torch.bfloat16, act_order=act_order,
                                  clip=clip)
    assert codes.dtype == torch.int8 and codes.shape == w.shape and scales.shape == (48, 3)
    assert scales.dtype == torch.bfloat16 and codes.min() >= -8 and codes.max() <= 7
    rtn = ((x @ (w - quantize_dequantize(w, 4, 32, torch.bfloat16, clip)).T) ** 2).mean()
    gptq = ((x @ (w - dequantize(codes, scales, 32)).T) ** 2).mean()
    assert gptq < 0.8 * rtn
    if act_order:  # static groups: the scales are RTN's, chosen before any column moved
        assert torch.equal(scales, choose_scales(w, 4, 32, torch.bfloat16, clip))


@pytest.mark.parametrize("clip", list(WeightClip))
def test_identity_hessian_gives_rtn(clip):
    """With no correlation between inputs there is nothing to compensate: GPTQ is round-to-nearest,
    with the same scale choice (amax or the clip search) as RTN."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    codes, scales = gptq_quantize(w, torch.eye(64, dtype=torch.float64), 4, 32, torch.bfloat16, damp=1e-9, clip=clip)
    assert torch.equal(scales, choose_scales(w, 4, 32, torch.bfloat16, clip))
    torch.testing.assert_close(dequantize(codes, scales, 32), quantize_dequantize(w, 4, 32, torch.bfloat16, clip),
                               rtol=0, atol=1e-6)


def test_dead_columns_are_zero():
    w = torch.randn(8, 32)
    x = _correlated(64, 32, 3)
    x[:, 5] = 0
    codes, _ = gptq_quantize(w, x.double().T @ x.double(), 4, 32)
    assert (codes[:, 5] == 0).all()


def test_layer_by_layer_error_is_at_most_rtn():
    """Each linear of a decoder layer, on the inputs it sees in the quantized layer, beats RTN."""
    model = tiny_llama(seed=0, dtype=torch.float32)
    ids = torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(4))
    inputs, kwargs = capture_layer_inputs(model, ids)
    assert inputs.shape == (6, 48, 64)
    layer = model.model.layers[0]
    original = {n: m.weight.detach().clone() for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    codes, outputs = gptq_layer(layer, inputs, kwargs, 4, 32, torch.float32)
    assert outputs.shape == inputs.shape and set(codes) == set(original)
    # the inputs each linear sees in the (now quantized) layer
    hooks = {n: HessianHook(layer.get_submodule(n)) for n in original}
    with torch.no_grad():
        for x in inputs:
            layer(x[None], **kwargs)
    for name, w in original.items():
        hooks[name].handle.remove()
        h = hooks[name].hessian.float()
        c, s = codes[name]
        assert torch.equal(layer.get_submodule(name).weight, dequantize(c, s, 32))  # weights replaced
        err = lambda q: torch.trace((w - q) @ h @ (w - q).T)  # noqa: E731  mean ‖x (W - Q)ᵀ‖²
        assert err(dequantize(c, s, 32)) <= err(quantize_dequantize(w, 4, 32)), name


def test_refit_scales_lowers_each_rows_error_and_is_least_squares():
    w = torch.randn(40, 96, generator=torch.Generator().manual_seed(5))
    x = _correlated(512, 96, 6)
    h = x.double().T @ x.double() / len(x)
    codes, scales = gptq_quantize(w, h, 4, 32, torch.bfloat16, clip=WeightClip.MSE)
    refit = refit_scales(w, h, codes, scales, 32)
    assert refit.dtype == scales.dtype and refit.shape == scales.shape and torch.all(refit > 0)

    def row_error(s):  # [N]: ‖x (w_n - q_n∘s_n)ᵀ‖² per output row
        return ((x.double() @ (w.double() - dequantize(codes, s, 32, torch.float64)).T) ** 2).sum(0)

    assert torch.all(row_error(refit) <= row_error(scales))
    assert row_error(refit).sum() < 0.99 * row_error(scales).sum()  # and it does refit something
    # with H = I the groups decouple: each scale is the least-squares <w, q> / <q, q> of its group
    eye = refit_scales(w, torch.eye(96, dtype=torch.float64), codes, scales.float(), 32)
    q, wg = codes.double().reshape(40, 3, 32), w.double().reshape(40, 3, 32)
    torch.testing.assert_close(eye.double(), (q * wg).sum(-1) / (q * q).sum(-1), rtol=1e-5, atol=1e-7)


def test_propagation_target_is_the_least_squares_map_to_the_float_outputs():
    """At α = 1, ``W + W Δ H⁻¹`` minimizes ‖X_f Wᵀ − X Tᵀ‖ over T; α scales it; Δ = 0 changes nothing."""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(7)).double()
    x_float = _correlated(400, 64, 8).double()
    x = x_float + 0.3 * _correlated(400, 64, 9).double()  # the inputs after earlier layers' rounding
    h, delta = x.T @ x / len(x), (x_float - x).T @ x / len(x)
    lstsq = torch.linalg.lstsq(x, x_float @ w.T).solution.T  # [N, K]
    torch.testing.assert_close(propagation_target(w, h, delta, 1.0, damp=1e-12), lstsq, rtol=1e-6, atol=1e-8)
    half = propagation_target(w, h, delta, 0.5, damp=1e-12)
    torch.testing.assert_close(half, (w + lstsq) / 2, rtol=1e-6, atol=1e-8)
    assert torch.equal(propagation_target(w, h, torch.zeros_like(delta), 1.0), w)


def test_propagation_brings_the_quantized_model_closer_to_the_float_one():
    """GPTQ with the correction (α = 1) ends nearer the float model's last hidden states than plain GPTQ,
    and α = 0 with a float reference is plain GPTQ, bit for bit."""
    ids = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(10))
    float_model = tiny_llama(seed=3, dtype=torch.float32, num_layers=4)
    inputs, kwargs = capture_layer_inputs(float_model, ids)
    target = inputs
    for layer in float_model.model.layers:
        target = layer_outputs(layer, target, kwargs)  # [n, L, D]: the float model's last hidden states

    def last_hidden(alpha: float) -> torch.Tensor:
        model = tiny_llama(seed=3, dtype=torch.float32, num_layers=4)
        gptq_model_(model, ids, 4, 32, torch.float32, propagation=alpha)
        hidden = inputs
        for layer in model.model.layers:
            hidden = layer_outputs(layer, hidden, kwargs)
        return hidden

    plain, corrected = last_hidden(0.0), last_hidden(1.0)
    error = lambda h: ((h - target) ** 2).mean()  # noqa: E731
    assert error(corrected) < 0.9 * error(plain)
    layer = tiny_llama(seed=3, dtype=torch.float32, num_layers=4).model.layers[0]
    copy_ = tiny_llama(seed=3, dtype=torch.float32, num_layers=4).model.layers[0]
    codes_a, _ = gptq_layer(layer, inputs, kwargs, 4, 32, torch.float32)
    codes_b, _ = gptq_layer(copy_, inputs, kwargs, 4, 32, torch.float32, reference=(copy_, inputs), propagation=0.0)
    assert all(torch.equal(codes_a[n][0], codes_b[n][0]) for n in codes_a)


def test_group_statistics_hessian_and_delta():
    """The group's Hessian is Xᵀ X / T of what its first linear sees (the MLP's gate_proj: the
    post-norm hidden states); against an identical copy Δ is 0, against a perturbed float copy it is
    (X_f − X)ᵀ X / T, both checked against inputs captured by a plain forward pre-hook."""
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(4))
    model = tiny_llama(seed=5, dtype=torch.float32, num_layers=1)
    inputs, kwargs = capture_layer_inputs(model, ids)  # [n, L, D]
    layer = model.model.layers[0]
    group = ("mlp.gate_proj", "mlp.up_proj")
    float_layer = tiny_llama(seed=5, dtype=torch.float32, num_layers=1).model.layers[0]
    with torch.no_grad():
        float_layer.self_attn.o_proj.weight.mul_(1.5)  # the float chain's MLP input differs from the quantized one's

    def mlp_inputs(module: torch.nn.Module) -> torch.Tensor:  # [n * L, D], float64
        seen = []
        handle = module.mlp.gate_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0][0].double()))
        layer_outputs(module, inputs, kwargs)
        handle.remove()
        return torch.cat(seen)

    x, x_f = mlp_inputs(layer), mlp_inputs(float_layer)
    hessian, delta = group_statistics(layer, group, inputs, kwargs)
    torch.testing.assert_close(hessian, x.T @ x / len(x))
    assert delta is None
    same = tiny_llama(seed=5, dtype=torch.float32, num_layers=1).model.layers[0]  # an identical float copy
    _, delta_same = group_statistics(layer, group, inputs, kwargs, (same, inputs))
    assert torch.count_nonzero(delta_same) == 0
    _, delta_f = group_statistics(layer, group, inputs, kwargs, (float_layer, inputs))
    torch.testing.assert_close(delta_f, (x_f - x).T @ x / len(x))
    assert delta_f.abs().max() > 0
