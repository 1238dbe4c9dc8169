"""Shared fixtures: tiny seeded Llama models (with a byte-level tokenizer), the data dir, a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from quantkit.model import tiny_llama, tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """The cache dir is $QUANTKIT_CACHE_DIR when set (make test: the checkout's .cache, so the kernel build
    and converted default model are shared), else the session's temp dir; perplexity windows are per test."""
    if "QUANTKIT_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("QUANTKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never hang on the network in tests
    # kept perplexity windows (quantkit eval resumes from them) never outlive a test: a stale one would
    # stand in for the forward pass a test means to check
    windows = tmp_path_factory.mktemp("perplexity")
    monkeypatch.setattr("quantkit.evaluate.windows_dir", lambda: windows)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("QUANTKIT_DATA_DIR", SHARED_DATA))
    if not (path / "wikitext-2-raw-v1" / "test.jsonl").is_file():
        pytest.skip(f"no data dir at {path} (set QUANTKIT_DATA_DIR)")
    return path


@pytest.fixture
def tiny():
    """A fresh tiny Llama (2 layers, hidden 64, GQA 4/2 heads, tied embeddings), seed 0."""
    return tiny_llama(seed=0)


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """The tiny model saved as a Hugging Face directory with a tokenizer."""
    path = tmp_path / "tiny"
    tiny_llama(seed=0).save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
