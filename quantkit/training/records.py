"""SFT and preference records: read, validated, rendered with the chat template, tokenized.

Sources are either a name from ``SOURCES`` (a local file under the data dir, or a ``datasets``
download when there is no data dir) or a path to a ``.json`` / ``.jsonl`` / ``.jsonl.gz`` file.
Each record's format is recognized from its fields (see ``README`` of ../shared/data):

SFT
    ``instruction``/``input``/``output`` (Alpaca), or ``messages`` ending with an assistant turn.
Preference pairs
    ``conversations`` + ``chosen``/``rejected`` turns (ShareGPT); ``input.messages`` +
    ``preferred_output``/``non_preferred_output``; ``chosen``/``rejected`` full HH-RLHF dialogues
    (prompt = their common prefix up to its last ``\\n\\nAssistant:``); ``prompt``/``chosen``/``rejected``
    strings or message lists; ``question``/``chosen``/``rejected`` (+ ``system``) as in orca_dpo_pairs.

A record that fits none of them is refused with the file and the record's index. Only the last
assistant turn is trained on (loss on responses only); earlier turns are context.
"""

from __future__ import annotations

import enum
import gzip
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.data import resolve_data_dir
from quantkit.errors import QuantkitError

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": str}, ...]


class Kind(str, enum.Enum):
    SFT = "sft"
    PREFERENCE = "preference"


@dataclass(frozen=True)
class Source:
    kind: Kind
    local: str  # relative to the data dir
    hub_path: str | None  # `datasets` fallback when there is no data dir (None: local only)
    hub_name: str | None = None
    hub_split: str = "train"
    hub_data_dir: str | None = None


SOURCES = {
    "alpaca": Source(Kind.SFT, "sft/alpaca_en_demo.json", "tatsu-lab/alpaca"),
    "gsm8k-chat": Source(Kind.SFT, "sft/gsm8k_chat_train.jsonl", None),
    "dpo-en-demo": Source(Kind.PREFERENCE, "pref/dpo_en_demo.json", None),
    "orca-dpo": Source(Kind.PREFERENCE, "pref/orca_dpo_pairs_validation.jsonl", "Intel/orca_dpo_pairs"),
    "hh-rlhf-harmless": Source(Kind.PREFERENCE, "pref/hh_rlhf_harmless_base_test.jsonl.gz", "Anthropic/hh-rlhf",
                               hub_split="test", hub_data_dir="harmless-base"),
}


@dataclass(frozen=True)
class SFTRecord:
    messages: Messages  # the last one is the assistant response trained on


@dataclass(frozen=True)
class PreferencePair:
    prompt: Messages  # ends with a user turn
    chosen: str
    rejected: str


# ---------------------------------------------------------------------------------------------
# Reading


def read_rows(spec: str, kind: Kind, data_dir: str | Path | None) -> tuple[str, list[dict]]:
    """(where the rows came from, the raw rows) of a named source or a file path."""
    if spec in SOURCES:
        source = SOURCES[spec]
        if source.kind is not kind:
            raise QuantkitError(f"{spec!r} holds {source.kind.value} data, not {kind.value} data")
        root = resolve_data_dir(data_dir)
        if root is None:
            return _hub_rows(spec, source)
        path = root / source.local
        if not path.is_file():
            raise QuantkitError(f"data directory {root} has no {source.local}; point --data-dir / "
                                "QUANTKIT_DATA_DIR at a directory laid out as ../shared/data")
        return str(path), _file_rows(path)
    path = Path(spec).expanduser()
    if not path.is_file():
        known = sorted(n for n, s in SOURCES.items() if s.kind is kind)
        raise QuantkitError(f"{kind.value} data {spec!r} is neither a file nor one of {known}")
    return str(path), _file_rows(path)


