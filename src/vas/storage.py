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
        VasError: if the folder is missing, not a dataset, empty, or lacks a required column.
    """
    path = Path(path)
    if not path.exists():
        raise VasError(f"dataset {str(path)!r} does not exist")
    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        raise VasError(f"{str(path)!r} is not a dataset folder (run `vas collect` to make one)")
    state = path / "state.json"
    if state.is_file() and not json.loads(state.read_text()).get("_data_files", True):
        raise VasError(f"dataset {str(path)!r} holds no responses: collect some first (vas collect)")
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
