import json

import pytest
import torch

from quantkit.checkpoint import METADATA_FILE, atomic_directory, load_any, load_checkpoint, save_checkpoint
from quantkit.errors import QuantkitError
from quantkit.model import LoadedModel, tiny_tokenizer
from quantkit.modules import quantize_
from quantkit.packing import FORMAT_VERSION
from quantkit.scheme import Scheme, WeightClip


@pytest.fixture
def quantized(tiny):
    scheme = Scheme()
    plan = quantize_(tiny, scheme)
    return LoadedModel(tiny, tiny_tokenizer(), "tiny-source", "abc123"), plan, scheme


def _logits(model, ids):
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("max_shard_bytes", [4 << 30, 20_000])
def test_save_load_is_bit_identical(quantized, ids, tmp_path, max_shard_bytes):
    loaded, plan, scheme = quantized
    out = save_checkpoint(loaded, plan, scheme, tmp_path / "ck", pipeline="ptq", method="rtn",
                          max_shard_bytes=max_shard_bytes)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert (len(shards) > 1) == (max_shard_bytes < 1 << 20)
    back, meta = load_checkpoint(out)
    assert torch.equal(_logits(loaded.model, ids), _logits(back.model, ids))
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]) and v.dtype == back.model.state_dict()[k].dtype, k
    assert back.tokenizer is not None


def test_metadata_records_format_scheme_source_and_plan(quantized, tmp_path):
    loaded, plan, scheme = quantized
    out = save_checkpoint(loaded, plan, scheme, tmp_path / "ck", pipeline="ptq", method="rtn", config={"a": 1})
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert Scheme.from_dict(meta["scheme"]) == scheme
    assert meta["source"] == {"model": "tiny-source", "sha256": "abc123"}
    assert meta["pipeline"] == "ptq" and meta["method"] == "rtn" and meta["config"] == {"a": 1}
    assert meta["modules"]["model.layers.0.self_attn.q_proj"] == "int4_linear"
    assert meta["unquantized"] == {}
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())


def test_existing_output_is_refused_without_overwrite(quantized, tmp_path):
    loaded, plan, scheme = quantized
    target = tmp_path / "ck"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(QuantkitError, match="--overwrite"):
        save_checkpoint(loaded, plan, scheme, target, pipeline="ptq", method="rtn")
    assert (target / "keep.txt").read_text() == "mine"


def test_crash_mid_write_leaves_the_previous_checkpoint_and_no_debris(tmp_path):
    target = tmp_path / "ck"
    target.mkdir()
    (target / "good").write_text("previous checkpoint")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "half").write_text("partial")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert sorted(p.name for p in target.iterdir()) == ["good"]


def test_overwrite_replaces_atomically(quantized, tmp_path):
    loaded, plan, scheme = quantized
    target = tmp_path / "ck"
    target.mkdir()
    (target / "stale").write_text("old")
    save_checkpoint(loaded, plan, scheme, target, pipeline="ptq", method="rtn", overwrite=True)
    assert not (target / "stale").exists() and (target / METADATA_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_unknown_format_version_is_refused(quantized, tmp_path):
    loaded, plan, scheme = quantized
    out = save_checkpoint(loaded, plan, scheme, tmp_path / "ck", pipeline="ptq", method="rtn")
    meta = json.loads((out / METADATA_FILE).read_text())
    meta["format_version"] = 99
    (out / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(QuantkitError, match="format version 99"):
        load_checkpoint(out)


def test_truncated_weights_are_a_clear_error(quantized, tmp_path):
    loaded, plan, scheme = quantized
    out = save_checkpoint(loaded, plan, scheme, tmp_path / "ck", pipeline="ptq", method="rtn")
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(QuantkitError, match="corrupt or truncated"):
        load_any(str(out))


def test_identical_head_and_embedding_are_stored_once_and_shared(quantized, ids, tmp_path):
    loaded, plan, scheme = quantized
    # RTN of an untied pair gives the same per-row int8 codes and scales to head and embedding
    assert torch.equal(loaded.model.lm_head.qweight, loaded.model.model.embed_tokens.qweight)
    out = save_checkpoint(loaded, plan, scheme, tmp_path / "ck", pipeline="ptq", method="rtn")
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["aliases"] == {"lm_head.qweight": "model.embed_tokens.qweight",
                               "lm_head.scales": "model.embed_tokens.scales"}
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.qweight" not in f.keys() and "model.embed_tokens.qweight" in f.keys()
    back, _ = load_checkpoint(out)
    assert back.model.lm_head.qweight.data_ptr() == back.model.model.embed_tokens.qweight.data_ptr()
    assert torch.equal(_logits(loaded.model, ids), _logits(back.model, ids))


def test_different_head_and_embedding_are_both_stored(quantized, ids, tmp_path):
    loaded, plan, scheme = quantized
    loaded.model.lm_head.qweight[0, 0] += 1  # as after QAT, where the two drift apart
    out = save_checkpoint(loaded, plan, scheme, tmp_path / "ck", pipeline="ptq", method="rtn")
    assert "lm_head.qweight" not in json.loads((out / METADATA_FILE).read_text())["aliases"]
    back, _ = load_checkpoint(out)
    assert torch.equal(_logits(loaded.model, ids), _logits(back.model, ids))


def test_weight_clip_is_recorded_and_older_metadata_reads_as_amax(tiny, tmp_path):
    scheme = Scheme(weight_clip="mse")
    plan = quantize_(tiny, scheme)
    out = save_checkpoint(LoadedModel(tiny, tiny_tokenizer(), "tiny-source", "abc123"), plan, scheme,
                          tmp_path / "ck", pipeline="ptq", method="rtn")
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["scheme"]["weight_clip"] == "mse"
    assert Scheme.from_dict(meta["scheme"]).weight_clip is WeightClip.MSE
    load_checkpoint(out)  # loads: the format did not change
    older = {k: v for k, v in meta["scheme"].items() if k != "weight_clip"}  # written before the field existed
    assert Scheme.from_dict(older).weight_clip is WeightClip.AMAX
    with pytest.raises(ValueError):
        Scheme(weight_clip="median")
