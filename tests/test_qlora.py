"""The qlora pipeline end to end on a tiny model: CLI, report, resume, NaN, merge, bad input."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from quantkit import draws
from quantkit.algorithms.rotation import Rotations, fold_rotations_, random_rotations
from quantkit.checkpoint import load_checkpoint
from quantkit.cli import main
from quantkit.config import Preset, QLoRAConfig
from quantkit.errors import QuantkitError
from quantkit.model import load_model, tiny_llama
from quantkit.kernels import hadamard
from quantkit.modules import InputTransform
from quantkit.pipelines import qlora as qlora_pipeline
from quantkit.pipelines.qlora import REPORT_FILE, run_qlora
from quantkit.training import loops
from quantkit.primitives import dequantize, quantize
from quantkit.scheme import Scheme
from quantkit.training.lora import LoRALinear, add_lora
from quantkit.training.qat import QATLinear, convert_qat, grid_lr_ratios, prepare_qat


@pytest.fixture(autouse=True)
def _reference_kernel(monkeypatch):
    monkeypatch.setenv("QUANTKIT_KERNEL", "reference")


def _config(tiny_dir, out, data_dir, **overrides):
    values = dict(model=str(tiny_dir), data_dir=data_dir, seq_len=48, lora_seq_len=40, eval_windows=1,
                  eval_seq_len=32, save_every=1, qat_steps=2, lora_steps=2, dpo_steps=2, dpo_heldout_pairs=4,
                  lora_rank=4, lora_alpha=8.0, qat_lr=1e-3)
    values.update(overrides)
    return QLoRAConfig.preset(Preset.CPU, out, **values)


def _tensors(path):
    return load_file(str(path / "model.safetensors"))


def test_cli_end_to_end(tiny_dir, tmp_path, data_dir, ids):
    out = tmp_path / "q"
    res = CliRunner().invoke(main, [str(a) for a in (
        "qlora", "--model", tiny_dir, "--output", out, "--preset", "cpu", "--data-dir", data_dir,
        "--qat-steps", 2, "--lora-steps", 2, "--dpo-steps", 2, "--lora-rank", 4, "--lora-alpha", 8,
        "--dpo-beta", 0.2, "--batch-size", 2, "--dpo-batch-size", 3, "--heldout-pairs", 4, "--seq-len", 48,
        "--lora-seq-len", 40, "--eval-windows", 1, "--eval-seq-len", 32)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    loaded, meta = load_checkpoint(out)
    assert meta["pipeline"] == "qlora" and meta["method"] == "qat"
    assert meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 8 and meta["lora"]["dtype"] == "bfloat16"
    assert meta["config"]["dpo"]["beta"] == 0.2
    # --batch-size sets every stage but the one with an option of its own
    assert [meta["config"][stage]["batch_size"] for stage in ("qat", "lora", "dpo")] == [2, 2, 3]
    # the cpu preset learns the int4 scales from the mse clip search; the checkpoint records both
    assert meta["config"]["qat"]["learn_scales"] and meta["scheme"]["weight_clip"] == "mse"
    # ... and starts QAT from GPTQ on the Hadamard-rotated model
    assert meta["config"]["qat"]["rotate"] and meta["config"]["qat"]["init"] == "gptq"
    assert meta["config"]["lora"]["init"] == "error"  # ... and LoRA from the int4 error's best rank-r fit
    assert meta["config"]["seq_len"] == 48 and meta["config"]["lora"]["seq_len"] == 40
    assert meta["config"]["qat"]["seq_len"] is None  # ... QAT at the run's length
    # ... and DPO distills the float model on the side, training the backbone slower than the adapters
    assert meta["config"]["dpo"]["kd_weight"] == 10.0 and meta["config"]["dpo"]["backbone_lr_ratio"] == 0.1
    assert meta["config"]["dpo"]["lr"] == 3e-6  # ... in small steps (the 90% target: docs/measurements/qlora.md)
    q = loaded.model.model.layers[1].mlp.down_proj
    assert isinstance(q, LoRALinear) and type(q.base).__name__ == "Int4Linear"
    with torch.inference_mode():
        assert torch.isfinite(loaded.model(ids).logits).all()
    report = json.loads((out / REPORT_FILE).read_text())
    for stage in ("qat", "lora", "dpo"):
        assert len(report[stage]["loss"]) == 2 and report[stage]["perplexity"] > 1
    assert report["perplexity_float"] > 1 and report["perplexity_qat_start"] > 1
    before, after = report["dpo"]["heldout_before"], report["dpo"]["heldout_after"]
    assert before["pairs"] == after["pairs"] == 4 and before["reward_margin"] == 0.0
    assert not (tmp_path / "q.stages").exists()  # stage results are dropped once the checkpoint is written


def test_cli_sequential_lora_init_starts_the_adapters_from_the_error(tiny_dir, tmp_path, data_dir):
    out = tmp_path / "q"
    res = CliRunner().invoke(main, [str(a) for a in (
        "qlora", "--model", tiny_dir, "--output", out, "--preset", "cpu", "--data-dir", data_dir,
        "--lora-init", "sequential", "--lora-init-samples", 2, "--qat-steps", 0, "--lora-steps", 0,
        "--dpo-steps", 0, "--lora-rank", 4, "--heldout-pairs", 4, "--seq-len", 48, "--lora-seq-len", 40,
        "--eval-windows", 1, "--eval-seq-len", 32)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    _, meta = load_checkpoint(out)
    assert meta["config"]["lora"]["init"] == "sequential"
    b = {k: v for k, v in _tensors(out).items() if k.endswith("lora_B")}
    assert len(b) == 14 and all(v.abs().max() > 0 for v in b.values())  # untrained, yet not LoRA's B = 0


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tiny_dir, tmp_path, data_dir, monkeypatch):
    # per-parameter lr ratios too: read from the model as each stage starts, so a resumed stage uses the same
    lr_options = dict(qat_grid_lr=True, dpo_grid_lr=True, dpo_backbone_lr_ratio=0.5)
    run_qlora(_config(tiny_dir, tmp_path / "a", data_dir, **lr_options))

    real_save = loops.save_progress
    interrupt_in = ["qat.progress", "lora.progress", "dpo.progress"]  # crash after each's first step checkpoint

    def crashing_save(progress_dir, *args):
        real_save(progress_dir, *args)
        if interrupt_in and progress_dir.name == interrupt_in[0]:
            interrupt_in.pop(0)
            raise KeyboardInterrupt

    monkeypatch.setattr(loops, "save_progress", crashing_save)
    config = _config(tiny_dir, tmp_path / "b", data_dir, **lr_options)
    with pytest.raises(KeyboardInterrupt):
        run_qlora(config)
    work = tmp_path / "b.stages"
    assert (work / "qat.progress" / "progress.json").is_file() and not (work / "qat").exists()
    with pytest.raises(KeyboardInterrupt):
        run_qlora(config)
    assert (work / "qat" / "stage.json").is_file() and (work / "lora.progress" / "progress.json").is_file()
    with pytest.raises(QuantkitError, match="other settings"):  # resuming needs the same settings
        run_qlora(_config(tiny_dir, tmp_path / "b", data_dir, lora_lr=5e-4, **lr_options))
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


def test_lora_runs_average_their_adapters_and_the_first_run_is_the_single_run(tiny_dir, tmp_path, data_dir,
                                                                            monkeypatch):
    common = dict(dpo_steps=0, lora_init_samples=2)
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    run_qlora(_config(tiny_dir, one, data_dir, **common))
    run_qlora(_config(tiny_dir, two, data_dir, lora_runs=2, **common))

    real_save = loops.save_progress

    def crashing_save(progress_dir, *args):  # crash in the second run, after its first step checkpoint
        real_save(progress_dir, *args)
        if progress_dir.name == "lora1.progress":
            raise KeyboardInterrupt

    monkeypatch.setattr(loops, "save_progress", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        run_qlora(_config(tiny_dir, resumed, data_dir, lora_runs=2, **common))
    assert (tmp_path / "resumed.stages" / "lora" / "stage.json").is_file()
    monkeypatch.setattr(loops, "save_progress", real_save)
    run_qlora(_config(tiny_dir, resumed, data_dir, lora_runs=2, **common))  # run 0 loaded, run 1 resumed
    a, b, r = _tensors(one), _tensors(two), _tensors(resumed)
    assert r.keys() == b.keys() and all(torch.equal(v, b[k]) for k, v in r.items())
    (_, meta1), (loaded2, meta2) = load_checkpoint(one), load_checkpoint(two)
    assert meta1["lora"]["rank"] == 4 and meta2["lora"]["rank"] == 8  # one adapter of runs x rank
    assert meta2["lora"]["alpha"] == meta1["lora"]["alpha"] == 8  # alpha kept: scaling alpha / 8 = mean of two
    name = "model.layers.1.self_attn.o_proj"
    # run 0 is the single run exactly (same seed): the first half of A's rows and B's columns
    assert torch.equal(b[f"{name}.lora_A"][:4], a[f"{name}.lora_A"])
    assert torch.equal(b[f"{name}.lora_B"][:, :4], a[f"{name}.lora_B"])
    # run 1 started from its own seed's windows and A draw, so it is another adapter
    assert not torch.equal(b[f"{name}.lora_A"][4:], a[f"{name}.lora_A"])
    assert all(torch.equal(a[k], b[k]) for k in a if "lora_" not in k)  # the same backbone
    report = json.loads((two / REPORT_FILE).read_text())
    assert len(report["lora"]["runs"]) == 2 and report["lora"]["perplexity"] > 1
    assert all(len(r["loss"]) == 2 for r in report["lora"]["runs"])
    assert isinstance(loaded2.model.get_submodule(name), LoRALinear)


@pytest.mark.parametrize("winner", [0, 1])
def test_best_of_n_keeps_the_draw_with_the_lowest_held_out_perplexity_and_resumes(winner, tiny_dir, tmp_path,
                                                                                   data_dir, monkeypatch):
    # The draws' scores are set here so that either draw can win; the real ones are checked below.
    scores, scored = {0: 2.0, 1: 2.0}, []
    scores[winner] = 1.0

    def fixed_score(model, held_out, path, label):
        assert held_out.shape == (2, 32)  # --selection-windows x --selection-seq-len of c4
        draw = path.parent.name
        scored.append(draw)
        if not path.is_file():  # kept like the real one, so a resumed run reads it back
            path.write_text(json.dumps({"perplexity": scores[int(draw.removeprefix("draw"))]}))
        return json.loads(path.read_text())["perplexity"]

    monkeypatch.setattr(draws, "selection_perplexity", fixed_score)
    real_save = loops.save_progress

    def crash_in_second_draws_qat(progress_dir, *args):
        real_save(progress_dir, *args)
        if progress_dir.parent.name == "draw1" and progress_dir.name == "qat.progress":
            raise KeyboardInterrupt

    monkeypatch.setattr(loops, "save_progress", crash_in_second_draws_qat)
    options = dict(dpo_steps=0, draws=2, selection_windows=2, selection_seq_len=32)
    config = _config(tiny_dir, tmp_path / "best", data_dir, **options)
    with pytest.raises(KeyboardInterrupt):
        run_qlora(config)
    work = tmp_path / "best.stages"
    assert (work / "draw0" / "lora" / "stage.json").is_file() and (work / "draw0" / "selection.json").is_file()
    monkeypatch.setattr(loops, "save_progress", real_save)
    run_qlora(config)  # resumes: draw 0 reloaded, draw 1 from its step checkpoint
    report = json.loads((tmp_path / "best" / REPORT_FILE).read_text())
    assert report["draws"] == {"chosen_seed": winner, "selection_perplexity": {"0": scores[0], "1": scores[1]}}
    assert scored == ["draw0", "draw0", "draw1"]

    # The kept stage-2 model is exactly the one-draw run from the winner's seed (DPO trains nothing here).
    run_qlora(_config(tiny_dir, tmp_path / "one", data_dir, dpo_steps=0, seed=winner))
    best, one = _tensors(tmp_path / "best"), _tensors(tmp_path / "one")
    assert best.keys() == one.keys() and all(torch.equal(best[k], one[k]) for k in best)
    loser = _config(tiny_dir, tmp_path / "other", data_dir, dpo_steps=0, seed=1 - winner)
    run_qlora(loser)
    other = _tensors(tmp_path / "other")
    assert any(not torch.equal(best[k], other[k]) for k in best)  # the draws differ: the choice matters


def test_best_of_n_scores_each_stage_2_model_on_the_held_out_set(tiny_dir, tmp_path, data_dir):
    run_qlora(_config(tiny_dir, tmp_path / "q", data_dir, dpo_steps=0, draws=2, selection_windows=2,
                      selection_seq_len=32))
    draws = json.loads((tmp_path / "q" / REPORT_FILE).read_text())["draws"]
    ppl = draws["selection_perplexity"]
    assert set(ppl) == {"0", "1"} and ppl["0"] != ppl["1"] and all(math.isfinite(p) and p > 1 for p in ppl.values())
    assert draws["chosen_seed"] == int(min(ppl, key=ppl.get))


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


def test_untrained_qlora_from_rtn_is_vanilla_ptq_and_the_rotated_gptq_start_is_not(tiny_dir, tmp_path, data_dir, ids):
    def logits(out):
        with torch.inference_mode():
            return load_checkpoint(out)[0].model(ids).logits

    runner = CliRunner()
    res = runner.invoke(main, ["ptq", "--model", str(tiny_dir), "--output", str(tmp_path / "ptq"),
                               "--weight-clip", "mse"])
    assert res.exit_code == 0, res.output
    zero = ["--qat-steps", "0", "--lora-steps", "0", "--dpo-steps", "0", "--heldout-pairs", "4", "--seq-len", "48",
            "--eval-windows", "1", "--eval-seq-len", "32", "--no-qat-learn-scales", "--lora-init", "zero"]
    for name, flags in (("rtn", ["--no-qat-rotate", "--qat-init", "rtn"]), ("gptq", ["--qat-init-samples", "2"])):
        res = runner.invoke(main, ["qlora", "--model", str(tiny_dir), "--output", str(tmp_path / name), "--preset",
                                   "cpu", "--data-dir", str(data_dir), *zero, *flags])
        assert res.exit_code == 0, res.output + repr(res.exception)
    meta = {n: load_checkpoint(tmp_path / n)[1]["config"]["qat"] for n in ("rtn", "gptq")}
    assert (meta["rtn"]["rotate"], meta["rtn"]["init"]) == (False, "rtn")
    assert (meta["gptq"]["rotate"], meta["gptq"]["init"]) == (True, "gptq")
    ptq = logits(tmp_path / "ptq")
    torch.testing.assert_close(logits(tmp_path / "rtn"), ptq, atol=0, rtol=0)  # RTN with mse scales, exactly
    assert (logits(tmp_path / "gptq") - ptq).abs().max() > 0.1  # rotated, GPTQ's codes: another int4 model


def test_rotation_before_qat_keeps_the_float_model(tiny, ids):
    model = tiny.float()
    with torch.no_grad():
        for layer in model.model.layers:  # gains that are not 1, so fusing them is tested too
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
        before = model(ids).logits
        q_before = model.model.layers[0].self_attn.q_proj.weight.clone()
        fold_rotations_(model, seed=0)
        after = model(ids).logits
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert (model.model.layers[0].input_layernorm.weight == 1).all()
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, q_before, atol=1e-3)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def test_rotation_of_a_size_without_hadamard_is_refused():
    model = tiny_llama(hidden_size=92, num_heads=2, num_kv_heads=1)  # 92 = 4 x 23: no Hadamard construction
    with pytest.raises(QuantkitError, match="hidden size 92.*pass --no-qat-rotate"):
        fold_rotations_(model, seed=0, remedy="pass --no-qat-rotate")


def _rotations_file(tiny_dir, path, r4=True, **tiny_overrides):
    """Seeded random rotations with R4, saved as spinquant saves its learned ones."""
    model = tiny_llama(**tiny_overrides) if tiny_overrides else load_model(str(tiny_dir)).model
    random_rotations(model, seed=7, r4=r4).save(path)
    return path


def test_qat_rotations_file_is_folded_in_with_its_r4(tiny_dir, tmp_path, data_dir, ids):
    rot_file = _rotations_file(tiny_dir, tmp_path / "rot.safetensors")
    res = CliRunner().invoke(main, [str(a) for a in (
        "qlora", "--model", tiny_dir, "--output", tmp_path / "q", "--preset", "cpu", "--data-dir", data_dir,
        "--qat-rotations", rot_file, "--qat-init", "rtn", "--lora-init", "zero", "--qat-steps", 0, "--lora-steps", 0,
        "--dpo-steps", 0, "--heldout-pairs", 4, "--seq-len", 48, "--eval-windows", 1, "--eval-seq-len", 32)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    loaded, meta = load_checkpoint(tmp_path / "q")
    assert meta["config"]["qat"]["rotate"] and meta["config"]["qat"]["rotations"] == str(rot_file)
    assert meta["input_transforms"] == {f"model.layers.{i}.mlp.down_proj": "hadamard" for i in range(2)}

    # The same model by hand from the public pieces: the file's R1/R2/R4 (R4 as hooks on the float
    # model, which computes what it computed before), then RTN-started QAT whose down_projs apply R4.
    model = load_model(str(tiny_dir)).model.float()
    with torch.no_grad():
        before = model(ids).logits
        hooks = fold_rotations_(model, seed=0, rotations=Rotations.load(rot_file)[0])
        torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)
        for hook in hooks:
            hook.remove()
        assert not torch.allclose(model(ids).logits, before, atol=1e-2)  # R4 is folded into the weights
        prepare_qat(model, Scheme(weight_clip="mse"), learn_scales=True)
        for layer in model.model.layers:
            layer.mlp.down_proj.input_transform = InputTransform.HADAMARD
        convert_qat(model, Scheme(weight_clip="mse"))
        qlora_pipeline._release_dtypes(model)
        with torch.inference_mode():
            torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("flags,needle", [
    (("--qat-rotations", "{missing}"), "missing.safetensors: no such file"),
    (("--qat-rotations", "{other}"), "r1 has shape (32, 32) but this model needs (64, 64)"),
    (("--qat-rotations", "{good}", "--no-qat-rotate"), "--qat-rotations needs --qat-rotate"),
])
def test_bad_rotations_file_is_refused_and_writes_nothing(flags, needle, tiny_dir, tmp_path, data_dir):
    files = {"missing": tmp_path / "missing.safetensors", "good": _rotations_file(tiny_dir, tmp_path / "good.st"),
             "other": _rotations_file(tiny_dir, tmp_path / "other.st", hidden_size=32, num_heads=2, num_kv_heads=1)}
    before = sorted(p.name for p in tmp_path.iterdir())
    res = CliRunner().invoke(main, ["qlora", "--model", str(tiny_dir), "--output", str(tmp_path / "o"), "--preset",
                                    "cpu", "--data-dir", str(data_dir), *(f.format(**files) for f in flags)])
    assert res.exit_code != 0 and needle in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_dpo_kd_weight_adds_the_distillation_term_to_each_step(tiny_dir, tmp_path, data_dir):
    first = {}
    for w in (0.0, 1.0, 2.0):  # identical stages 1-2, so the first DPO step differs by w x the same KD
        run_qlora(_config(tiny_dir, tmp_path / f"w{w}", data_dir, qat_steps=1, lora_steps=1, dpo_steps=1,
                          qat_init="rtn", dpo_kd_weight=w))
        first[w] = json.loads((tmp_path / f"w{w}" / REPORT_FILE).read_text())["dpo"]["loss"][0]
    kd = first[1.0] - first[0.0]
    assert kd > 1e-4  # the stage-2 model is not the float teacher
    assert abs((first[2.0] - first[1.0]) - kd) < 1e-4 * max(1.0, kd)


def test_each_stage_trains_and_inits_on_windows_of_its_own_length(tiny_dir, tmp_path, data_dir, monkeypatch):
    seen = []  # (stage, window length) of every calibration read and every training batch

    def calibration_tokens(tok, name, n, seq_len, *args):
        seen.append(("read", seq_len))
        return real_tokens(tok, name, n, seq_len, *args)

    def stage_loss(model, batch, *args):
        seen.append(("train", batch.input_ids.shape[1]))
        return real_loss(model, batch, *args)

    real_tokens, real_loss = qlora_pipeline.calibration_tokens, qlora_pipeline.stage_loss
    monkeypatch.setattr(qlora_pipeline, "calibration_tokens", calibration_tokens)
    monkeypatch.setattr(qlora_pipeline, "stage_loss", stage_loss)
    run_qlora(_config(tiny_dir, tmp_path / "s", data_dir, qat_seq_len=24, lora_seq_len=40, seq_len=48,
                      qat_steps=1, lora_steps=2, dpo_steps=1, dpo_kd_weight=1.0))
    # GPTQ init and QAT at 24; LoRA's init windows and its 2 steps at 40; DPO's distillation window at
    # LoRA's 40 too (the stage-2 model's own text), while its pairs are cut at the run's 48
    assert seen == [("read", 24), ("read", 24), ("train", 24), ("read", 40), ("read", 40), ("train", 40),
                    ("train", 40), ("read", 40), ("train", 40)]


def test_dpo_lr_ratios_train_the_backbone_slower_and_by_its_grid(tiny):
    tiny.float()
    prepare_qat(tiny, Scheme(), learn_scales=True)
    add_lora(tiny, 4, 8.0)
    params = dict(tiny.named_parameters())
    plain = qlora_pipeline._lr_ratios(tiny, params, grid_lr=False, backbone=1.0)
    assert {plain[n] for n in params if not n.endswith("weight_scale")} == {1.0}  # one lr, scales a tenth
    ratios = qlora_pipeline._lr_ratios(tiny, params, grid_lr=True, backbone=0.25)
    adapters = [n for n in params if "lora_" in n]
    assert adapters and all(ratios[n] == 1.0 for n in adapters)
    grid = grid_lr_ratios(tiny)
    for n in params:
        if "lora_" not in n:  # norms, head and embedding at the backbone ratio; int4 linears by their grid too
            assert ratios[n] == pytest.approx(0.25 * grid.get(n, 1.0)), n
    assert len({round(ratios[n], 6) for n in grid}) > 2


def test_error_init_of_full_rank_adapters_restores_the_float_linears_under_r4(tiny_dir, tmp_path, data_dir):
    rot_file = _rotations_file(tiny_dir, tmp_path / "rot.safetensors")
    config = _config(tiny_dir, tmp_path / "q", data_dir, qat_rotations=str(rot_file), lora_init="error",
                     lora_init_samples=2, scheme=Scheme(act_bits=None))  # the weights alone lose anything
    data = qlora_pipeline._Data(config, load_model(str(tiny_dir)).tokenizer)
    model, float_weights = _rotated_qat_model_with_adapters(tiny_dir, rot_file, config.scheme, rank=None)
    with torch.no_grad():
        x = {n: torch.randn(5, w.shape[1], generator=torch.Generator().manual_seed(1)) for n, w in float_weights.items()}
        before = {n: model.get_submodule(n)(x[n]) for n in float_weights}  # B = 0: the int4 linears
        qlora_pipeline._init_adapters(model, float_weights, data, config)
        for name, w in float_weights.items():
            down = name.endswith("down_proj")
            want = torch.nn.functional.linear(hadamard(x[name]) if down else x[name], w)  # the float linear
            assert (before[name] - want).abs().max() > 1e-3 * want.abs().max(), name  # int4 loses something
            torch.testing.assert_close(model.get_submodule(name)(x[name]), want, atol=1e-4, rtol=1e-4)


def _rotated_qat_model_with_adapters(tiny_dir, rot_file, scheme, rank):
    """The tiny model rotated (R4 applied by its down_projs), fake-quantized by ``scheme``, with fresh
    rank-``rank`` adapters on every block linear; and its float block weights by name."""
    model = load_model(str(tiny_dir)).model.float()
    with torch.no_grad():
        for hook in fold_rotations_(model, seed=0, rotations=Rotations.load(rot_file)[0]):
            hook.remove()  # R4 folded into the down_projs' weights; applied online below
        float_weights = {n: w.clone() for n, w in qlora_pipeline._block_weights(model).items()}
        prepare_qat(model, scheme, learn_scales=True)
        for layer in model.model.layers:
            layer.mlp.down_proj.input_transform = InputTransform.HADAMARD
        torch.manual_seed(0)
        for name, w in float_weights.items():  # rank None: full rank, min(in, out) of each linear
            add_lora(model, min(w.shape) if rank is None else rank, 8.0, [name])
    return model, float_weights


def _hidden(model, ids):
    """The last block's outputs ``[n, L, D]`` (no final norm, no head) on windows ``ids``."""
    with torch.no_grad():
        return torch.stack([model.model(input_ids=row[None]).last_hidden_state[0] for row in ids])


