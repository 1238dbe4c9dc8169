"""``quantkit compare report``: the model-card table (quality, speed, size, memory) for one's own model.

:func:`build_report` scores the bf16 baseline and every checkpoint that has not been scored yet,
then writes ``results.json``, ``report.md`` (with PNG plots beside it) and a self-contained
``report.html`` (plots embedded as data URIs, CSS inline, no scripts, no network fetches).

* **Quality**: lm-eval tasks (:mod:`quantkit.tasks`), quantkit's WikiText-2 token perplexity
  (:mod:`quantkit.evaluate`), and the mean accuracy over the tasks' ``acc``.
* **Size**: MiB of the model's ``*.safetensors`` (the ``.gguf`` file for a GGUF baseline).
* **Speed and memory**: ``quantkit bench model`` results when given (a JSON file, or a callable
  passed to :func:`build_report`); left out, with a note, when absent.
* **Per-layer quantization error**: SQNR of each checkpoint's dequantized weights against the
  baseline's float weights (:mod:`quantkit.sqnr`).

Scores are cached under ``<cache dir>/scores/<content sha256>.json``: the hash covers every file of
the checkpoint directory, so a changed checkpoint is re-scored and an unchanged one is not. Each
entry's key names what produced it (task, data source, --limit, lm-eval and task versions). A token
perplexity stopped partway resumes from the windows it had scored (``resume`` in :mod:`quantkit.evaluate`).

The report itself is a pure function of the results document (:func:`derive`, :func:`write_report`),
so it can be re-rendered from a stored ``results.json`` without evaluating anything.
"""

from __future__ import annotations

import base64
import contextlib
import enum
import html
import io
import json
import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from quantkit import __version__, jsonout
from quantkit.checkpoint import atomic_directory, check_output, is_checkpoint, read_metadata
from quantkit.config import ReportConfig
from quantkit.errors import QuantkitError
from quantkit.float_matmul import Bf16Matmul, resolve_bf16, use_float32_matmuls_
from quantkit.model import LoadedModel, weight_files
from quantkit.settings import cache_dir
from quantkit.tasks import TASKS, TASKS_VERSION, parse_tasks, source_for

RESULTS_VERSION = 1
MIB = 1 << 20
#: a PTQ gap smaller than this (in the metric's own units) is noise, not a gap to recover
GAP_EPSILON = 1e-9

#: ``quantkit bench model`` for one model spec (None = the embedded default) -> its result dict
SpeedFn = Callable[[str | None], dict]


class Group(str, enum.Enum):
    QUALITY = "quality"
    SIZE = "size"
    SPEED = "speed"
    MEMORY = "memory"


class Role(str, enum.Enum):
    BASELINE = "baseline"
    CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class MetricDef:
    key: str
    label: str
    group: Group
    higher_is_better: bool
    percent: bool = False  # stored in [0, 1], shown x100, deltas in points

    def to_dict(self) -> dict:
        return {"key": self.key, "label": self.label, "group": self.group.value,
                "higher_is_better": self.higher_is_better, "percent": self.percent}

    @classmethod
    def from_dict(cls, d: dict) -> MetricDef:
        return cls(d["key"], d["label"], Group(d["group"]), bool(d["higher_is_better"]), bool(d.get("percent")))


MEAN_ACC = MetricDef("mean_acc", "Mean accuracy (tasks' acc)", Group.QUALITY, True, True)
SIZE = MetricDef("size_mib", "Model size (MiB)", Group.SIZE, False)
#: the flat ``summary`` of ``quantkit bench model``, in the order of the Llama 3.2 model card
SPEED_METRICS = (
    MetricDef("decode_tok_s", "Decode (tokens/s)", Group.SPEED, True),
    MetricDef("prefill_tok_s", "Prefill (tokens/s)", Group.SPEED, True),
    MetricDef("ttft_s", "Time to first token, 64-token prompt (s)", Group.SPEED, False),
    MetricDef("peak_rss_mib", "Peak RSS (MiB)", Group.MEMORY, False),
)


def token_ppl_metric(seq_len: int) -> MetricDef:
    return MetricDef("wikitext2/token_perplexity", f"WikiText-2 token perplexity (quantkit, seq {seq_len})",
                     Group.QUALITY, False)


def task_metrics(tasks: tuple[str, ...]) -> list[MetricDef]:
    return [MetricDef(f"{t}/{m.key}", f"{TASKS[t].title} {m.label}", Group.QUALITY, m.higher_is_better, m.percent)
            for t in tasks for m in TASKS[t].metrics]


# ---------------------------------------------------------------------------------------------
# Content hashes and the score cache


