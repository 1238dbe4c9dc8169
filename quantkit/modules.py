"""Quantized modules and ``quantize_``: quantization by module swap, never by forking model code.

``Int4Linear``, ``Int8Linear`` and ``Int8Embedding`` hold the portable tensors of
:mod:`quantkit.packing` as buffers (so ``state_dict`` is the checkpoint) and call the one kernel
entry point in :mod:`quantkit.kernels`. ``quantize_`` swaps a Llama model's float modules for
them according to a :class:`~quantkit.scheme.Scheme`; ``make_empty`` rebuilds the same modules
from checkpoint metadata before loading.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit import kernels
from quantkit.packing import pack_int4
from quantkit.primitives import choose_scales, quantize
from quantkit.scheme import Scheme

log = logging.getLogger(__name__)


class Kind(str, enum.Enum):
    """What a module became (recorded per module in checkpoint metadata)."""

    INT4_LINEAR = "int4_linear"
    INT8_LINEAR = "int8_linear"
    INT8_EMBEDDING = "int8_embedding"


class InputTransform(str, enum.Enum):
    """An online transform of an Int4Linear's input, applied before the kernel (recorded in metadata)."""

    NONE = "none"
    HADAMARD = "hadamard"  # x Hᵀ / sqrt(K), fast Walsh–Hadamard (SpinQuant's R4 before down_proj)


class Int4Linear(nn.Module):
    """Linear with packed int4 groupwise weights and optional per-token dynamic int8 activations."""

    def __init__(self, in_features: int, out_features: int, group_size: int, act_bits: int | None,
                 scale_dtype: torch.dtype, bias: bool = False, bias_dtype: torch.dtype = torch.bfloat16,
                 input_transform: InputTransform = InputTransform.NONE):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.act_bits = group_size, act_bits
        self.input_transform = InputTransform(input_transform)  # folded into the weight; applied online
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, in_features // group_size, dtype=scale_dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)
        self.kernel_cache: dict = {}  # backend-private repacked weights (see quantkit.kernels)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, group_size: int, act_bits: int | None,
                   bias: torch.Tensor | None = None) -> Int4Linear:
        """From int codes ``[N, K]`` in [-8, 7] and ``scales [N, K/g]`` (RTN, GPTQ and QAT all end here)."""
        n, k = codes.shape
        mod = cls(k, n, group_size, act_bits, scales.dtype, bias is not None,
                  bias.dtype if bias is not None else torch.bfloat16)
        mod.qweight = pack_int4(codes)
        mod.scales = scales.contiguous()
        mod.bias = None if bias is None else bias.detach().clone()
        return mod

    def forward(self, x: torch.Tensor, side: kernels.SidePath | None = None) -> torch.Tensor:
        """``x [..., K] -> [..., N]``; ``side`` is an unmerged LoRA adapter on the untransformed ``x``."""
        if self.input_transform is InputTransform.HADAMARD:
            y = kernels.linear_int4(kernels.hadamard(x), self.qweight, self.scales, self.group_size,
                                    self.act_bits, self.bias, self.kernel_cache)
            if side is None:
                return y
            return (y.float() + side.delta(x)).to(y.dtype)  # the adapter sees x, not H x
        return kernels.linear_int4(x, self.qweight, self.scales, self.group_size, self.act_bits,
                                   self.bias, self.kernel_cache, side)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, act_bits={self.act_bits}"
                + ("" if self.input_transform is InputTransform.NONE else f", input_transform={self.input_transform.value}"))


class Int8Linear(nn.Module):
    """Linear with int8 per-channel weights and optional per-token dynamic activations."""

    def __init__(self, in_features: int, out_features: int, act_bits: int | None, scale_dtype: torch.dtype,
                 bias: bool = False, bias_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.act_bits = in_features, out_features, act_bits
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(out_features, 1, dtype=scale_dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if bias else None)
        self.kernel_cache: dict = {}

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, act_bits: int | None,
                   bias: torch.Tensor | None = None) -> Int8Linear:
        n, k = codes.shape
        mod = cls(k, n, act_bits, scales.dtype, bias is not None, bias.dtype if bias is not None else torch.bfloat16)
        mod.qweight = codes.to(torch.int8).contiguous()
        mod.scales = scales.contiguous()
        mod.bias = None if bias is None else bias.detach().clone()
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear_int8(x, self.qweight, self.scales, self.act_bits, self.bias, self.kernel_cache)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, act_bits={self.act_bits}"


