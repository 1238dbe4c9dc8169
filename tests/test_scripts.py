"""scripts/qat_sweep.py (docs/measurements/qlora.md's QAT sweep) runs on the package's pieces, every variant at once."""

import json
import math
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "qat_sweep.py"


def _run(tiny_dir, out, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--model", str(tiny_dir), "--seq-len", "32", "--eval-windows", "1",
                                      "--eval-seq-len", "32", "--json", str(out), *args])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return json.loads(out.read_text())


def test_qat_sweep_runs_every_variant(tiny_dir, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTKIT_DATA_DIR", str(data_dir))
    out = tmp_path / "r.json"
    result = _run(tiny_dir, out, monkeypatch, "--steps", "3", "--lr", "1e-3", "--learn-scales", "--weight-clip", "mse",
                  "--rotate", "--gptq-init", "2", "--hidden-weight", "1")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    for key in ("perplexity_before", "perplexity", "loss_first10", "loss_last10"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["perplexity"] != result["perplexity_before"]  # the three steps changed the model


def test_qat_sweep_without_steps_scores_the_untrained_model(tiny_dir, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_DATA_DIR", str(data_dir))
    int8 = _run(tiny_dir, tmp_path / "a.json", monkeypatch, "--steps", "0", "--int8-block-weights")
    int4 = _run(tiny_dir, tmp_path / "b.json", monkeypatch, "--steps", "0")
    assert int8["perplexity"] == int8["perplexity_before"] and "loss_first10" not in int8
    assert int8["perplexity"] != int4["perplexity"]  # the flag changed the block weights' grid
