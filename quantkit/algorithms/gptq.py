"""GPTQ: quantize a linear's columns one at a time, spreading each rounding error over the rest.

For a linear ``W [N, K]`` and calibration inputs ``X [T, K]``, GPTQ minimizes
``‖X Wᵀ - X Qᵀ‖²`` column by column with the Hessian ``H = Xᵀ X / T [K, K]``: after rounding
column ``j`` the error ``(w_j - q_j) / U_jj`` is pushed onto the columns not yet rounded through
row ``j`` of ``U``, the upper Cholesky factor of ``H⁻¹``. Rounding itself is the shared
primitives' ``quantize`` with symmetric per-group scales, exactly as RTN, so the codes and
scales fit the packed format and every kernel unchanged.

* **Damping**: ``H += damp · mean(diag H) · I`` (default 1%); columns never activated
  (``H_jj = 0``) are zeroed and get ``H_jj = 1``.
* **Scales**: without act-order a group's scale is chosen when GPTQ reaches its first column,
  from the weights as updated so far. With **act-order** (columns in decreasing ``H_jj``) the
  scales are *static*: chosen from the original weights before any column moves, so groups stay
  the contiguous 32-column blocks of the format and the kernel does not change. Either way the
  scale is amax or the primitives' clip search (``clip``).
* **Scale refit** (``refit``): with the codes fixed, the objective is quadratic in the scales, so
  each output row's G scales are re-solved by least squares (a G×G system per row); a row keeps
  its scales unless the refit, rounded to the stored dtype, lowers its error.
* **Error propagation** (``propagation`` α, QEP): a layer's inputs ``X`` already carry the error of
  the layers quantized before it, while the float model would have fed it ``X_f``. GPTQ then
  quantizes the corrected weight ``W + α W Δ H⁻¹`` with ``Δ = (X_f − X)ᵀ X / T [K, K]`` (``H``
  damped): at α = 1 that is the least-squares map taking the inputs it gets to the float outputs,
  so ``‖X_f Wᵀ − X Qᵀ‖²`` is what GPTQ minimizes; α < 1 shrinks the correction (it is fitted on
  the calibration windows). α = 0 is plain GPTQ. The float inputs come from a float copy of
  each layer run beside it (:func:`gptq_model_` keeps that chain).
* :func:`gptq_layer` runs one decoder layer **true-sequentially**: q/k/v from the layer's inputs,
  then o_proj from inputs computed with q/k/v already quantized, then gate/up, then down — each
  group's Hessian comes from a forward pass that stops right after the group, and the layer's
  weights are replaced by their dequantized values as it goes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from quantkit.primitives import MIN_SCALE, choose_scales, dequantize, quantize
from quantkit.scheme import WeightClip

#: the linears of a Llama block in true-sequential groups (those in a group share one input)
SEQUENTIAL_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int,
                  scale_dtype: torch.dtype = torch.float32, damp: float = 0.01, act_order: bool = False,
                  block_size: int = 128, clip: WeightClip = WeightClip.AMAX,
                  refit: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[N, K]`` (int8) and scales ``[N, K/group_size]`` for ``weight [N, K]`` given ``hessian [K, K]``.

    ``refit``: once the codes are fixed, re-solve each row's scales by least squares on the
    (damped) Hessian (:func:`refit_scales`).
    """
    w = weight.detach().double().clone()  # [N, K], updated in place as errors are spread
    h = hessian.detach().double().clone()
    n, k = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k)
    target, h_damped = w.clone(), h.clone()  # [N, K], [K, K] in the original column order
    w, h = w[:, perm], h[perm][:, perm]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # [K, K]
    # static scales (act-order) come from the original weights, group by original column
    scales = choose_scales(target, bits, group_size, scale_dtype, clip) if act_order else \
        torch.zeros(n, k // group_size, dtype=scale_dtype)
    codes = torch.zeros(n, k, dtype=torch.int8)
    block = max(group_size, block_size // group_size * group_size)  # whole groups per block (lazy scales)
    for start in range(0, k, block):
        end = min(start + block, k)
        err_block = torch.zeros(n, end - start, dtype=torch.float64)
        for i in range(start, end):
            col = int(perm[i])
            g = col // group_size
            if not act_order and col % group_size == 0:  # without act-order perm is the identity
                scales[:, g] = choose_scales(w[:, i : i + group_size], bits, None, scale_dtype, clip)[:, 0]
            s = scales[:, g : g + 1]  # [N, 1]
            q = quantize(w[:, i : i + 1], s, bits, group_size=1)  # [N, 1] int8
            codes[:, col] = q[:, 0]
            err = (w[:, i] - dequantize(q, s, group_size=1, dtype=torch.float64)[:, 0]) / u[i, i]  # [N]
            w[:, i + 1 : end] -= err[:, None] * u[i, i + 1 : end][None, :]
            err_block[:, i - start] = err
        w[:, end:] -= err_block @ u[start:end, end:]
    if refit:
        scales = refit_scales(target, h_damped, codes, scales, group_size)
    return codes, scales


def refit_scales(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                 group_size: int, chunk: int = 64) -> torch.Tensor:
    """Least-squares scales for fixed ``codes [N, K]``: per row, ``min_s (w - q∘s) H (w - q∘s)ᵀ``.

    Per output row ``n`` the G = K / group_size scales solve ``A s = c`` with
    ``A[a, b] = Σ q[a, i] H[a i, b j] q[b, j]`` and ``c[a] = Σ q[a, i] (w H)[a i]``. A row keeps its
    scales unless the refit (after rounding to the stored dtype) lowers its error.
    """
    n, k = weight.shape
    groups = k // group_size
    w, h = weight.double(), hessian.double()
    hg = h.reshape(k, groups, group_size).permute(1, 0, 2)  # [G, K, gs]: H's columns by group
    q = codes.double().reshape(n, groups, group_size)  # [N, G, gs]
    c = (q * (w @ h).reshape(n, groups, group_size)).sum(-1)  # [N, G]
    out = scales.clone()
    for start in range(0, n, chunk):
        qc = q[start : start + chunk]
        hq = torch.bmm(hg, qc.permute(1, 2, 0)).permute(2, 1, 0)  # [c, K, G]: H M_n, M_n = codes by group
        a = (qc[..., None] * hq.reshape(len(qc), groups, group_size, groups)).sum(2)  # [c, G, G]
        cc = c[start : start + chunk]
        s0 = scales[start : start + chunk].double()
        ridge = 1e-6 * a.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-30)[:, None, None]  # empty groups
        eye = torch.eye(groups, dtype=torch.float64)
        s = torch.linalg.solve(a + ridge * eye, (cc + ridge[:, :, 0] * s0)[..., None])[..., 0]
        s = s.clamp(min=MIN_SCALE).to(scales.dtype)

        def obj(x: torch.Tensor) -> torch.Tensor:  # [c]: the row's error up to the constant w H wᵀ
            x = x.double()
            return (x[:, None, :] @ a @ x[:, :, None])[:, 0, 0] - 2 * (cc * x).sum(-1)

        better = obj(s) < obj(s0)
        out[start : start + chunk] = torch.where(better[:, None], s, scales[start : start + chunk])
    return out


class HessianHook:
    """Accumulates ``Xᵀ X / T`` of a linear's inputs (after any pre-hook transforms) in float64."""

    def __init__(self, module: nn.Linear):
        k = module.in_features
        self.hessian = torch.zeros(k, k, dtype=torch.float64)
        self.tokens = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, _module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [T, K]
        self.hessian *= self.tokens / (self.tokens + x.shape[0])
        self.tokens += x.shape[0]
        self.hessian += x.T @ x / self.tokens


class InputHook:
    """Keeps the latest input ``[T, K]`` (after any pre-hook transforms) a linear saw, in float64."""

    def __init__(self, module: nn.Linear):
        self.x: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, _module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        self.x = args[0].detach().reshape(-1, args[0].shape[-1]).double()


def propagation_target(weight: torch.Tensor, hessian: torch.Tensor, delta: torch.Tensor, alpha: float,
                       damp: float = 0.01) -> torch.Tensor:
    """``W + α W Δ H⁻¹`` ``[N, K]``: the weight whose outputs on the quantized inputs best match the
    float layer's on the float inputs (α = 1), for ``delta`` ``Δ = (X_f − X)ᵀ X / T`` and ``hessian``
    ``H = Xᵀ X / T`` (damped as :func:`gptq_quantize` damps it)."""
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    w = weight.double()
    # solve for (W Δ) H⁻¹ with H symmetric: Hᵀ Zᵀ = (W Δ)ᵀ
    correction = torch.linalg.solve(h, (w @ delta.double()).T).T  # [N, K]
    return (w + alpha * correction).to(weight.dtype)


class _Stop(Exception):
    """Raised by a hook to end a calibration forward pass once the wanted inputs are seen."""


def gptq_layer(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict, bits: int, group_size: int,
               scale_dtype: torch.dtype, damp: float = 0.01, act_order: bool = False,
               clip: WeightClip = WeightClip.AMAX, refit: bool = False,
               reference: tuple[nn.Module, torch.Tensor] | None = None, propagation: float = 0.0,
               ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """GPTQ every linear of one decoder ``layer`` on its ``inputs [n, L, D]`` (one sample per forward).

    Returns ``{name: (codes, scales)}`` (names relative to the layer) and the quantized layer's
    outputs ``[n, L, D]`` — the next layer's inputs. The layer's float weights are left holding
    the dequantized values. ``reference``: the float layer and its float inputs ``[n, L, D]``,
    for the error-propagation correction at strength ``propagation`` (module docstring).
    """
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for group in SEQUENTIAL_GROUPS:
        mods = [layer.get_submodule(name) for name in group]
        with_reference = reference is not None and propagation
        hessian, delta = group_statistics(layer, group, inputs, layer_kwargs,
                                          reference if with_reference else None)
        # one GPTQ pass over the group's weights stacked by output rows: [sum N, K]
        stacked = torch.cat([mod.weight.detach().float() for mod in mods])
        if delta is not None:
            stacked = propagation_target(stacked, hessian, delta, propagation, damp)
        codes, scales = gptq_quantize(stacked, hessian, bits, group_size, scale_dtype, damp, act_order,
                                      clip=clip, refit=refit)
        rows = [mod.out_features for mod in mods]
        for name, mod, c, s in zip(group, mods, codes.split(rows), scales.split(rows), strict=True):
            with torch.no_grad():
                mod.weight.copy_(dequantize(c, s, group_size, mod.weight.dtype))
            results[name] = (c.contiguous(), s.contiguous())
    return results, layer_outputs(layer, inputs, layer_kwargs)


def group_statistics(layer: nn.Module, group: tuple[str, ...], inputs: torch.Tensor, layer_kwargs: dict,
                     reference: tuple[nn.Module, torch.Tensor] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What one true-sequential ``group`` of ``layer``'s linears sees over ``inputs [n, L, D]``.

    Returns ``H = Xᵀ X / T`` ``[K, K]`` of the group's shared input ``X`` and, given ``reference``
    (the float layer and its own inputs ``[n, L, D]``), ``Δ = (X_f − X)ᵀ X / T`` ``[K, K]`` with
    ``X_f`` what the float layer's group sees (else None). Each forward ends after the group's last
    linear, one sample at a time (bounding the activations' memory).
    """
    first = layer.get_submodule(group[0])
    gram = HessianHook(first)
    seen = float_seen = None
    stops = []
    if reference is not None:
        seen, float_seen = InputHook(first), InputHook(reference[0].get_submodule(group[0]))
        stops.append(_stop_after(reference[0].get_submodule(group[-1])))
        delta = torch.zeros_like(gram.hessian)  # Σ (x_f − x)ᵀ x, [K, K]
    # registered after the input hooks: a one-linear group's stop must not fire before they record
    stops.append(_stop_after(layer.get_submodule(group[-1])))
    try:
        with torch.no_grad():
            for i, x in enumerate(inputs):  # [L, D]
                _run_until_stop(layer, x, layer_kwargs)
                if seen is not None:
                    _run_until_stop(reference[0], reference[1][i], layer_kwargs)
                    delta += (float_seen.x - seen.x).T @ seen.x
    finally:
        for handle in [*stops, gram.handle] + ([seen.handle, float_seen.handle] if seen else []):
            handle.remove()
    return gram.hessian, (delta / gram.tokens if seen is not None else None)


@torch.no_grad()
def layer_outputs(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """``layer`` on each sample of ``inputs [n, L, D]``: its outputs ``[n, L, D]``."""
    return torch.stack([layer(x[None], **layer_kwargs)[0] for x in inputs])


def _stop_after(module: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """End every forward pass right after ``module`` runs (:func:`_run_until_stop` catches it)."""
    def stop(*_) -> None:
        raise _Stop
    return module.register_forward_hook(stop)


def _run_until_stop(layer: nn.Module, x: torch.Tensor, layer_kwargs: dict) -> None:
    """One sample ``x [L, D]`` through ``layer`` until a hook raises :class:`_Stop`."""
    try:
        layer(x[None], **layer_kwargs)
    except _Stop:
        pass


def capture_layer_inputs(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The first decoder layer's inputs ``[n, L, D]`` for token windows ``ids [n, L]``, and the
    keyword arguments the model passes every layer (mask, position embeddings; same for all windows)."""
    first = model.model.layers[0]
    captured: list[torch.Tensor] = []
    kwargs: dict = {}

    def grab(_mod: nn.Module, args: tuple, kw: dict) -> None:
        captured.append(args[0].detach()[0] if args else kw["hidden_states"].detach()[0])
        kwargs.update({k: v for k, v in kw.items() if k not in ("hidden_states", "cache", "past_key_values",
                                                                 "use_cache")})
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for row in ids:
                try:
                    model(row[None], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return torch.stack(captured), kwargs


def gptq_model_(model: nn.Module, ids: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype,
                clip: WeightClip = WeightClip.AMAX, refit: bool = True,
                on_layer: Callable[[int], None] | None = None, propagation: float = 0.0) -> dict[str, torch.Tensor]:
    """GPTQ of every block linear of ``model`` on windows ``ids [n, L]``, layer by layer, in place.

    Each layer sees the previous quantized layers' outputs. The float weights are left holding
    the dequantized values; returns each linear's scales ``[N, K / group_size]`` by model name.
    ``on_layer(i)`` runs after layer ``i`` (progress). ``propagation`` > 0 also runs each layer's
    float copy on the float model's inputs, for the correction of the module docstring.
    """
    inputs, layer_kwargs = capture_layer_inputs(model, ids)  # [n, L, D]; kwargs: mask, rotary cos/sin
    float_inputs = inputs  # [n, L, D]: the float model's, kept beside the quantized chain's
    scales: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        reference = (copy.deepcopy(layer), float_inputs) if propagation else None
        result, inputs = gptq_layer(layer, inputs, layer_kwargs, bits, group_size, scale_dtype, clip=clip,
                                    refit=refit, reference=reference, propagation=propagation)
        if reference is not None:
            float_inputs = layer_outputs(reference[0], float_inputs, layer_kwargs)
        scales.update({f"model.layers.{i}.{name}": s for name, (_, s) in result.items()})
        if on_layer is not None:
            on_layer(i)
    return scales
