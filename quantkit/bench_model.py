"""``quantkit bench model``: the inference columns of the Llama 3.2 model card, for any model.

For the bf16 baseline and any quantized checkpoint: decode tokens/s, prefill tokens/s, time to
first token for a 64-token prompt, checkpoint size (MiB of its safetensors) and peak RSS.
Each model runs in a fresh subprocess, so peak RSS is that model's alone and one model's
allocations never slow the next. ``synthetic`` models (random weights, real shapes) measure speed
at the sizes users care about without downloading them.

Numbers are only comparable within one run on one machine: compare ratios, not absolute times.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quantkit.bench import MODELS
from quantkit.errors import QuantkitError



def _shapes(hidden: int, inter: int, n_heads: int, n_kv: int, head_dim: int, vocab: int, layers: int) -> dict:
    return dict(hidden_size=hidden, intermediate_size=inter, num_attention_heads=n_heads, num_key_value_heads=n_kv,
                head_dim=head_dim, vocab_size=vocab, num_hidden_layers=layers)


#: real Llama 3.2 shapes (random weights) for speed measurements without a download
SYNTHETIC = {
    "llama-3.2-1b": _shapes(*MODELS["llama-3.2-1b"], layers=16),
    "llama-3.2-3b": _shapes(*MODELS["llama-3.2-3b"], layers=28),
    "tiny": _shapes(64, 128, 4, 2, 16, 256, layers=2),
}
SYNTHETIC_PREFIX = "synthetic:"  # "synthetic:llama-3.2-1b" = bf16, "synthetic:llama-3.2-1b:8da4w" = its PTQ


@dataclass(frozen=True)
class ModelBenchConfig:
    prompt_tokens: int = 64  # time to first token is measured on this prompt
    prefill_tokens: int = 512  # prefill throughput is measured on this prompt
    new_tokens: int = 32  # decode steps timed after the 64-token prompt
    threads: int | None = None  # torch threads (None: torch's default)
    repeats: int = 3  # median over repeats

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "prefill_tokens", "new_tokens", "repeats"):
            if getattr(self, name) <= 0:
                raise QuantkitError(f"{name} must be positive, got {getattr(self, name)}")


def _load(spec: str):
    """(model, size in MiB) for a model spec: synthetic, a checkpoint, or a float model."""
    from quantkit.checkpoint import load_any
    from quantkit.model import default_model_dir

    if spec.startswith(SYNTHETIC_PREFIX):
        path = synthetic_dir(spec[len(SYNTHETIC_PREFIX):])
    else:
        path = default_model_dir() if spec == "default" else Path(spec)
    loaded, _ = load_any(str(path))
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files) / 2**20
    return loaded.model, size


def synthetic_dir(name: str) -> Path:
    """Where ``name`` (``llama-3.2-1b`` = bf16, ``llama-3.2-1b:8da4w`` = its PTQ checkpoint) lives on disk."""
    from quantkit.settings import cache_dir

    base, _, quant = name.partition(":")
    if base not in SYNTHETIC or quant not in ("", "8da4w"):
        raise QuantkitError(f"unknown synthetic model {name!r}; choose from {sorted(SYNTHETIC)} (+ ':8da4w')")
    return cache_dir() / "synthetic" / (f"{base}-8da4w" if quant else base)


def prepare_synthetic(base: str) -> None:
    """Write the random bf16 model (real shapes, tied embeddings) and its PTQ checkpoint, once.

    Both are measured from disk like any other model, so size, load path and peak RSS are real.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.initialization import no_init_weights

    from quantkit.checkpoint import atomic_directory, save_checkpoint
    from quantkit.model import LoadedModel
    from quantkit.modules import quantize_
    from quantkit.scheme import Scheme

    float_dir, quant_dir = synthetic_dir(base), synthetic_dir(f"{base}:8da4w")
    if float_dir.is_dir() and quant_dir.is_dir():
        return
    config = LlamaConfig(**SYNTHETIC[base], tie_word_embeddings=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for p in model.parameters():  # random weights of a realistic scale (no init is faster)
        p.data.normal_(0, 0.02)
    model.tie_weights()  # no_init_weights skips tying: tie as a real Llama 3.2 checkpoint is
    if model.lm_head.weight is not model.get_input_embeddings().weight:
        raise RuntimeError("synthetic model: lm_head is not tied to the embedding")
    with atomic_directory(float_dir, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
    scheme = Scheme()
    plan = quantize_(model, scheme)
    save_checkpoint(LoadedModel(model, None, f"{SYNTHETIC_PREFIX}{base}", ""), plan, scheme, quant_dir,
                    pipeline="ptq", method="rtn", overwrite=True)


def _peak_rss_mib() -> float:
    """This process's peak resident memory since it exec'd.

    Not ``getrusage``: Linux carries ``ru_maxrss`` across fork+exec, so a benchmark started from a
    big parent (the report, with models and lm-eval loaded) would report the parent's footprint.
    ``VmHWM`` belongs to the address space, which exec replaces.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass  # not Linux: fall back to getrusage (KiB on Linux, bytes on macOS)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(spec: str, config: ModelBenchConfig) -> dict:
    """Run in this process: load ``spec`` and time prefill, first token and decode."""
    from quantkit.decode import greedy_decode

    if config.threads:
        torch.set_num_threads(config.threads)
    model, size = _load(spec)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, config.prompt_tokens), generator=gen)
    long_prompt = torch.randint(0, vocab, (1, config.prefill_tokens), generator=gen)
    greedy_decode(model, prompt, 2)  # warm-up: first-call allocations, kernel repacking
    ttft, decode, prefill = [], [], []
    for _ in range(config.repeats):
        r = greedy_decode(model, prompt, config.new_tokens)
        ttft.append(r.prefill_s)
        decode.append(statistics.median(r.step_s))
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(long_prompt, use_cache=False, logits_to_keep=1)
            prefill.append(time.perf_counter() - t0)
    return {"model": spec, "threads": torch.get_num_threads(),
            "summary": {"decode_tok_s": 1 / statistics.median(decode),
                        "prefill_tok_s": config.prefill_tokens / statistics.median(prefill),
                        "ttft_s": statistics.median(ttft), "size_mib": size, "peak_rss_mib": _peak_rss_mib()}}


def bench_model(spec: str, config: ModelBenchConfig = ModelBenchConfig(), baseline: str | None = None) -> dict:
    """Benchmark ``spec`` (and ``baseline`` in the same run) each in its own subprocess."""
    for s in (spec, baseline):
        if s is not None and s.startswith(SYNTHETIC_PREFIX):
            name = s[len(SYNTHETIC_PREFIX):]
            if not synthetic_dir(name).is_dir():  # written in a subprocess of its own: no memory left behind
                _run_worker(["--prepare", name.partition(":")[0]], f"preparing {s}")
    result = _in_subprocess(spec, config)
    if baseline is not None:
        base = _in_subprocess(baseline, config)
        s, b = result["summary"], base["summary"]
        s.update(decode_speedup=s["decode_tok_s"] / b["decode_tok_s"],
                 prefill_speedup=s["prefill_tok_s"] / b["prefill_tok_s"],
                 size_ratio=s["size_mib"] / b["size_mib"], rss_ratio=s["peak_rss_mib"] / b["peak_rss_mib"])
        result["baseline"] = base
    result["config"] = asdict(config)
    return result


def _in_subprocess(spec: str, config: ModelBenchConfig) -> dict:
    return json.loads(_run_worker([spec, json.dumps(asdict(config))], f"benchmark of {spec}").splitlines()[-1])


def _run_worker(args: list[str], what: str) -> str:
    cmd = [sys.executable, "-m", "quantkit.bench_model", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise QuantkitError(f"{what} failed:\n{tail}")
    return proc.stdout.strip()


def render_model_bench(result: dict):
    from rich.table import Table

    rows = [result] + ([result["baseline"]] if "baseline" in result else [])
    table = Table(title=f"bench model ({result['threads']} threads; compare ratios, not absolute times)")
    for col in ("model", "decode tok/s", "prefill tok/s", "TTFT s (64 tok)", "size MiB", "peak RSS MiB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        s = r["summary"]
        table.add_row(r["model"], f"{s['decode_tok_s']:.2f}", f"{s['prefill_tok_s']:.1f}", f"{s['ttft_s']:.3f}",
                      f"{s['size_mib']:.1f}", f"{s['peak_rss_mib']:.0f}")
    if "baseline" in result:
        s = result["summary"]
        table.caption = (f"vs baseline: decode {s['decode_speedup']:.2f}x, prefill {s['prefill_speedup']:.2f}x, "
                         f"size {s['size_ratio']:.2f}x, peak RSS {s['rss_ratio']:.2f}x")
    return table


if __name__ == "__main__":  # the worker side of _in_subprocess: prints one JSON line
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if sys.argv[1] == "--prepare":
        prepare_synthetic(sys.argv[2])
    else:
        cfg = ModelBenchConfig(**json.loads(sys.argv[2]))
        sys.stdout.write(json.dumps(measure(sys.argv[1], cfg)) + "\n")
