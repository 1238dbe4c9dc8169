"""Per-layer quantization error of a checkpoint: SQNR of its dequantized weights vs the float weights.

For every module a checkpoint quantized (``quantkit.json`` ``modules``), the stored codes are
dequantized exactly as the kernels see them (:func:`quantkit.primitives.dequantize` with the
stored scales) and compared with the baseline model's float weight of the same name::

    SQNR (dB) = 10 * log10( sum(W**2) / sum((W - dequant(Q))**2) )

Higher is better; each bit of a uniform quantizer is worth about 6 dB. Tied baselines (one matrix
for embedding and head) are compared with that one matrix for both, since quantkit unties them
before quantizing. Pipelines that change the weights before rounding (QAT/LoRA training, rotations)
measure that change too (unmerged LoRA adapters are added to the dequantized weight); for a rotated checkpoint (SpinQuant) the weights live in another basis,
so its SQNR against the un-rotated baseline is not a rounding error and reads very low.

Only safetensors are read; weights are taken straight from the checkpoint files, no model is built.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from quantkit.checkpoint import read_metadata
from quantkit.errors import QuantkitError
from quantkit.model import weight_files
from quantkit.modules import Kind
from quantkit.packing import unpack_int4
from quantkit.primitives import dequantize

_LAYER = re.compile(r"\.layers\.(\d+)\.")
_TIED = {"lm_head": "model.embed_tokens", "model.embed_tokens": "lm_head"}  # Llama's tied pair

#: looks up a float weight of the baseline by parameter name ("model.layers.0.mlp.up_proj.weight")
WeightLookup = Callable[[str], "torch.Tensor | None"]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(signal power / error power); ``inf`` when identical."""
    ref = reference.detach().float()
    noise = (ref - approx.detach().float()).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


class _Tensors:
    """Lazy name -> tensor access over a directory's safetensors files."""

    def __init__(self, directory: Path):
        self.where: dict[str, Path] = {}
        for f in weight_files(Path(directory)):
            with safe_open(str(f), framework="pt") as st:
                self.where.update(dict.fromkeys(st.keys(), f))

    def get(self, name: str) -> torch.Tensor | None:
        f = self.where.get(name)
        if f is None:
            return None
        with safe_open(str(f), framework="pt") as st:
            return st.get_tensor(name)


def float_weights(directory: Path) -> WeightLookup:
    """Weights of a float Hugging Face directory, read lazily from its safetensors."""
    tensors = _Tensors(directory)
    if not tensors.where:
        raise QuantkitError(f"{directory} has no *.safetensors weights to compare against")
    return tensors.get


def state_dict_weights(model: torch.nn.Module) -> WeightLookup:
    """Weights of an already-loaded float model (GGUF or hub baselines)."""
    state = model.state_dict()
    return state.get


def checkpoint_sqnr(checkpoint: Path, baseline: WeightLookup) -> list[dict]:
    """One row per quantized module: ``module``, ``kind``, ``layer`` (block index or None), ``sqnr_db``."""
    checkpoint = Path(checkpoint)
    meta = read_metadata(checkpoint)
    group_size = int(meta["scheme"]["group_size"])
    tensors = _Tensors(checkpoint)
    aliases = meta.get("aliases", {})  # tensors stored once under another name (e.g. head = embedding)
    lora = meta.get("lora") or {}
    lora_modules = set(lora.get("modules", []))

    def get(name: str) -> torch.Tensor | None:
        return tensors.get(aliases.get(name, name))

    rows = []
    for module, kind_name in meta["modules"].items():
        kind = Kind(kind_name)
        # an unmerged LoRA adapter wraps the quantized module as ``<module>.base``
        stored = f"{module}.base" if module in lora_modules else module
        qweight, scales = get(f"{stored}.qweight"), get(f"{stored}.scales")
        if qweight is None or scales is None:
            raise QuantkitError(f"{checkpoint} lacks the tensors of {module}; re-create the checkpoint")
        if kind is Kind.INT4_LINEAR:
            approx = dequantize(unpack_int4(qweight), scales, group_size)  # [N, K]
        else:
            approx = dequantize(qweight, scales, None)  # per-row scales [N, 1]
        if module in lora_modules:  # the weight the model computes with: W_q + (alpha / rank) B A
            a, b = get(f"{module}.lora_A"), get(f"{module}.lora_B")  # [r, K], [N, r]
            approx = approx + (float(lora["alpha"]) / int(lora["rank"])) * (b.float() @ a.float())
        reference = baseline(f"{module}.weight")
        if reference is None and module in _TIED:
            # tied baseline: one matrix for both, saved under either name
            reference = baseline(f"{_TIED[module]}.weight")
        if reference is None or tuple(reference.shape) != tuple(approx.shape):
            raise QuantkitError(f"the baseline has no weight matching {module} {tuple(approx.shape)} of "
                                f"{checkpoint}; is it the model this checkpoint was made from?")
        m = _LAYER.search(f".{module}.")
        rows.append({"module": module, "kind": kind.value, "layer": int(m.group(1)) if m else None,
                     "sqnr_db": sqnr_db(reference, approx)})
    return rows


def per_layer_mean(rows: list[dict]) -> dict[str, float]:
    """Mean SQNR (dB) of each transformer block's quantized linears, plus the embedding and head."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        key = f"block {row['layer']}" if row["layer"] is not None else row["module"]
        if math.isfinite(row["sqnr_db"]):
            groups.setdefault(key, []).append(row["sqnr_db"])
    return {k: sum(v) / len(v) for k, v in groups.items()}
