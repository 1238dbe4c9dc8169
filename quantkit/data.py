"""Text data: the WikiText-2 evaluation split and the declared calibration sets.

Every dataset has two sources:

* a **local data directory** (``--data-dir`` or ``QUANTKIT_DATA_DIR``; tests, CI and the demo
  use ``../shared/data``): plain files, read offline;
* otherwise the Hugging Face hub through ``datasets`` (for users with a network).

Calibration sets are declared in ``calibration/*.json`` (see ``calibration/README.md``); they
never include the evaluation text. Sampled token sets (N windows of L tokens, seeded) are cached
under the cache dir, keyed by the text, the tokenizer, N, L and the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantkit.errors import QuantkitError
from quantkit.settings import cache_dir

WIKITEXT2_TEST = "wikitext-2-raw-v1/test.jsonl"
CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "calibration"


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The explicit directory, else ``QUANTKIT_DATA_DIR``, else None (use ``datasets`` downloads)."""
    value = data_dir if data_dir is not None else os.environ.get("QUANTKIT_DATA_DIR") or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise QuantkitError(f"data directory {path} does not exist; pass --data-dir DIR "
                            "(e.g. ../shared/data) or unset QUANTKIT_DATA_DIR to download with `datasets`")
    return path


def _local_file(data_dir: Path, relative: str) -> Path:
    path = data_dir / relative
    if not path.is_file():
        raise QuantkitError(f"data directory {data_dir} has no {relative}; point --data-dir / "
                            "QUANTKIT_DATA_DIR at a directory laid out as ../shared/data (see its README)")
    return path


def _read_jsonl_field(path: Path, field: str) -> list[str]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError) as exc:
                raise QuantkitError(f"{path}:{lineno} is not a JSON object with a {field!r} field") from exc
    return rows


def _hub_rows(path: str, name: str | None, split: str, field: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split)
    except (OSError, ConnectionError, ValueError) as exc:
        raise QuantkitError(f"could not download {path}/{name} ({split}) with `datasets` ({exc}); offline? "
                            "pass --data-dir DIR (or set QUANTKIT_DATA_DIR) with the files of ../shared/data") from exc
    return list(ds[field])


def wikitext2_test_text(data_dir: str | Path | None = None) -> str:
    """The WikiText-2 raw v1 test split joined GPTQ/SpinQuant-style: ``"\\n\\n".join(rows)``."""
    root = resolve_data_dir(data_dir)
    if root is None:
        rows = _hub_rows("wikitext", "wikitext-2-raw-v1", "test", "text")
    else:
        rows = _read_jsonl_field(_local_file(root, WIKITEXT2_TEST), "text")
    return "\n\n".join(rows)


# ---------------------------------------------------------------------------------------------
# Calibration sets


@dataclass(frozen=True)
class CalibrationSet:
    """A declared calibration source (one ``calibration/<name>.json``)."""

    name: str
    description: str
    local_path: str  # relative to the data dir
    local_format: str  # "text" (one document) or "jsonl" (one {"text": ...} per line)
    hub_path: str
    hub_name: str | None
    hub_split: str
    hub_field: str

    def texts(self, data_dir: Path | None) -> list[str]:
        if data_dir is None:
            return _hub_rows(self.hub_path, self.hub_name, self.hub_split, self.hub_field)
        path = _local_file(data_dir, self.local_path)
        if self.local_format == "jsonl":
            return _read_jsonl_field(path, "text")
        return [path.read_text(encoding="utf-8")]


def calibration_sets() -> dict[str, CalibrationSet]:
    """The sets declared in ``calibration/`` (``QUANTKIT_CALIBRATION_DIR`` overrides the folder)."""
    folder = Path(os.environ.get("QUANTKIT_CALIBRATION_DIR", CALIBRATION_DIR))
    sets = {}
    for f in sorted(folder.glob("*.json")):
        d = json.loads(f.read_text())
        sets[d["name"]] = CalibrationSet(
            d["name"], d["description"], d["local"]["path"], d["local"]["format"],
            d["hub"]["path"], d["hub"].get("name"), d["hub"]["split"], d["hub"]["field"])
    return sets


def calibration_set(name: str) -> CalibrationSet:
    sets = calibration_sets()
    if name not in sets:
        raise QuantkitError(f"unknown calibration set {name!r}; declared sets: {sorted(sets)}")
    return sets[name]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash that changes whenever the tokenizer would produce different ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(tokenizer, text: str) -> torch.Tensor:
    """All of ``text`` as one 1-D LongTensor of ids (no length limit warnings: we window it)."""
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_tokens(tokenizer, set_name: str, n: int, seq_len: int, seed: int,
                       data_dir: str | Path | None = None) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens ``[n, seq_len]`` sampled (seeded) from a calibration set."""
    if n <= 0 or seq_len <= 1:
        raise QuantkitError(f"need at least 1 calibration sample of 2+ tokens (got n={n}, seq_len={seq_len})")
    cset = calibration_set(set_name)
    root = resolve_data_dir(data_dir)
    texts = cset.texts(root)
    text_hash = hashlib.sha256("\n\n".join(texts).encode()).hexdigest()[:16]
    key = f"{set_name}-{text_hash}-{tokenizer_fingerprint(tokenizer)}-{n}x{seq_len}-seed{seed}"
    cached = cache_dir() / "tokens" / f"{key}.safetensors"
    if cached.is_file():
        return load_file(str(cached))["ids"]
    ids = encode(tokenizer, "\n\n".join(texts))
    if len(ids) <= seq_len:
        raise QuantkitError(f"calibration set {set_name!r} has {len(ids)} tokens, fewer than one window "
                            f"of {seq_len}; use shorter windows (--seq-len, or qlora's --qat-seq-len / "
                            f"--lora-seq-len for a stage's own) or a larger calibration set")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n,), generator=gen)
    windows = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}")
    save_file({"ids": windows.contiguous()}, str(tmp))
    os.replace(tmp, cached)
    return windows
