import json

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.model import load_model


def test_hf_directory_loads_in_bf16_with_tokenizer(tiny_dir, ids):
    loaded = load_model(str(tiny_dir))
    assert loaded.model.dtype == torch.bfloat16 and loaded.tokenizer is not None
    assert len(loaded.source_sha256) == 64
    assert torch.isfinite(loaded.model(ids).logits).all()


def test_missing_path(tmp_path):
    with pytest.raises(QuantkitError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(QuantkitError, match="no config.json"):
        load_model(str(tmp_path))


def test_non_llama_model_is_refused(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match="Llama-architecture"):
        load_model(str(tiny_dir))


def test_pickled_weights_are_never_loaded(tiny_dir):
    (tiny_dir / "model.safetensors").rename(tiny_dir / "pytorch_model.bin")
    with pytest.raises(QuantkitError, match="never unpickles"):
        load_model(str(tiny_dir))


def test_corrupt_safetensors(tiny_dir):
    (tiny_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(QuantkitError, match="corrupt or truncated"):
        load_model(str(tiny_dir))


def test_hub_id_offline_says_what_to_do():
    with pytest.raises(QuantkitError, match="--local-dir"):
        load_model("some-org/some-model-that-is-not-cached")


def test_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(QuantkitError, match="not a .gguf"):
        load_model(str(f))


@pytest.mark.stories
def test_stories260k_loads(data_dir):
    loaded = load_model(str(data_dir / "models" / "stories260K"))
    assert loaded.tokenizer is None
    cfg = loaded.model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    logits = loaded.model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()


def test_the_cache_dir_is_the_setting_or_the_home_default(monkeypatch, tmp_path):
    from pathlib import Path

    from quantkit.settings import cache_dir

    monkeypatch.setenv("QUANTKIT_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.setenv("QUANTKIT_CACHE_DIR", "")  # set but empty: not the current directory
    assert cache_dir() == Path.home() / ".cache" / "quantkit"