class Int8Embedding(nn.Module):
    """Embedding table with int8 codes and one scale per row; outputs ``dtype``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale_dtype: torch.dtype,
                 dtype: torch.dtype = torch.bfloat16, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype, self.padding_idx = dtype, padding_idx
        self.register_buffer("qweight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(num_embeddings, 1, dtype=scale_dtype))

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                   padding_idx: int | None = None) -> Int8Embedding:
        mod = cls(codes.shape[0], codes.shape[1], scales.dtype, dtype, padding_idx)
        mod.qweight = codes.to(torch.int8).contiguous()
        mod.scales = scales.contiguous()
        return mod

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return kernels.embedding_int8(ids, self.qweight, self.scales, self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}"


# ---------------------------------------------------------------------------------------------
# Which modules of a Llama model are quantized, and how


@dataclass
class Plan:
    """The module-level outcome of applying a scheme: name -> Kind, and what stayed float."""

    modules: dict[str, Kind] = field(default_factory=dict)
    unquantized: dict[str, str] = field(default_factory=dict)  # name -> reason
    input_transforms: dict[str, InputTransform] = field(default_factory=dict)  # Int4Linear name -> transform

    def to_dict(self) -> dict:
        d = {"modules": {k: v.value for k, v in self.modules.items()}, "unquantized": dict(self.unquantized)}
        if self.input_transforms:  # only written when used: older checkpoints stay byte-identical
            d["input_transforms"] = {k: v.value for k, v in self.input_transforms.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        return cls({k: Kind(v) for k, v in d["modules"].items()}, dict(d.get("unquantized", {})),
                   {k: InputTransform(v) for k, v in d.get("input_transforms", {}).items()})


def untie_embeddings(model: nn.Module) -> None:
    """Give ``lm_head`` its own copy of the embedding matrix, so each is quantized on its own."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False


def block_linear_names(model: nn.Module) -> list[str]:
    """Names of every nn.Linear inside the transformer blocks (q, k, v, o, gate, up, down)."""
    return [name for name, mod in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(mod, nn.Linear)]


def plan_for(model: nn.Module, scheme: Scheme) -> Plan:
    """Decide, per module, what the scheme makes of it (before any weight is touched)."""
    plan = Plan()
    for name in block_linear_names(model):
        k = model.get_submodule(name).in_features
        if k % scheme.group_size:
            plan.unquantized[name] = f"in_features {k} is not a multiple of group_size {scheme.group_size}"
        else:
            plan.modules[name] = Kind.INT4_LINEAR
    head_name = _name_of(model, model.get_output_embeddings())
    if scheme.head_bits is None:
        plan.unquantized[head_name] = "scheme.head_bits is None"
    else:
        plan.modules[head_name] = Kind.INT8_LINEAR
    emb_name = _name_of(model, model.get_input_embeddings())
    if scheme.embedding_bits is None:
        plan.unquantized[emb_name] = "scheme.embedding_bits is None"
    else:
        plan.modules[emb_name] = Kind.INT8_EMBEDDING
    return plan


def _name_of(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, mod in model.named_modules() if mod is target)


