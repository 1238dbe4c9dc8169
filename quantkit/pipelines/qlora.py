"""QLoRA, Llama 3.2 style: QAT, then LoRA on the frozen QAT backbone, then DPO; packed int4 + bf16 adapters.

1. **QAT**: every module the scheme quantizes is swapped for its fake-quantized twin
   (:mod:`quantkit.training.qat`, the packed kernel's math with straight-through gradients) and the
   whole model is fine-tuned on instruction data (loss on responses only), or distilled from the
   frozen float starting model (``StageLoss.KD`` / ``MIXED``), on that data or on calibration text.
   Optionally (the cpu preset) the float weights are first rotated (random Hadamard R1/R2 folded
   in, no run-time transform; or a SpinQuant rotations file's learned R1/R2 and its R4, the online
   Hadamard before down_proj) and QAT starts from GPTQ's int4 model instead of round-to-nearest.
2. **LoRA**: that backbone is frozen; bf16 LoRA adapters on every block linear are trained on
   the same kind of data, with their own loss choice. With ``lora.runs`` > 1 the stage runs that
   many times from consecutive seeds and the adapters are averaged into one (rank runs x rank).
3. **DPO**: backbone and adapters are trained together on preference pairs against the frozen
   stage-2 model; a held-out slice of pairs is scored before and after. Optionally (the cpu
   preset) each step adds the distillation loss on a calibration window, weighted by ``kd_weight``.

Best of N (``draws``): stages 1-2 run from N seeds, each draw on its own copy of the float model
(its stages in ``draw{i}/``, its held-out score the last); the stage-2 model with the lowest
perplexity on the selection set goes on to DPO.

Training runs on float32 master weights (bf16 would round away small updates); the release
casts the remaining float tensors (norms, adapters) to bf16. The packed checkpoint keeps the
adapters as an unmerged side path (``--merge-lora`` folds them in, which requantizes).

Stages write their results next to the output, in ``<output>.stages/``; a rerun with the same
configuration resumes after the last finished stage (and from the last step checkpoint inside
a stage). The directory is removed once the checkpoint is written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantkit import jsonout
from quantkit.algorithms.gptq import gptq_model_
from quantkit.algorithms.rotation import Rotations, down_projs, fold_rotations_
from quantkit.checkpoint import atomic_file, check_output, save_checkpoint
from quantkit.config import LoRAInit, QATInit, QLoRAConfig
from quantkit.data import calibration_tokens, encode, wikitext2_test_text
from quantkit.errors import QuantkitError
from quantkit.draws import best_of_n
from quantkit.evaluate import perplexity
from quantkit.model import load_model
from quantkit.kernels import hadamard
from quantkit.modules import InputTransform, Int8Embedding, block_linear_names
from quantkit.progress import err, progress_bar
from quantkit.scheme import Method
from quantkit.training.dpo import dpo_loss, pair_logps, preference_metrics, reference_logps
from quantkit.training.loops import batch_indices, run_stage, train
from quantkit.training.lora import (add_averaged_lora, add_lora, check_rank, init_from_error_, init_sequential_,
                                    lora_metadata, lora_modules, merge_lora_, pop_lora)
from quantkit.training.qat import (QATLinear, convert_qat, grid_lr_ratios, prepare_qat, scale_lr_ratios,
                                   trainable_parameters)
from quantkit.training.records import Tokenized, collate, preference_pairs, sft_records, tokenize
from quantkit.training.sft import StageLoss, stage_loss

REPORT_FILE = "qlora_report.json"


def run_qlora(config: QLoRAConfig) -> Path:
    """Run the three stages on ``config.model`` and write the packed checkpoint; returns its directory."""
    check_output(config.output, config.overwrite)
    loaded = load_model(config.model)
    model, tok = loaded.model.float(), loaded.tokenizer  # fp32 master weights, in place
    if tok is None:
        raise QuantkitError(f"{loaded.source} has no tokenizer; qlora trains on text and needs one")
    check_rank(model, config.lora.rank, config.lora.runs)
    rotations = _rotations_file(config.qat.rotations, model)
    data = _Data(config, tok)  # bad data is refused before anything is written
    work = _work_dir(config)
    report = {"eval": {"windows": config.eval_windows, "seq_len": config.eval_seq_len},
              "perplexity_float": _cached_perplexity(work / "ppl-float.json", model, data, config, "ppl float")}

    # The distillation teacher: a frozen float32 copy of the starting model (the bf16 baseline's weights).
    teacher = copy.deepcopy(model).requires_grad_(False).eval() if config.needs_teacher else None
    # (1)-(2) once, or best of N: each draw on its own copy of the float model, with its own seed
    held_out = None if config.draws == 1 else calibration_tokens(
        tok, config.selection_data, config.selection_windows, config.selection_seq_len, config.seed,
        config.data_dir)  # [n_sel, L_sel], never trained on

    def stages_1_2(draw_model, draw_work: Path, seed: int) -> tuple[torch.nn.Module, dict]:
        return _qat_and_lora(draw_model, rotations, teacher, data, dataclasses.replace(config, seed=seed), draw_work)

    best = best_of_n(model, work, config.seed, config.draws, held_out, stages_1_2,
                     f"stage-2 model's held-out {config.selection_data} perplexity")
    model, loaded = best.model, dataclasses.replace(loaded, model=best.model)
    report.update(best.result)
    if best.scores:
        report["draws"] = best.report()
    if not (config.dpo.kd_weight and config.dpo.steps):
        teacher = None  # DPO has its own (stage-2) reference; free the copy

    model.requires_grad_(True)  # (3) DPO: backbone and adapters, against the frozen stage-2 model
    report["dpo"] = run_stage(work, "dpo", model, lambda progress: _dpo_stage(model, data, config, work, progress,
                                                                              teacher))

    if config.merge_lora:
        merge_lora_(model)  # requantized below: what QAT bought for these weights is partly lost
    plan = convert_qat(model, config.scheme)  # packed int4 / int8: the grid QAT trained on
    _release_dtypes(model)
    path = save_checkpoint(loaded, plan, config.scheme, config.output, pipeline="qlora", method=Method.QAT.value,
                           config=config.to_dict(), overwrite=config.overwrite, lora=lora_metadata(model),
                           extra_files={REPORT_FILE: jsonout.dumps(report) + "\n"})
    shutil.rmtree(work, ignore_errors=True)
    return path


def _qat_and_lora(model, rotations: Rotations | None, teacher, data: _Data, config: QLoRAConfig,
                  work: Path) -> tuple[torch.nn.Module, dict]:
    """(1) QAT, then (2) LoRA on the frozen QAT backbone, on the float ``model`` in place (stages in
    ``work``); returns the stage-2 model and the stages' report."""
    work.mkdir(parents=True, exist_ok=True)
    report = {}
    # R1/R2 (R4) folded into the weights: the same float model, flatter activations; R4 as hooks for now
    r4_hooks = fold_rotations_(model, config.seed, rotations, remedy="pass --no-qat-rotate") \
        if config.qat.rotate else []
    float_weights = {n: w.detach().clone() for n, w in _block_weights(model).items()} \
        if config.lora.init is not LoRAInit.ZERO else None  # what the adapters' init compares int4 with
    init_scales = _gptq_init(work / "gptq-init.safetensors", model, data, config) \
        if config.qat.init is QATInit.GPTQ else None  # weights left on GPTQ's grid
    prepare_qat(model, config.scheme, config.qat.learn_scales, init_scales)  # (1) QAT: fake-quantized, all trained
    for hook in r4_hooks:  # the QAT down_projs apply R4 themselves, as the packed ones will
        hook.remove()
    for name, down in down_projs(model) if r4_hooks else []:
        if not isinstance(down, QATLinear):
            raise QuantkitError(f"{name} is not quantized by the scheme, so it cannot apply R4; "
                                "use a rotations file without R4 (quantkit spinquant --no-r4)")
        down.input_transform = InputTransform.HADAMARD
    # Before any training the fake-quantized model is the int4 model QAT starts from, exactly: vanilla
    # PTQ with the scheme's scales (RTN init) or the GPTQ model (with learned scales, GPTQ's own).
    report["perplexity_qat_start"] = _cached_perplexity(work / "ppl-start.json", model, data, config,
                                                        f"ppl {config.qat.init.value} start")
    report["qat"] = run_stage(work, "qat", model, lambda progress: _sft_stage(
        "qat", model, trainable_parameters(model), config.qat, data, config, progress, teacher,
        config.qat.grid_lr))

    model.requires_grad_(False)  # (2) LoRA: backbone frozen, adapters trained (once, or per run and averaged)
    report["lora"] = _lora_runs(model, float_weights, data, config, work, teacher)
    return model, report


