"""SpinQuant's rotations as weight transforms of a Llama model (no forked model code).

Notation: a linear computes ``y = x Wᵀ`` with ``W [out, in]``; the residual stream is a row
vector ``x [.., D]``.

* **Norm fusion** (:func:`fuse_norms_`): an RMSNorm gain ``g`` feeding linears is folded into
  their input columns (``W ← W diag(g)``, ``g ← 1``). RMSNorm without a gain commutes with any
  orthogonal ``R`` (``‖x R‖ = ‖x‖``), which is what lets R1 pass through the norms.
* **R1** ``[D, D]``, one for the whole residual stream ``x → x R1``: the embedding's output
  (``E ← E R1``), every linear reading the stream (q/k/v, gate/up, the head: ``W ← W R1``) and
  every linear writing to it (o/down: ``W ← R1ᵀ W``, bias ``b ← b R1``).
* **R2** ``[head_dim, head_dim]`` per layer: each v head's output (``W_v,h ← R2ᵀ W_v,h``) and the
  matching input block of o_proj (``W_o[:, h] ← W_o[:, h] R2``). Attention mixes positions, not
  channels, so it commutes.
* **R4**: the normalized Hadamard ``T(x) = x Hᵀ/√n`` on down_proj's input. Folded as
  ``W_down ← T(W_down)`` (rows transformed), applied online at run time (a forward pre-hook on
  the float model; ``InputTransform.HADAMARD`` on the quantized Int4Linear).

:func:`rotated_weights` computes the new tensors *functionally* from the (norm-fused) model and
the rotations, so the same code folds them in place (:func:`apply_rotations_`) and, with
``torch.func.functional_call``, puts learnable rotations in the loss (see
:mod:`quantkit.algorithms.cayley` and :mod:`quantkit.pipelines.spinquant`).

Embeddings must be untied first: rotating a tied pair would rotate the shared matrix twice.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from quantkit.algorithms import LearnTarget, RotationObjective
from quantkit.algorithms.cayley import CayleySGD
from quantkit.algorithms.hadamard import hadamard_transform, random_hadamard, supported
from quantkit.errors import QuantkitError
from quantkit.modules import untie_embeddings
from quantkit.primitives import fake_quantize
from quantkit.scheme import Scheme
from quantkit.training.sft import kd_loss


def _dims(model: nn.Module) -> tuple[int, int, int, int, int, int]:
    """(layers, hidden D, heads, kv heads, head_dim, intermediate) of a Llama model."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, head_dim,
            c.intermediate_size)


def check_untied(model: nn.Module) -> None:
    if model.get_output_embeddings().weight is model.get_input_embeddings().weight:
        raise QuantkitError("embeddings are tied: untie them before rotating (R1 would be applied twice)")


@torch.no_grad()
def fuse_norms_(model: nn.Module) -> None:
    """Fold every RMSNorm gain into the linears that read its output; the gains become 1."""
    check_untied(model)

    def fold(norm: nn.Module, linears: list[nn.Linear]) -> None:
        g = norm.weight.double()
        for lin in linears:
            lin.weight.copy_((lin.weight.double() * g[None, :]).to(lin.weight.dtype))
        norm.weight.fill_(1.0)

    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    fold(model.model.norm, [model.get_output_embeddings()])


@dataclass
class Rotations:
    """R1 ``[D, D]``, R2 ``[layers, head_dim, head_dim]`` (None = identity), and whether R4 is folded."""

    r1: torch.Tensor | None
    r2: torch.Tensor | None
    r4: bool

    def save(self, path: Path, metadata: dict[str, str] | None = None) -> None:
        tensors = {k: v.detach().contiguous() for k, v in (("r1", self.r1), ("r2", self.r2)) if v is not None}
        save_file(tensors, str(path), metadata={"r4": str(self.r4).lower(), **(metadata or {})})

    @classmethod
    def load(cls, path: Path) -> tuple[Rotations, dict[str, str]]:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except (SafetensorError, OSError) as exc:
            raise QuantkitError(f"rotations file {path} is unreadable ({exc})") from exc
        if "r4" not in meta:
            raise QuantkitError(f"{path} is not a quantkit rotations file (no 'r4' metadata)")
        return cls(tensors.get("r1"), tensors.get("r2"), meta["r4"] == "true"), meta

    def check(self, model: nn.Module, where: str = "rotations") -> None:
        """Refuse rotations whose shapes do not match ``model`` or that are not orthogonal."""
        layers, d, _, _, hd, inter = _dims(model)
        expected = {"r1": (d, d), "r2": (layers, hd, hd)}
        for name, shape in expected.items():
            r = getattr(self, name)
            if r is None:
                continue
            if tuple(r.shape) != shape:
                raise QuantkitError(f"{where}: {name} has shape {tuple(r.shape)} but this model needs {shape} "
                                    f"(layers {layers}, hidden {d}, head_dim {hd})")
            eye = torch.eye(shape[-1], dtype=torch.float64)
            err = (r.double().transpose(-1, -2) @ r.double() - eye).abs().max().item()
            if not math.isfinite(err) or err > 1e-3:
                raise QuantkitError(f"{where}: {name} is not orthogonal (max |RᵀR - I| = {err:.2e})")
        if self.r4 and not supported(inter):
            raise QuantkitError(f"{where}: R4 needs a Hadamard of the intermediate size {inter}, which has none")


