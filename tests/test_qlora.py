"""The qlora pipeline end to end on a tiny model: CLI, report, resume, NaN, merge, bad input."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from quantkit.checkpoint import load_checkpoint
from quantkit.cli import main
from quantkit.config import Preset, QLoRAConfig
from quantkit.errors import QuantkitError
from quantkit.pipelines import qlora as qlora_pipeline
from quantkit.pipelines.qlora import REPORT_FILE, run_qlora
from quantkit.training import loops
from quantkit.training.lora import LoRALinear


@pytest.fixture(autouse=True)
def _reference_kernel(monkeypatch):
    monkeypatch.setenv("QUANTKIT_KERNEL", "reference")


def _config(tiny_dir, out, data_dir, **overrides):
    values = dict(model=str(tiny_dir), data_dir=data_dir, seq_len=48, eval_windows=1, eval_seq_len=32,
                  save_every=1, qat_steps=2, lora_steps=2, dpo_steps=2, dpo_heldout_pairs=4, lora_rank=4,
                  lora_alpha=8.0, qat_lr=1e-3)
    values.update(overrides)
    return QLoRAConfig.preset(Preset.CPU, out, **values)


def _tensors(path):
    return load_file(str(path / "model.safetensors"))


def test_cli_end_to_end(tiny_dir, tmp_path, data_dir, ids):
    out = tmp_path / "q"
    res = CliRunner().invoke(main, [str(a) for a in (
        "qlora", "--model", tiny_dir, "--output", out, "--preset", "cpu", "--data-dir", data_dir,
        "--qat-steps", 2, "--lora-steps", 2, "--dpo-steps", 2, "--lora-rank", 4, "--lora-alpha", 8,
        "--dpo-beta", 0.2, "--heldout-pairs", 4, "--seq-len", 48, "--eval-windows", 1, "--eval-seq-len", 32)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    loaded, meta = load_checkpoint(out)
    assert meta["pipeline"] == "qlora" and meta["method"] == "qat"
    assert meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 8 and meta["lora"]["dtype"] == "bfloat16"
    assert meta["config"]["dpo"]["beta"] == 0.2
    # the cpu preset learns the int4 scales from the mse clip search; the checkpoint records both
    assert meta["config"]["qat"]["learn_scales"] and meta["scheme"]["weight_clip"] == "mse"
    q = loaded.model.model.layers[1].mlp.down_proj
    assert isinstance(q, LoRALinear) and type(q.base).__name__ == "Int4Linear"
    with torch.inference_mode():
        assert torch.isfinite(loaded.model(ids).logits).all()
    report = json.loads((out / REPORT_FILE).read_text())
    for stage in ("qat", "lora", "dpo"):
        assert len(report[stage]["loss"]) == 2 and report[stage]["perplexity"] > 1
    assert report["perplexity_float"] > 1 and report["perplexity_ptq"] > 1
    before, after = report["dpo"]["heldout_before"], report["dpo"]["heldout_after"]
    assert before["pairs"] == after["pairs"] == 4 and before["reward_margin"] == 0.0
    assert not (tmp_path / "q.stages").exists()  # stage results are dropped once the checkpoint is written


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_dir, tmp_path, data_dir, monkeypatch):
    run_qlora(_config(tiny_dir, tmp_path / "a", data_dir))

    real_save = loops.save_progress
    interrupt_in = ["lora.progress", "dpo.progress"]  # crash right after the first step checkpoint of each

    def crashing_save(progress_dir, *args):
        real_save(progress_dir, *args)
        if interrupt_in and progress_dir.name == interrupt_in[0]:
            interrupt_in.pop(0)
            raise KeyboardInterrupt

    monkeypatch.setattr(loops, "save_progress", crashing_save)
    config = _config(tiny_dir, tmp_path / "b", data_dir)
    with pytest.raises(KeyboardInterrupt):
        run_qlora(config)
    work = tmp_path / "b.stages"
    assert (work / "qat" / "stage.json").is_file() and (work / "lora.progress" / "progress.json").is_file()
    with pytest.raises(QuantkitError, match="other settings"):  # resuming needs the same settings
        run_qlora(_config(tiny_dir, tmp_path / "b", data_dir, lora_lr=5e-4))
    with pytest.raises(KeyboardInterrupt):
        run_qlora(config)
    assert (work / "lora" / "stage.json").is_file() and (work / "dpo.progress" / "progress.json").is_file()
    run_qlora(config)

    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((tmp_path / d / REPORT_FILE).read_text()) for d in ("a", "b"))
    assert ra == rb


def test_nan_loss_stops_the_stage_and_keeps_finished_stages(tiny_dir, tmp_path, data_dir, monkeypatch):
    calls = []

    def nan_in_lora(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) > 2 else loss  # QAT's 2 steps are fine

    real_loss = qlora_pipeline.stage_loss
    monkeypatch.setattr(qlora_pipeline, "stage_loss", nan_in_lora)
    with pytest.raises(QuantkitError, match=r"stage lora: the loss became nan at step 1"):
        run_qlora(_config(tiny_dir, tmp_path / "n", data_dir))
    assert (tmp_path / "n.stages" / "qat" / "stage.json").is_file()
    assert not (tmp_path / "n.stages" / "lora").exists() and not (tmp_path / "n").exists()
    qat_state = load_file(str(tmp_path / "n.stages" / "qat" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in qat_state.values() if t.is_floating_point())


def test_merge_lora_writes_one_matrix_per_linear(tiny_dir, tmp_path, data_dir):
    out = run_qlora(_config(tiny_dir, tmp_path / "m", data_dir, merge_lora=True, qat_steps=1, lora_steps=1,
                            dpo_steps=1))
    loaded, meta = load_checkpoint(out)
    assert "lora" not in meta and not any(isinstance(m, LoRALinear) for m in loaded.model.modules())
    assert not any("lora_" in k for k in _tensors(out))


@pytest.mark.parametrize("args,needle", [
    (("--lora-rank", "0"), "--lora-rank must be at least 1"),
    (("--lora-rank", "33"), "--lora-rank must be between 1 and 32"),
    (("--pref-data", "{bad_pref}"), "bad.jsonl record 1 is not a preference pair"),
    (("--sft-data", "{bad_sft}"), "sft.json record 0 has no response turn"),
    (("--qat-steps", "-1"), "--qat-steps must be >= 0"),
])
def test_bad_input_is_refused_and_writes_nothing(args, needle, tiny_dir, tmp_path, data_dir):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q"}\n')
    (tmp_path / "sft.json").write_text('[{"instruction": "q", "input": "", "output": ""}]')
    args = [a.format(bad_pref=tmp_path / "bad.jsonl", bad_sft=tmp_path / "sft.json") for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(main, ["qlora", "--model", str(tiny_dir), "--output", str(tmp_path / "o"), "--preset",
                                    "cpu", "--data-dir", str(data_dir), *args])
    assert res.exit_code != 0 and needle in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
