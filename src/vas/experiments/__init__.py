"""Experiments that test the paper's claims at small scale: ``vas experiment NAME``.

Each experiment module has ``NAME``, a ``Size`` dataclass (defaults sized for at most 30 minutes on 2 CPU
cores), ``QUICK`` (a seconds-long size, to check the plumbing), optionally ``SIZES`` (more named sizes, e.g.
for a GPU; ``vas experiment NAME --size NAME``) and ``run(out, ...) -> list[Section]``: it writes
its data and plots under ``out`` (reusing finished stages there and in the shared ``stages/`` folder, see
:mod:`vas.experiments.setup`) and returns its sections of REPORT.md (:mod:`vas.experiments.report`).
"""

from __future__ import annotations

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