@pytest.mark.parametrize("init", ["error", "sequential"])
def test_full_rank_adapters_from_either_error_init_restore_the_float_model(init, tiny_dir, tmp_path, data_dir):
    rot_file = _rotations_file(tiny_dir, tmp_path / "rot.safetensors")
    scheme = Scheme(act_bits=None, embedding_bits=None)  # block weights alone: full-rank adapters undo them
    config = _config(tiny_dir, tmp_path / "q", data_dir, qat_rotations=str(rot_file), lora_init=init,
                     lora_init_samples=2, scheme=scheme)
    data = qlora_pipeline._Data(config, load_model(str(tiny_dir)).tokenizer)
    model, float_weights = _rotated_qat_model_with_adapters(tiny_dir, rot_file, scheme, rank=None)
    ids = data.calibration_ids("wikitext2", 2, 40, config.seed)
    want = _hidden(_float_rotated(tiny_dir, rot_file), ids)
    assert (_hidden(model, ids) - want).abs().max() > 1e-3 * want.abs().max()  # B = 0: int4 loses something
    with torch.no_grad():
        qlora_pipeline._init_adapters(model, float_weights, data, config)
    torch.testing.assert_close(_hidden(model, ids), want, atol=2e-3, rtol=2e-3)


def test_sequential_init_brings_the_model_closer_to_the_float_one_than_the_per_layer_init(
        tiny_dir, tmp_path, data_dir):
    rot_file = _rotations_file(tiny_dir, tmp_path / "rot.safetensors")
    errors = {}
    for init in ("error", "sequential"):
        config = _config(tiny_dir, tmp_path / init, data_dir, qat_rotations=str(rot_file), lora_init=init,
                         lora_init_samples=4)
        data = qlora_pipeline._Data(config, load_model(str(tiny_dir)).tokenizer)
        model, float_weights = _rotated_qat_model_with_adapters(tiny_dir, rot_file, config.scheme, rank=4)
        ids = data.calibration_ids("wikitext2", 4, 40, config.seed)  # the init's own windows
        want = _hidden(_float_rotated(tiny_dir, rot_file), ids)
        errors["start"] = (_hidden(model, ids) - want).norm() / want.norm()
        with torch.no_grad():
            qlora_pipeline._init_adapters(model, float_weights, data, config)
        errors[init] = (_hidden(model, ids) - want).norm() / want.norm()
    # measured 0.108 < 0.176 < 0.264 (at propagation 0 the sequential init gives 0.174: the float chain's work)
    assert errors["sequential"] < 0.8 * errors["error"] and errors["error"] < errors["start"], errors