def _lora_runs(model, float_weights: dict | None, data: _Data, config: QLoRAConfig, work: Path, teacher) -> dict:
    """Stage 2 once (stage ``lora``), or ``--lora-runs`` times from seeds seed, seed + 1, ... (stages
    ``lora``, ``lora1``, ...) on the same frozen backbone, their adapters then averaged into one."""
    reports, adapters = [], []
    for i in range(config.lora.runs):
        run = dataclasses.replace(config, seed=config.seed + i)  # its init windows, A draw and data order
        torch.manual_seed(run.seed)  # the adapters' A init: a resumed run must draw the same one
        add_lora(model, config.lora.rank, config.lora.alpha)
        params = {n: p for n, p in model.named_parameters() if "lora_" in n}
        reports.append(run_stage(work, "lora" if i == 0 else f"lora{i}", model, lambda progress: _lora_stage(
            model, params, float_weights, data, run, progress, teacher)))
        if config.lora.runs > 1:
            adapters.append(pop_lora(model))  # the backbone alone again for the next run
    if config.lora.runs == 1:
        return reports[0]
    add_averaged_lora(model, adapters, config.lora.alpha)  # rank runs x rank: the mean of the side paths
    return {"runs": reports, "perplexity": _cached_perplexity(work / "ppl-lora-average.json", model, data, config,
                                                             "ppl after lora (average)")}


