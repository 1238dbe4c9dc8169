"""quantkit's lm-eval task configs: they load offline from the data dir and score a tiny model correctly."""

from __future__ import annotations

import json

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.model import tiny_llama, tiny_tokenizer
from quantkit.tasks import CONFIG_DIR, DEFAULT_TASKS, TASKS, parse_tasks, run_tasks


def _loaders():
    """The loader module exactly as lm-eval imports it (by file path, from the YAMLs' directory)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quantkit_task_loaders", CONFIG_DIR / "loaders.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_tasks():
    assert parse_tasks(None) == DEFAULT_TASKS
    assert len(DEFAULT_TASKS) == 9 and "wikitext" not in DEFAULT_TASKS
    assert parse_tasks("copa, piqa,copa") == ("copa", "piqa")
    assert parse_tasks("all") == tuple(TASKS)
    with pytest.raises(QuantkitError, match="unknown task 'arc_medium'"):
        parse_tasks("arc_easy,arc_medium")
    with pytest.raises(QuantkitError, match="no task"):
        parse_tasks(" , ")


def test_every_task_has_a_local_config():
    names = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert names == {t.local for t in TASKS.values()}


@pytest.mark.parametrize("loader,n,fields", [
    ("arc_easy", 2376, {"query", "choices", "gold"}),
    ("arc_challenge", 1172, {"query", "choices", "gold"}),
    ("piqa", 1838, {"query", "choices", "gold"}),
    ("boolq", 3270, {"query", "choices", "gold"}),
    ("openbookqa", 500, {"query", "choices", "gold"}),
    ("copa", 100, {"query", "choices", "gold"}),
    ("hellaswag", 10042, {"query", "choices", "gold"}),
    ("winogrande", 1267, {"context_options", "continuation", "gold"}),
    ("lambada", 5153, {"context", "continuation"}),
    ("wikitext", 62, {"page"}),
])
def test_loaders_read_the_local_files(data_dir, loader, n, fields):
    ds = getattr(_loaders(), loader)(data_dir=str(data_dir))["test"]
    assert len(ds) == n
    assert set(ds.column_names) == fields
    row = ds[0]
    if "gold" in fields:
        options = row["choices"] if "choices" in row else row["context_options"]
        assert 0 <= row["gold"] < len(options)


def test_hellaswag_items_are_six_lines(data_dir):
    row = _loaders().hellaswag(data_dir=str(data_dir))["test"][0]
    assert row["query"].startswith("Roof shingle removal: A man is sitting on a roof.")
    assert row["gold"] == 3 and len(row["choices"]) == 4


def test_loaders_need_a_data_dir():
    with pytest.raises(QuantkitError, match="data directory"):
        _loaders().copa()


def test_all_tasks_load_offline_and_score_a_tiny_model(data_dir):
    model, tok = tiny_llama(seed=0), tiny_tokenizer()
    # wikitext: one whole article (5.6k bytes = tokens here) is enough to exercise rolling scoring
    res = run_tasks(model, tok, DEFAULT_TASKS, limit=2, data_dir=data_dir, batch_size=4)
    res.update(run_tasks(model, tok, ("wikitext",), limit=1, data_dir=data_dir, max_length=256))
    assert set(res) == set(TASKS)
    for task, r in res.items():
        assert r["source"] == "local" and r["lm_eval_task"] == f"quantkit_{task}"
        assert r["samples"] == (1 if task == "wikitext" else 2)
        for m in TASKS[task].metrics:
            v = r["metrics"][m.key]
            assert (0.0 <= v <= 1.0) if m.percent else v > 1.0, (task, m.key, v)


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation | context) under ``model`` (byte-level tokenizer: ids concatenate)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # [L, V]
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_multiple_choice_scores_match_a_direct_computation(data_dir):
    """lm-eval's acc / acc_norm on quantkit_arc_easy equal an independent loglikelihood argmax."""
    model, tok = tiny_llama(seed=3), tiny_tokenizer()
    limit = 6
    res = run_tasks(model, tok, ("arc_easy",), limit=limit, data_dir=data_dir, batch_size=3)["arc_easy"]
    rows = [json.loads(line) for line in (data_dir / "eval" / "arc_easy.jsonl").open()][:limit]
    acc = acc_norm = 0
    for row in rows:
        context = row["query"].rstrip() + "\nAnswer:"
        lls = [_loglikelihood(model, tok, context, " " + c) for c in row["choices"]]
        acc += max(range(len(lls)), key=lambda i: lls[i]) == row["gold"]
        # acc_norm: loglikelihood per character of the continuation
        norm = [ll / len(" " + c) for ll, c in zip(lls, row["choices"])]
        acc_norm += max(range(len(norm)), key=lambda i: norm[i]) == row["gold"]
    assert res["metrics"]["acc"] == pytest.approx(acc / limit)
    assert res["metrics"]["acc_norm"] == pytest.approx(acc_norm / limit)


def test_limit_must_be_positive(data_dir):
    with pytest.raises(QuantkitError, match="--limit"):
        run_tasks(tiny_llama(), tiny_tokenizer(), ("copa",), limit=0, data_dir=data_dir)


def test_tasks_command(tiny_dir, data_dir, tmp_path):
    from click.testing import CliRunner

    from quantkit.cli import main

    out = tmp_path / "scores.json"
    result = CliRunner().invoke(main, ["tasks", str(tiny_dir), "--tasks", "copa", "--limit", "2",
                                       "--data-dir", str(data_dir), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "copa acc" in result.output
    assert json.loads(out.read_text())["tasks"][str(tiny_dir)]["copa"]["samples"] == 2
    bad = CliRunner().invoke(main, ["tasks", str(tiny_dir), "--tasks", "nope", "--data-dir", str(data_dir)])
    assert bad.exit_code == 1 and "unknown task 'nope'" in bad.output


def test_without_a_data_dir_stock_tasks_are_used_and_offline_fails_cleanly(monkeypatch):
    """No data dir: lm-eval's stock task (hub). Offline, that is one clear error, not a traceback."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(QuantkitError, match="--data-dir"):
        run_tasks(tiny_llama(), tiny_tokenizer(), ("copa",), limit=2, data_dir=None)
