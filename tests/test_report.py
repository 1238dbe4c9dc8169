"""`quantkit compare report`: deltas and PTQ-gap shares, rendering, caching, SQNR and bad input."""

from __future__ import annotations

import base64
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from quantkit.cli import main
from quantkit.model import tiny_llama, tiny_tokenizer
from quantkit.report import (MEAN_ACC, SIZE, SPEED_METRICS, derive, load_results, load_speed_json, token_ppl_metric,
                             write_report)

ACC = {"key": "piqa/acc", "label": "PIQA acc", "group": "quality", "higher_is_better": True, "percent": True}
PPL = token_ppl_metric(2048).to_dict()


def _model(name, role, values, pipeline=None):
    return {"name": name, "role": role, "path": f"/ckpt/{name}", "kind": pipeline or "bf16", "pipeline": pipeline,
            "method": None, "content_sha256": "0" * 64, "values": values, "stderr": {}, "sqnr": None}


def hand_made() -> dict:
    """bf16, vanilla PTQ, a better method, one worse than PTQ, and one missing a metric."""
    metrics = [ACC, PPL, MEAN_ACC.to_dict(), SIZE.to_dict(), *[m.to_dict() for m in SPEED_METRICS]]
    return {"results_version": 1, "quantkit_version": "test", "created": "now", "config": {}, "metrics": metrics,
            "notes": ["hand-made"],
            "models": [
                _model("bf16", "baseline", {"piqa/acc": 0.70, PPL["key"]: 10.0, "size_mib": 256.0}),
                _model("ptq", "checkpoint", {"piqa/acc": 0.60, PPL["key"]: 14.0, "size_mib": 64.0}, "ptq"),
                _model("spin", "checkpoint", {"piqa/acc": 0.65, PPL["key"]: 11.0, "size_mib": 64.0}, "spinquant"),
                _model("bad", "checkpoint", {"piqa/acc": 0.55, PPL["key"]: 16.0, "size_mib": 64.0}, "qlora"),
                _model("partial", "checkpoint", {PPL["key"]: 12.0}, "qlora"),
            ]}


def test_deltas_and_gap_shares_on_hand_made_results():
    d = derive(hand_made())
    assert d["deltas"]["ptq"]["piqa/acc"] == pytest.approx(-10.0)  # points
    assert d["deltas"]["spin"][PPL["key"]] == pytest.approx(10.0)  # relative %, 11 vs 10
    assert d["deltas"]["ptq"]["size_mib"] == pytest.approx(-75.0)
    assert d["deltas"]["partial"]["piqa/acc"] is None  # missing metric: no delta
    gap = d["gap_recovered"]
    assert gap["ptq"] == "ptq"
    assert gap["per_metric"]["spin"]["piqa/acc"] == pytest.approx(0.5)
    assert gap["per_metric"]["spin"][PPL["key"]] == pytest.approx(0.75)  # (11 - 14) / (10 - 14)
    assert gap["per_metric"]["bad"]["piqa/acc"] == pytest.approx(-0.5)  # worse than PTQ: negative
    assert gap["per_metric"]["bad"][PPL["key"]] == pytest.approx(-0.5)
    assert gap["per_metric"]["ptq"]["piqa/acc"] == pytest.approx(0.0)
    assert gap["per_metric"]["partial"]["piqa/acc"] is None
    assert gap["per_metric"]["partial"][PPL["key"]] == pytest.approx(0.5)
    assert gap["mean"]["spin"] == pytest.approx(0.625)
    assert gap["mean"]["bad"] == pytest.approx(-0.5)
    assert gap["mean"]["partial"] == pytest.approx(0.5)  # over the metrics it has


