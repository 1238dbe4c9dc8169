"""LoRA as a wrapper module: ``y = base(x) + (alpha / rank) * B (A x)``, never merged unless asked.

``LoRALinear(base, rank, alpha)`` wraps any linear — ``nn.Linear``, a ``QATLinear``, a packed
``Int4Linear``. Over a float or fake-quantized base it adds the low-rank term from the
*unquantized* input itself; over a packed ``Int4Linear`` it hands the adapter to the kernel entry
point as a :class:`~quantkit.kernels.SidePath`, which both kernels add in float32 before the
output is rounded (the fast CPU kernel fuses it into the same op call, so a QLoRA checkpoint
decodes at nearly the speed of a plain one). ``B`` starts at zero, so a fresh adapter changes nothing.

In a checkpoint the wrapped linear's tensors are ``<name>.base.*`` and the adapter's are
``<name>.lora_A [rank, in]`` and ``<name>.lora_B [out, rank]``; ``quantkit.json`` records
``{"rank", "alpha", "dtype", "modules"}`` under ``"lora"`` so loading rebuilds the wrappers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from quantkit.algorithms.gptq import (SEQUENTIAL_GROUPS, capture_layer_inputs, group_statistics, layer_outputs,
                                      propagation_target)
from quantkit.errors import QuantkitError
from quantkit.kernels import SidePath
from quantkit.modules import Int4Linear, block_linear_names


class LoRALinear(nn.Module):
    """A linear plus an unmerged low-rank side path of rank ``rank`` scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dtype: torch.dtype | None = None,
                 name: str = "this layer"):
        super().__init__()
        in_f, out_f = base.in_features, base.out_features
        if not 1 <= rank <= min(in_f, out_f):
            raise QuantkitError(f"LoRA rank must be between 1 and min(in, out) = {min(in_f, out_f)} of {name} "
                                f"({in_f} -> {out_f}), got {rank}")
        self.base, self.rank, self.alpha = base, rank, float(alpha)
        self.in_features, self.out_features = in_f, out_f
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, dtype=dtype))  # [r, K]
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, dtype=dtype))  # [N, r]; zero: starts as a no-op
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initializes its weight

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, Int4Linear):  # packed backbone: the kernel adds the side path in the same call
            return self.base(x, SidePath(self.lora_A, self.lora_B, self.scaling))
        y = self.base(x)  # [..., N], the base's own (float or fake-quantized) math
        side = nn.functional.linear(nn.functional.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (side * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The merged update ``(alpha / rank) B A`` ``[N, K]`` in float32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


@torch.no_grad()
def init_from_error_(wrapper: LoRALinear, error: torch.Tensor, gram: torch.Tensor | None = None,
                     damp: float = 0.01) -> None:
    """Start the adapter at the best rank-r approximation of ``error`` ``[N, K]`` (LoftQ's init).

    ``(alpha / r) B A`` then stands in for what the base's quantized weight lost (``error`` = float
    weight minus quantized weight, as a map of the adapter's input ``x``). With ``gram`` ``[K, K]``
    (``Σ x xᵀ`` over calibration tokens) the approximation is the best in the norm that outputs
    see, ``‖(E − BA) X‖``: the SVD of ``E G^½``, mapped back by ``G^-½`` (``damp`` times the mean
    diagonal is added to ``G`` first, as GPTQ does). Without it, the best in the Frobenius norm.
    """
    r, e = wrapper.rank, error.double()
    back = None
    if gram is not None:
        g = gram.double()
        g = g + damp * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
        ev, v = torch.linalg.eigh(g)  # G = V diag(ev) Vᵀ, ev > 0 after damping
        e = e @ ((v * ev.sqrt()) @ v.T)  # E G^½
        back = (v / ev.sqrt()) @ v.T  # G^-½
    u, sig, vt = torch.linalg.svd(e, full_matrices=False)
    b = u[:, :r] * sig[:r].sqrt()  # [N, r]
    a = sig[:r].sqrt()[:, None] * vt[:r]  # [r, K]
    if back is not None:
        a = a @ back
    wrapper.lora_B.copy_(b / wrapper.scaling)
    wrapper.lora_A.copy_(a)


@torch.no_grad()
def init_sequential_(model: nn.Module, float_weights: dict[str, torch.Tensor],
                     quantized_weights: dict[str, torch.Tensor], ids: torch.Tensor, propagation: float = 1.0,
                     on_layer: Callable[[int], None] | None = None) -> None:
    """Start every adapter from what its layer lost, layer by layer, the earlier adapters already in place.

    ``float_weights`` / ``quantized_weights``: each wrapped linear's float and quantized weight
    ``[N, K]`` as maps of the adapter's own input ``x`` (by model name; a name missing from
    ``quantized_weights`` lost nothing, its ``B`` stays 0). The blocks run on windows ``ids [n, L]``
    in GPTQ's true-sequential groups, beside a float copy of each layer fed the float chain's
    inputs. A group's adapters then approximate, at rank r and in the norm its inputs ``X`` see,
    ``propagation_target(W) − Q``: the weight taking the inputs the quantized chain gives it to the
    float layer's outputs on the float inputs (``propagation`` = 1), minus the quantized weight.
    At 0 it is :func:`init_from_error_` with inputs from the already-corrected chain. Both chains
    start from the model's own first-layer inputs (its int8 embedding's).
    """
    inputs, layer_kwargs = capture_layer_inputs(model, ids)  # [n, L, D]; kwargs: mask, rotary cos/sin
    float_inputs = inputs  # [n, L, D]: the float chain's
    prefix = _layers_prefix(model)
    for i, layer in enumerate(model.model.layers):
        names = {name: f"{prefix}{i}.{name}" for group in SEQUENTIAL_GROUPS for name in group}
        reference = copy.deepcopy(layer)  # float copy: each wrapper -> a plain linear with the float weight
        for name, full in names.items():
            _set_submodule(reference, name, _plain_linear(float_weights[full], layer.get_submodule(name).base.bias))
        for group in SEQUENTIAL_GROUPS:
            hessian, delta = group_statistics(layer, group, inputs, layer_kwargs, (reference, float_inputs))
            for name in group:
                full = names[name]
                if full not in quantized_weights:
                    continue
                target = propagation_target(float_weights[full].double(), hessian, delta, propagation)
                init_from_error_(layer.get_submodule(name), target - quantized_weights[full].double(), hessian)
        inputs = layer_outputs(layer, inputs, layer_kwargs)
        float_inputs = layer_outputs(reference, float_inputs, layer_kwargs)
        if on_layer is not None:
            on_layer(i)


def add_lora(model: nn.Module, rank: int, alpha: float, names: list[str] | None = None,
             dtype: torch.dtype | None = None) -> list[str]:
    """Wrap every linear of every transformer block (or ``names``) in ``LoRALinear``; returns the names."""
    names = block_linear_names(model) if names is None else names
    for name in names:
        base = model.get_submodule(name)
        wrapper = LoRALinear(base, rank, alpha, dtype=dtype or _param_dtype(base), name=name)
        _set_submodule(model, name, wrapper)
    return names


def check_rank(model: nn.Module, rank: int, runs: int = 1) -> None:
    """Refuse a rank no block linear can hold, before any training starts (``runs`` averaged adapters
    of rank ``rank`` become one of rank ``runs * rank``: :func:`add_averaged_lora`)."""
    for name in block_linear_names(model):
        mod = model.get_submodule(name)
        most = min(mod.in_features, mod.out_features)
        if not 1 <= rank <= most:
            raise QuantkitError(f"--lora-rank must be between 1 and {most} "
                                f"(the smallest side of {name}, {mod.in_features} -> {mod.out_features}); "
                                f"got {rank}")
        if runs * rank > most:
            raise QuantkitError(f"--lora-runs {runs} at --lora-rank {rank} averages into one adapter of rank "
                                f"{runs * rank}, more than {name} ({mod.in_features} -> {mod.out_features}) "
                                f"can hold; keep runs x rank <= {most}")


def pop_lora(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Unwrap every adapter (the bases go back in place); returns each one's ``(A [r, K], B [N, r])`` by name."""
    popped = {}
    for name, wrapper in lora_modules(model).items():
        popped[name] = (wrapper.lora_A.detach().clone(), wrapper.lora_B.detach().clone())
        _set_submodule(model, name, wrapper.base)
    return popped


@torch.no_grad()
def add_averaged_lora(model: nn.Module, runs: list[dict[str, tuple[torch.Tensor, torch.Tensor]]],
                      alpha: float) -> None:
    """Wrap the linears of ``runs`` (:func:`pop_lora`'s, each of rank r at ``alpha``) in one adapter whose
    side path is the mean of theirs: rank ``n r``, ``A`` stacked ``[n r, K]``, ``B`` side by side
    ``[N, n r]``, so ``alpha / (n r) · B A = (1/n) Σ (alpha / r) B_i A_i``. The checkpoint format is
    unchanged: it is a plain adapter of rank ``n r``."""
    names = list(runs[0])
    if any(list(run) != names for run in runs):
        raise ValueError("the runs' adapters wrap different linears")
    ranks = {a.shape[0] for run in runs for a, _b in run.values()}
    if len(ranks) != 1:
        raise ValueError(f"the runs' adapters differ in rank ({sorted(ranks)})")
    add_lora(model, len(runs) * ranks.pop(), alpha, names, dtype=runs[0][names[0]][0].dtype)
    for name, wrapper in lora_modules(model).items():
        wrapper.lora_A.copy_(torch.cat([run[name][0] for run in runs], dim=0))
        wrapper.lora_B.copy_(torch.cat([run[name][1] for run in runs], dim=1))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def merge_lora_(model: nn.Module) -> None:
    """Fold every adapter into its float base weight (``W += (alpha/r) B A``) and drop the wrappers."""
    for name, wrapper in lora_modules(model).items():
        weight = getattr(wrapper.base, "weight", None)
        if weight is None:
            raise QuantkitError(f"cannot merge the adapter of {name}: its base has no float weight "
                                "(merge before converting to packed int4)")
        with torch.no_grad():
            weight.copy_((weight.float() + wrapper.delta_weight()).to(weight.dtype))
        _set_submodule(model, name, wrapper.base)


def lora_metadata(model: nn.Module) -> dict | None:
    """What ``quantkit.json`` records so that loading rebuilds the wrappers (None without adapters)."""
    mods = lora_modules(model)
    if not mods:
        return None
    first = next(iter(mods.values()))
    return {"rank": first.rank, "alpha": first.alpha, "dtype": str(first.lora_A.dtype).removeprefix("torch."),
            "modules": list(mods)}


def add_lora_from_metadata(model: nn.Module, meta: dict) -> None:
    add_lora(model, meta["rank"], meta["alpha"], meta["modules"], getattr(torch, meta["dtype"]))


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen float32 ``nn.Linear`` holding copies of ``weight [N, K]`` and ``bias [N]``."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return linear


def _layers_prefix(model: nn.Module) -> str:
    """The module-name prefix of the decoder layers (``model.layers.``)."""
    layers = model.model.layers
    return next(name for name, mod in model.named_modules() if mod is layers) + "."


def _param_dtype(mod: nn.Module) -> torch.dtype:
    weight = getattr(mod, "weight", None)
    return weight.dtype if weight is not None else torch.bfloat16  # packed linears: bf16 adapters


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
