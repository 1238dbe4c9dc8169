"""Task scoring through lm-eval: quantkit models in lm-eval's HF wrapper, on local or stock tasks.

Every model (the bf16 baseline and every quantized checkpoint, on the packed kernel) is wrapped
in ``lm_eval.models.huggingface.HFLM`` as an already-loaded model, so lm-eval's own request
building, batching and metrics do the scoring. Tasks come from one of two places:

* **local** (a data dir is given: ``--data-dir`` / ``QUANTKIT_DATA_DIR``): quantkit's task
  configs in ``quantkit/tasks/configs/`` (``quantkit_<task>``), lm-eval YAMLs whose
  ``custom_dataset`` reads the files of ``../shared/data/eval`` offline. They are registered with
  ``TaskManager(include_path=..., include_defaults=False)`` and receive the data dir through
  lm-eval's task metadata;
* **stock** (no data dir): lm-eval's own task of the same benchmark, downloaded from the hub.

The two use different prompt formats and data copies; numbers compare between checkpoints
scored the same way (the results record which source was used), not across sources.

Two perplexities are kept apart: ``wikitext`` here is lm-eval's **word** perplexity of whole
detokenized articles; quantkit's **token** perplexity (:mod:`quantkit.evaluate`, GPTQ/SpinQuant
convention) is a separate metric in the report.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: bump when a quantkit task config or loader changes the numbers it produces (invalidates caches)
TASKS_VERSION = 1


class Source(str, enum.Enum):
    """Where a task's data and prompt come from."""

    LOCAL = "local"  # quantkit's configs over the local data dir
    STOCK = "stock"  # lm-eval's own task (hub download)


@dataclass(frozen=True)
class Metric:
    """One number a task produces, as lm-eval names it, with the direction that is better."""

    key: str  # lm-eval metric name ("acc", "acc_norm", "perplexity", "word_perplexity")
    label: str
    higher_is_better: bool
    percent: bool  # an accuracy (shown x100, deltas in points) rather than a ratio-scale number


ACC = Metric("acc", "acc", True, True)
ACC_NORM = Metric("acc_norm", "acc_norm", True, True)


@dataclass(frozen=True)
class TaskSpec:
    name: str  # quantkit's name, used on the command line and in results
    title: str
    stock: str  # lm-eval's stock task
    metrics: tuple[Metric, ...]

    @property
    def local(self) -> str:
        return f"quantkit_{self.name}"


class TaskName(str, enum.Enum):
    ARC_EASY = "arc_easy"
    ARC_CHALLENGE = "arc_challenge"
    PIQA = "piqa"
    WINOGRANDE = "winogrande"
    HELLASWAG = "hellaswag"
    LAMBADA = "lambada_openai"
    BOOLQ = "boolq"
    OPENBOOKQA = "openbookqa"
    COPA = "copa"
    WIKITEXT = "wikitext"


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec(TaskName.ARC_EASY.value, "ARC-Easy", "arc_easy", (ACC, ACC_NORM)),
    TaskSpec(TaskName.ARC_CHALLENGE.value, "ARC-Challenge", "arc_challenge", (ACC, ACC_NORM)),
    TaskSpec(TaskName.PIQA.value, "PIQA", "piqa", (ACC, ACC_NORM)),
    TaskSpec(TaskName.WINOGRANDE.value, "Winogrande", "winogrande", (ACC,)),
    TaskSpec(TaskName.HELLASWAG.value, "HellaSwag", "hellaswag", (ACC, ACC_NORM)),
    TaskSpec(TaskName.LAMBADA.value, "LAMBADA (OpenAI)", "lambada_openai",
             (ACC, Metric("perplexity", "target ppl", False, False))),
    TaskSpec(TaskName.BOOLQ.value, "BoolQ", "boolq", (ACC,)),
    TaskSpec(TaskName.OPENBOOKQA.value, "OpenBookQA", "openbookqa", (ACC, ACC_NORM)),
    TaskSpec(TaskName.COPA.value, "COPA", "copa", (ACC,)),
    TaskSpec(TaskName.WIKITEXT.value, "WikiText-2", "wikitext",
             (Metric("word_perplexity", "word ppl (lm-eval)", False, False),)),
)}

