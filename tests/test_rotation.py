"""SpinQuant rotations: folding keeps the float model's function; Cayley SGD keeps R orthogonal."""

from __future__ import annotations

import copy

import pytest
import torch

from quantkit.algorithms import LearnTarget, RotationObjective
from quantkit.algorithms.cayley import CayleySGD
from quantkit.algorithms.rotation import (Rotations, activation_quantizers, apply_rotations_, fuse_norms_,
                                          learn_rotations, random_rotations, rotation_loss)
from quantkit.errors import QuantkitError
from quantkit.model import tiny_llama
from quantkit.modules import untie_embeddings
from quantkit.scheme import Scheme
from quantkit.training.sft import kd_loss


def _model(tie: bool) -> torch.nn.Module:
    model = tiny_llama(seed=0, tie=tie, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norm gains, so norm fusion is exercised
        gen = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("which", ["r1", "r2", "r4", "all"])
def test_rotated_float_model_gives_the_same_logits(tie, which, ids):
    model = _model(tie)
    ref = model(ids).logits
    untie_embeddings(model)
    fuse_norms_(model)
    rot = random_rotations(model, seed=1, r1=which in ("r1", "all"), r2=which in ("r2", "all"),
                           r4=which in ("r4", "all"))
    apply_rotations_(model, rot)
    name = {"r1": "model.embed_tokens.weight", "r2": "model.layers.0.self_attn.v_proj.weight",
            "r4": "model.layers.0.mlp.down_proj.weight", "all": "model.layers.0.self_attn.o_proj.weight"}[which]
    before = dict(_model(tie).named_parameters())[name]
    assert not torch.allclose(dict(model.named_parameters())[name], before)  # the weights did change
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=2e-5)


def test_tied_embeddings_are_refused_unless_untied(ids):
    model = _model(True)
    with pytest.raises(QuantkitError, match="tied"):
        fuse_norms_(model)


def test_cayley_steps_keep_r_orthogonal():
    gen = torch.Generator().manual_seed(0)
    r = torch.nn.Parameter(torch.linalg.qr(torch.randn(48, 48, generator=gen))[0])
    target = torch.randn(48, 48, generator=gen)
    opt = CayleySGD([r], lr=0.5)
    first = None
    for _ in range(30):
        loss = ((r - target) ** 2).sum()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert ((r - target) ** 2).sum().item() < first  # it descends...
    torch.testing.assert_close(r.T @ r, torch.eye(48), rtol=0, atol=1e-5)  # ...on the manifold


def test_learned_rotations_stay_orthogonal_and_loss_is_finite(ids):
    model = _model(True)
    untie_embeddings(model)
    fuse_norms_(model)
    rot, losses = learn_rotations(model, random_rotations(model, 0), ids.repeat(2, 1), Scheme(), steps=3, lr=1.5)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(rot.r1.T @ rot.r1, torch.eye(64), rtol=0, atol=1e-5)
    torch.testing.assert_close(rot.r2.transpose(1, 2) @ rot.r2, torch.eye(16).expand(2, 16, 16), rtol=0, atol=1e-5)
    assert not torch.allclose(rot.r1, random_rotations(model, 0).r1.float())  # it did move


def test_loss_with_rotated_activation_sites_equals_the_rotated_model(ids):
    """The cheap learning graph (Q(xR)Rᵀ on the unrotated model) is the rotated model with quantizers."""
    model = _model(False)
    untie_embeddings(model)
    fuse_norms_(model)
    rot = random_rotations(model, 0)
    learned = rotation_loss(model, Rotations(rot.r1.float(), rot.r2.float(), True), ids, Scheme(),
                            LearnTarget.ACTIVATIONS)
    rotated = copy.deepcopy(model)
    apply_rotations_(rotated, rot)
    with activation_quantizers(rotated, 8):
        direct = rotated(ids, labels=ids).loss
    assert abs(learned.item() - direct.item()) < 1e-3
    # and the weights-too variant is the same model with the weights on the RTN grid: close, not equal
    both = rotation_loss(model, Rotations(rot.r1.float(), rot.r2.float(), True), ids, Scheme(),
                         LearnTarget.WEIGHTS_AND_ACTIVATIONS)
    assert both.item() != learned.item() and abs(both.item() - learned.item()) < 0.5


def test_kd_objective_is_the_kl_from_the_float_model_to_the_rotated_quantized_one(ids):
    """KD's teacher is the unrotated float model, which the rotations leave unchanged."""
    model = _model(False)
    float_logits = model(ids).logits  # before fusion: the teacher must be the user's model itself
    untie_embeddings(model)
    fuse_norms_(model)
    rot = random_rotations(model, 0)
    rotated = copy.deepcopy(model)
    apply_rotations_(rotated, rot)
    with activation_quantizers(rotated, 8):
        student = rotated(ids).logits
    hand = kd_loss(student.flatten(0, 1), float_logits.flatten(0, 1))
    r = Rotations(rot.r1.float(), rot.r2.float(), True)
    kd = rotation_loss(model, r, ids, Scheme(), LearnTarget.ACTIVATIONS, RotationObjective.KD)
    assert hand.item() > 0 and abs(kd.item() - hand.item()) < 1e-4 * max(1.0, hand.item())
    # with the weights on the int4 grid too the damage is larger, and the loss still has a gradient in R1
    r1 = r.r1.clone().requires_grad_(True)
    both = rotation_loss(model, Rotations(r1, r.r2, True), ids, Scheme(), LearnTarget.WEIGHTS_AND_ACTIVATIONS,
                         RotationObjective.KD)
    both.backward()
    assert both.item() > kd.item() and r1.grad.abs().sum() > 0


def test_learning_against_the_kd_objective_lowers_it(ids):
    model = _model(False)
    untie_embeddings(model)
    fuse_norms_(model)
    init = random_rotations(model, 0)
    rows = ids.repeat(2, 1)
    before = rotation_loss(model, Rotations(init.r1.float(), init.r2.float(), True), rows, Scheme(),
                           LearnTarget.WEIGHTS_AND_ACTIVATIONS, RotationObjective.KD).item()
    rot, _ = learn_rotations(model, init, rows, Scheme(), steps=8, lr=1.5,
                             target=LearnTarget.WEIGHTS_AND_ACTIVATIONS, objective=RotationObjective.KD)
    after = rotation_loss(model, rot, rows, Scheme(), LearnTarget.WEIGHTS_AND_ACTIVATIONS,
                          RotationObjective.KD).item()
    assert after < before


def test_nan_loss_stops_learning(ids):
    model = _model(False)
    untie_embeddings(model)
    fuse_norms_(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(QuantkitError, match="diverged"):
        learn_rotations(model, random_rotations(model, 0), ids, Scheme(), steps=2, lr=1.5)


def test_rotations_file_round_trip_and_shape_check(tmp_path):
    model = _model(False)
    rot = random_rotations(model, 0)
    rot.save(tmp_path / "r.safetensors")
    back, _ = Rotations.load(tmp_path / "r.safetensors")
    assert torch.equal(back.r1, rot.r1) and torch.equal(back.r2, rot.r2) and back.r4
    back.check(model)
    other = tiny_llama(seed=0, hidden_size=32, intermediate_size=64)
    with pytest.raises(QuantkitError, match=r"r1 has shape \(64, 64\)"):
        back.check(other)
