import json

import pytest
import torch

from quantkit.data import (
    calibration_set,
    calibration_sets,
    calibration_tokens,
    resolve_data_dir,
    wikitext2_test_text,
)
from quantkit.errors import QuantkitError
from quantkit.model import tiny_tokenizer


def test_wikitext2_test_text_is_the_standard_string(data_dir):
    text = wikitext2_test_text(data_dir)
    assert len(text) == 1_294_336  # the GPTQ/SpinQuant "\n\n".join(rows) string, per the data README
    assert text.startswith("\n\n = Robert Boulter = \n")  # the first row is empty


def test_calibration_never_reads_the_evaluation_split():
    sets = calibration_sets()
    assert {"wikitext2", "c4"} <= set(sets)
    for cset in sets.values():
        assert "test" not in cset.local_path and "test" not in cset.hub_split


def test_calibration_tokens_are_seeded_and_cached(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE_DIR", str(tmp_path))
    tok = tiny_tokenizer()
    a = calibration_tokens(tok, "wikitext2", 4, 64, seed=0, data_dir=data_dir)
    assert a.shape == (4, 64) and a.dtype == torch.long
    cached = list((tmp_path / "tokens").glob("*.safetensors"))
    assert len(cached) == 1
    assert torch.equal(calibration_tokens(tok, "wikitext2", 4, 64, seed=0, data_dir=data_dir), a)
    assert not torch.equal(calibration_tokens(tok, "wikitext2", 4, 64, seed=1, data_dir=data_dir), a)
    # windows are real text of the calibration file
    text = (data_dir / "calib" / "wiki_demo.txt").read_text()
    assert tok.decode(a[0]) in text


def test_too_short_calibration_names_every_window_option(data_dir, tmp_path, monkeypatch):
    # the same windows serve spinquant (--seq-len) and each qlora stage (its own option)
    monkeypatch.setenv("QUANTKIT_CACHE_DIR", str(tmp_path))
    with pytest.raises(QuantkitError, match="fewer than one window") as refused:
        calibration_tokens(tiny_tokenizer(), "wikitext2", 1, 10_000_000, seed=0, data_dir=data_dir)
    for option in ("--seq-len", "--qat-seq-len", "--lora-seq-len"):
        assert option in str(refused.value)
    assert not (tmp_path / "tokens").exists()  # nothing cached for a refused request


def test_c4_set_reads_jsonl(data_dir):
    texts = calibration_set("c4").texts(data_dir)
    assert len(texts) == 300 and all(isinstance(t, str) for t in texts)


def test_bad_data_dirs(tmp_path, monkeypatch):
    with pytest.raises(QuantkitError, match="does not exist"):
        resolve_data_dir(tmp_path / "missing")
    with pytest.raises(QuantkitError, match="has no wikitext-2-raw-v1/test.jsonl"):
        wikitext2_test_text(tmp_path)
    monkeypatch.setenv("QUANTKIT_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path


def test_malformed_jsonl_names_the_line(tmp_path):
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    (tmp_path / "wikitext-2-raw-v1" / "test.jsonl").write_text(json.dumps({"text": "a"}) + "\n{oops\n")
    with pytest.raises(QuantkitError, match="test.jsonl:2"):
        wikitext2_test_text(tmp_path)


def test_unknown_calibration_set():
    with pytest.raises(QuantkitError, match="unknown calibration set"):
        calibration_set("nope")