# ---------------------------------------------------------------------------------------------


def _rotations_file(path: str | None, model) -> Rotations | None:
    """``--qat-rotations``' R1/R2 (and R4 flag), refused before any work if they do not fit ``model``."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise QuantkitError(f"--qat-rotations {path}: no such file (quantkit spinquant writes "
                            "OUTPUT.rotations.safetensors beside its checkpoint)")
    rotations, _meta = Rotations.load(Path(path))
    rotations.check(model, path)
    return rotations


def _gptq_init(path: Path, model, data: _Data, config: QLoRAConfig) -> dict[str, torch.Tensor]:
    """GPTQ every block linear in place (weights left dequantized); their scales ``[N, K / group]`` by name.

    Calibrates on ``--qat-init-samples`` windows of the QAT stage's calibration set (wikitext2
    when it trains on instruction data); the result is kept in ``path`` for a resumed run.
    """
    weights = _block_weights(model)
    if not path.is_file():
        scheme, stage = config.scheme, config.qat
        ids = data.calibration_ids(stage.calibration or "wikitext2", stage.init_samples,
                                   config.stage_seq_len(stage), config.seed)  # [n, seq_len]
        with progress_bar("GPTQ init (layers)", len(model.model.layers)) as advance:
            scales = gptq_model_(model, ids, scheme.linear_bits, scheme.group_size, scheme.scale_dtype.torch,
                                 scheme.weight_clip, on_layer=lambda _i: advance())
        tensors = {**{f"{n}.weight": w.detach().contiguous() for n, w in weights.items()},
                   **{f"{n}.scales": s for n, s in scales.items()}}
        atomic_file(lambda tmp: save_file(tensors, str(tmp)), path)  # exact values: a resumed run starts alike
        return scales
    saved = load_file(str(path))
    with torch.no_grad():
        for n, w in weights.items():
            w.copy_(saved[f"{n}.weight"])
    return {k.removesuffix(".scales"): v for k, v in saved.items() if k.endswith(".scales")}


class _Data:
    """Tokenized SFT examples, training / held-out preference pairs, and the perplexity text."""

    def __init__(self, config: QLoRAConfig, tok):
        self._sft = sft_records(config.sft_data, config.data_dir)  # all validated, tokenized on demand
        pairs = preference_pairs(config.pref_data, config.data_dir)
        n_heldout = config.dpo.heldout_pairs
        if len(pairs) <= n_heldout:
            raise QuantkitError(f"{config.pref_data} has {len(pairs)} preference pairs; at least "
                                f"--heldout-pairs + 1 = {n_heldout + 1} are needed")
        # Held out: a seeded random slice, never trained on.
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(config.seed)).tolist()
        # the pairs' length is the run's seq_len; the SFT stages pass their own (QLoRAConfig.stage_seq_len)
        self._tok, self._seq_len, self._data_dir = tok, config.seq_len, config.data_dir
        self._train_pairs = [pairs[i] for i in order[n_heldout:]]
        self.heldout = [self._tokenized(pairs[i]) for i in order[:n_heldout]]
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.eval_ids = _eval_prefix_ids(tok, wikitext2_test_text(config.data_dir),
                                         config.eval_windows * config.eval_seq_len)

    @property
    def n_sft(self) -> int:
        return len(self._sft)

    def sft_example(self, i: int, seq_len: int):
        record = self._sft[i]
        return tokenize(self._tok, record.messages[:-1], record.messages[-1]["content"], seq_len)

    def calibration_ids(self, name: str, n: int, seq_len: int, seed: int) -> torch.Tensor:
        """``n`` windows ``[n, seq_len]`` of calibration set ``name``, drawn by ``seed`` (a draw's own)."""
        return calibration_tokens(self._tok, name, n, seq_len, seed, self._data_dir)

    def calibration_windows(self, name: str, n: int, seq_len: int, seed: int) -> list[Tokenized]:
        """:meth:`calibration_ids` as training rows, every token a target."""
        return [Tokenized(row.tolist(), 0) for row in self.calibration_ids(name, n, seq_len, seed)]

    @property
    def n_train_pairs(self) -> int:
        return len(self._train_pairs)

    def train_pair(self, i: int):
        return self._tokenized(self._train_pairs[i])  # on demand: only the pairs a run samples

    def _tokenized(self, pair):
        return (tokenize(self._tok, pair.prompt, pair.chosen, self._seq_len),
                tokenize(self._tok, pair.prompt, pair.rejected, self._seq_len))


def _eval_prefix_ids(tok, text: str, needed: int) -> torch.Tensor:
    """The ids of the text's start, enough for ``needed`` tokens: the same ids ``quantkit eval`` scores.

    Tokenizing the whole split costs seconds per run; a prefix cut at a paragraph break tokenizes
    identically up to the cut (pre-tokenization splits at whitespace), and only the start is scored.
    """
    chars = 16 * needed
    while chars < len(text):
        cut = text.find("\n\n", chars)
        if cut < 0:
            break
        ids = encode(tok, text[:cut])
        if len(ids) > needed + 64:  # the last words before the cut never reach the scored windows
            return ids
        chars *= 4
    return encode(tok, text)


def _work_dir(config: QLoRAConfig) -> Path:
    """``<output>.stages``; refuses to resume a run started with another configuration."""
    work = config.output.with_name(config.output.name + ".stages")
    wanted = {k: v for k, v in config.to_dict().items() if k not in ("overwrite", "save_every")}
    run_file = work / "run.json"
    if run_file.is_file():
        started = json.loads(run_file.read_text())
        if started != wanted:
            changed = sorted(k for k in set(started) | set(wanted) if started.get(k) != wanted.get(k))
            raise QuantkitError(f"{work} holds an unfinished run with other settings ({', '.join(changed)}); "
                                "rerun with those settings to resume, or pass --restart to discard it")
        err.print(f"resuming the unfinished run in {work}")
    else:
        work.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(wanted, indent=2) + "\n")
    return work


