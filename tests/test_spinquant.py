"""`quantkit spinquant` end to end on the tiny model: CLI, checkpoint round trip, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from quantkit import kernels
from quantkit.algorithms import LearnTarget, RotationObjective
from quantkit.algorithms import gptq as gptq_module
from quantkit.algorithms.hadamard import hadamard_transform
from quantkit.checkpoint import load_checkpoint
from quantkit.cli import main
from quantkit.config import SpinQuantConfig
from quantkit.errors import QuantkitError
from quantkit.model import tiny_llama, tiny_tokenizer
from quantkit.modules import InputTransform, Int4Linear
from quantkit.pipelines.spinquant import run_spinquant
from quantkit.primitives import choose_scales, quantize
from quantkit.scheme import WeightClip

SMALL = dict(rotation_steps=2, rotation_samples=2, gptq_samples=3, seq_len=32)


def _config(tiny_dir, out, data_dir, **kw) -> SpinQuantConfig:
    return SpinQuantConfig(output=out, model=str(tiny_dir), data_dir=data_dir, **{**SMALL, **kw})


def test_cli_end_to_end_checkpoint_round_trip(tiny_dir, tmp_path, data_dir, ids):
    out = tmp_path / "spin"
    args = ["spinquant", "--model", str(tiny_dir), "--output", str(out), "--data-dir", str(data_dir),
            "--rotation-steps", "2", "--rotation-samples", "2", "--gptq-samples", "3", "--seq-len", "32"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    loaded, meta = load_checkpoint(out)
    assert meta["pipeline"] == "spinquant" and meta["method"] == "gptq"
    assert meta["input_transforms"] == {f"model.layers.{i}.mlp.down_proj": "hadamard" for i in range(2)}
    assert len(meta["config"]["result"]["rotation_losses"]) == 2
    assert meta["scheme"]["weight_clip"] == "mse" and meta["config"]["refit_scales"] is True  # spinquant defaults
    down = loaded.model.model.layers[0].mlp.down_proj
    assert isinstance(down, Int4Linear) and down.input_transform is InputTransform.HADAMARD
    saved = load_file(str(out / "model.safetensors"))
    aliases = meta.get("aliases", {})  # tensors stored once when bit-identical (tied head = embedding)
    assert all(torch.equal(saved[aliases.get(k, k)], v) for k, v in loaded.model.state_dict().items())
    assert not (tmp_path / ".spin.spinquant-work").exists()  # stages removed once written
    # the quantized model still models the tiny model (close logits, not garbage)
    with torch.no_grad():
        float_logits = tiny_llama(seed=0)(ids).logits.float()
    with torch.no_grad():
        q_logits = loaded.model(ids).logits.float()
    # (random int4 weights of a 64-wide model: PTQ itself only reaches a cosine of ~0.95 here)
    assert torch.nn.functional.cosine_similarity(q_logits.flatten(), float_logits.flatten(), dim=0) > 0.85
    # reusing the saved rotations skips learning and gives the same checkpoint
    again = tmp_path / "again"
    result = CliRunner().invoke(main, args[:3] + ["--output", str(again), "--rotations",
                                                  str(tmp_path / "spin.rotations.safetensors")] + args[5:])
    assert result.exit_code == 0, result.output
    other = load_file(str(again / "model.safetensors"))
    assert all(torch.equal(saved[k], other[k]) for k in saved)


def test_input_transform_is_applied_before_either_kernel_backend(monkeypatch):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    scales = choose_scales(w, 4, 32)
    mod = Int4Linear.from_codes(quantize(w, scales, 4, 32), scales, 32, 8)
    x = torch.randn(3, 64)
    plain = mod(hadamard_transform(x))
    mod.input_transform = InputTransform.HADAMARD
    for backend in ("reference", "auto"):
        monkeypatch.setenv("QUANTKIT_KERNEL", backend)
        torch.testing.assert_close(mod(x), plain, rtol=1e-5, atol=1e-5)
    assert kernels.backend_for(x) in (kernels.Backend.CPU, kernels.Backend.REFERENCE)


@pytest.mark.parametrize("propagation", [0.0, 1.0])  # 1: the float chain's inputs are resumed too
def test_resume_after_interruption_gives_the_same_checkpoint(tiny_dir, tmp_path, data_dir, monkeypatch, propagation):
    reference = run_spinquant(_config(tiny_dir, tmp_path / "ref", data_dir, gptq_propagation=propagation))
    real = gptq_module.gptq_layer
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # layer 0 finished and saved, then Ctrl-C in layer 1
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    import quantkit.pipelines.spinquant as pipeline

    monkeypatch.setattr(pipeline, "gptq_layer", interrupted)
    config = _config(tiny_dir, tmp_path / "resumed", data_dir, gptq_propagation=propagation)
    with pytest.raises(KeyboardInterrupt):
        run_spinquant(config)
    assert not config.output.exists()
    assert (config.stage_dir / "rotations.safetensors").is_file()
    assert (config.stage_dir / "gptq-layer000.safetensors").is_file()
    calls.clear()
    monkeypatch.setattr(pipeline, "learn_rotations", lambda *a, **k: pytest.fail("rotations were re-learned"))
    monkeypatch.setattr(pipeline, "gptq_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_spinquant(config)
    assert len(calls) == 1  # only layer 1 was redone
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(config.output / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DRAWS = dict(rotation_draws=2, selection_windows=2, selection_seq_len=32)


def test_best_of_draws_keeps_the_draw_with_the_lowest_held_out_perplexity(tiny_dir, tmp_path, data_dir):
    """The chosen draw's recorded score is the minimum, and is what the saved checkpoint scores on those windows."""
    from quantkit.data import calibration_tokens
    from quantkit.evaluate import perplexity

    single = load_file(str(run_spinquant(_config(tiny_dir, tmp_path / "one", data_dir)) / "model.safetensors"))
    out = run_spinquant(_config(tiny_dir, tmp_path / "best", data_dir, **DRAWS))
    loaded, meta = load_checkpoint(out)
    draws = meta["config"]["result"]["draws"]
    scores = draws["selection_perplexity"]
    assert set(scores) == {"0", "1"} and scores["0"] != scores["1"]  # the inits differ, so do the draws
    chosen = min(scores, key=scores.get)
    assert draws["chosen_seed"] == int(chosen)
    held_out = calibration_tokens(loaded.tokenizer, "c4", 2, 32, 0, data_dir)
    with torch.no_grad():
        again = perplexity(loaded.model, held_out.flatten(), 32, 2).perplexity
    assert again == scores[chosen]  # save/load reproduces the scored model bit for bit
    saved = load_file(str(out / "model.safetensors"))
    same_as_single = all(torch.equal(saved[k], single[k]) for k in single)
    assert same_as_single == (chosen == "0")  # draw 0 is the one-draw run (same init seed, same windows)
    assert not (tmp_path / ".best.spinquant-work").exists()