def _stat_key(f: Path) -> str:
    st = f.stat()
    return f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


class _HashMemo:
    """sha256 of files, remembered by (path, size, mtime, inode) so unchanged files are not re-read."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known: dict[str, str] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            self.known = {}

    def file(self, f: Path) -> str:
        import hashlib

        key = _stat_key(f)
        if key not in self.known:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
            self.known[key] = h.hexdigest()
            _write_json_atomic(self.path, self.known)
        return self.known[key]


    def concatenated(self, files: list[Path]) -> str:
        """sha256 of the files' bytes one after another (``quantkit.model``'s source-hash rule)."""
        from quantkit.model import sha256_files  # the same rule as the checkpoints' source.sha256

        key = "concat:" + "|".join(_stat_key(f) for f in files)
        if key not in self.known:
            self.known[key] = sha256_files(files)
            _write_json_atomic(self.path, self.known)
        return self.known[key]


def content_sha256(path: Path, memo: _HashMemo | None = None) -> str:
    """A hash of every file of a model directory (weights, config, tokenizer, metadata), or of one file."""
    import hashlib

    memo = memo or _HashMemo(cache_dir() / "scores" / "file-hashes.json")
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{memo.file(f)}\n".encode())
    return h.hexdigest()


def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


class ScoreCache:
    """Stored scores of one model, keyed by what produced them: ``<cache>/scores/<sha256>.json``."""

    def __init__(self, content_hash: str, enabled: bool = True):
        self.path = cache_dir() / "scores" / f"{content_hash}.json"
        self.enabled = enabled
        try:
            self.entries: dict = json.loads(self.path.read_text()) if enabled else {}
        except (OSError, json.JSONDecodeError):
            self.entries = {}

    def get(self, key: str):
        return self.entries.get(key)

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        if self.enabled:
            _write_json_atomic(self.path, self.entries)


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def task_key(task: str, data_dir: Path | None, limit: int | None) -> str:
    where = "hub" if data_dir is None else str(Path(data_dir).resolve())
    return (f"task:{task}:{source_for(data_dir).value}:{where}:limit={limit}:tasks-v{TASKS_VERSION}"
            f":lm-eval-{_lm_eval_version()}")


def ppl_key(seq_len: int, max_windows: int | None, data_dir: Path | None) -> str:
    where = "hub" if data_dir is None else str(Path(data_dir).resolve())
    return f"token-ppl:{where}:seq={seq_len}:windows={max_windows}"


def speed_key() -> str:
    return f"speed:{platform.node()}:{os.cpu_count()}cpu:{os.environ.get('QUANTKIT_KERNEL', 'auto')}"


# ---------------------------------------------------------------------------------------------
# The models of a report


@dataclass
class _Model:
    name: str
    role: Role
    spec: str | None  # as loadable by quantkit.checkpoint.load_any (None = the embedded default)
    path: Path | None  # local directory or file; None for a hub id
    kind: str
    meta: dict | None = None
    matmul: Bf16Matmul = Bf16Matmul.NATIVE  # FLOAT32: the bf16 linears scored as float32 matmuls
    _loaded: LoadedModel | None = None

    def load(self) -> LoadedModel:
        if self._loaded is None:
            from quantkit.checkpoint import load_any

            self._loaded, _ = load_any(self.spec)
        if self.matmul is Bf16Matmul.FLOAT32:  # also after a load made before matmul was set (a hub
            use_float32_matmuls_(self._loaded.model)  # baseline's hash); swaps only plain nn.Linear
        return self._loaded

    def score_key(self, key: str) -> str:
        """A stored score's key: float32 matmuls give other floats than torch's bf16 ones."""
        return key if self.matmul is Bf16Matmul.NATIVE else f"{key}:matmul={self.matmul.value}"

    def release(self) -> None:
        self._loaded = None


def _checkpoint_models(specs: tuple[str, ...]) -> list[_Model]:
    if not specs:
        raise QuantkitError("name at least one CHECKPOINT to compare with the baseline")
    models = []
    for spec in specs:
        path = Path(spec).expanduser()
        if not path.exists():
            raise QuantkitError(f"checkpoint {spec} does not exist")
        if not is_checkpoint(path):
            raise QuantkitError(f"{spec} is not a quantkit checkpoint (no quantkit.json); make one with "
                                "`quantkit ptq` (or spinquant / qlora), or pass a float model as --baseline")
        meta = read_metadata(path)
        models.append(_Model("", Role.CHECKPOINT, str(path), path, f"{meta['pipeline']} ({meta['method']})", meta))
    sources = {m.meta["source"]["sha256"] for m in models}
    if len(sources) > 1:
        listing = "; ".join(f"{m.spec} from {m.meta['source']['model']} (sha256 {m.meta['source']['sha256'][:12]})"
                            for m in models)
        raise QuantkitError(f"the checkpoints come from different base models, so one report cannot compare them: "
                            f"{listing}. Make one report per base model.")
    return models


def _source_sha256_of(path: Path) -> str:
    """The source hash ``quantkit.model.load_model`` records for a float model at ``path``."""
    from quantkit.model import read_source_hash  # a converted default model names its GGUF's hash

    memo = _HashMemo(cache_dir() / "scores" / "file-hashes.json")
    if path.is_file():
        return memo.concatenated([path])
    return read_source_hash(path) or memo.concatenated(weight_files(path))


def _baseline_model(spec: str | None, checkpoints: list[_Model]) -> _Model:
    source = checkpoints[0].meta["source"]
    if spec is None:
        spec = source["model"]
        if not Path(spec).exists() and not _looks_like_hub_id(spec):
            raise QuantkitError(f"the checkpoints' source model {spec} is not here; pass --baseline MODEL "
                                "(the float model they were quantized from)")
    if spec == "default":
        from quantkit.model import default_model_dir

        spec = str(default_model_dir())
    path = Path(spec).expanduser()
    if path.exists() and is_checkpoint(path):
        raise QuantkitError(f"--baseline {spec} is a quantized checkpoint; the baseline must be the float model "
                            "(pass checkpoints as CHECKPOINT arguments)")
    model = _Model("", Role.BASELINE, str(path) if path.exists() else spec, path if path.exists() else None, "bf16")
    want = source["sha256"]
    have = _source_sha256_of(path) if path.exists() else model.load().source_sha256
    if want and have and want != have:
        raise QuantkitError(f"--baseline {spec} (sha256 {have[:12]}) is not the model the checkpoints were made "
                            f"from ({source['model']}, sha256 {want[:12]}); pass that model as --baseline")
    return model


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def _name(models: list[_Model]) -> None:
    """Short unique column names: the directory name, with parents added where they collide."""
    for m in models:
        m.name = "bf16" if m.role is Role.BASELINE else (m.path.name if m.path else m.spec)
    depth = 1
    while len({m.name for m in models}) < len(models) and depth < 6:
        depth += 1
        for m in models:
            if m.role is Role.CHECKPOINT and m.path is not None:
                m.name = "/".join(m.path.resolve().parts[-depth:])
    seen: dict[str, int] = {}
    for m in models:  # last resort: number them
        seen[m.name] = seen.get(m.name, 0) + 1
        if seen[m.name] > 1:
            m.name = f"{m.name} #{seen[m.name]}"


# ---------------------------------------------------------------------------------------------
# Speed input


def _summary(result: dict) -> dict:
    summary = result.get("summary", result)
    return {m.key: float(summary[m.key]) for m in SPEED_METRICS if isinstance(summary.get(m.key), (int, float))}


def load_speed_json(path: Path) -> dict[str, dict]:
    """Speed summaries by model name from ``quantkit bench model --json`` output.

    Accepted: one bench result (``{"model": ..., "summary": {...}}``, its ``baseline`` included),
    a list of them, or an object ``{model: result or summary}``. A model is matched by its path (as
    given or resolved), its directory name, or ``bf16`` / ``baseline`` / ``default`` for the baseline.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantkitError(f"--speed-json {path} is unreadable ({exc})") from exc
    results = data if isinstance(data, list) else [data] if isinstance(data, dict) and "summary" in data else None
    pairs: list[tuple[str, dict]] = []
    if results is not None:
        for r in results:
            if isinstance(r, dict) and "summary" in r:
                pairs.append((str(r.get("model")), r))
                if isinstance(r.get("baseline"), dict):
                    pairs.append((str(r["baseline"].get("model")), r["baseline"]))
    elif isinstance(data, dict):
        pairs = [(k, v) for k, v in data.items() if isinstance(v, dict)]
    else:
        raise QuantkitError(f"--speed-json {path} must hold `quantkit bench model --json` results")
    table = {}
    for name, result in pairs:
        table[name] = _summary(result)
        with contextlib.suppress(OSError):  # also by resolved path, when it names a local path
            table.setdefault(str(Path(name).expanduser().resolve()), table[name])
    return table


