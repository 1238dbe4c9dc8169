"""Vanilla PTQ: untie, round every weight to the scheme's grid (RTN), save the packed checkpoint."""

from __future__ import annotations

from pathlib import Path

from quantkit.checkpoint import check_output, save_checkpoint
from quantkit.config import PTQConfig
from quantkit.model import load_model
from quantkit.modules import plan_for, quantize_
from quantkit.progress import progress_bar
from quantkit.scheme import Method


def run_ptq(config: PTQConfig) -> Path:
    """Quantize ``config.model`` with ``config.scheme`` by round-to-nearest; returns the checkpoint dir."""
    check_output(config.output, config.overwrite)
    loaded = load_model(config.model)
    total = len(plan_for(loaded.model, config.scheme).modules)
    with progress_bar("quantizing (RTN)", total) as advance:
        plan = quantize_(loaded.model, config.scheme, progress=lambda _name: advance())
    return save_checkpoint(loaded, plan, config.scheme, config.output, pipeline="ptq", method=Method.RTN.value,
                           config=config.to_dict(), overwrite=config.overwrite)
