"""Resuming long jobs: each finished row kept at once, so that an interrupted job resumes where it stopped and
gives what an uninterrupted one would.

This is the one resume mechanism of ``collect``, ``generate``, ``evaluate``, ``train``, ``finetune`` and the
experiments:

* :class:`RowLog` keeps finished rows in ``<out>.partial`` (one JSON line each) and refuses to resume under
  other settings; :func:`read_rows` reads a finished file back;
* :func:`chunk_seed` fixes the seed of batch i by (seed, i) alone, and :func:`prompts_digest` names the prompts;
* :func:`trainer_checkpoint` resumes a training run (``vas train``, ``vas finetune``) from its newest
  checkpoint, refusing other settings.

The jobs themselves (batches and concurrency around the decoding loop) are :mod:`vas.decoding.batches`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from vas.errors import VasError
from vas.storage import require_absent, write_text_atomic


def chunk_seed(seed: int, chunk: int) -> int:
    """The RNG seed of batch ``chunk``: fixed by (seed, chunk) alone, so resuming changes nothing."""
    return (seed * 1_000_003 + chunk) % (2**63)


def prompts_digest(prompts: Sequence[str | Sequence[int]]) -> str:
    """A short hash of the prompt list: a resumed run must have the same prompts, not only as many."""
    return hashlib.sha256(json.dumps([p if isinstance(p, str) else list(p) for p in prompts]).encode()).hexdigest()[:16]


class RowLog:
    """The finished rows of a long job, kept as they finish so that an interrupted job resumes.

    Rows are appended as JSON lines to ``<out>.partial`` (its first line holds the job's settings), one
    ``write`` and ``fsync`` per row; a line torn by a crash is dropped on reopening. :meth:`finish` writes
    all rows to ``out`` atomically, in key order, and removes the partial file.

    Args:
        out: the final JSON-lines file (must not exist).
        settings: JSON-able settings of the job; a partial file with finished rows under other settings is
            refused (one without rows is started afresh).
        key: the row field that identifies a row (an int).

    Raises:
        VasError: if ``out`` exists, or the partial file holds rows made with other settings.
    """

    def __init__(self, out: str | Path, settings: dict, key: str = "prompt_index"):
        self.out, self.key = Path(out), key
        require_absent(self.out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        settings = json.loads(json.dumps(settings))
        self.rows: dict[int, dict] = {}
        if self.partial.is_dir():
            raise VasError(f"{self.partial} is a folder of chunks from an older version of vas: delete it to start over")
        if self.partial.exists():
            lines = self.partial.read_text(encoding="utf-8", errors="replace").split("\n")
            previous = json.loads(lines[0])
            if previous != settings and any(line.strip() for line in lines[1:]):
                changed = option_names(changed_settings(previous, settings))
                raise VasError(f"{self.partial} was started with other settings ({', '.join(changed)}): "
                               "delete it or restore them")
            for line in lines[1:] if previous == settings else []:  # no finished row: new settings are fine
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # the torn last line of a crash, or the final newline
                self.rows[row[key]] = row
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.partial, "".join(json.dumps(r) + "\n" for r in [settings, *self.rows.values()]))

    def abandon(self) -> None:
        """Remove the partial file if it holds no finished row (a run that failed before finishing one)."""
        if not self.rows:
            self.partial.unlink(missing_ok=True)

    def append(self, row: dict) -> None:
        """Keep one finished row (durably)."""
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")  # ASCII: a torn line never splits a character
            f.flush()
            os.fsync(f.fileno())
        self.rows[row[self.key]] = row

    def ordered(self) -> list[dict]:
        """The finished rows in key order (the partial file stays: the caller saves them in another form,
        then calls :meth:`discard`)."""
        return [self.rows[k] for k in sorted(self.rows)]

    def finish(self) -> list[dict]:
        """Write every row to ``out`` as JSON lines (atomically, in key order), remove the partial file, and
        return the rows."""
        rows = self.ordered()
        write_text_atomic(self.out, "".join(json.dumps(r) + "\n" for r in rows))
        self.discard(self.out)
        return rows

    @staticmethod
    def discard(out: str | Path) -> None:
        """Remove the partial file of ``out`` (once its rows are saved elsewhere)."""
        out = Path(out)
        out.with_name(out.name + ".partial").unlink(missing_ok=True)


def changed_settings(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ between two settings dicts, nested dicts as ``outer.inner``."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += changed_settings(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(prefix + k)
    return out


_OPTION_NAMES = {"num_prompts": "the prompts", "prompts_sha256": "the prompts", "weights": "the --value weights",
                 "base": "--base-model", "learning_rate": "--lr", "lam": "--lambda", "data": "the data",
                 "value_sha256": "the value models (retrained since)"}


def option_names(keys: Sequence[str]) -> list[str]:
    """What a user changed, named by the command's options, from settings keys (:func:`changed_settings`):
    ``max_new_tokens`` → ``--max-new-tokens``, ``config.learning_rate`` → ``--lr``, any ``policy.*`` → π0's options.
    Duplicates are dropped."""
    names = []
    for key in keys:
        last = key.rsplit(".", 1)[-1]
        if key.startswith("policy."):
            name = "π0 (--base-model, --dtype or --api-*)"
        else:
            name = _OPTION_NAMES.get(last, "--" + last.replace("_", "-"))
        if name not in names:
            names.append(name)
    return names


def trainer_checkpoint(checkpoint_dir: str | Path, settings: dict) -> str | None:
    """The one way a :class:`transformers.Trainer` run resumes: ``checkpoint_dir`` keeps the run's settings in
    ``vas_train.json`` beside the Trainer's checkpoints; an existing folder must hold the same settings.

    Returns:
        The newest complete checkpoint (its ``trainer_state.json``, which the Trainer writes last, a whole JSON
        document: an interrupt while saving leaves a newer, incomplete one, which is skipped), or None to start
        afresh.

    Raises:
        VasError: if ``checkpoint_dir`` holds an interrupted run with other settings (named by option).
    """
    checkpoint_dir = Path(checkpoint_dir)
    settings = json.loads(json.dumps(settings))
    settings_file = checkpoint_dir / "vas_train.json"
    if checkpoint_dir.exists():
        previous = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        if previous != settings:
            raise VasError(f"{checkpoint_dir} holds an interrupted run with other settings "
                           f"({', '.join(option_names(changed_settings(previous, settings)))}): restore them to resume "
                           "it, or delete it")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(settings_file, json.dumps(settings))
    checkpoints = sorted((c for c in checkpoint_dir.glob("checkpoint-*") if _complete(c)),
                         key=lambda c: int(c.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def _complete(checkpoint: Path) -> bool:
    """Whether the Trainer finished saving ``checkpoint``: its ``trainer_state.json``, written last and not
    atomically, holds a whole JSON document (an interrupt during that write leaves it empty or cut short)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a finished JSON-lines file written by :func:`vas.decoding.batches.generate` or
    :meth:`RowLog.finish`."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