def check_rotatable(model: nn.Module, remedy: str) -> None:
    """Refuse a model whose hidden size or head_dim has no Hadamard construction (R1/R2's init)."""
    _, d, _, _, hd, _ = _dims(model)
    for what, n in (("hidden size", d), ("head_dim", hd)):
        if not supported(n):
            raise QuantkitError(f"no Hadamard construction for the {what} {n}, needed to initialize R1/R2; {remedy}")


@torch.no_grad()
def fold_rotations_(model: nn.Module, seed: int, rotations: Rotations | None = None,
                    remedy: str = "run without rotations") -> list[torch.utils.hooks.RemovableHandle]:
    """Fold R1/R2 (and R4 if ``rotations`` has it) into the float ``model``; norms fused, embeddings untied.

    ``rotations`` are e.g. SpinQuant's learned ones, read from its rotations file; None means
    SpinQuant's initialization without R4: seeded random Hadamard R1 and R2, so the model computes
    the same function with plain weights and its activations lose their outlier channels (what
    8-bit per-token activations then keep). With R4, H is folded into every down_proj's weight and
    the returned pre-hooks apply it online to the float down_projs (whoever swaps the modules
    removes them and gives the new modules ``InputTransform.HADAMARD``). QLoRA's ``--qat-rotate``.
    """
    if rotations is None:
        check_rotatable(model, remedy)
        rotations = random_rotations(model, seed, r4=False)
    else:
        rotations.check(model)
    untie_embeddings(model)
    fuse_norms_(model)
    return apply_rotations_(model, rotations)


def random_rotations(model: nn.Module, seed: int, r1: bool = True, r2: bool = True, r4: bool = True) -> Rotations:
    """SpinQuant's initialization: random Hadamard R1 and R2 (Hadamard matrix with random row signs)."""
    layers, d, _, _, hd, _ = _dims(model)
    gen = torch.Generator().manual_seed(seed)
    return Rotations(random_hadamard(d, gen) if r1 else None,
                     torch.stack([random_hadamard(hd, gen) for _ in range(layers)]) if r2 else None, r4)