def _file_rows(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                rows = [json.loads(line) for line in fh if line.strip()]
            else:
                rows = json.load(fh)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantkitError(f"{path} is not readable JSON / JSON lines ({exc})") from exc
    if not isinstance(rows, list):
        raise QuantkitError(f"{path} must hold a JSON list of records (or one JSON object per line)")
    return rows


def _hub_rows(name: str, source: Source) -> tuple[str, list[dict]]:
    if source.hub_path is None:
        raise QuantkitError(f"{name!r} is only available offline; pass --data-dir DIR (or set QUANTKIT_DATA_DIR) "
                            "with the files of ../shared/data")
    import datasets

    try:
        ds = datasets.load_dataset(source.hub_path, source.hub_name, split=source.hub_split,
                                   data_dir=source.hub_data_dir)
    except (OSError, ConnectionError, ValueError) as exc:
        raise QuantkitError(f"could not download {source.hub_path} with `datasets` ({exc}); offline? pass "
                            "--data-dir DIR (or set QUANTKIT_DATA_DIR) with the files of ../shared/data") from exc
    return source.hub_path, list(ds)


# ---------------------------------------------------------------------------------------------
# Parsing: one function per record family, refusing with the file and the record named


def sft_records(spec: str, data_dir: str | Path | None = None) -> list[SFTRecord]:
    where, rows = read_rows(spec, Kind.SFT, data_dir)
    return [_sft_record(row, f"{where} record {i}") for i, row in enumerate(rows)]


def preference_pairs(spec: str, data_dir: str | Path | None = None) -> list[PreferencePair]:
    """Every well-formed pair; pairs with an empty answer (real data has a few) are skipped with a warning."""
    where, rows = read_rows(spec, Kind.PREFERENCE, data_dir)
    pairs = [_preference_pair(row, f"{where} record {i}") for i, row in enumerate(rows)]
    empty = [i for i, p in enumerate(pairs) if not p.chosen or not p.rejected]
    if empty:
        log.warning("%s: skipping %d pairs with an empty chosen or rejected answer (records %s)", where,
                    len(empty), ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else ""))
    return [p for p in pairs if p.chosen and p.rejected]


def _sft_record(row: dict, where: str) -> SFTRecord:
    if not isinstance(row, dict):
        raise QuantkitError(f"{where} is not a JSON object")
    if "messages" in row:
        messages = _messages(row["messages"], where)
    elif "instruction" in row:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": user}]
        if row.get("output"):
            messages.append({"role": "assistant", "content": row["output"]})
    else:
        raise QuantkitError(f"{where} is not SFT data: expected 'messages' or 'instruction'/'output' fields, "
                            f"found {sorted(row)}")
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or not messages[-1]["content"]:
        raise QuantkitError(f"{where} has no response turn: SFT records must end with a non-empty assistant "
                            "message (or have a non-empty 'output')")
    return SFTRecord(messages)