#: chooses int4 codes for one linear: (name, float weight [N, K]) -> (codes [N, K], scales [N, K/g])
Int4Codes = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rtn_codes(scheme: Scheme) -> Int4Codes:
    """Round-to-nearest: the scheme's scales, each weight rounded on its own."""
    def codes(name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ARG001
        scales = choose_scales(weight, scheme.linear_bits, scheme.group_size, scheme.scale_dtype.torch,
                               scheme.weight_clip)
        return quantize(weight, scales, scheme.linear_bits, scheme.group_size), scales
    return codes


def quantize_(model: nn.Module, scheme: Scheme, int4_codes: Int4Codes | None = None,
              progress: Callable[[str], None] | None = None,
              input_transforms: dict[str, InputTransform] | None = None) -> Plan:
    """Swap ``model``'s float modules for quantized ones in place; returns the plan applied.

    ``int4_codes`` chooses the block linears' integer codes (RTN by default; GPTQ passes its
    own). The head and the embedding are always per-channel RTN, as in the Llama 3.2 release.
    Layers the scheme cannot quantize stay float, with a warning naming them.
    ``input_transforms`` names Int4Linears whose input is transformed online (the transform must
    already be folded into their float weight); it is recorded in the plan.
    """
    if scheme.untie_embeddings:
        untie_embeddings(model)
    plan = plan_for(model, scheme)
    plan.input_transforms = {n: InputTransform(t) for n, t in (input_transforms or {}).items()
                             if plan.modules.get(n) is Kind.INT4_LINEAR and t is not InputTransform.NONE}
    for name, reason in plan.unquantized.items():
        log.warning("leaving %s unquantized: %s", name, reason)
    int4_codes = int4_codes or rtn_codes(scheme)
    for name, kind in plan.modules.items():
        float_mod = model.get_submodule(name)
        new = _quantized(float_mod, kind, scheme, lambda w, n=name: int4_codes(n, w))
        if name in plan.input_transforms:
            new.input_transform = plan.input_transforms[name]
        _set_submodule(model, name, new)
        if progress:
            progress(name)
    return plan


def _quantized(mod: nn.Module, kind: Kind, scheme: Scheme,
               codes_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    w = mod.weight.detach()
    sd = scheme.scale_dtype.torch
    if kind is Kind.INT4_LINEAR:
        codes, scales = codes_fn(w)
        return Int4Linear.from_codes(codes, scales, scheme.group_size, scheme.act_bits, mod.bias)
    if kind is Kind.INT8_LINEAR:
        scales = choose_scales(w, scheme.head_bits, None, sd)
        return Int8Linear.from_codes(quantize(w, scales, scheme.head_bits), scales, scheme.act_bits, mod.bias)
    scales = choose_scales(w, scheme.embedding_bits, None, sd)
    return Int8Embedding.from_codes(quantize(w, scales, scheme.embedding_bits), scales, w.dtype, mod.padding_idx)


def make_empty(model: nn.Module, plan: Plan, scheme: Scheme) -> None:
    """Swap in storage-less quantized modules per ``plan`` (shapes from the float model), for loading.

    Their tensors live on the ``meta`` device, so nothing is allocated or touched until
    ``load_state_dict(..., assign=True)`` puts the checkpoint's tensors in their place (zero-filled
    modules and a copied head would cost a 1B model ~1 GiB of resident memory, thrown away at once).
    """
    if scheme.untie_embeddings:
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and head.weight is emb.weight:  # untie without a copy: loading fills it
            head.weight = nn.Parameter(torch.empty_like(emb.weight, device="meta"), requires_grad=False)
        model.config.tie_word_embeddings = False
    for name, kind in plan.modules.items():
        with torch.device("meta"):
            new = _empty_module(model.get_submodule(name), kind, scheme,
                                plan.input_transforms.get(name, InputTransform.NONE))
        _set_submodule(model, name, new)


def _empty_module(mod: nn.Module, kind: Kind, scheme: Scheme, transform: InputTransform) -> nn.Module:
    sd = scheme.scale_dtype.torch
    has_bias = getattr(mod, "bias", None) is not None
    if kind is Kind.INT4_LINEAR:
        return Int4Linear(mod.in_features, mod.out_features, scheme.group_size, scheme.act_bits, sd, has_bias,
                          input_transform=transform)
    if kind is Kind.INT8_LINEAR:
        return Int8Linear(mod.in_features, mod.out_features, scheme.act_bits, sd, has_bias)
    return Int8Embedding(mod.num_embeddings, mod.embedding_dim, sd, mod.weight.dtype, mod.padding_idx)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