def test_best_of_draws_follows_the_scores_and_resumes_without_relearning(tiny_dir, tmp_path, data_dir, monkeypatch):
    import quantkit.evaluate as evaluate
    import quantkit.pipelines.spinquant as pipeline
    from quantkit.evaluate import PerplexityResult

    def scores(*values):  # the held-out perplexities, in call order; None: Ctrl-C while scoring
        queue = list(values)

        def scored(*_args, **_kwargs):
            value = queue.pop(0)
            if value is None:
                raise KeyboardInterrupt
            return PerplexityResult(value, 0.0, 1, 1, 1)
        return scored, queue

    single = load_file(str(run_spinquant(_config(tiny_dir, tmp_path / "one", data_dir)) / "model.safetensors"))
    scored, queue = scores(3.0, 5.0)
    monkeypatch.setattr(evaluate, "perplexity", scored)  # what the draws' selection_perplexity scores with
    first = run_spinquant(_config(tiny_dir, tmp_path / "first", data_dir, **DRAWS))

    scored, queue = scores(5.0, None, 3.0)  # draw 0 scored, Ctrl-C while scoring draw 1, then the rerun
    monkeypatch.setattr(evaluate, "perplexity", scored)
    config = _config(tiny_dir, tmp_path / "second", data_dir, **DRAWS)
    with pytest.raises(KeyboardInterrupt):
        run_spinquant(config)
    assert (config.stage_dir / "draw0" / "selection.json").is_file() and not config.output.exists()
    monkeypatch.setattr(pipeline, "learn_rotations", lambda *a, **k: pytest.fail("rotations were re-learned"))
    monkeypatch.setattr(pipeline, "gptq_layer", lambda *a, **k: pytest.fail("GPTQ ran again"))
    second = run_spinquant(config)
    assert queue == []  # draw 0's score was read from its stage, not computed again

    for path, chosen, fake in ((first, 0, [3.0, 5.0]), (second, 1, [5.0, 3.0])):
        meta = json.loads((path / "quantkit.json").read_text())
        assert meta["config"]["result"]["draws"] == {"chosen_seed": chosen,
                                                     "selection_perplexity": {"0": fake[0], "1": fake[1]}}
        saved = load_file(str(path / "model.safetensors"))
        assert all(torch.equal(saved[k], single[k]) for k in single) == (chosen == 0)