def _float_rotated(tiny_dir, rot_file):
    """The tiny model with the rotations folded in and R4 applied online: the float model's outputs."""
    model = load_model(str(tiny_dir)).model.float()
    fold_rotations_(model, seed=0, rotations=Rotations.load(rot_file)[0])  # R4 hooks stay on
    return model


def test_gptq_init_puts_qat_on_gptqs_grid_and_resumes_from_its_file(tiny_dir, tmp_path, data_dir):
    config = _config(tiny_dir, tmp_path / "g", data_dir, qat_init_samples=3)
    scheme = config.scheme
    models = [load_model(str(tiny_dir)) for _ in range(2)]
    data = qlora_pipeline._Data(config, models[0].tokenizer)
    path = tmp_path / "gptq-init.safetensors"
    float_weight = models[0].model.model.layers[0].mlp.up_proj.weight.detach().float().clone()
    scales = [qlora_pipeline._gptq_init(path, m.model.float(), data, config) for m in models]  # 2nd: from the file
    assert set(scales[0]) == {f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    model = models[0].model
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, float_weight)  # GPTQ moved the weights
    for a, b in zip(model.parameters(), models[1].model.parameters(), strict=True):
        assert torch.equal(a, b)  # the resumed start is the uninterrupted one
    prepare_qat(model, scheme, learn_scales=True, init_scales=scales[0])
    for name, mod in model.named_modules():
        if isinstance(mod, QATLinear) and mod.group_size is not None:
            s = mod.scales()
            assert torch.equal(s, scales[0][name].to(s.dtype))  # learned scales start at GPTQ's
            codes = quantize(mod.weight.detach(), s, scheme.linear_bits, scheme.group_size)
            assert torch.equal(dequantize(codes, s, scheme.group_size), mod.weight.detach())  # on the grid


