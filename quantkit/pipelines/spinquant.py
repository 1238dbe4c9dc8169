"""SpinQuant: fuse norms, learn R1/R2 (Cayley SGD), fold R1/R2/R4 into the weights, GPTQ, save.

The output is the same packed int4 checkpoint as ``quantkit ptq``; the only addition is the
online Hadamard (R4) on every down_proj's input, recorded as ``InputTransform.HADAMARD`` in the
metadata. Stages are saved in a work directory as they finish (the rotations, then each GPTQ
layer with the next layer's inputs), so an interrupted run resumes from its last finished stage;
the directory is removed once the checkpoint is written. Work runs in float32; the model is cast
back to bfloat16 just before the modules are swapped.

Best of N (``rotation_draws``): each draw learns R1/R2 from its own init seed on a copy of the
fused model and is quantized in full (its stages in ``draw{i}/``, its held-out score the last);
the draw whose quantized model scores the lowest perplexity on the selection set is saved.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import load_file, save_file

from quantkit.algorithms.gptq import capture_layer_inputs, gptq_layer, layer_outputs
from quantkit.algorithms.hadamard import supported
from quantkit.algorithms.rotation import (Rotations, apply_rotations_, check_rotatable, fuse_norms_,
                                          learn_rotations, random_rotations)
from quantkit.checkpoint import atomic_file, check_output, save_checkpoint
from quantkit.config import RotationMode, SpinQuantConfig
from quantkit.data import calibration_tokens
from quantkit.draws import best_of_n
from quantkit.errors import QuantkitError
from quantkit.model import load_model
from quantkit.modules import InputTransform, Plan, quantize_, untie_embeddings
from quantkit.progress import err, progress_bar
from quantkit.scheme import Method


def run_spinquant(config: SpinQuantConfig) -> Path:
    """Rotate ``config.model`` (SpinQuant R1/R2/R4), quantize it (GPTQ or RTN); returns the checkpoint dir."""
    check_output(config.output, config.overwrite)
    loaded = load_model(config.model)
    if loaded.tokenizer is None:
        raise QuantkitError(f"{loaded.source} has no tokenizer; spinquant calibrates on text")
    model = loaded.model.float()  # [work in float32: rotations must keep the float model exact]
    untie_embeddings(model)  # tied pairs would be rotated twice
    c = model.config
    r4, r4_note = config.r4, "on" if config.r4 else "off (--no-r4)"
    if r4 and not supported(c.intermediate_size):
        r4, r4_note = False, f"off: no Hadamard construction for intermediate size {c.intermediate_size}"
        err.print(f"[yellow]warning[/]: R4 {r4_note}; continuing without it (recorded in the metadata)")
    if config.rotation_mode is not RotationMode.NONE and config.rotations is None:
        check_rotatable(model, "pass --rotation-mode none or --rotations FILE")
    # the calibration windows (refused when empty or too short) before any work: [n, seq_len]
    learning = config.rotation_mode is RotationMode.LEARNED and config.rotations is None
    n = max(config.rotation_samples if learning else 0, config.gptq_samples if config.method is Method.GPTQ else 0)
    ids = calibration_tokens(loaded.tokenizer, config.calibration, max(n, 1), config.seq_len, config.seed,
                             config.data_dir)
    # best of N draws: the held-out windows that pick one [n_sel, L_sel] (refused early, like the above)
    held_out = None if config.rotation_draws == 1 else calibration_tokens(
        loaded.tokenizer, config.selection_data, config.selection_windows, config.selection_seq_len,
        config.seed, config.data_dir)
    stages = _stage_dir(config)

    fuse_norms_(model)
    best = best_of_n(model, stages, config.seed, config.rotation_draws, held_out,
                     lambda draw_model, draw_stages, seed: _draw(config, draw_model, ids, draw_stages, r4, seed),
                     f"held-out {config.selection_data} perplexity")
    plan, rot, losses = best.result.plan, best.result.rot, best.result.losses

    rotations_file = None
    if rot.r1 is not None or rot.r2 is not None:
        rotations_file = config.output.with_name(f"{config.output.name}.rotations.safetensors")
        atomic_file(lambda tmp: rot.save(tmp, {"losses": json.dumps(losses)}), rotations_file)
    result = {"r4": r4_note, "rotation_losses": losses,
              "rotations_file": None if rotations_file is None else str(rotations_file)}
    if best.scores:
        result["draws"] = best.report()
    path = save_checkpoint(dataclasses.replace(loaded, model=best.model), plan, config.scheme, config.output,
                           pipeline="spinquant", method=config.method.value,
                           config={**config.to_dict(), "result": result}, overwrite=config.overwrite)
    shutil.rmtree(stages, ignore_errors=True)
    return path


@dataclasses.dataclass
class _Quantized:
    """One rotation draw's results beside its quantized model: the packing plan and the rotations."""

    plan: Plan
    rot: Rotations
    losses: list[float]