def _speed_for(model: _Model, table: dict[str, dict]) -> dict | None:
    names = [model.name, model.spec or "default"]
    if model.path is not None:
        names += [str(model.path), str(model.path.resolve()), model.path.name]
    if model.role is Role.BASELINE:
        names += ["baseline", "bf16", "default"]
    for n in names:
        if n in table:
            return table[n]
    return None


# ---------------------------------------------------------------------------------------------
# Collecting the results document


def collect(config: ReportConfig, speed: SpeedFn | None = None) -> dict:
    """Score whatever is not cached yet and return the results document (see :func:`derive`)."""
    from quantkit.data import resolve_data_dir

    tasks = parse_tasks(config.tasks)
    if config.limit is not None and config.limit <= 0:
        raise QuantkitError(f"--limit must be positive, got {config.limit}")
    if config.batch_size <= 0:
        raise QuantkitError(f"--batch-size must be positive, got {config.batch_size}")
    data_dir = resolve_data_dir(config.data_dir)
    checkpoints = _checkpoint_models(config.checkpoints)
    baseline = _baseline_model(config.baseline, checkpoints)
    baseline.matmul = resolve_bf16(config.bf16_matmul)  # the baseline is loaded in bf16
    models = [baseline, *checkpoints]
    _name(models)
    speed_table = load_speed_json(config.speed_json) if config.speed_json else {}

    metrics = [*task_metrics(tasks)]
    if sum(1 for m in metrics if m.key.endswith("/acc")) >= 2:
        metrics.append(MEAN_ACC)
    if config.token_perplexity:
        metrics.append(token_ppl_metric(config.seq_len))
    metrics.append(SIZE)
    metrics.extend(SPEED_METRICS)

    memo = _HashMemo(cache_dir() / "scores" / "file-hashes.json")
    entries = []
    baseline_weights = None
    contents = [content_sha256(model.path, memo) if model.path is not None
                else f"hub-{model.spec.replace('/', '--')}-{model.load().source_sha256}" for model in models]
    for model, content in zip(models, contents):
        cache = ScoreCache(content, config.use_cache)
        values: dict[str, float] = {}
        stderr: dict[str, float] = {}
        sources: dict[str, str] = {}
        # lm-eval tasks: one call for every task not stored yet
        todo = [t for t in tasks if cache.get(model.score_key(task_key(t, data_dir, config.limit))) is None]
        if todo:
            from quantkit.progress import err
            from quantkit.tasks import run_tasks

            err.print(f"scoring [bold]{model.name}[/] on {', '.join(todo)}"
                      + (f" (--limit {config.limit})" if config.limit else ""))
            loaded = model.load()
            got = run_tasks(loaded.model, loaded.tokenizer, tuple(todo), limit=config.limit, data_dir=data_dir,
                            batch_size=config.batch_size)
            for t in todo:
                cache.put(model.score_key(task_key(t, data_dir, config.limit)), got[t])
        for t in tasks:
            res = cache.get(model.score_key(task_key(t, data_dir, config.limit)))
            sources[t] = res["source"]
            for k, v in res["metrics"].items():
                values[f"{t}/{k}"] = v
            for k, v in res.get("stderr", {}).items():
                stderr[f"{t}/{k}"] = v
        accs = [values.get(f"{t}/acc") for t in tasks if any(m.key == "acc" for m in TASKS[t].metrics)]
        if MEAN_ACC in metrics and accs and all(a is not None for a in accs):
            values[MEAN_ACC.key] = sum(accs) / len(accs)
        if config.token_perplexity:
            key = model.score_key(ppl_key(config.seq_len, config.max_windows, data_dir))
            if cache.get(key) is None:
                from quantkit.evaluate import wikitext2_perplexity

                loaded = model.load()
                cache.put(key, wikitext2_perplexity(loaded.model, loaded.tokenizer, config.seq_len,
                                                    config.max_windows, data_dir, description=f"token ppl {model.name}",
                                                    resume=config.use_cache).to_dict())
            values[token_ppl_metric(config.seq_len).key] = cache.get(key)["perplexity"]
        size = _size_mib(model.path)
        if size is not None:
            values[SIZE.key] = size
        summary = _speed_for(model, speed_table)
        if summary is None and speed is not None:
            if cache.get(speed_key()) is None:
                model.release()  # measure peak memory of the benchmark alone
                cache.put(speed_key(), _summary(speed(model.spec)))
            summary = cache.get(speed_key())
        values.update(summary or {})
        sqnr_rows = None
        if model.role is Role.CHECKPOINT:
            from quantkit.sqnr import checkpoint_sqnr, float_weights, state_dict_weights

            key = f"sqnr:vs={contents[0]}"  # models[0] is the baseline
            if cache.get(key) is None:
                if baseline_weights is None:
                    baseline_weights = (float_weights(baseline.path) if baseline.path is not None
                                        and baseline.path.is_dir() else state_dict_weights(baseline.load().model))
                cache.put(key, checkpoint_sqnr(model.path, baseline_weights))
            sqnr_rows = cache.get(key)
        entries.append({"name": model.name, "role": model.role.value, "path": str(model.path or model.spec),
                        "kind": model.kind, "pipeline": (model.meta or {}).get("pipeline"),
                        "method": (model.meta or {}).get("method"), "content_sha256": content,
                        "bf16_matmul": model.matmul.value,
                        "values": values, "stderr": stderr, "task_sources": sources, "sqnr": sqnr_rows})
        model.release()

    notes = []
    if not any(m.key in e["values"] for e in entries for m in SPEED_METRICS):
        notes.append("Speed and memory rows are left out: no `quantkit bench model` results were given "
                     "(pass --speed-json FILE or --bench).")
    src = source_for(data_dir).value
    notes.append(f"Tasks: {'quantkit configs over local files in ' + str(data_dir) if src == 'local' else 'lm-eval stock tasks (hub)'}"
                 f", zero-shot, scored by lm-eval {_lm_eval_version()}"
                 + (f", first {config.limit} documents per task (--limit): quick, noisy numbers" if config.limit else "")
                 + ". Local prompts follow llm-foundry's data, so numbers compare between these columns, "
                   "not with published lm-eval numbers.")
    if config.token_perplexity:
        notes.append("Two perplexities, kept apart: quantkit's token perplexity (GPTQ/SpinQuant convention, windows of "
                     f"{config.seq_len} tokens{'' if config.max_windows is None else f', first {config.max_windows} windows'}) "
                     "depends on the tokenizer; lm-eval's word perplexity (task wikitext) is per word of detokenized text.")
    if baseline.matmul is Bf16Matmul.FLOAT32:
        notes.append("The bf16 baseline's linears were scored as float32 matmuls rounded back to bf16 (this CPU has "
                     "no bf16 dot products, so torch's bf16 matmul is 5-8x slower; the same product up to summation "
                     "order; `--bf16-matmul native` for torch's).")
    notes.append(f"Size is the MiB of the model's *.safetensors files ({MIB} bytes per MiB).")
    return {"results_version": RESULTS_VERSION, "quantkit_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_dict(), "metrics": [m.to_dict() for m in metrics], "models": entries, "notes": notes}


def _size_mib(path: Path | None) -> float | None:
    if path is None:
        return None
    files = [path] if path.is_file() else weight_files(path)
    return sum(f.stat().st_size for f in files) / MIB if files else None


# ---------------------------------------------------------------------------------------------
# Deltas and the share of the PTQ gap recovered (pure functions of the results document)


def delta(value: float | None, base: float | None, metric: MetricDef) -> float | None:
    """Points for accuracies (x100 difference), else relative change in percent; None when undefined."""
    if value is None or base is None:
        return None
    if metric.percent:
        return 100.0 * (value - base)
    if base == 0:
        return None
    return 100.0 * (value / base - 1.0)


def gap_share(value: float | None, ptq: float | None, base: float | None) -> float | None:
    """Share of the baseline-to-PTQ gap a checkpoint recovers: 1 = back to baseline, 0 = PTQ, < 0 worse."""
    if value is None or ptq is None or base is None or abs(base - ptq) <= GAP_EPSILON:
        return None
    return (value - ptq) / (base - ptq)


def derive(doc: dict) -> dict:
    """Deltas to the baseline and PTQ-gap shares, from ``doc["models"]`` and ``doc["metrics"]``."""
    metrics = [MetricDef.from_dict(m) for m in doc["metrics"]]
    models = doc["models"]
    baselines = [m for m in models if m["role"] == Role.BASELINE.value]
    if len(baselines) != 1:
        raise QuantkitError("a results document needs exactly one baseline model")
    base = baselines[0]["values"]
    deltas = {m["name"]: {k.key: delta(m["values"].get(k.key), base.get(k.key), k) for k in metrics}
              for m in models if m["role"] != Role.BASELINE.value}
    ptq = next((m for m in models if m.get("pipeline") == "ptq"), None)
    gap = None
    if ptq is not None:
        per_metric, mean = {}, {}
        quality = [k for k in metrics if k.group is Group.QUALITY]
        for m in models:
            if m["role"] == Role.BASELINE.value:
                continue
            shares = {k.key: gap_share(m["values"].get(k.key), ptq["values"].get(k.key), base.get(k.key))
                      for k in quality}
            per_metric[m["name"]] = shares
            # the mean counts only metrics on which PTQ lost quality (a "gain" from PTQ is noise)
            lost = [s for k in quality if (s := shares[k.key]) is not None and _worse(
                ptq["values"][k.key], base[k.key], k)]
            mean[m["name"]] = sum(lost) / len(lost) if lost else None
        gap = {"ptq": ptq["name"], "per_metric": per_metric, "mean": mean}
    return {"deltas": deltas, "gap_recovered": gap}


def _worse(value: float, base: float, metric: MetricDef) -> bool:
    return value < base if metric.higher_is_better else value > base


# ---------------------------------------------------------------------------------------------
# Rendering


def fmt_value(v: float | None, metric: MetricDef) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if metric.percent:
        return f"{100 * v:.1f}"
    return f"{v:.4g}" if abs(v) < 1e6 else f"{v:.3e}"


def fmt_delta(d: float | None, metric: MetricDef) -> str:
    if d is None:
        return ""
    return f"{d:+.1f} pt" if metric.percent else f"{d:+.1f}%"


def _better(d: float | None, metric: MetricDef) -> bool | None:
    if d is None or abs(d) < 1e-12:
        return None
    return (d > 0) == metric.higher_is_better


def arrow(metric: MetricDef) -> str:
    return "↑" if metric.higher_is_better else "↓"


def _rows(doc: dict, derived: dict) -> tuple[list[str], list[dict]]:
    """Table columns and rows: every metric some model has, then the PTQ-gap row."""
    metrics = [MetricDef.from_dict(m) for m in doc["metrics"]]
    models = doc["models"]
    columns = [m["name"] for m in models]
    rows = []
    for k in metrics:
        if not any(k.key in m["values"] for m in models):
            continue  # e.g. speed rows when no bench results were given
        cells = []
        for m in models:
            v = m["values"].get(k.key)
            d = derived["deltas"].get(m["name"], {}).get(k.key) if m["role"] != Role.BASELINE.value else None
            cells.append({"value": fmt_value(v, k), "delta": fmt_delta(d, k), "better": _better(d, k)})
        rows.append({"label": k.label, "arrow": arrow(k), "group": k.group.value, "cells": cells})
    gap = derived["gap_recovered"]
    if gap is not None:
        cells = []
        for m in models:
            share = gap["mean"].get(m["name"]) if m["role"] != Role.BASELINE.value else None
            text = "" if m["role"] == Role.BASELINE.value else ("—" if share is None else f"{100 * share:.0f}%")
            if m["name"] == gap["ptq"]:
                text = "0% (reference)"
            cells.append({"value": text, "delta": "", "better": None if share is None or m["name"] == gap["ptq"]
                          else share > 0})
        rows.append({"label": f"Share of the vanilla-PTQ gap recovered (vs {gap['ptq']}; mean over quality metrics)",
                     "arrow": "↑", "group": "gap", "cells": cells})
    return columns, rows


def render_terminal(doc: dict, derived: dict | None = None):
    """The table as a rich Table (print it with ``quantkit.progress.out.print``)."""
    from rich.table import Table

    derived = derived or derive(doc)
    columns, rows = _rows(doc, derived)
    table = Table(title="quantkit compare report", show_lines=False)
    table.add_column("metric")
    table.add_column("", justify="center")
    for c in columns:
        table.add_column(c, justify="right")
    for row in rows:
        cells = []
        for c in row["cells"]:
            color = {True: "green", False: "red", None: "dim"}[c["better"]]
            cells.append(c["value"] + (f" [{color}]({c['delta']})[/]" if c["delta"] else ""))
        table.add_row(row["label"], row["arrow"], *cells, end_section=row["group"] == "gap")
    return table


def render_markdown(doc: dict, derived: dict, plots: dict[str, str]) -> str:
    columns, rows = _rows(doc, derived)
    lines = ["# quantkit compare report", "",
             f"Baseline: `{_baseline(doc)['path']}`. Created {doc.get('created', '')} by quantkit "
             f"{doc.get('quantkit_version', '')}. Each cell: value (delta to the baseline: points for accuracies, "
             "relative change otherwise). ↑ higher is better, ↓ lower is better.", "",
             "| metric | | " + " | ".join(_md(c) for c in columns) + " |",
             "|---|:-:|" + "---:|" * len(columns)]
    for row in rows:
        cells = [c["value"] + (f" ({c['delta']})" if c["delta"] else "") for c in row["cells"]]
        lines.append(f"| {_md(row['label'])} | {row['arrow']} | " + " | ".join(cells) + " |")
    lines += ["", *_models_md(doc), ""]
    gap = derived["gap_recovered"]
    if gap is not None:
        lines += _gap_md(doc, gap)
    for title, fname in plots.items():
        lines += [f"## {title}", "", f"![{title}]({fname})", ""]
    lines += ["## Notes", "", *[f"- {n}" for n in doc.get("notes", [])], ""]
    return "\n".join(lines)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _baseline(doc: dict) -> dict:
    return next(m for m in doc["models"] if m["role"] == Role.BASELINE.value)


def _models_md(doc: dict) -> list[str]:
    lines = ["## Models", "", "| column | kind | path | content sha256 |", "|---|---|---|---|"]
    for m in doc["models"]:
        lines.append(f"| {_md(m['name'])} | {_md(m['kind'])} | `{_md(m['path'])}` | `{m.get('content_sha256', '')[:16]}` |")
    return lines


def _gap_md(doc: dict, gap: dict) -> list[str]:
    metrics = [MetricDef.from_dict(m) for m in doc["metrics"] if m["group"] == Group.QUALITY.value]
    names = list(gap["per_metric"])
    lines = [f"## Share of the vanilla-PTQ gap recovered, per metric (PTQ: {_md(gap['ptq'])})", "",
             "(value − PTQ) / (baseline − PTQ): 100% is back at the baseline, 0% no better than PTQ, "
             "negative worse than PTQ; — where PTQ lost nothing or a value is missing.", "",
             "| metric | " + " | ".join(_md(n) for n in names) + " |", "|---|" + "---:|" * len(names)]
    for k in metrics:
        shares = [gap["per_metric"][n].get(k.key) for n in names]
        if all(s is None for s in shares):
            continue
        lines.append(f"| {_md(k.label)} | " + " | ".join("—" if s is None else f"{100 * s:.0f}%" for s in shares) + " |")
    return [*lines, ""]


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px}td.num{text-align:right;white-space:nowrap}
th{background:#f3f3f3}tr.gap td{font-weight:bold;background:#fafafa}
.better{color:#1a7f37}.worse{color:#c62828}.delta{font-size:12px}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}code{font-size:12px}
"""


def render_html(doc: dict, derived: dict, plots_png: dict[str, bytes]) -> str:
    """One self-contained page: inline CSS, plots as data: URIs, no scripts, no external references."""
    e = html.escape
    columns, rows = _rows(doc, derived)
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           "<title>quantkit compare report</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>quantkit compare report</h1>",
           f"<p>Baseline: <code>{e(_baseline(doc)['path'])}</code>. Created {e(str(doc.get('created', '')))} by "
           f"quantkit {e(str(doc.get('quantkit_version', '')))}. Each cell: value (delta to the baseline: points "
           "for accuracies, relative change otherwise). ↑ higher is better, ↓ lower is better.</p>",
           "<table><tr><th>metric</th><th></th>" + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>"]
    for row in rows:
        tds = []
        for c in row["cells"]:
            cls = {True: "better", False: "worse", None: ""}[c["better"]]
            d = f" <span class='delta {cls}'>({e(c['delta'])})</span>" if c["delta"] else ""
            tds.append(f"<td class='num'>{e(c['value'])}{d}</td>")
        tr = " class='gap'" if row["group"] == "gap" else ""
        out.append(f"<tr{tr}><td>{e(row['label'])}</td><td>{row['arrow']}</td>{''.join(tds)}</tr>")
    out.append("</table>")
    for block in (_models_md(doc), _gap_md(doc, derived["gap_recovered"]) if derived["gap_recovered"] else []):
        out.append(_md_table_to_html(block))
    for title, png in plots_png.items():
        data = base64.b64encode(png).decode()
        out.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{data}'>")
    out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in doc.get("notes", [])) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def _md_table_to_html(lines: list[str]) -> str:
    """The small markdown blocks of this module (a heading, prose, one table) as HTML."""
    e = html.escape
    parts, table = [], []
    for line in lines:
        if line.startswith("## "):
            parts.append(f"<h2>{e(line[3:])}</h2>")
        elif line.startswith("|"):
            if set(line) <= set("|-:"):
                continue
            cells = [c.strip().replace("\\|", "|").strip("`") for c in line.strip("|").split(" | ")]
            tag = "th" if not table else "td"
            table.append("<tr>" + "".join(f"<{tag}>{e(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.strip():
            parts.append(f"<p>{e(line)}</p>")
    if table:
        parts.append("<table>" + "".join(table) + "</table>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, rendered to PNG bytes)


def make_plots(doc: dict) -> dict[str, bytes]:
    """Title -> PNG: quality vs size, speed bars, per-layer SQNR (each only when its data exists)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; render to bytes
    import matplotlib.pyplot as plt

    plots = {}
    metrics = {m["key"]: MetricDef.from_dict(m) for m in doc["metrics"]}
    models = doc["models"]

    quality = next((metrics[k] for k in (MEAN_ACC.key, *metrics) if k in metrics and metrics[k].group is Group.QUALITY
                    and any(k in m["values"] for m in models)), None)
    points = [(m["name"], m["values"].get(SIZE.key), m["values"].get(quality.key) if quality else None) for m in models]
    points = [p for p in points if p[1] is not None and p[2] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, x, y in points:
            shown = 100 * y if quality.percent else y
            ax.scatter([x], [shown])
            ax.annotate(name, (x, shown), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("model size (MiB)")
        ax.set_ylabel(f"{quality.label}{' (%)' if quality.percent else ''} {arrow(quality)}")
        ax.set_title("Quality vs size")
        ax.grid(alpha=0.3)
        plots["Quality vs size"] = _png(fig, plt)

    speed = [k for k in SPEED_METRICS if any(k.key in m["values"] for m in models)]
    if speed:
        fig, axes = plt.subplots(1, len(speed), figsize=(3.2 * len(speed), 3.6), squeeze=False)
        names = [m["name"] for m in models]
        for ax, k in zip(axes[0], speed):
            vals = [m["values"].get(k.key, 0.0) or 0.0 for m in models]
            ax.bar(range(len(names)), vals, color=[f"C{i}" for i in range(len(names))])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{k.label} {arrow(k)}", fontsize=9)
        fig.tight_layout()
        plots["Speed and memory"] = _png(fig, plt)

    with_sqnr = [m for m in models if m.get("sqnr")]
    if with_sqnr:
        from quantkit.sqnr import per_layer_mean

        fig, ax = plt.subplots(figsize=(7, 4))
        for m in with_sqnr:
            means = per_layer_mean(m["sqnr"])
            order = sorted(means, key=_layer_order)
            ax.plot(range(len(order)), [means[k] for k in order], marker="o", markersize=3, label=m["name"])
            ax.set_xticks(range(len(order)), [_short_layer(k) for k in order], fontsize=7)
        ax.set_xlabel("module (embedding, transformer blocks, head)")
        ax.set_ylabel("SQNR (dB) ↑")
        ax.set_title("Per-layer weight quantization error vs the baseline (mean over each block's linears)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        plots["Per-layer quantization error (SQNR)"] = _png(fig, plt)
    return plots


def _short_layer(key: str) -> str:
    if key.startswith("block "):
        return key.split()[1]
    return "emb" if "embed" in key else "head" if "head" in key else key.rsplit(".", 1)[-1]


def _layer_order(key: str) -> tuple[int, int]:
    if key.startswith("block "):
        return (1, int(key.split()[1]))
    return (0, 0) if "embed" in key else (2, 0)


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


_PLOT_FILES = {"Quality vs size": "quality_vs_size.png", "Speed and memory": "speed.png",
               "Per-layer quantization error (SQNR)": "sqnr.png"}


def write_report(doc: dict, output: Path, overwrite: bool = False) -> Path:
    """Write results.json, report.md (+ PNGs) and report.html for ``doc`` into ``output`` (atomically)."""
    derived = derive(doc)
    plots = make_plots(doc)
    with atomic_directory(Path(output), overwrite) as tmp:
        (tmp / "results.json").write_text(jsonout.dumps({**doc, **derived}, default=_json_default) + "\n")
        for title, png in plots.items():
            (tmp / _PLOT_FILES[title]).write_bytes(png)
        (tmp / "report.md").write_text(render_markdown(doc, derived, {t: _PLOT_FILES[t] for t in plots}))
        (tmp / "report.html").write_text(render_html(doc, derived, plots))
    return Path(output)


def _json_default(o):
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def load_results(path: Path) -> dict:
    """A stored ``results.json`` (or the directory holding one), ready to re-render."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise QuantkitError(f"{path} is not a readable results.json ({exc})") from exc
    if doc.get("results_version") != RESULTS_VERSION:
        raise QuantkitError(f"{path} has results version {doc.get('results_version')!r}; this quantkit "
                            f"reads {RESULTS_VERSION}. Re-run `quantkit compare report`.")
    for k in ("deltas", "gap_recovered"):  # derived again when rendered
        doc.pop(k, None)
    return doc


def build_report(config: ReportConfig, speed: SpeedFn | None = None, show: bool = True) -> dict:
    """Score (what is not cached), write the report directory, print the table; returns the document."""
    check_output(config.output, config.overwrite)  # before any work
    doc = collect(config, speed)
    write_report(doc, config.output, config.overwrite)
    if show:
        from quantkit.progress import out

        out.print(render_terminal(doc))
        for note in doc["notes"]:
            out.print(f"[dim]- {note}[/]", highlight=False)
        out.print(f"wrote [bold]{config.output}[/] (results.json, report.md, report.html)")
    return doc