def test_learned_scales_of_the_wrong_shape_are_refused(tiny):
    with pytest.raises(ValueError, match="do not fit"):
        prepare_qat(tiny, Scheme(), learn_scales=True,
                    init_scales={"model.layers.0.mlp.up_proj": torch.ones(3, 2)})


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
    (("--qat-init-samples", "0"), "--qat-init-samples must be at least 1"),
    (("--dpo-kd-weight", "-1"), "--dpo-kd-weight must be >= 0"),
    (("--lora-init-samples", "0"), "--lora-init-samples must be at least 1"),
    (("--lora-seq-len", "4"), "--lora-seq-len must be >= 8"),
    (("--qat-seq-len", "7"), "--qat-seq-len must be >= 8"),
    (("--dpo-backbone-lr-ratio", "0"), "--dpo-backbone-lr-ratio must be > 0"),
    (("--draws", "0"), "--draws and --selection-windows must be >= 1"),
    (("--lora-runs", "0"), "--lora-runs must be at least 1"),
    (("--lora-runs", "3", "--lora-rank", "16"), "rank 48, more than"),
    (("--draws", "2", "--selection-data", "wikitext2"), "--selection-data wikitext2 is a set stages 1-2 train"),
    (("--draws", "2", "--selection-data", "nope"), "nope"),
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
