"""Prompts: built-in sets, readers for JSONL / CSV / text files and `datasets` datasets, chat templating.

Built-in sets (use the name as the prompt source):

* ``chitchat``: conversation openings from the Chit-Chat Challenge dataset (package ``chitchat-dataset``),
  the stand-in here for Anthropic HH; first messages of 3–200 characters, deduplicated, in corpus order.
* ``topics``: the personalization prompt of App. C.5.4, "Please write a one paragraph explanation about
  the following topic." followed by one of 80 topics shipped with this package.

Files: ``.jsonl`` / ``.json`` (one object per line, field ``prompt``), ``.csv`` (column ``prompt``),
anything else is plain text with one prompt per line. ``hf:NAME[:SPLIT]`` loads a dataset with
``datasets.load_dataset`` (column ``prompt``); a folder written by ``Dataset.save_to_disk`` also works.
"""

from __future__ import annotations

import csv
import json
import os
from importlib import resources
from pathlib import Path
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from vas.errors import VasError

PERSONALIZATION_PROMPT = "Please write a one paragraph explanation about the following topic."


def chitchat_openings() -> list[str]:
    """Distinct first messages of the Chit-Chat Challenge conversations (3–200 characters), in corpus order."""
    import chitchat_dataset

    seen: dict[str, None] = {}
    for conversation in chitchat_dataset.ConversationDataset():
        opening = next(iter(conversation), "").strip()
        if 3 <= len(opening) <= 200:
            seen.setdefault(opening, None)
    return list(seen)


def topic_prompts() -> list[str]:
    """The App. C.5.4 personalization prompt applied to each built-in topic."""
    topics = resources.files("vas").joinpath("data/topics.txt").read_text().split("\n")
    return [f"{PERSONALIZATION_PROMPT}\nTopic: {t.strip()}" for t in topics if t.strip()]


BUILTIN_PROMPTS = {"chitchat": chitchat_openings, "topics": topic_prompts}


def _read_file(path: Path, field: str) -> list[str]:
    try:
        return _parse_file(path, field)
    except UnicodeDecodeError:
        raise VasError(f"{path} is not UTF-8 text") from None
    except csv.Error as exc:
        raise VasError(f"{path}: malformed CSV ({exc})") from None


def _parse_file(path: Path, field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        prompts = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise VasError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise VasError(f"{path}:{number}: no {field!r} field")
            if not isinstance(record[field], str):
                raise VasError(f"{path}:{number}: {field!r} is not a string")
            prompts.append(record[field])
        return prompts
    if suffix == ".csv":
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or field not in reader.fieldnames:
                raise VasError(f"{path}: no {field!r} column (columns: {reader.fieldnames})")
            return [row[field] for row in reader]
    return [line for line in path.read_text().splitlines() if line.strip()]


def _read_dataset(source: str, field: str) -> list[str]:
    import datasets

    try:
        if Path(source).is_dir():
            data = datasets.load_from_disk(source)
        else:
            name, _, split = source[3:].partition(":")
            data = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types; all mean "cannot read it"
        raise VasError(f"cannot load prompt dataset {source!r}: {str(exc).splitlines()[0]}") from exc
    if isinstance(data, datasets.DatasetDict):
        data = data[next(iter(data))]
    if field not in data.column_names:
        raise VasError(f"prompt dataset {source!r} has no {field!r} column (columns: {data.column_names})")
    return [str(p) for p in data[field]]


def load_prompts(source: str, *, field: str = "prompt", start: int = 0, limit: int | None = None) -> list[str]:
    """Prompts from a built-in set name, a file, ``hf:NAME[:SPLIT]`` or a saved dataset folder.

    Args:
        source: see the module docstring.
        field: the JSON field / CSV column / dataset column holding the prompt.
        start, limit: take prompts ``[start, start + limit)`` (all from ``start`` if limit is None), e.g. to
            keep training and held-out prompts apart.

    Raises:
        VasError: if the source does not exist, lacks the field, or yields no prompt.
    """
    if start < 0 or (limit is not None and limit < 1):
        raise VasError(f"--start must be ≥ 0 and --limit ≥ 1, got {start} and {limit}")
    if source in BUILTIN_PROMPTS:
        prompts = BUILTIN_PROMPTS[source]()
    elif source.startswith("hf:") or (Path(source).is_dir() and (Path(source) / "dataset_info.json").exists()):
        prompts = _read_dataset(source, field)
    elif Path(source).is_file():
        prompts = _read_file(Path(source), field)
    elif Path(source).suffix.lower() in (".jsonl", ".csv", ".txt") or os.sep in source:
        raise VasError(f"prompt file {source!r} does not exist")
    else:
        raise VasError(
            f"prompt source {source!r} is not a file, a dataset or a built-in set ({', '.join(BUILTIN_PROMPTS)})"
        )
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise VasError(f"prompt source {source!r} has no prompts")
    selected = prompts[start : None if limit is None else start + limit]
    if not selected:
        raise VasError(f"prompt source {source!r} has {len(prompts)} prompts, none from index {start}")
    return selected


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt as the model should see it: the user turn of the model's chat template with
    the assistant turn opened, or the raw text when the tokenizer has no chat template."""
    if getattr(tokenizer, "chat_template", None):
        return [
            list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False))
            for p in prompts
        ]
    return [tokenizer(p)["input_ids"] for p in prompts]
