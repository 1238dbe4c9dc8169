"""Datasets and helpers for quantkit's lm-eval task configs (the ``*.yaml`` beside this file).

lm-eval calls each ``custom_dataset`` function with the task's metadata; quantkit puts the local
data directory there as ``data_dir`` (``TaskManager(metadata={"data_dir": ...})``, or
``lm_eval --include_path <this dir> --metadata '{"data_dir": "../shared/data"}'`` by hand). Every
loader returns a ``DatasetDict`` with one ``test`` split in a uniform layout, so the YAMLs only
hold prompts:

* multiple choice: ``query`` (str), ``choices`` (list[str]), ``gold`` (int);
* Winogrande (partial scoring): ``context_options`` (list[str]), ``continuation`` (str), ``gold``;
* LAMBADA: ``context``, ``continuation``;
* WikiText: ``page`` (one Wikipedia article of the test split, raw WikiText markup).

File formats are documented in ``../shared/data/README.md`` (llm-foundry style jsonl; HellaSwag
as bz2 text, 6 lines per item).
"""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

import datasets

from quantkit.errors import QuantkitError

HELLASWAG_LINES_PER_ITEM = 6  # "label: ctx", gold index, 4 endings


def _root(data_dir: str | None) -> Path:
    if not data_dir:
        raise QuantkitError("quantkit's local lm-eval tasks need a data directory: pass --data-dir DIR "
                            "(or set QUANTKIT_DATA_DIR), or use lm-eval's stock tasks with a network")
    return Path(data_dir)


def _file(data_dir: str | None, relative: str) -> Path:
    path = _root(data_dir) / relative
    if not path.is_file():
        raise QuantkitError(f"data directory {data_dir} has no {relative} (see ../shared/data/README.md)")
    return path


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise QuantkitError(f"{path}:{lineno} is not JSON ({exc})") from exc
    return rows


def _split(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _multiple_choice(relative: str, data_dir: str | None) -> datasets.DatasetDict:
    rows = _jsonl(_file(data_dir, relative))
    for i, row in enumerate(rows):
        if not {"query", "choices", "gold"} <= row.keys():
            raise QuantkitError(f"{relative} row {i} lacks query/choices/gold")
    return _split([{"query": r["query"].rstrip(), "choices": list(r["choices"]), "gold": int(r["gold"])}
                   for r in rows])


def arc_easy(data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    return _multiple_choice("eval/arc_easy.jsonl", data_dir)


def arc_challenge(data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    return _multiple_choice("eval/arc_challenge.jsonl", data_dir)


def piqa(data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    return _multiple_choice("eval/piqa.jsonl", data_dir)


def boolq(data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    return _multiple_choice("eval/boolq.jsonl", data_dir)


def openbookqa(data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    return _multiple_choice("eval/openbook_qa.jsonl", data_dir)


def copa(data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    return _multiple_choice("eval/copa.jsonl", data_dir)


def winogrande(data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    rows = _jsonl(_file(data_dir, "eval/winogrande.jsonl"))
    return _split([{"context_options": list(r["context_options"]), "continuation": r["continuation"],
                    "gold": int(r["gold"])} for r in rows])


def lambada(data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    rows = _jsonl(_file(data_dir, "eval/lambada_openai.jsonl"))
    return _split([{"context": r["context"], "continuation": r["continuation"]} for r in rows])


def hellaswag(data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    path = _file(data_dir, "eval/hellaswag_val.txt.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) % HELLASWAG_LINES_PER_ITEM:
        raise QuantkitError(f"{path} has {len(lines)} lines, not a multiple of {HELLASWAG_LINES_PER_ITEM}")
    rows = []
    for i in range(0, len(lines), HELLASWAG_LINES_PER_ITEM):
        ctx, gold, *endings = lines[i : i + HELLASWAG_LINES_PER_ITEM]
        rows.append({"query": ctx.strip(), "choices": [e.strip() for e in endings], "gold": int(gold)})
    return _split(rows)


_ARTICLE_TITLE = re.compile(r"^ = [^=].* = $")  # " = Title = ": a top-level heading starts an article


def wikitext(data_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
    """The WikiText-2 raw test rows regrouped into its 62 articles (lm-eval scores whole articles)."""
    rows = [r["text"] for r in _jsonl(_file(data_dir, "wikitext-2-raw-v1/test.jsonl"))]
    pages: list[list[str]] = []
    for row in rows:
        if _ARTICLE_TITLE.match(row.rstrip("\n")) or not pages:
            pages.append([])
        pages[-1].append(row if row else "\n")
    return _split([{"page": "".join(p)} for p in pages if "".join(p).strip()])


# ---------------------------------------------------------------------------------------------
# WikiText scoring: lm-eval's own detokenizer, then word / byte perplexity of the whole article


def wikitext_target(doc: dict) -> str:
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer(doc)


def wikitext_results(doc: dict, results: list) -> dict:
    (loglikelihood,) = results
    text = wikitext_target(doc)
    words = len(re.split(r"\s+", text))
    nbytes = len(text.encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}
