"""Quantization algorithms: Hadamard transforms, SpinQuant rotations, Cayley SGD, GPTQ.

This package's ``__init__`` stays free of torch imports (the CLI imports its enums at start-up).
"""

from __future__ import annotations

import enum


class LearnTarget(str, enum.Enum):
    """What the quantizers in the loop quantize while SpinQuant's R1/R2 are learned."""

    ACTIVATIONS = "activations"  # Meta's ExecuTorch recipe when GPTQ follows: weights stay float
    WEIGHTS_AND_ACTIVATIONS = "weights-and-activations"  # weights fake-quantized too (RTN grid)


class RotationObjective(str, enum.Enum):
    """What SpinQuant's R1/R2 are learned to minimize (the quantizers of ``LearnTarget`` in the loop)."""

    CE = "ce"  # next-token cross-entropy on the calibration text (SpinQuant's loss)
    # KL(float model || quantized model) per token: the float model is rotation-invariant, so this is
    # the quantization damage alone, without CE's per-window text-fitting term (a less noisy gradient)
    KD = "kd"