def rotated_weights(model: nn.Module, rot: Rotations, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The rotated (norm-fused) model's tensors, by parameter name; differentiable in R1/R2.

    Math in the rotations' dtype (float64 for folding, float32 while learning); results in
    ``dtype`` (default: each parameter's own).
    """
    _, _, heads, kv_heads, hd, _ = _dims(model)
    work = next((r.dtype for r in (rot.r1, rot.r2) if r is not None), torch.float64)
    r1 = None if rot.r1 is None else rot.r1.to(work)
    out: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
        out[name] = tensor.to(dtype or like.dtype)

    def reads_stream(mod: nn.Module) -> torch.Tensor:  # W R1: [out, D]
        w = mod.weight.to(work)
        return w if r1 is None else w @ r1

    emb_name = _param_owner(model, model.get_input_embeddings())
    head_name = _param_owner(model, model.get_output_embeddings())
    emb = model.get_input_embeddings().weight
    put(f"{emb_name}.weight", reads_stream(model.get_input_embeddings()), emb)
    put(f"{head_name}.weight", reads_stream(model.get_output_embeddings()),
        model.get_output_embeddings().weight)
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        r2 = None if rot.r2 is None else rot.r2[i].to(work)
        for lin, name in ((attn.q_proj, "self_attn.q_proj"), (attn.k_proj, "self_attn.k_proj"),
                          (mlp.gate_proj, "mlp.gate_proj"), (mlp.up_proj, "mlp.up_proj")):
            put(f"{p}.{name}.weight", reads_stream(lin), lin.weight)
        # v: input side R1, then each kv head's output rows by R2ᵀ: [kv, hd, D]
        wv = reads_stream(attn.v_proj)
        if r2 is not None:
            wv = (r2.T @ wv.reshape(kv_heads, hd, -1)).reshape(kv_heads * hd, -1)
            if attn.v_proj.bias is not None:
                put(f"{p}.self_attn.v_proj.bias",
                    (attn.v_proj.bias.to(work).reshape(kv_heads, hd) @ r2).reshape(-1), attn.v_proj.bias)
        put(f"{p}.self_attn.v_proj.weight", wv, attn.v_proj.weight)
        # o: each head's input block by R2 ([D, heads, hd] @ R2), then the output side R1ᵀ W
        wo = attn.o_proj.weight.to(work)
        if r2 is not None:
            wo = (wo.reshape(-1, heads, hd) @ r2).reshape(-1, heads * hd)
        # down: input side Hadamard (R4), then the output side
        wd = mlp.down_proj.weight.to(work)
        if rot.r4:
            wd = hadamard_transform(wd)
        for lin, name, w in ((attn.o_proj, "self_attn.o_proj", wo), (mlp.down_proj, "mlp.down_proj", wd)):
            put(f"{p}.{name}.weight", w if r1 is None else r1.T @ w, lin.weight)
            if lin.bias is not None and r1 is not None:
                put(f"{p}.{name}.bias", lin.bias.to(work) @ r1, lin.bias)
    return out


def _param_owner(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, mod in model.named_modules() if mod is target)


@torch.no_grad()
def apply_rotations_(model: nn.Module, rot: Rotations) -> list[torch.utils.hooks.RemovableHandle]:
    """Fold ``rot`` into the (norm-fused, untied) float ``model``; returns the online-R4 hook handles.

    With R4 the model is only equivalent while the returned pre-hooks run (quantization replaces
    them with ``InputTransform.HADAMARD`` on the swapped-in Int4Linear).
    """
    check_untied(model)
    wanted = Rotations(None if rot.r1 is None else rot.r1.double(),
                       None if rot.r2 is None else rot.r2.double(), rot.r4)
    params = dict(model.named_parameters())
    for name, tensor in rotated_weights(model, wanted).items():
        params[name].copy_(tensor)
    return online_hadamard(model) if rot.r4 else []


def down_projs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"model.layers.{i}.mlp.down_proj", layer.mlp.down_proj) for i, layer in enumerate(model.model.layers)]


def online_hadamard(model: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward pre-hooks that apply R4 (``x Hᵀ/√n``) to every float down_proj's input."""
    return [mod.register_forward_pre_hook(lambda _m, args: (hadamard_transform(args[0]), *args[1:]))
            for _, mod in down_projs(model)]


def stream_linears(model: nn.Module) -> list[nn.Module]:
    """Every linear the scheme quantizes with per-token activations: block linears and the head."""
    return [mod for mod in model.model.layers.modules() if isinstance(mod, nn.Linear)] + \
        [model.get_output_embeddings()]


@contextlib.contextmanager
def activation_quantizers(model: nn.Module, act_bits: int | None) -> Iterator[None]:
    """Per-token fake-quant (straight-through) on every quantized linear's input, while inside."""
    if act_bits is None:
        yield
        return
    handles = [mod.register_forward_pre_hook(lambda _m, args: (fake_quantize(args[0], act_bits), *args[1:]))
               for mod in stream_linears(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Learning R1 and R2 (Cayley SGD, language-model loss with quantizers in the loop)


@contextlib.contextmanager
def _rotated_activation_quantizers(model: nn.Module, r1: torch.Tensor, r2: torch.Tensor, r4: bool,
                                   act_bits: int | None) -> Iterator[None]:
    """On the norm-fused, *unrotated* model: every quantized input ``x`` becomes ``Q(x R) Rᵀ``.

    That is exactly what the rotated model computes at that point (its input is ``x R``, its
    weight ``W R``), at the cost of one small matmul per site instead of rotating every weight.
    Sites: the outputs of the norms (q/k/v, gate/up and the head read them; R1), o_proj's input
    (per head R2), down_proj's input (the fixed R4 Hadamard).
    """
    def quant(x: torch.Tensor) -> torch.Tensor:
        return x if act_bits is None else fake_quantize(x, act_bits)

    def stream(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:  # [.., D]
        return quant(out @ r1) @ r1.T

    def heads(i: int):
        def hook(_m: nn.Module, args: tuple) -> tuple:
            x = args[0]  # [B, L, heads * hd]
            xh = x.reshape(*x.shape[:-1], -1, r2.shape[-1]) @ r2[i]  # per head
            y = quant(xh.reshape(x.shape)).reshape(xh.shape) @ r2[i].T
            return (y.reshape(x.shape), *args[1:])
        return hook

    def down(_m: nn.Module, args: tuple) -> tuple:
        return (hadamard_transform(quant(hadamard_transform(args[0])), inverse=True), *args[1:])

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles += [layer.input_layernorm.register_forward_hook(stream),
                    layer.post_attention_layernorm.register_forward_hook(stream),
                    layer.self_attn.o_proj.register_forward_pre_hook(heads(i))]
        if r4 or act_bits is not None:
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(
                down if r4 else lambda _m, args: (quant(args[0]), *args[1:])))
    handles.append(model.model.norm.register_forward_hook(stream))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _fake_quantized_weights(model: nn.Module, rot: Rotations, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The rotated model's weights through the scheme's weight quantizers (straight-through, amax scales)."""
    weights = rotated_weights(model, rot, torch.float32)
    emb = f"{_param_owner(model, model.get_input_embeddings())}.weight"
    head = f"{_param_owner(model, model.get_output_embeddings())}.weight"
    sd = scheme.scale_dtype.torch
    for name, w in weights.items():
        if name == emb and scheme.embedding_bits is not None:
            weights[name] = fake_quantize(w, scheme.embedding_bits, None, sd)
        elif name == head and scheme.head_bits is not None:
            weights[name] = fake_quantize(w, scheme.head_bits, None, sd)
        elif name.endswith(".weight") and name not in (emb, head) and w.shape[-1] % scheme.group_size == 0:
            # amax scales even when the scheme searches them: the search costs ~40 round trips of every
            # weight per step; the amax grid is the cheap proxy the rotations learn against
            weights[name] = fake_quantize(w, scheme.linear_bits, scheme.group_size, sd)
    return weights


def rotation_loss(model: nn.Module, rot: Rotations, ids: torch.Tensor, scheme: Scheme,
                  target: LearnTarget, objective: RotationObjective = RotationObjective.CE) -> torch.Tensor:
    """``objective`` on ``ids [B, L]`` of the rotated model with the quantizers of ``target`` in the loop.

    ``model`` is norm-fused, untied and *not* rotated; the loss is differentiable in R1/R2. For
    ``KD`` the teacher is ``model`` itself, float and unrotated (rotations leave it unchanged).
    """
    teacher = None
    if objective is RotationObjective.KD:
        with torch.no_grad():
            teacher = model(ids, use_cache=False).logits  # [B, L, V]
    kwargs = {"use_cache": False} if teacher is not None else {"labels": ids, "use_cache": False}
    handles = online_hadamard(model) if rot.r4 and target is not LearnTarget.ACTIVATIONS else []
    try:
        if target is LearnTarget.ACTIVATIONS:
            with _rotated_activation_quantizers(model, rot.r1, rot.r2, rot.r4, scheme.act_bits):
                out = model(ids, **kwargs)
        else:
            with activation_quantizers(model, scheme.act_bits):
                out = functional_call(model, _fake_quantized_weights(model, rot, scheme), (ids,), kwargs)
    finally:
        for h in handles:
            h.remove()
    if teacher is None:
        return out.loss
    return kd_loss(out.logits.flatten(0, 1), teacher.flatten(0, 1))  # [B*L, V] each


def learn_rotations(model: nn.Module, init: Rotations, ids: torch.Tensor, scheme: Scheme, steps: int,
                    lr: float, target: LearnTarget = LearnTarget.ACTIVATIONS,
                    objective: RotationObjective = RotationObjective.CE,
                    on_step: Callable[[int, float], None] | None = None) -> tuple[Rotations, list[float]]:
    """Learn R1 and R2 from ``init`` by Cayley SGD over ``steps`` batches of ``ids [n, L]`` (cycled).

    Batches hold ``max(1, n // steps)`` windows; the learning rate decays linearly to 0. The
    model's own parameters are frozen. Stops with a QuantkitError on a NaN/inf loss.
    """
    if init.r1 is None or init.r2 is None:
        raise QuantkitError("learning rotations needs initial R1 and R2")
    for p in model.parameters():
        p.requires_grad_(False)
    r1 = nn.Parameter(init.r1.detach().float().clone())
    r2 = nn.Parameter(init.r2.detach().float().clone())
    opt = CayleySGD([r1, r2], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    batch = max(1, len(ids) // steps)
    losses: list[float] = []
    for step in range(steps):
        start = (step * batch) % len(ids)
        rows = ids[start : start + batch]  # [B, L]
        loss = rotation_loss(model, Rotations(r1, r2, init.r4), rows, scheme, target, objective)
        if not torch.isfinite(loss):
            raise QuantkitError(f"rotation learning diverged: loss is {loss.item()} at step {step + 1}; "
                                "nothing was written. Try a smaller --rotation-lr")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step:
            on_step(step, losses[-1])
    return Rotations(r1.detach().clone(), r2.detach().clone(), init.r4), losses