def _preference_pair(row: dict, where: str) -> PreferencePair:
    if not isinstance(row, dict):
        raise QuantkitError(f"{where} is not a JSON object")
    if "preferred_output" in row or "non_preferred_output" in row:
        prompt = _messages(row.get("input", {}).get("messages", []), where)
        chosen = _response(row.get("preferred_output"), where)
        rejected = _response(row.get("non_preferred_output"), where)
    elif "chosen" not in row or "rejected" not in row:
        raise QuantkitError(f"{where} is not a preference pair: it needs 'chosen' and 'rejected' fields "
                            f"(or 'preferred_output'/'non_preferred_output'), found {sorted(row)}")
    elif "conversations" in row:
        prompt = _messages(row["conversations"], where)
        chosen, rejected = _response(row["chosen"], where), _response(row["rejected"], where)
    elif "prompt" in row:
        prompt = ([{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str)
                  else _messages(row["prompt"], where))
        chosen, rejected = _response(row["chosen"], where), _response(row["rejected"], where)
    elif "question" in row:
        prompt = ([{"role": "system", "content": row["system"]}] if row.get("system") else [])
        prompt.append({"role": "user", "content": row["question"]})
        chosen, rejected = _response(row["chosen"], where), _response(row["rejected"], where)
    elif isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        prompt, chosen, rejected = _hh_dialogue(row["chosen"], row["rejected"], where)
    else:
        raise QuantkitError(f"{where}: cannot tell the prompt of this pair (fields {sorted(row)})")
    if not prompt or prompt[-1]["role"] != "user":
        raise QuantkitError(f"{where}: the prompt must end with a user turn")
    return PreferencePair(prompt, chosen, rejected)


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _messages(turns, where: str) -> Messages:
    if not isinstance(turns, list):
        raise QuantkitError(f"{where}: expected a list of turns")
    out = []
    for turn in turns:
        role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if role not in _ROLES or not isinstance(content, str):
            raise QuantkitError(f"{where}: turn {turn!r:.80} needs a role (system/user/assistant) and text content")
        out.append({"role": _ROLES[role], "content": content})
    return out


def _response(value, where: str) -> str:
    """One assistant response given as text, a turn, or a list of turns (the last one counts)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    turns = _messages(value, where)
    if not turns or turns[-1]["role"] != "assistant":
        raise QuantkitError(f"{where}: a chosen/rejected response must be an assistant turn")
    return turns[-1]["content"]


def _hh_dialogue(chosen: str, rejected: str, where: str) -> tuple[Messages, str, str]:
    """HH-RLHF: both strings are whole dialogues; the prompt is their common prefix up to its last assistant cue."""
    marker = "\n\nAssistant:"
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(marker)
    if cut < 0:
        raise QuantkitError(f"{where}: 'chosen' and 'rejected' do not share a prompt ending in {marker!r}")
    prefix = chosen[:cut]
    turns = []
    for part in prefix.split("\n\nHuman:")[1:]:
        human, *assistant = part.split(marker)
        turns.append({"role": "user", "content": human.strip()})
        turns.extend({"role": "assistant", "content": a.strip()} for a in assistant)
    return turns, chosen[cut + len(marker):].strip(), rejected[cut + len(marker):].strip()


# ---------------------------------------------------------------------------------------------
# Tokenizing: chat template when the tokenizer has one, else a plain "User:/Assistant:" format


@dataclass(frozen=True)
class Tokenized:
    ids: list[int]  # prompt then response
    n_prompt: int  # ids[:n_prompt] are context (no loss); ids[n_prompt:] the response


def render(tokenizer, messages: Messages, generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    # No template (e.g. the tests' byte-level tokenizer): a plain, unambiguous transcript.
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    return text + ("Assistant:" if generation_prompt else "")


def tokenize(tokenizer, prompt: Messages, response: str, seq_len: int) -> Tokenized:
    """Prompt and response ids, truncated to ``seq_len``: the prompt from the left, the response from the right."""
    prompt_text = render(tokenizer, prompt, generation_prompt=True)
    full_text = render(tokenizer, [*prompt, {"role": "assistant", "content": response}], generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise QuantkitError("the chat template does not render the prompt as a prefix of the conversation; "
                            "responses cannot be separated from prompts with this tokenizer")
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    r = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None) and tokenizer.eos_token_id is not None:
        r = [*r, tokenizer.eos_token_id]  # the template ends turns itself; the plain format needs an end
    keep_prompt = min(len(p), max(seq_len - len(r), seq_len // 2))  # long responses keep half the window
    p = p[len(p) - keep_prompt:]
    return Tokenized(p + r[: seq_len - len(p)], len(p))


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] right-padded
    attention_mask: torch.Tensor  # [B, L] 1 on real tokens
    labels: torch.Tensor  # [B, L] the token itself on response positions, -100 elsewhere


def collate(examples: list[Tokenized], pad_id: int) -> Batch:
    length = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt:n] = ids[i, e.n_prompt:n]
    return Batch(ids, mask, labels)
