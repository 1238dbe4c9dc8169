"""Distillation losses of the QAT / LoRA stages: KD against a hand computation, its invariants, the pipeline."""

import copy
import json
import math

import pytest
import torch
from click.testing import CliRunner

from quantkit.checkpoint import load_checkpoint
from quantkit.cli import main
from quantkit.config import Preset, QLoRAConfig
from quantkit.errors import QuantkitError
from quantkit.pipelines.qlora import REPORT_FILE
from quantkit.scheme import Scheme, WeightClip
from quantkit.training.loops import train
from quantkit.training.qat import prepare_qat
from quantkit.training.records import Tokenized, collate
from quantkit.training.sft import StageLoss, kd_loss, sft_loss, stage_loss


def test_kd_loss_equals_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 0.0]])

    def softmax(row):
        z = sum(math.exp(v) for v in row)
        return [math.exp(v) / z for v in row]

    want = 0.0
    for s, t in zip(student.tolist(), teacher.tolist()):
        ps, pt = softmax(s), softmax(t)
        want += sum(q * math.log(q / p) for q, p in zip(pt, ps))  # KL(teacher || student) of one position
    assert kd_loss(student, teacher).item() == pytest.approx(want / 2, rel=1e-6)
    assert kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(teacher + 5.0, teacher).item() == pytest.approx(0.0, abs=1e-6)  # shift-invariant, as softmax


def test_kd_gradient_is_student_minus_teacher_probabilities():
    student = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0, 0.0]])
    kd_loss(student, teacher).backward()
    want = torch.softmax(student.detach(), -1) - torch.softmax(teacher, -1)
    torch.testing.assert_close(student.grad, want)


def _batch(lengths=(20, 13), n_prompt=8):
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in lengths]
    return collate([Tokenized(s, n_prompt) for s in seqs], pad_id=1)


def test_kd_is_zero_against_itself_and_mixed_is_half_the_cross_entropy(tiny):
    tiny.float()
    teacher = copy.deepcopy(tiny).eval()
    batch = _batch()
    with torch.no_grad():
        assert stage_loss(tiny, batch, StageLoss.KD, teacher).item() == pytest.approx(0.0, abs=1e-6)
        ce = sft_loss(tiny, batch).item()
        assert stage_loss(tiny, batch, StageLoss.CE, teacher).item() == ce
        assert stage_loss(tiny, batch, StageLoss.MIXED, teacher).item() == pytest.approx(ce / 2, rel=1e-5)
        prepare_qat(tiny, Scheme())  # the student now computes on the int4 / int8 grid: it differs
        assert stage_loss(tiny, batch, StageLoss.KD, teacher).item() > 1e-4
    with pytest.raises(ValueError, match="needs a teacher"):
        stage_loss(tiny, batch, StageLoss.KD)


def test_kd_covers_every_real_token_and_ignores_padding(tiny):
    """A padded batch's KD loss is the token-weighted mean of each sequence's own, prompt tokens included."""
    tiny.float()
    teacher = copy.deepcopy(tiny).eval()
    prepare_qat(tiny, Scheme())
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (20, 13)]
    with torch.no_grad():
        both = stage_loss(tiny, collate([Tokenized(s, 8) for s in seqs], 1), StageLoss.KD, teacher).item()
        alone = [stage_loss(tiny, collate([Tokenized(s, 8)], 1), StageLoss.KD, teacher).item() for s in seqs]
        # Where the response starts does not matter to KD: it predicts every next real token.
        shifted = stage_loss(tiny, collate([Tokenized(seqs[0], 2)], 1), StageLoss.KD, teacher).item()
    assert both == pytest.approx((19 * alone[0] + 12 * alone[1]) / 31, rel=1e-4)
    assert shifted == pytest.approx(alone[0], rel=1e-6)


def test_one_kd_step_moves_the_qat_student_toward_the_teacher(tiny, tmp_path):
    tiny.float()
    teacher = copy.deepcopy(tiny).eval()
    with torch.no_grad():  # a student well off the teacher (at the start, only rounding separates them)
        for p in tiny.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    prepare_qat(tiny, Scheme())
    batch = _batch()
    before = stage_loss(tiny, batch, StageLoss.KD, teacher).item()
    train("qat", dict(tiny.named_parameters()), 1, 1e-3, lambda step: stage_loss(tiny, batch, StageLoss.KD, teacher),
          tmp_path / "p", 10)
    assert stage_loss(tiny, batch, StageLoss.KD, teacher).item() < before - 0.05
    assert all(p.grad is None for p in teacher.parameters())  # the teacher runs without autograd


def test_cli_distills_on_calibration_text(tiny_dir, tmp_path, data_dir):
    out = tmp_path / "q"
    res = CliRunner().invoke(main, [str(a) for a in (
        "qlora", "--model", tiny_dir, "--output", out, "--preset", "cpu", "--data-dir", data_dir,
        "--qat-steps", 2, "--qat-loss", "kd", "--qat-calibration", "wikitext2", "--lora-steps", 2,
        "--lora-loss", "mixed", "--lora-calibration", "none", "--dpo-steps", 1, "--lora-rank", 4, "--heldout-pairs", 4, "--seq-len", 48,
        "--eval-windows", 1, "--eval-seq-len", 32)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    _, meta = load_checkpoint(out)
    assert meta["config"]["qat"]["loss"] == "kd" and meta["config"]["qat"]["calibration"] == "wikitext2"
    assert meta["config"]["lora"]["loss"] == "mixed" and meta["config"]["lora"]["calibration"] is None
    report = json.loads((out / REPORT_FILE).read_text())
    assert all(loss > 0 for loss in report["qat"]["loss"])  # the student starts off the teacher's grid


def test_unknown_calibration_set_and_loss_are_refused(tmp_path):
    with pytest.raises(QuantkitError, match="unknown calibration set"):
        QLoRAConfig.preset(Preset.CPU, tmp_path / "o", qat_calibration="wikitext2-test")
    with pytest.raises(ValueError):
        QLoRAConfig.preset(Preset.CPU, tmp_path / "o", lora_loss="kl")
    assert QLoRAConfig.preset(Preset.CPU, tmp_path / "o", qat_loss="ce").qat.loss is StageLoss.CE
    cpu, full = (QLoRAConfig.preset(p, tmp_path / "o") for p in (Preset.CPU, Preset.FULL))
    assert cpu.qat.loss is cpu.lora.loss is StageLoss.KD and cpu.qat.calibration == cpu.lora.calibration == "wikitext2"
    assert full.qat.loss is full.lora.loss is StageLoss.CE and full.qat.calibration is full.lora.calibration is None
    assert cpu.pref_data == "orca-dpo" and cpu.dpo.heldout_pairs == 64 and full.pref_data == "hh-rlhf-harmless"
    assert (cpu.qat.batch_size, cpu.lora.batch_size, cpu.dpo.batch_size) == (1, 1, 4)  # DPO: 4 pairs a step (measured)
    assert cpu.qat.learn_scales and cpu.scheme.weight_clip is WeightClip.MSE  # learned, from the clip search
    assert not full.qat.learn_scales and full.scheme.weight_clip is WeightClip.AMAX  # Meta's recipe
