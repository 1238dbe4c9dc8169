"""The quantization scheme: one frozen dataclass that every pipeline shares.

The default is the Llama 3.2 1B/3B quantized-release scheme ("8da4w"):

* every linear of every transformer block (q, k, v, o, gate, up, down): int4 **symmetric**
  weights, one scale per group of ``group_size`` (32) consecutive input channels, with int8
  per-token dynamic activations;
* the classification layer (``lm_head``): int8 per-channel weights, int8 per-token dynamic
  activations;
* the embedding: int8 per-channel (one scale per vocabulary row);
* tied embeddings are untied first, so embedding and head are quantized separately.

RTN, GPTQ, QAT fake-quant and the kernels all read their bit widths and group sizes from here.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields

import torch

from quantkit.errors import QuantkitError

SCHEME_VERSION = 1

#: names of the linears of a Llama block, in the order they run
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ScaleDtype(str, enum.Enum):
    """dtype in which weight scales are stored (activation scales are always float32)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def torch(self) -> torch.dtype:
        return getattr(torch, self.value)


class WeightClip(str, enum.Enum):
    """How the int4 block linears' group scales are chosen (recorded in checkpoint metadata).

    Only the choice of scale changes; codes, scales and the packed format are the same.
    """

    AMAX = "amax"  # scale = max|w| / qmax: nothing clips (vanilla RTN)
    MSE = "mse"  # clip ratio per group searched on a grid, minimizing sum (w - q)^2
    LP24 = "lp2.4"  # the same search minimizing sum |w - q|^2.4 (QuaRot / SpinQuant's w_clip)

    @property
    def norm(self) -> float | None:
        """Exponent p of the group error ``sum |w - q|^p`` the search minimizes (None: no search)."""
        return {WeightClip.AMAX: None, WeightClip.MSE: 2.0, WeightClip.LP24: 2.4}[self]


class Method(str, enum.Enum):
    """How integer weights were chosen (recorded in checkpoint metadata)."""

    RTN = "rtn"
    GPTQ = "gptq"
    QAT = "qat"


@dataclass(frozen=True)
class Scheme:
    linear_bits: int = 4  # block linears, symmetric, per group
    group_size: int = 32  # input channels per int4 scale
    act_bits: int | None = 8  # per-token dynamic activation bits; None = weight-only
    head_bits: int | None = 8  # lm_head, per-channel symmetric; None = leave in bf16
    embedding_bits: int | None = 8  # embedding, per-row symmetric; None = leave in bf16
    scale_dtype: ScaleDtype = ScaleDtype.BFLOAT16
    untie_embeddings: bool = True
    # int4 group scales: amax, or a clip search (RTN and GPTQ; head, embedding and activations stay amax).
    # Checkpoints written before this field existed used amax, which is what from_dict fills in.
    weight_clip: WeightClip = WeightClip.AMAX

    def __post_init__(self) -> None:
        # Frozen dataclass: coerce strings (from JSON/CLI) through object.__setattr__.
        object.__setattr__(self, "scale_dtype", ScaleDtype(self.scale_dtype))
        object.__setattr__(self, "weight_clip", WeightClip(self.weight_clip))
        if self.linear_bits not in (2, 3, 4):
            raise QuantkitError(f"linear_bits must be 2, 3 or 4 (packed 4-bit storage), got {self.linear_bits}")
        if self.group_size <= 0 or self.group_size % 2:
            raise QuantkitError(f"group_size must be a positive even number, got {self.group_size}")
        for name in ("act_bits", "head_bits", "embedding_bits"):
            bits = getattr(self, name)
            if bits is not None and not 2 <= bits <= 8:
                raise QuantkitError(f"{name} must be between 2 and 8 (or None), got {bits}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale_dtype"] = self.scale_dtype.value
        d["weight_clip"] = self.weight_clip.value
        d["version"] = SCHEME_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Scheme:
        d = dict(d)
        version = d.pop("version", None)
        if version != SCHEME_VERSION:
            raise QuantkitError(
                f"scheme version {version!r} is not supported by this quantkit (knows {SCHEME_VERSION}); "
                "upgrade quantkit or re-quantize the model"
            )
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise QuantkitError(f"unknown scheme fields {sorted(unknown)}")
        return cls(**d)


LLAMA32_SCHEME = Scheme()
