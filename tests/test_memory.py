"""Resident memory of a loaded checkpoint: weights resident once, nothing allocated to be thrown away.

A loaded checkpoint's portable tensors are memory-mapped from its safetensors files; the fast
kernel repacks each weight on first use and then evicts the portable pages (``release_pages``),
so the repacked copy is the only resident one. These tests pin the pieces that make that true
and that it never changes a value.
"""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.checkpoint import load_checkpoint, save_checkpoint
from quantkit.kernels import cpu
from quantkit.model import LoadedModel, tiny_llama, tiny_tokenizer
from quantkit.modules import Int4Linear, Int8Embedding, Int8Linear, make_empty, quantize_
from quantkit.scheme import Scheme

from test_kernel_cpu import _unrepack_int4, make_int4, make_int8

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise / /proc are Linux")


def _rss_file_kib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


def test_make_empty_allocates_no_weight_memory():
    scheme = Scheme()
    plan = quantize_(tiny_llama(seed=0), scheme)
    fresh = tiny_llama(seed=1)  # tied, like a model about to receive a checkpoint
    make_empty(fresh, plan, scheme)
    quantized = [m for m in fresh.modules() if isinstance(m, (Int4Linear, Int8Linear, Int8Embedding))]
    assert len(quantized) == len(plan.modules) == 2 * 7 + 2
    for mod in quantized:  # shapes only: loading assigns the checkpoint's tensors
        assert all(b.device.type == "meta" for b in mod.buffers())
    assert fresh.get_output_embeddings() is not fresh.get_input_embeddings()
    assert not fresh.config.tie_word_embeddings


@linux_only
def test_release_pages_evicts_a_mapped_tensor_and_keeps_its_values(tmp_path):
    original = torch.randint(0, 256, (8 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    save_file({"w": original}, str(tmp_path / "w.safetensors"))
    mapped = load_file(str(tmp_path / "w.safetensors"))["w"]  # file-backed: load_file maps, it does not copy
    before = _rss_file_kib()
    assert torch.equal(mapped, original)  # touches every page
    touched = _rss_file_kib()
    assert touched - before > 6 << 10, "the tensor was expected to be a file mapping"
    cpu.release_pages(mapped)
    assert touched - _rss_file_kib() > 6 << 10  # the 8 MiB went out of this process's memory ...
    assert torch.equal(mapped, original)  # ... and read back unchanged from the file
    anonymous = original.clone()
    cpu.release_pages(anonymous)  # a hint on anonymous memory: never loses data
    assert torch.equal(anonymous, original)


def test_chunked_repack_equals_one_chunk(monkeypatch):
    # N = 70: several chunks of 2 tiles and a padded last tile; the layout must not depend on chunking
    qweight, scales = make_int4(70, 96, g=32)
    q8, s8 = make_int8(70, 64)
    monkeypatch.setattr(cpu, "_REPACK_TILES", 1 << 20)
    whole4, whole8 = cpu.repack_int4(qweight, scales), cpu.repack_int8(q8, s8)
    monkeypatch.setattr(cpu, "_REPACK_TILES", 2)
    for a, b in zip((*cpu.repack_int4(qweight, scales), *cpu.repack_int8(q8, s8)), (*whole4, *whole8)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    back_q, back_s = _unrepack_int4(*cpu.repack_int4(qweight, scales), 70, 96, 32)
    assert torch.equal(back_q, qweight) and torch.equal(back_s, scales)


@pytest.mark.skipif(cpu.unavailable_reason() is not None, reason="fast CPU kernel unavailable")
def test_after_repack_and_eviction_the_checkpoint_still_saves_bit_identically(tiny, ids, tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_KERNEL", "cpu")
    scheme = Scheme()
    plan = quantize_(tiny, scheme)
    first = save_checkpoint(LoadedModel(tiny, tiny_tokenizer(), "tiny", "abc"), plan, scheme, tmp_path / "a",
                            pipeline="ptq", method="rtn")
    loaded, _ = load_checkpoint(first)
    with torch.inference_mode():
        logits = loaded.model(ids).logits  # repacks every weight and evicts the portable pages
    second = save_checkpoint(loaded, plan, scheme, tmp_path / "b", pipeline="ptq", method="rtn")
    a, b = load_file(str(next(first.glob("*.safetensors")))), load_file(str(next(second.glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again, _ = load_checkpoint(second)
    with torch.inference_mode():
        assert torch.equal(again.model(ids).logits, logits)
