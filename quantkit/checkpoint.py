"""Quantized checkpoints: a directory, written atomically, read back bit for bit.

Layout of a checkpoint directory::

    config.json                  the Hugging Face config (tie_word_embeddings false once untied)
    model.safetensors            every tensor of the state dict (or model-0000N-of-0000M.safetensors
    model.safetensors.index.json   shards with the usual index, above ``max_shard_bytes``)
    tokenizer files              when the source model had a tokenizer
    quantkit.json                quantkit's metadata (see below)

``quantkit.json`` holds ``format_version`` (the packed layout of :mod:`quantkit.packing`), the
scheme, the pipeline and its config, the source model and the sha256 of its weights, the kind of
every quantized module, what was left unquantized and why, and ``aliases``: tensors stored once
because another tensor is bit-identical (typically the int8 head and embedding after untying). The format lives there, never in
file names. Only safetensors is ever read; nothing is unpickled.

Writes go to a sibling temporary directory that replaces the target only when complete, so a
crash or Ctrl-C never leaves a half-written checkpoint where a good one was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.model import LoadedModel, check_safetensors, load_model, load_tokenizer, weight_files
from quantkit.modules import Plan, make_empty
from quantkit.packing import FORMAT_VERSION
from quantkit.scheme import Scheme

METADATA_FILE = "quantkit.json"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 << 30


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def check_output(target: Path, overwrite: bool) -> None:
    """Refuse to replace an existing path unless asked to (pipelines call this before any work)."""
    if Path(target).exists() and not overwrite:
        raise QuantkitError(f"{target} already exists; choose another --output or pass --overwrite")


def atomic_file(write: Callable[[Path], None], path: Path) -> None:
    """``write(tmp)`` a file next to ``path``, then rename it into place: ``path`` is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``target`` only if the block succeeds."""
    target = Path(target)
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            os.replace(target, old)  # keep the good one until the new one is in place
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(loaded: LoadedModel, plan: Plan, scheme: Scheme, output: Path, *, pipeline: str,
                    method: str, config: dict | None = None, overwrite: bool = False,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, lora: dict | None = None,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write the (already quantized) ``loaded.model`` to ``output`` as a checkpoint directory.

    ``lora``: the model's unmerged LoRA adapters (``quantkit.training.lora.lora_metadata``), recorded
    so that loading rebuilds them; their tensors are in the state dict like any other.
    ``extra_files``: small text files (name -> content) written into the directory, e.g. a report.
    """
    model = loaded.model
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # only the quantized modules' buffers: never tie parameters someone may train later
    aliases = _identical_tensors({k: v for k, v in state.items() if k.rpartition(".")[0] in plan.modules})
    state = {k: v for k, v in state.items() if k not in aliases}
    meta = {
        "format_version": FORMAT_VERSION,
        "quantkit_version": __version__,
        "pipeline": pipeline,
        "method": method,
        "scheme": scheme.to_dict(),
        "source": {"model": loaded.source, "sha256": loaded.source_sha256},
        **plan.to_dict(),
        "aliases": aliases,
        **({"lora": lora} if lora else {}),
        "config": config or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_directory(Path(output), overwrite) as tmp:
        model.config.save_pretrained(str(tmp))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(tmp))
        _write_shards(state, tmp, max_shard_bytes)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(output)


def _identical_tensors(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map each tensor that repeats an earlier one bit for bit to that earlier name.

    Untying makes the head and the embedding separate modules, but RTN (and SpinQuant's R1)
    gives both the same int8 codes and per-row scales: storing them once saves a vocabulary-sized
    matrix on disk and in memory (the loaded modules share the tensor).
    """
    aliases: dict[str, str] = {}
    seen: dict[tuple, list[str]] = {}
    for name, t in state.items():
        key = (tuple(t.shape), t.dtype)
        for other in seen.get(key, []):
            if torch.equal(t, state[other]):
                aliases[name] = other
                break
        else:
            seen.setdefault(key, []).append(name)
    return aliases


def _write_shards(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def read_metadata(path: Path) -> dict:
    try:
        meta = json.loads((path / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantkitError(f"{path / METADATA_FILE} is unreadable ({exc})") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise QuantkitError(f"{path} has checkpoint format version {version!r}; this quantkit "
                            f"({__version__}) reads version {FORMAT_VERSION}. Upgrade quantkit or re-quantize.")
    return meta


def load_checkpoint(path: str | Path) -> tuple[LoadedModel, dict]:
    """Rebuild a runnable quantized model from a checkpoint directory; returns (model, metadata)."""
    path = Path(path)
    meta = read_metadata(path)
    scheme = Scheme.from_dict(meta["scheme"])
    plan = Plan.from_dict(meta)
    files = weight_files(path)
    if not files:
        raise QuantkitError(f"{path} has quantkit.json but no *.safetensors weights; re-create the checkpoint")
    check_safetensors(files)
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with no_init_weights():  # every tensor is overwritten by the checkpoint
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    make_empty(model, plan, scheme)
    if meta.get("lora"):  # unmerged adapters: wrap their (packed) linears before loading
        from quantkit.training.lora import add_lora_from_metadata

        add_lora_from_metadata(model, meta["lora"])
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    for name, original in meta.get("aliases", {}).items():
        state[name] = state[original]  # stored once, shared by both modules
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise QuantkitError(f"{path} does not match its own metadata ({str(exc).splitlines()[0]})") from exc
    loaded = LoadedModel(model.eval(), load_tokenizer(path), str(path), meta["source"]["sha256"])
    return loaded, meta


def load_any(spec: str | None) -> tuple[LoadedModel, dict | None]:
    """A quantized checkpoint (with its metadata) or a float model (metadata None)."""
    if spec is not None and is_checkpoint(spec):
        return load_checkpoint(spec)
    return load_model(spec), None