def _draw(config: SpinQuantConfig, model: torch.nn.Module, ids: torch.Tensor, stages: Path, r4: bool,
          seed: int) -> tuple[torch.nn.Module, _Quantized]:
    """Rotations from ``seed``'s init folded into the fused float ``model``, GPTQ (or RTN), quantized in place."""
    stages.mkdir(parents=True, exist_ok=True)
    rot, losses = _rotations(config, model, ids, stages, r4, seed)
    hooks = apply_rotations_(model, rot)  # online R4 pre-hooks on the float down_projs
    codes = _gptq(config, model, ids[: config.gptq_samples], stages) if config.method is Method.GPTQ else None
    for h in hooks:
        h.remove()

    for p in model.parameters():  # the checkpoint's float parts (norm gains, now 1) in the baseline dtype;
        p.data = p.data.to(torch.bfloat16)  # not buffers: RoPE's inv_freq stays float32, as a loaded model has it
    layers = model.config.num_hidden_layers
    transforms = {f"model.layers.{i}.mlp.down_proj": InputTransform.HADAMARD for i in range(layers)}
    with progress_bar("packing", layers * 7 + 2) as advance:
        plan = quantize_(model, config.scheme, int4_codes=None if codes is None else lambda name, _w: codes[name],
                         progress=lambda _name: advance(), input_transforms=transforms if r4 else None)
    return model, _Quantized(plan, rot, losses)


# ---------------------------------------------------------------------------------------------
# Stages (each saved when finished, so an interrupted run resumes)


def _stage_dir(config: SpinQuantConfig) -> Path:
    """The work directory for this exact run; stale stages of a different run are discarded."""
    d = config.to_dict()
    for key in ("output", "overwrite", "work_dir"):
        d.pop(key)
    fingerprint = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    stages = config.stage_dir
    state = stages / "run.json"
    if stages.exists() and not (state.is_file() and json.loads(state.read_text()).get("fingerprint") == fingerprint):
        err.print(f"[yellow]note[/]: discarding {stages} (stages of a run with other settings)")
        shutil.rmtree(stages)
    if state.is_file():
        err.print(f"resuming from the finished stages in {stages}")
    stages.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"fingerprint": fingerprint, "config": d}))
    return stages


def _rotations(config: SpinQuantConfig, model: torch.nn.Module, ids: torch.Tensor, stages: Path,
               r4: bool, seed: int) -> tuple[Rotations, list[float]]:
    """From --rotations, the finished stage, learning, a random init or none (R4 as decided)."""
    finished = stages / "rotations.safetensors"
    if config.rotations is not None or finished.is_file():
        source = config.rotations or finished
        rot, meta = Rotations.load(source)
        rot.r4 = r4
        rot.check(model, str(source))
        return rot, json.loads(meta.get("losses", "[]"))
    if config.rotation_mode is RotationMode.NONE:
        return Rotations(None, None, r4), []
    rot = random_rotations(model, seed, r4=r4)
    losses: list[float] = []
    if config.rotation_mode is RotationMode.LEARNED:
        columns = (TextColumn("[bold]learning R1/R2"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
        with Progress(*columns, console=err, disable=not err.is_terminal) as bar:
            task = bar.add_task("rotations", total=config.rotation_steps, loss="-")
            rot, losses = learn_rotations(
                model, rot, ids[: config.rotation_samples], config.scheme, config.rotation_steps,
                config.rotation_lr, config.learn_against, config.rotation_objective,
                on_step=lambda _s, loss: bar.update(task, advance=1, loss=f"{loss:.4f}"))
    rot = Rotations(rot.r1.float(), rot.r2.float(), r4)  # what is saved is exactly what is used
    atomic_file(lambda tmp: rot.save(tmp, {"losses": json.dumps(losses)}), finished)
    return Rotations.load(finished)[0], losses


def _gptq(config: SpinQuantConfig, model: torch.nn.Module, ids: torch.Tensor,
          stages: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ layer by layer (one layer's inputs in memory); each finished layer is a stage."""
    scheme = config.scheme
    layers = model.model.layers
    inputs_file = stages / "gptq-inputs.safetensors"  # inputs of layer ``next`` (its metadata)
    inputs, layer_kwargs = capture_layer_inputs(model, ids)  # [n, L, D]; kwargs: mask, rotary cos/sin
    float_inputs = inputs  # [n, L, D]: the float model's (--gptq-propagation), beside the quantized chain's
    start = 0
    if inputs_file.is_file():
        saved = load_file(str(inputs_file))
        inputs, float_inputs, start = saved["inputs"], saved.get("float_inputs", inputs), int(saved["next"])
    codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with progress_bar("GPTQ (layers)", len(layers)) as advance:
        advance(start)
        for i, layer in enumerate(layers):
            prefix = f"model.layers.{i}"
            layer_file = stages / f"gptq-layer{i:03d}.safetensors"
            if i < start:  # finished before the interruption
                saved = load_file(str(layer_file))
                codes.update({f"{prefix}.{k[:-6]}": (saved[k], saved[f"{k[:-6]}.scales"])
                              for k in saved if k.endswith(".codes")})
                continue
            reference = (copy.deepcopy(layer), float_inputs) if config.gptq_propagation else None
            result, inputs = gptq_layer(layer, inputs, layer_kwargs, scheme.linear_bits, scheme.group_size,
                                        scheme.scale_dtype.torch, config.damp, config.act_order,
                                        scheme.weight_clip, config.refit_scales, reference, config.gptq_propagation)
            saved = {"inputs": inputs.contiguous(), "next": torch.tensor(i + 1)}
            if reference is not None:
                float_inputs = saved["float_inputs"] = layer_outputs(reference[0], float_inputs, layer_kwargs)
            tensors = {f"{k}.{part}": t for k, (q, s) in result.items() for part, t in (("codes", q), ("scales", s))}
            atomic_file(lambda tmp, t=tensors: save_file(t, str(tmp)), layer_file)
            atomic_file(lambda tmp: save_file(saved, str(tmp)), inputs_file)
            codes.update({f"{prefix}.{k}": v for k, v in result.items()})
            advance()
    return codes
