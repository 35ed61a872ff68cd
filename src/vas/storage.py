"""Atomic writes: a file or a `datasets` folder appears whole at its final path, or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import datasets

from vas.errors import VasError


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with replace_atomic(path) as tmp:
        Path(tmp).write_text(text)


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def require_absent(path: str | Path) -> None:
    """Raise :class:`VasError` if ``path`` exists: outputs are never overwritten."""
    if Path(path).exists():
        raise VasError(f"{path} exists already: choose another --out or delete it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(path: str | Path) -> Path:
    """A new empty folder beside ``path`` (to be renamed to it), with the usual permissions (0777 & ~umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def save_dataset_atomic(dataset: datasets.Dataset, path: str | Path) -> None:
    """``dataset.save_to_disk`` into a temporary folder beside ``path``, then rename it to ``path``.

    Raises:
        VasError: if ``path`` exists already.
    """
    require_absent(path)
    tmp = make_temp_dir(path)
    try:
        dataset.save_to_disk(str(tmp))
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_dataset_dir(path: str | Path, required: set[str]) -> datasets.Dataset:
    """Load a folder written by ``save_to_disk`` and check it has the ``required`` columns.

    Raises:
        VasError: if the folder is missing, not a dataset, or lacks a required column.
    """
    path = Path(path)
    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        raise VasError(f"{str(path)!r} is not a dataset folder (run `vas collect` to make one)")
    data = datasets.load_from_disk(str(path))
    missing = sorted(required - set(data.column_names))
    if missing:
        raise VasError(f"dataset {str(path)!r} lacks required columns: {', '.join(missing)}")
    return data


@contextmanager
def replace_atomic(path: str | Path):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class RowLog:
    """The finished rows of a long job, kept as they finish so that an interrupted job resumes.

    Rows are appended as JSON lines to ``<out>.partial`` (its first line holds the job's settings), one
    ``write`` and ``fsync`` per row; a line torn by a crash is dropped on reopening. :meth:`finish` writes
    all rows to ``out`` atomically, in key order, and removes the partial file.
    (:func:`vas.collect.collect_api` and :func:`vas.text_sampling.generate` use it.)

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
        if self.partial.exists():
            lines = self.partial.read_text(encoding="utf-8", errors="replace").split("\n")
            previous = json.loads(lines[0])
            if previous != settings and any(line.strip() for line in lines[1:]):
                changed = changed_settings(previous, settings)
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

    def finish(self, write: bool = True) -> list[dict]:
        """Write every row to ``out`` as JSON lines (atomically, in key order; unless ``write`` is False, for a
        caller that saves them in another form), remove the partial file, and return the rows."""
        rows = [self.rows[k] for k in sorted(self.rows)]
        if write:
            write_text_atomic(self.out, "".join(json.dumps(r) + "\n" for r in rows))
        self.partial.unlink()
        return rows


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
