"""The resumable training loop and the stage bookkeeping of multi-stage pipelines.

A *stage* writes its finished result to ``<work>/<stage>/`` (``model.safetensors`` + ``stage.json``),
atomically; a rerun loads it instead of training again. Inside a stage, every ``save_every`` steps
the trained parameters, the AdamW moments and the loss curve go to ``<work>/<stage>.progress/``
(safetensors + JSON, never pickle); a rerun continues from there. Batches are a pure function of
(seed, step) and the learning rate of the step number, so a resumed stage takes the same steps as
an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file
from torch import nn

from quantkit.checkpoint import atomic_directory
from quantkit.errors import QuantkitError
from quantkit.progress import err

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
MAX_GRAD_NORM = 1.0


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Rows of step ``step``: consecutive slices of a seeded permutation per epoch over ``n`` rows."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[i]))
    return out


def lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first tenth of the steps, then cosine down to a tenth."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(name: str, params: dict[str, nn.Parameter], steps: int, lr: float,
          loss_fn: Callable[[int], torch.Tensor | Iterable[torch.Tensor]], progress_dir: Path, save_every: int,
          lr_ratios: dict[str, float] | None = None) -> list[float]:
    """Run AdamW on ``params`` for ``steps`` steps of ``loss_fn(step)``; returns the loss per step.

    ``loss_fn`` returns the step's loss, or yields it as terms (a generator): each term is
    backpropagated before the next is computed, so the step's peak memory is its largest term's
    graph, not all of them at once. The step's loss is their sum.

    ``lr_ratios`` gives some parameters (by name) a multiple of ``lr`` (learned quantization
    scales train slower than weights). Resumes from ``progress_dir`` when a step checkpoint is
    there. A non-finite loss stops the stage before the update (nothing NaN is ever saved) with
    a QuantkitError.
    """
    ratios = lr_ratios or {}
    by_ratio: dict[float, list[nn.Parameter]] = {}
    for key, p in params.items():  # one AdamW group per ratio, in the order params lists them
        by_ratio.setdefault(ratios.get(key, 1.0), []).append(p)
    optimizer = torch.optim.AdamW([{"params": ps, "ratio": r} for r, ps in by_ratio.items()], lr=lr,
                                  weight_decay=0.0)
    start, losses = _load_progress(progress_dir, params, optimizer)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=not err.is_terminal) as bar:
        task = bar.add_task(name, total=steps, completed=start, loss=f"{losses[-1]:.4f}" if losses else "-")
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr * group["ratio"] * lr_factor(step, steps)
            optimizer.zero_grad(set_to_none=True)
            terms = loss_fn(step)
            loss = 0.0
            for term in [terms] if isinstance(terms, torch.Tensor) else terms:
                if not torch.isfinite(term):  # before any update: nothing NaN reaches the weights
                    raise QuantkitError(
                        f"stage {name}: the loss became {term.item()} at step {step + 1}; stopped. Finished "
                        f"stages (and this stage's last step checkpoint) are kept in {progress_dir.parent}: "
                        "lower this stage's learning rate and rerun to resume from them")
                term.backward()  # frees this term's graph before the next term's forward
                loss += term.item()
            torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_GRAD_NORM)
            optimizer.step()
            losses.append(loss)
            log.info("%s step %d/%d loss %.4f", name, step + 1, steps, losses[-1])
            bar.update(task, advance=1, loss=f"{losses[-1]:.4f}")
            if (step + 1) % save_every == 0 and step + 1 < steps:
                save_progress(progress_dir, params, optimizer, step + 1, losses)
    return losses


def save_progress(progress_dir: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                  step: int, losses: list[float]) -> None:
    """Parameters, AdamW moments (``<index>.<key>``) and the loss curve after ``step`` steps."""
    moments = {f"{i}.{key}": value.detach().contiguous()
               for i, state in optimizer.state_dict()["state"].items() for key, value in state.items()}
    with atomic_directory(progress_dir, overwrite=True) as tmp:
        save_file({k: p.detach().contiguous() for k, p in params.items()}, str(tmp / "params.safetensors"))
        save_file(moments, str(tmp / "optimizer.safetensors"))
        (tmp / "progress.json").write_text(json.dumps({"step": step, "losses": losses}))


def _load_progress(progress_dir: Path, params: dict[str, nn.Parameter],
                   optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
    if not (progress_dir / "progress.json").is_file():
        return 0, []
    saved = load_file(str(progress_dir / "params.safetensors"))
    if set(saved) != set(params):
        raise QuantkitError(f"{progress_dir} does not hold this stage's parameters; delete it to restart the stage")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    state: dict[int, dict] = {}
    for key, value in load_file(str(progress_dir / "optimizer.safetensors")).items():
        index, _, field = key.partition(".")
        state.setdefault(int(index), {})[field] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    progress = json.loads((progress_dir / "progress.json").read_text())
    log.info("resuming %s at step %d", progress_dir.name, progress["step"])
    return progress["step"], progress["losses"]


def run_stage(work: Path, name: str, model: nn.Module, train_and_report: Callable[[Path], dict]) -> dict:
    """The report of stage ``name``: loaded (with the model's weights) if it already finished, else run.

    ``train_and_report(progress_dir)`` trains ``model`` in place and returns the stage's report;
    the model's state and the report are then written to ``<work>/<name>/`` atomically.
    """
    done = work / name
    if (done / STAGE_FILE).is_file():
        state = load_file(str(done / "model.safetensors"))
        model.load_state_dict(state, strict=True)
        log.info("stage %s already finished: loaded from %s", name, done)
        return json.loads((done / STAGE_FILE).read_text())
    report = train_and_report(work / f"{name}.progress")
    with atomic_directory(done, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        (tmp / STAGE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(work / f"{name}.progress", ignore_errors=True)
    return report