def test_no_gap_row_without_ptq_and_no_share_where_ptq_lost_nothing():
    doc = hand_made()
    doc["models"][1]["values"]["piqa/acc"] = 0.70  # PTQ lost nothing on PIQA
    gap = derive(doc)["gap_recovered"]
    assert gap["per_metric"]["spin"]["piqa/acc"] is None
    assert gap["mean"]["spin"] == pytest.approx(0.75)  # perplexity only
    doc["models"][1]["pipeline"] = "gptq"
    assert derive(doc)["gap_recovered"] is None


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.urls = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def test_report_renders_from_stored_results_and_html_is_self_contained(tmp_path):
    out = write_report(hand_made(), tmp_path / "rep")
    html = (out / "report.html").read_text()
    parser = _Collect()
    parser.feed(html)
    parser.close()
    assert "script" not in parser.tags and "link" not in parser.tags
    assert parser.urls and all(u.startswith("data:image/png;base64,") for u in parser.urls)
    assert "http://" not in html and "https://" not in html and "url(" not in html
    for u in parser.urls:
        assert base64.b64decode(u.split(",", 1)[1]).startswith(b"\x89PNG")
    assert "Share of the vanilla-PTQ gap recovered" in html and "-50%" in html and "63%" in html
    md = (out / "report.md").read_text()
    assert "| PIQA acc | ↑ | 70.0 | 60.0 (-10.0 pt) |" in md
    assert "Speed" not in md.split("## Notes")[0]  # no speed rows without bench results
    assert (out / "quality_vs_size.png").is_file() and not (out / "speed.png").exists()
    stored = json.loads((out / "results.json").read_text())
    assert stored["gap_recovered"]["mean"]["bad"] == pytest.approx(-0.5)
    # re-render from the stored file: same numbers, nothing evaluated (no checkpoint exists)
    result = CliRunner().invoke(main, ["compare", "report", "--from-results", str(out), "-o", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again" / "report.md").read_text().split("Created")[1].split("\n", 1)[1] == \
        md.split("Created")[1].split("\n", 1)[1]


def test_speed_rows_from_bench_json(tmp_path):
    bench = {"model": "/ckpt/ptq", "summary": {"decode_tok_s": 40.0, "prefill_tok_s": 400.0, "ttft_s": 0.2,
                                               "size_mib": 64.0, "peak_rss_mib": 300.0},
             "baseline": {"model": "/ckpt/bf16", "summary": {"decode_tok_s": 20.0, "prefill_tok_s": 500.0,
                                                             "ttft_s": 0.25, "size_mib": 256.0,
                                                             "peak_rss_mib": 600.0}}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    table = load_speed_json(path)
    assert table["/ckpt/ptq"]["decode_tok_s"] == 40.0 and table["/ckpt/bf16"]["peak_rss_mib"] == 600.0
    assert "size_mib" not in table["/ckpt/ptq"]  # size is measured by the report itself
    doc = hand_made()
    doc["models"][0]["values"].update(table["/ckpt/bf16"])
    doc["models"][1]["values"].update(table["/ckpt/ptq"])
    assert derive(doc)["deltas"]["ptq"]["decode_tok_s"] == pytest.approx(100.0)
    out = write_report(doc, tmp_path / "rep")
    md = (out / "report.md").read_text()
    assert "| Decode (tokens/s) | ↑ | 20 | 40 (+100.0%) |" in md
    assert "| Time to first token, 64-token prompt (s) | ↓ |" in md
    assert (out / "speed.png").is_file()


# ---------------------------------------------------------------------------------------------
# End to end on tiny checkpoints


def _ptq(model_dir: Path, out: Path) -> Path:
    result = CliRunner().invoke(main, ["ptq", "--model", str(model_dir), "--output", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def ptq_dir(tiny_dir, tmp_path) -> Path:
    return _ptq(tiny_dir, tmp_path / "ptq")


def _report(*args: str):
    return CliRunner().invoke(main, ["compare", "report", *args])


QUICK = ["--tasks", "copa", "--limit", "2", "--seq-len", "64", "--max-windows", "1"]


def test_report_end_to_end_cached_and_invalidated(data_dir, tmp_path, monkeypatch):
    import quantkit.tasks

    # scores are cached by content: a cache of this test's own, so earlier runs cannot serve them
    monkeypatch.setenv("QUANTKIT_CACHE_DIR", str(tmp_path / "cache"))
    tiny_dir = tmp_path / "tiny-seed5"
    tiny_llama(seed=5).save_pretrained(str(tiny_dir))
    tiny_tokenizer().save_pretrained(str(tiny_dir))
    ptq_dir = _ptq(tiny_dir, tmp_path / "ptq")
    calls = []
    real = quantkit.tasks.run_tasks
    monkeypatch.setattr(quantkit.tasks, "run_tasks", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = [str(ptq_dir), "--baseline", str(tiny_dir), "-o", str(tmp_path / "rep"), "--data-dir", str(data_dir), *QUICK]
    result = _report(*args)
    assert result.exit_code == 0, result.output
    assert len(calls) == 2  # baseline and checkpoint
    doc = json.loads((tmp_path / "rep" / "results.json").read_text())
    names = [m["name"] for m in doc["models"]]
    assert names == ["bf16", "ptq"]
    ptq = doc["models"][1]
    assert set(ptq["values"]) >= {"copa/acc", "wikitext2/token_perplexity", "size_mib"}
    assert ptq["values"]["size_mib"] < doc["models"][0]["values"]["size_mib"]
    kinds = {r["kind"]: r["sqnr_db"] for r in ptq["sqnr"]}
    assert 15 < kinds["int4_linear"] < 30 and kinds["int8_linear"] > 35  # ~6 dB per bit
    assert {r["module"] for r in ptq["sqnr"]} >= {"lm_head", "model.embed_tokens"}
    assert "Speed and memory rows are left out" in result.output

    # the output exists: refused without --overwrite
    again = _report(*args)
    assert again.exit_code == 1 and "--overwrite" in again.output
    # a re-run is served from the cache
    assert _report(*args, "--overwrite").exit_code == 0
    assert len(calls) == 2
    # a changed checkpoint is re-scored (only it)
    meta_file = ptq_dir / "quantkit.json"
    meta = json.loads(meta_file.read_text())
    meta["created"] = "changed"
    meta_file.write_text(json.dumps(meta))
    assert _report(*args, "--overwrite").exit_code == 0
    assert len(calls) == 3


def test_default_baseline_is_the_recorded_source(ptq_dir, data_dir, tmp_path):
    result = _report(str(ptq_dir), "-o", str(tmp_path / "rep"), "--data-dir", str(data_dir), "--no-token-perplexity",
                     *QUICK[:4])
    assert result.exit_code == 0, result.output
    doc = load_results(tmp_path / "rep")
    assert doc["models"][0]["path"].endswith("tiny") and "wikitext2/token_perplexity" not in doc["models"][0]["values"]


def test_bad_input(ptq_dir, tiny_dir, data_dir, tmp_path):
    # not a checkpoint
    r = _report(str(tiny_dir), "-o", str(tmp_path / "a"), "--data-dir", str(data_dir), *QUICK)
    assert r.exit_code == 1 and "is not a quantkit checkpoint" in r.output
    # checkpoints of different base models: refused, naming both
    other = tmp_path / "other"
    tiny_llama(seed=1).save_pretrained(str(other))
    tiny_tokenizer().save_pretrained(str(other))
    other_ptq = _ptq(other, tmp_path / "other-ptq")
    r = _report(str(ptq_dir), str(other_ptq), "-o", str(tmp_path / "b"), "--data-dir", str(data_dir), *QUICK)
    assert r.exit_code == 1 and "different base models" in r.output
    assert str(ptq_dir) in r.output and str(other_ptq) in r.output
    # a baseline that is not the source
    r = _report(str(ptq_dir), "--baseline", str(other), "-o", str(tmp_path / "c"), "--data-dir", str(data_dir), *QUICK)
    assert r.exit_code == 1 and "is not the model the checkpoints were made from" in r.output
    # a checkpoint as the baseline
    r = _report(str(ptq_dir), "--baseline", str(ptq_dir), "-o", str(tmp_path / "d"), *QUICK)
    assert r.exit_code == 1 and "baseline must be the float model" in r.output
    # unknown task
    r = _report(str(ptq_dir), "-o", str(tmp_path / "e"), "--tasks", "copa,nope")
    assert r.exit_code == 1 and "unknown task 'nope'" in r.output
    # existing output
    (tmp_path / "f").mkdir()
    r = _report(str(ptq_dir), "-o", str(tmp_path / "f"), *QUICK)
    assert r.exit_code == 1 and "already exists" in r.output
    # nothing to compare
    r = _report("-o", str(tmp_path / "g"))
    assert r.exit_code == 1 and "at least one CHECKPOINT" in r.output
    for name in "abcdeg":
        assert not (tmp_path / name).exists()


def test_sqnr_db():
    import torch

    from quantkit.sqnr import sqnr_db

    w = torch.randn(8, 32)
    assert sqnr_db(w, w) == math.inf
    assert sqnr_db(w, w + 0.1 * w) == pytest.approx(20.0, abs=1e-3)


def test_sqnr_reads_aliases_and_unmerged_lora(tmp_path):
    """SQNR uses the weight the model computes with: shared (aliased) tensors, plus W_q + (alpha/r) B A."""
    import torch

    from quantkit.checkpoint import load_checkpoint, save_checkpoint
    from quantkit.model import LoadedModel
    from quantkit.modules import quantize_
    from quantkit.packing import unpack_int4
    from quantkit.primitives import dequantize
    from quantkit.scheme import Scheme
    from quantkit.sqnr import checkpoint_sqnr, sqnr_db, state_dict_weights
    from quantkit.training.lora import add_lora, lora_metadata

    float_model = tiny_llama(seed=2)  # tied: head and embedding are one matrix
    model = tiny_llama(seed=2)
    plan = quantize_(model, Scheme())
    add_lora(model, 2, 4.0, [n for n, k in plan.modules.items() if k.value == "int4_linear"])
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            with torch.no_grad():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    path = save_checkpoint(LoadedModel(model, None, "tiny", "x"), plan, Scheme(), tmp_path / "ck", pipeline="qlora",
                           method="qat", lora=lora_metadata(model))
    rows = {r["module"]: r for r in checkpoint_sqnr(path, state_dict_weights(float_model))}
    loaded, meta = load_checkpoint(path)
    assert meta["aliases"] and meta["lora"]  # the int8 head is stored as the embedding's tensors
    name = "model.layers.1.mlp.down_proj"
    mod = loaded.model.get_submodule(name)
    effective = dequantize(unpack_int4(mod.base.qweight),
                           mod.base.scales, 32) + mod.delta_weight()
    want = sqnr_db(float_model.get_submodule(name).weight, effective)
    assert rows[name]["sqnr_db"] == pytest.approx(want, rel=1e-5)
    assert rows["lm_head"]["sqnr_db"] == pytest.approx(rows["model.embed_tokens"]["sqnr_db"])


def _strict(text: str):
    """Parse as strict JSON: the bare words NaN / Infinity that Python writes are refused."""
    def refuse(word):
        raise ValueError(f"{word} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_results_json_is_strict_json_when_a_score_is_nan(tmp_path):
    doc = hand_made()
    doc["models"][1]["stderr"] = {"piqa/acc": float("nan")}  # lm-eval's stderr on a handful of samples
    doc["models"][4]["values"]["size_mib"] = float("inf")
    out = write_report(doc, tmp_path / "rep")
    stored = _strict((out / "results.json").read_text())
    assert stored["models"][1]["stderr"]["piqa/acc"] is None and stored["models"][4]["values"]["size_mib"] is None
    result = CliRunner().invoke(main, ["compare", "report", "--from-results", str(out), "-o", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