#: what ``--tasks`` means when not given: the nine benchmarks of the issue (wikitext is opt-in)
DEFAULT_TASKS: tuple[str, ...] = tuple(n for n in TASKS if n != TaskName.WIKITEXT.value)


def parse_tasks(names: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Comma-separated or listed task names -> validated tuple; ``all`` adds wikitext."""
    if names is None:
        return DEFAULT_TASKS
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name == "all":
            out.extend(TASKS)
            continue
        if name not in TASKS:
            raise QuantkitError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or 'all')")
        out.append(name)
    if not out:
        raise QuantkitError("no task given; pass --tasks with one or more of: " + ", ".join(TASKS))
    return tuple(dict.fromkeys(out))  # keep order, drop repeats


def source_for(data_dir: Path | None) -> Source:
    return Source.STOCK if data_dir is None else Source.LOCAL


def task_manager(data_dir: Path | None):
    """lm-eval's TaskManager: quantkit's local configs only, or lm-eval's stock tasks."""
    from lm_eval.tasks import TaskManager

    if data_dir is None:
        return TaskManager()
    # include_defaults=False: indexing lm-eval's thousands of stock YAMLs is slow and not needed
    return TaskManager(include_path=str(CONFIG_DIR), include_defaults=False,
                       metadata={"data_dir": str(Path(data_dir).resolve())})


def lm_eval_model(model, tokenizer, batch_size: int = 8, max_length: int | None = None):
    """Wrap an already-loaded quantkit model (float or quantized) in lm-eval's HF model class."""
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise QuantkitError("this model has no tokenizer, so lm-eval tasks cannot be scored on it; "
                            "put tokenizer files next to it")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def run_tasks(model, tokenizer, tasks: tuple[str, ...], *, limit: int | None = None,
              data_dir: Path | None = None, batch_size: int = 8, max_length: int | None = None) -> dict:
    """Score ``model`` on ``tasks``; returns ``{task: {"metrics": {...}, "stderr": {...}, ...}}``.

    ``limit`` scores only the first N documents of each task (quick runs). Metrics are lm-eval's
    aggregated values, unscaled (accuracies in [0, 1]).
    """
    import lm_eval

    if limit is not None and limit <= 0:
        raise QuantkitError(f"--limit must be positive, got {limit}")
    tasks = parse_tasks(list(tasks))
    source = source_for(data_dir)
    manager = task_manager(data_dir)
    names = {t: (TASKS[t].local if source is Source.LOCAL else TASKS[t].stock) for t in tasks}
    try:
        with _quiet_lm_eval():
            lm = lm_eval_model(model, tokenizer, batch_size, max_length)
            # bootstrap_iters=0: no resampled stderrs (slow); accuracy stderrs are closed-form below
            raw = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()), limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=0,
                                          random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                          fewshot_random_seed=0)
    except (OSError, ConnectionError) as exc:
        hint = ("pass --data-dir DIR (or set QUANTKIT_DATA_DIR) to use the local files"
                if source is Source.STOCK else "check the data directory")
        raise QuantkitError(f"lm-eval could not load its tasks ({str(exc).splitlines()[0]}); {hint}") from exc
    if raw is None:  # simple_evaluate returns None on non-zero ranks only
        raise QuantkitError("lm-eval returned no results")
    results = {}
    for task, lm_name in names.items():
        got = raw["results"].get(lm_name, {})
        metrics, stderr = {}, {}
        for m in TASKS[task].metrics:
            value = got.get(f"{m.key},none")
            if isinstance(value, (int, float)):
                metrics[m.key] = float(value)
        n = raw.get("n-samples", {}).get(lm_name, {}).get("effective")
        for m in TASKS[task].metrics:
            if m.percent and m.key in metrics and n and n > 1:
                p = metrics[m.key]  # standard error of a mean of n 0/1 outcomes
                stderr[m.key] = math.sqrt(p * (1 - p) / (n - 1))
        results[task] = {"metrics": metrics, "stderr": stderr, "source": source.value, "lm_eval_task": lm_name,
                         "limit": limit, "samples": n}
    return results


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs advice per task at WARNING; show it only with ``quantkit -v``."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)
