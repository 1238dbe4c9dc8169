"""Quantization-aware training by module swap: float weights, the packed kernel's math in the forward.

``QATLinear`` and ``QATEmbedding`` subclass ``nn.Linear`` / ``nn.Embedding`` and keep the float
weight as the trainable parameter. Their forward is, op for op, what the reference kernel computes
from the packed checkpoint (see :mod:`quantkit.kernels.reference`): activations fake-quantized per
token in float32, weights fake-quantized with the scheme's bits, group size and scale dtype, the
product in float32, cast back to the input's dtype. Gradients pass straight through both
roundings (:func:`quantkit.primitives.fake_quantize`).

The int4 group scales are either recomputed from the weight at every forward (the scheme's
``weight_clip``, as RTN chooses them) or **learned** (``learn_scales``): a ``weight_scale``
parameter ``[N, K / group_size]``, initialised to the scheme's choice and trained beside the
weights with LSQ gradients (:func:`quantkit.primitives.fake_quantize_learned`); the checkpoint
then stores those scales, so the packed model still computes exactly what QAT trained.

Because they *are* ``nn.Linear`` / ``nn.Embedding``, ``quantkit.modules.quantize_`` converts a
QAT model (``convert_qat``), rounding each int4 linear's trained weights with the scales its
forward used, which is exactly the grid it trained on: the packed model then computes what the
QAT model computed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from quantkit.kernels import hadamard
from quantkit.modules import InputTransform, Kind, Plan, plan_for, quantize_, untie_embeddings
from quantkit.primitives import MIN_SCALE, choose_scales, fake_quantize, fake_quantize_learned, quantize
from quantkit.scheme import Scheme, WeightClip

log = logging.getLogger(__name__)


class QATLinear(nn.Linear):
    """``nn.Linear`` whose forward fake-quantizes weights (per group) and activations (per token)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_bits: int,
                 group_size: int | None, act_bits: int | None, scale_dtype: torch.dtype,
                 weight_clip: WeightClip = WeightClip.AMAX, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_bits, self.group_size, self.act_bits = weight_bits, group_size, act_bits
        self.scale_dtype, self.weight_clip = scale_dtype, weight_clip
        # SpinQuant's R4 before down_proj: H folded into the weight, applied to x here as the packed
        # Int4Linear applies it (an unmerged LoRA adapter around this module still sees x itself)
        self.input_transform = InputTransform.NONE
        self.register_parameter("weight_scale", None)  # learn_scales() makes the group scales a parameter

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_bits: int, group_size: int | None, act_bits: int | None,
                    scale_dtype: torch.dtype, weight_clip: WeightClip = WeightClip.AMAX) -> QATLinear:
        """Wrap ``linear``'s own parameters (shared, not copied)."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_bits, group_size,
                  act_bits, scale_dtype, weight_clip, device="meta")  # no allocation: the parameters are reassigned
        mod.weight = linear.weight
        mod.bias = linear.bias
        return mod

    def learn_scales(self, init: torch.Tensor | None = None) -> None:
        """Make the group scales a trainable float32 parameter, from ``init`` or the scheme's choice."""
        if init is None:
            init = choose_scales(self.weight.detach(), self.weight_bits, self.group_size, self.scale_dtype,
                                 self.weight_clip)  # [N, K / group_size]
        elif init.shape != (self.out_features, self.in_features // self.group_size):
            raise ValueError(f"initial scales {tuple(init.shape)} do not fit a {self.out_features}x"
                             f"{self.in_features} weight in groups of {self.group_size}")
        self.weight_scale = nn.Parameter(init.detach().float().clone())

    def scales(self) -> torch.Tensor:
        """The scales the forward uses now, in the scheme's scale dtype (what a checkpoint stores)."""
        if self.weight_scale is not None:
            return self.weight_scale.detach().clamp(min=MIN_SCALE).to(self.scale_dtype)
        return choose_scales(self.weight.detach(), self.weight_bits, self.group_size, self.scale_dtype,
                             self.weight_clip)

    def fake_quantized_weight(self) -> torch.Tensor:
        """The weight ``[N, K]`` (float32) the forward multiplies by: on the int grid, STE gradients."""
        if self.weight_scale is None:
            return fake_quantize(self.weight.float(), self.weight_bits, self.group_size, self.scale_dtype,
                                 self.weight_clip)
        return fake_quantize_learned(self.weight, self.weight_scale, self.weight_bits, self.group_size,
                                     self.scale_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is InputTransform.HADAMARD:
            x = hadamard(x)  # [..., K]: x Hᵀ / sqrt(K) in x's dtype, as the packed linear transforms it
        xf = x.float()
        xq = xf if self.act_bits is None else fake_quantize(xf, self.act_bits, None)  # [..., K] per token
        out = nn.functional.linear(xq, self.fake_quantized_weight())
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_bits={self.weight_bits}, group_size={self.group_size}, "
                f"act_bits={self.act_bits}"
                + ("" if self.input_transform is InputTransform.NONE else f", input_transform={self.input_transform.value}"))


class QATEmbedding(nn.Embedding):
    """``nn.Embedding`` whose rows are fake-quantized per row (one scale per vocabulary row)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, scale_dtype: torch.dtype,
                 padding_idx: int | None = None, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        self.bits, self.scale_dtype = bits, scale_dtype

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, scale_dtype: torch.dtype) -> QATEmbedding:
        mod = cls(emb.num_embeddings, emb.embedding_dim, bits, scale_dtype, emb.padding_idx, device="meta")
        mod.weight = emb.weight
        return mod

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Scales are per row, so quantizing only the gathered rows [..., D] equals quantizing the table.
        rows = nn.functional.embedding(ids, self.weight, self.padding_idx)
        return fake_quantize(rows.float(), self.bits, None, self.scale_dtype).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"


def prepare_qat(model: nn.Module, scheme: Scheme, learn_scales: bool = False,
                init_scales: dict[str, torch.Tensor] | None = None) -> Plan:
    """Swap every module the scheme quantizes for its fake-quantized twin, in place; returns the plan.

    Block linears: int4 per group with int8 per-token activations (``learn_scales``: their group
    scales become parameters, starting from ``init_scales[name]`` ``[N, K / group_size]`` where
    given, e.g. GPTQ's, else from the scheme's choice); head: int8 per channel with int8
    activations; embedding: int8 per row. What the scheme leaves float stays ``nn.Linear``.
    """
    init_scales = init_scales or {}
    if scheme.untie_embeddings:
        untie_embeddings(model)
    plan = plan_for(model, scheme)
    for name, reason in plan.unquantized.items():
        log.warning("leaving %s unquantized: %s", name, reason)
    sd = scheme.scale_dtype.torch
    for name, kind in plan.modules.items():
        mod = model.get_submodule(name)
        if kind is Kind.INT4_LINEAR:
            new = QATLinear.from_linear(mod, scheme.linear_bits, scheme.group_size, scheme.act_bits, sd,
                                        scheme.weight_clip)
            if learn_scales:
                new.learn_scales(init_scales.get(name))
        elif kind is Kind.INT8_LINEAR:
            new = QATLinear.from_linear(mod, scheme.head_bits, None, scheme.act_bits, sd)
        else:
            new = QATEmbedding.from_embedding(mod, scheme.embedding_bits, sd)
        _set_submodule(model, name, new)
    return plan


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters whose trained values the checkpoint keeps, by name; freezes all the others.

    Kept: the linears' and embeddings' (quantized ones are stored on their integer grids, rounded
    from float32 master weights at conversion) and the LoRA adapters'. Frozen: everything else,
    i.e. the RMSNorm gains, which the checkpoint releases in bf16. Near 1 (a rotated model's gains
    are exactly 1) bf16's step is 2^-8 to 2^-7, while a QAT run moves a gain by ~1e-3: trained,
    the gains would be rounded back at release and the int4 weights fitted to gains the checkpoint
    does not have (on SmolLM2: the QAT model 19.97, its release 20.03 on 2 windows of 2048).
    Frozen, the released model computes what was trained.
    """
    from quantkit.training.lora import LoRALinear

    kept = {}
    for prefix, mod in model.named_modules():
        for name, param in mod.named_parameters(recurse=False):
            if isinstance(mod, nn.Linear | nn.Embedding | LoRALinear):
                kept[f"{prefix}.{name}" if prefix else name] = param
            else:
                param.requires_grad_(False)
    return kept


#: learning rate of learned scales relative to the weights' (a scale moves every weight of its group)
SCALE_LR_RATIO = 0.1


def scale_lr_ratios(params: dict[str, nn.Parameter]) -> dict[str, float]:
    """``loops.train``'s ``lr_ratios`` for the learned scales among ``params`` (by name)."""
    return {name: SCALE_LR_RATIO for name in params if name.endswith(".weight_scale")}


def grid_lr_ratios(model: nn.Module) -> dict[str, float]:
    """Per int4 linear, lr ratios that move every layer by the same fraction of its int4 grid step.

    AdamW moves each weight by about the learning rate, whatever its gradient's size, and the
    group scales (the grid steps) of a rotated Llama differ a hundredfold between layers (e.g.
    SmolLM2's first v_proj against its down_projs): one learning rate then rewrites the small
    layers' codes and leaves the large ones' unmoved. Each linear's ``weight`` (and ``weight_scale``,
    on top of its :data:`SCALE_LR_RATIO`) gets ``median(its scales) / median over linears``; the
    ratios are read from the scales at the call, so a stage computes them before it trains.
    """
    medians = {name: mod.scales().float().median().item() for name, mod in model.named_modules()
               if isinstance(mod, QATLinear) and mod.group_size is not None}
    if not medians:
        return {}
    ref = torch.tensor(list(medians.values())).median().item()
    ratios = {}
    for name, median in medians.items():
        ratios[f"{name}.weight"] = median / ref
        ratios[f"{name}.weight_scale"] = SCALE_LR_RATIO * median / ref
    return ratios


def convert_qat(model: nn.Module, scheme: Scheme) -> Plan:
    """Replace the QAT modules by packed ones: the trained weights on the grid QAT trained on.

    Each int4 linear is rounded with the scales its forward used (recomputed, or learned), so
    the packed model computes what the QAT model computed.

    LoRA wrappers stay in place around their (now packed) base linear; the plan names the base
    linears by their model names, as in every other checkpoint.
    """
    from quantkit.training.lora import LoRALinear

    wrappers = {name: mod for name, mod in model.named_modules() if isinstance(mod, LoRALinear)}
    for name, wrapper in wrappers.items():  # unwrap: quantize_ sees the model's own linears
        _set_submodule(model, name, wrapper.base)
    scales = {name: mod.scales() for name, mod in model.named_modules()
              if isinstance(mod, QATLinear) and mod.group_size is not None}

    def codes(name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize(weight, scales[name], scheme.linear_bits, scheme.group_size), scales[name]

    transforms = {name: mod.input_transform for name, mod in model.named_modules() if isinstance(mod, QATLinear)}
    plan = quantize_(model, scheme, codes, input_transforms=transforms)
    for name, wrapper in wrappers.items():  # rewrap around the packed linear
        wrapper.base = model.get_submodule(name)
        _set_submodule(model, name, wrapper)
    return plan


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
