"""Experiments that test the paper's claims at small scale: ``vas experiment NAME``.

Each experiment module has ``NAME``, a ``Size`` dataclass (defaults sized for at most 30 minutes on 2 CPU
cores), ``QUICK`` (a seconds-long size, to check the plumbing), optionally ``SIZES`` (more named sizes, e.g.
for a GPU; ``vas experiment NAME --size NAME``) and ``run(out, ...) -> list[Section]``: it writes
its data and plots under ``out`` (reusing finished stages there and in the shared ``stages/`` folder, see
:mod:`vas.experiments.setup`) and returns its sections of REPORT.md (:mod:`vas.experiments.report`).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from vas.errors import VasError
from vas.experiments import ablations, beta_knob, composition, frontier, scaling, tool_use, value_heads

EXPERIMENTS: dict[str, ModuleType] = {module.NAME: module for module in
                                      (frontier, value_heads, scaling, beta_knob, composition, ablations, tool_use)}
ALL = tuple(name for name in EXPERIMENTS if name != scaling.NAME)
"""What ``vas experiment all`` runs: every experiment but ``scaling`` (90 minutes, collecting through vLLM), which
runs on its own."""


def sizes(module: ModuleType) -> dict:
    """An experiment's named sizes: ``default`` (its ``Size()``), ``quick`` (``QUICK``) and any in its ``SIZES``."""
    return {"default": module.Size(), "quick": module.QUICK, **getattr(module, "SIZES", {})}


def size_named(module: ModuleType, name: str):
    """The experiment's size called ``name``.

    Raises:
        VasError: if the experiment has no size of that name (naming those it has).
    """
    named = sizes(module)
    if name not in named:
        raise VasError(f"experiment {module.NAME} has no size {name!r}: choose one of {', '.join(named)}")
    return named[name]


def chosen_sizes(name: str, size: str = "default", *, quick: bool = False, out: Path | None = None) -> dict:
    """The experiments ``vas experiment NAME`` runs (``all``: those of :data:`ALL`) and each one's size named
    ``size`` (``quick``: the size ``quick``), checked before any runs, with what each needs installed (its
    ``check``, where it has one).

    Args:
        out: the folder every experiment writes into, if known: it must not be a file.

    Returns:
        ``{experiment name: its size}``, in the order they run.

    Raises:
        VasError: for an unknown experiment, an ``out`` that is a file, ``quick`` with a size other than
            ``default`` or ``quick``, a size an experiment lacks (:func:`size_named`), or from an experiment's
            ``check``.
    """
    if name not in EXPERIMENTS and name != "all":
        raise VasError(f"unknown experiment {name!r}: choose one of {', '.join(EXPERIMENTS)} or all")
    if out is not None and out.exists() and not out.is_dir():
        raise VasError(f"--out {out} is a file: name a folder (it holds every experiment's data and REPORT.md)")
    if quick and size not in ("default", "quick"):
        raise VasError(f"--quick is --size quick: leave out one of --quick and --size {size}")
    size = "quick" if quick else size
    chosen = {one: size_named(EXPERIMENTS[one], size) for one in (ALL if name == "all" else (name,))}
    for one, one_size in chosen.items():
        if hasattr(EXPERIMENTS[one], "check"):
            EXPERIMENTS[one].check(one_size)
    return chosen