def _perplexity(model, data: _Data, config: QLoRAConfig, description: str) -> float:
    model.eval()
    return perplexity(model, data.eval_ids, config.eval_seq_len, config.eval_windows, description).perplexity


def _cached_perplexity(path: Path, model, data: _Data, config: QLoRAConfig, description: str) -> float:
    """Perplexity, kept in ``path`` so that a resumed run does not score the same model again."""
    if path.is_file():
        return json.loads(path.read_text())["perplexity"]
    ppl = _perplexity(model, data, config, description)
    path.write_text(json.dumps({"perplexity": ppl}) + "\n")
    return ppl


def _sft_stage(name: str, model, params: dict, stage, data: _Data, config: QLoRAConfig, progress: Path,
               teacher, grid_lr: bool = False) -> dict:
    seq_len = config.stage_seq_len(stage)
    if stage.calibration is None:  # instruction data, tokenized on demand
        n_rows, example = data.n_sft, lambda i: data.sft_example(i, seq_len)
    else:  # one fresh window per sequence of the stage (raw text: every token is a target)
        windows = data.calibration_windows(stage.calibration, max(1, stage.steps * stage.batch_size), seq_len,
                                           config.seed)
        n_rows, example = len(windows), windows.__getitem__

    def loss(step: int) -> torch.Tensor:
        rows = batch_indices(n_rows, stage.batch_size, step, config.seed)
        return stage_loss(model, collate([example(i) for i in rows], data.pad_id), stage.loss, teacher)

    model.train()
    ratios = _lr_ratios(model, params, grid_lr, 1.0)
    losses = train(name, params, stage.steps, stage.lr, loss, progress, config.save_every, ratios)
    return {"loss": losses, "perplexity": _perplexity(model, data, config, f"ppl after {name}")}


