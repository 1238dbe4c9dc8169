"""Best of N (quantkit.draws), apart from the pipelines: copies, stage dirs, the choice, ties and NaN."""

import json

import pytest
import torch

from quantkit import draws
from quantkit.draws import best_of_n


def _scored_by(scores, monkeypatch):
    """Score draw ``i`` (by its stage dir) with ``scores[i]``, keeping it where the real scorer does."""
    def score(model, held_out, path, description):
        value = scores[int(path.parent.name.removeprefix("draw"))]
        path.write_text(json.dumps({"perplexity": value}))
        return value
    monkeypatch.setattr(draws, "selection_perplexity", score)


def _run(calls):
    def run(model, stage_dir, seed):  # a draw changes its model in place, as the pipelines' do
        calls.append((model, stage_dir, seed))
        stage_dir.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            model.weight.fill_(seed)
        return model, f"result {seed}"
    return run


NAN = float("nan")


@pytest.mark.parametrize("scores, chosen", [([3.0, 1.0, 2.0], 1), ([2.0, 1.0, 1.0], 1), ([1.0, 1.0, 1.0], 0),
                                            ([NAN, 2.0, NAN], 1), ([NAN, NAN, NAN], 0)])
def test_the_lowest_score_wins_and_the_earlier_draw_a_tie(scores, chosen, tmp_path, monkeypatch):
    _scored_by(scores, monkeypatch)
    model, calls = torch.nn.Linear(2, 2), []
    before = model.weight.detach().clone()
    best = best_of_n(model, tmp_path, 10, 3, torch.zeros(2, 4, dtype=torch.long), _run(calls), "ppl")
    assert [(stage, seed) for _m, stage, seed in calls] == [(tmp_path / f"draw{i}", 10 + i) for i in range(3)]
    assert all(m is not model for m, _s, _seed in calls)  # each draw on its own copy ...
    assert torch.equal(model.weight, before)  # ... so the model given is left as it was
    assert best.seed == 10 + chosen and best.result == f"result {10 + chosen}"
    assert torch.all(best.model.weight == 10 + chosen)
    assert best.report()["chosen_seed"] == 10 + chosen
    assert list(best.report()["selection_perplexity"].items()) == [("10", scores[0]), ("11", scores[1]),
                                                                   ("12", scores[2])]


def test_one_draw_is_the_plain_run(tmp_path, monkeypatch):
    monkeypatch.setattr(draws, "selection_perplexity", lambda *a: pytest.fail("one draw is not scored"))
    model, calls = torch.nn.Linear(2, 2), []
    best = best_of_n(model, tmp_path / "stages", 5, 1, None, _run(calls), "ppl")
    assert calls == [(model, tmp_path / "stages", 5)] and best.model is model and best.scores == {}


def test_held_out_windows_go_with_more_than_one_draw(tmp_path):
    with pytest.raises(ValueError):
        best_of_n(torch.nn.Linear(2, 2), tmp_path, 0, 2, None, _run([]), "ppl")
    with pytest.raises(ValueError):
        best_of_n(torch.nn.Linear(2, 2), tmp_path, 0, 1, torch.zeros(1, 2, dtype=torch.long), _run([]), "ppl")
