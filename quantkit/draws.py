"""Best of N: a pipeline's random part run from N seeds; the model scoring lowest on held-out text is kept.

spinquant draws rotation inits (R1/R2 learned, then GPTQ); qlora draws stages 1-2 (GPTQ start,
QAT, LoRA). Draw ``i`` runs from seed ``seed + i`` on its own copy of the model, with its stages
in ``<stages>/draw{i}/``, and keeps its held-out score there too, so an interrupted run resumes
without training or scoring a finished draw again. One draw is the plain pipeline: the model
itself, the stage directory itself, nothing scored.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import torch

from quantkit.evaluate import selection_perplexity
from quantkit.progress import err

T = TypeVar("T")


@dataclasses.dataclass
class Best(Generic[T]):
    """The kept draw: its seed, model and the pipeline's other results; every draw's score by seed."""

    seed: int
    model: torch.nn.Module
    result: T
    scores: dict[str, float]  # held-out perplexity by draw seed; empty with one draw

    def report(self) -> dict:
        """What the pipelines record about the choice (with more than one draw)."""
        return {"chosen_seed": self.seed, "selection_perplexity": self.scores}


def best_of_n(model: torch.nn.Module, stages: Path, seed: int, draws: int, held_out: torch.Tensor | None,
              run: Callable[[torch.nn.Module, Path, int], tuple[torch.nn.Module, T]], what: str) -> Best[T]:
    """``run(model, stage_dir, seed) -> (model, result)`` once, or per draw; the lowest perplexity on
    ``held_out`` ``[n, L]`` wins (the earlier draw on a tie, a finite one over NaN). ``held_out`` is
    None for one draw. ``what`` names the score in the line printed per draw."""
    if (draws == 1) != (held_out is None):
        raise ValueError(f"{draws} draws need held-out windows exactly when there is more than one")
    best, best_score, scores, one = None, math.inf, {}, held_out is None
    for i in range(draws):
        draw_model, result = run(model if one else copy.deepcopy(model), stages if one else stages / f"draw{i}",
                                 seed + i)
        if one:
            return Best(seed, draw_model, result, {})
        score = selection_perplexity(draw_model, held_out, stages / f"draw{i}" / "selection.json",
                                     f"draw {i + 1}/{draws}: held-out ppl")
        err.print(f"draw {i + 1} (seed {seed + i}): {what} {score:.3f}")
        scores[str(seed + i)] = score
        if best is None or score < best_score:  # only the best draw stays in memory
            # a NaN score (a diverged draw) loses to any finite one, whichever comes first
            best, best_score = Best(seed + i, draw_model, result, scores), math.inf if math.isnan(score) else score
        del draw_model, result
    return best