def _lora_stage(model, adapters: dict, float_weights: dict | None, data: _Data, config: QLoRAConfig,
                progress: Path, teacher) -> dict:
    _init_adapters(model, float_weights, data, config)  # (a resumed stage reloads its step checkpoint over it)
    return _sft_stage("lora", model, adapters, config.lora, data, config, progress, teacher)


def _init_adapters(model, float_weights: dict[str, torch.Tensor] | None, data: _Data, config: QLoRAConfig) -> None:
    """The adapters' start by ``--lora-init`` (zero: LoRA's own, already there)."""
    if config.lora.init is LoRAInit.ERROR:
        _init_adapters_from_error(model, float_weights, data, config)
    elif config.lora.init is LoRAInit.SEQUENTIAL:
        _init_adapters_sequential(model, float_weights, data, config)


@torch.no_grad()
def _init_adapters_from_error(model, float_weights: dict[str, torch.Tensor], data: _Data,
                              config: QLoRAConfig) -> None:
    """Each adapter := what its int4 base lost, best at rank r for its inputs (``lora.init_from_error_``).

    The inputs are the adapters' own (the unquantized ``x`` the side path sees) on calibration
    windows through the stage-1 model; an R4 base multiplies ``H x``, so its error is mapped back.
    """
    wrappers = lora_modules(model)
    grams: dict[str, torch.Tensor] = {}

    def accumulate(name: str):
        def hook(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # [tokens, K]
            grams[name] = grams.get(name, 0) + x.T @ x  # [K, K]
        return hook

    handles = [w.register_forward_pre_hook(accumulate(n)) for n, w in wrappers.items()]
    ids = data.calibration_ids(config.lora.calibration or "wikitext2", config.lora.init_samples,
                               config.stage_seq_len(config.lora), config.seed)  # [n, L]
    model.eval()
    with progress_bar("LoRA init (windows)", len(ids)) as advance:
        for row in ids:
            model.model(input_ids=row[None])  # the blocks only: the adapters' inputs, no head
            advance()
    for handle in handles:
        handle.remove()
    for name, wrapper in wrappers.items():
        base = wrapper.base
        if not isinstance(base, QATLinear):  # left float by the scheme: nothing lost, B stays 0
            continue
        lost = _map_of_x(base, float_weights[name] - base.fake_quantized_weight())  # [N, K]
        init_from_error_(wrapper, lost, grams.pop(name))


@torch.no_grad()
def _init_adapters_sequential(model, float_weights: dict[str, torch.Tensor], data: _Data,
                              config: QLoRAConfig) -> None:
    """Each adapter := what its layer lost, earlier layers' error included (``lora.init_sequential_``),
    on the same calibration windows as ``--lora-init error``."""
    bases = {name: wrapper.base for name, wrapper in lora_modules(model).items()}
    floats = {name: _map_of_x(base, float_weights[name]) for name, base in bases.items()}
    quantized = {name: _map_of_x(base, base.fake_quantized_weight())
                 for name, base in bases.items() if isinstance(base, QATLinear)}  # others lost nothing
    ids = data.calibration_ids(config.lora.calibration or "wikitext2", config.lora.init_samples,
                               config.stage_seq_len(config.lora), config.seed)  # [n, L]
    model.eval()
    with progress_bar("LoRA init (layers)", len(model.model.layers)) as advance:
        init_sequential_(model, floats, quantized, ids, on_layer=lambda _i: advance())


def _map_of_x(base, weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` as a map of the adapter's input ``x``: an R4 base multiplies ``H x``, so ``W H``."""
    weight = weight.detach().float()
    if getattr(base, "input_transform", InputTransform.NONE) is InputTransform.HADAMARD:
        return weight @ hadamard(torch.eye(base.in_features)).T
    return weight


def _block_weights(model) -> dict[str, torch.Tensor]:
    """The weight of every block linear (the ones LoRA wraps), by module name."""
    return {n: model.get_submodule(n).weight for n in block_linear_names(model)}


def _dpo_stage(model, data: _Data, config: QLoRAConfig, work: Path, progress: Path, teacher) -> dict:
    cfg = config.dpo
    steps_rows = [batch_indices(data.n_train_pairs, cfg.batch_size, s, config.seed) for s in range(cfg.steps)]
    ref = _reference(work / "dpo-reference.safetensors", model, data, sorted({i for r in steps_rows for i in r}), cfg)
    before = preference_metrics(ref["heldout_chosen"], ref["heldout_rejected"], ref["heldout_chosen"],
                                ref["heldout_rejected"], cfg.beta)  # the policy starts as the reference

    # the stage-2 model's own distillation text and window length, one window a step
    kd_text, kd_len = config.lora.calibration or "wikitext2", config.stage_seq_len(config.lora)
    windows = data.calibration_windows(kd_text, cfg.steps, kd_len, config.seed) if cfg.kd_weight and cfg.steps else []

    def loss(step: int):  # two terms, backpropagated in turn (loops.train): the peak is one graph, not both
        rows = steps_rows[step]
        pc, pr = pair_logps(model, [data.train_pair(i) for i in rows], data.pad_id)
        yield dpo_loss(pc, pr, ref["train_chosen"][rows], ref["train_rejected"][rows], cfg.beta)[0]
        if cfg.kd_weight:
            yield cfg.kd_weight * stage_loss(model, collate([windows[step]], data.pad_id), StageLoss.KD, teacher)

    model.train()
    params = trainable_parameters(model)
    ratios = _lr_ratios(model, params, cfg.grid_lr, cfg.backbone_lr_ratio)
    losses = train("dpo", params, cfg.steps, cfg.lr, loss, progress, config.save_every, ratios)
    model.eval()
    pc, pr = reference_logps(model, data.heldout, data.pad_id, cfg.batch_size)  # the trained policy now
    after = preference_metrics(pc, pr, ref["heldout_chosen"], ref["heldout_rejected"], cfg.beta)
    return {"loss": losses, "perplexity": _perplexity(model, data, config, "ppl after dpo"),
            "heldout_before": before.to_dict(), "heldout_after": after.to_dict()}


def _lr_ratios(model, params: dict, grid_lr: bool, backbone: float) -> dict[str, float]:
    """Each parameter's lr as a multiple of the stage's: learned scales slower than weights, int4
    linears by their grid step (``grid_lr``), and everything but the adapters times ``backbone``.

    Read from the model as the stage starts (before a resumed stage reloads its step checkpoint),
    so a resumed stage trains with the same ratios.
    """
    ratios = grid_lr_ratios(model) if grid_lr else scale_lr_ratios(params)
    return {n: ratios.get(n, 1.0) * (1.0 if "lora_" in n else backbone) for n in params}


def _reference(path: Path, model, data: _Data, rows: list[int], cfg) -> dict[str, torch.Tensor]:
    """Log-probs under the frozen stage-2 model (the current weights), computed once and kept on disk.

    ``train_*`` ``[P]`` holds the pairs the schedule samples (NaN elsewhere); ``heldout_*`` ``[H]``.
    """
    if path.is_file():
        return load_file(str(path))
    model.eval()
    with progress_bar("dpo reference log-probs", len(rows) + len(data.heldout)) as advance:
        train_c, train_r = (torch.full((data.n_train_pairs,), float("nan")) for _ in range(2))
        c, r = reference_logps(model, [data.train_pair(i) for i in rows], data.pad_id, cfg.batch_size, advance)
        train_c[rows], train_r[rows] = c, r
        held_c, held_r = reference_logps(model, data.heldout, data.pad_id, cfg.batch_size, advance)
    ref = {"train_chosen": train_c, "train_rejected": train_r, "heldout_chosen": held_c, "heldout_rejected": held_r}
    save_file({k: v.float().contiguous() for k, v in ref.items()}, str(path))
    return ref


def _release_dtypes(model) -> None:
    """bf16 for what stays float (norms, adapters, bias) and for the embedding's output."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    for mod in model.modules():
        if isinstance(mod, Int8Embedding):
            mod.dtype = torch.bfloat16
    model.requires_grad_(False)