def test_draws_need_rotations_and_a_held_out_set(tiny_dir, tmp_path, data_dir):
    with pytest.raises(QuantkitError, match="--rotation-draws needs rotations"):
        _config(tiny_dir, tmp_path / "o", data_dir, rotation_mode="none", **DRAWS)
    with pytest.raises(QuantkitError, match="--selection-data wikitext2 is the calibration set"):
        _config(tiny_dir, tmp_path / "o", data_dir, selection_data="wikitext2", **DRAWS)
    with pytest.raises(QuantkitError, match="rotation_draws=0"):
        _config(tiny_dir, tmp_path / "o", data_dir, rotation_draws=0)


def test_too_short_calibration_is_refused_before_any_work(tiny_dir, tmp_path, data_dir):
    config = _config(tiny_dir, tmp_path / "out", data_dir, seq_len=10_000_000)
    with pytest.raises(QuantkitError, match="fewer than one window"):
        run_spinquant(config)
    assert not config.stage_dir.exists() and not config.output.exists()
    with pytest.raises(QuantkitError, match="rotation_samples=0"):
        _config(tiny_dir, tmp_path / "out", data_dir, rotation_samples=0)


def test_rotations_of_another_model_are_refused(tiny_dir, tmp_path, data_dir):
    from quantkit.algorithms.rotation import random_rotations

    path = tmp_path / "r.safetensors"
    random_rotations(tiny_llama(seed=0, hidden_size=32, intermediate_size=64), 0).save(path)
    with pytest.raises(QuantkitError, match=r"r1 has shape \(32, 32\)"):
        run_spinquant(_config(tiny_dir, tmp_path / "out", data_dir, rotations=path))
    assert not (tmp_path / "out").exists()


def test_unsupported_sizes(tmp_path, data_dir):
    """head_dim without a Hadamard: a clear error; intermediate without one: R4 off, recorded."""
    bad_head = tmp_path / "bad_head"
    tiny_llama(seed=0, hidden_size=40, num_heads=4, num_kv_heads=2).save_pretrained(str(bad_head))
    tiny_tokenizer().save_pretrained(str(bad_head))
    with pytest.raises(QuantkitError, match="head_dim 10"):
        run_spinquant(_config(bad_head, tmp_path / "o1", data_dir))
    bad_inter = tmp_path / "bad_inter"
    tiny_llama(seed=0, intermediate_size=50).save_pretrained(str(bad_inter))
    tiny_tokenizer().save_pretrained(str(bad_inter))
    out = run_spinquant(_config(bad_inter, tmp_path / "o2", data_dir, method="rtn", rotation_mode="random"))
    meta = json.loads((out / "quantkit.json").read_text())
    assert "intermediate size 50" in meta["config"]["result"]["r4"] and "input_transforms" not in meta


def test_cli_presets_and_explicit_options_reach_the_config(monkeypatch, tmp_path):
    import quantkit.pipelines.spinquant as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_spinquant", lambda config: seen.append(config) or config.output)
    for extra in ([], ["--learn-against", "activations", "--no-refit-scales", "--weight-clip", "amax",
                       "--rotation-objective", "kd", "--rotation-samples", "24", "--rotation-draws", "1"],
                  ["--preset", "meta"]):
        result = CliRunner().invoke(main, ["spinquant", "--output", str(tmp_path / "o"), "--preset", "cpu", *extra])
        assert result.exit_code == 0, result.output
    cpu, overridden, meta = seen
    assert (cpu.learn_against, cpu.refit_scales, cpu.scheme.weight_clip, cpu.rotation_steps, cpu.rotation_samples,
            cpu.rotation_objective, cpu.rotation_draws, cpu.selection_data) == \
        (LearnTarget.WEIGHTS_AND_ACTIVATIONS, True, WeightClip.MSE, 24, 96, RotationObjective.CE, 3, "c4")
    assert (overridden.learn_against, overridden.refit_scales, overridden.scheme.weight_clip,
            overridden.rotation_objective, overridden.rotation_samples, overridden.rotation_draws) == \
        (LearnTarget.ACTIVATIONS, False, WeightClip.AMAX, RotationObjective.KD, 24, 1)
    assert (meta.learn_against, meta.rotation_steps, meta.gptq_samples, meta.rotation_objective,
            meta.rotation_draws) == (LearnTarget.ACTIVATIONS, 100, 128, RotationObjective.CE, 1)
