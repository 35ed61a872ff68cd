"""Experiments that test the paper's claims at small scale: ``vas experiment NAME``.

Each experiment module has ``NAME``, a ``Size`` dataclass (defaults sized for at most 30 minutes on 2 CPU
cores), ``QUICK`` (a seconds-long size, to check the plumbing) and ``run(out, ...) -> list[Section]``: it writes
its data and plots under ``out`` (reusing finished stages there and in the shared ``stages/`` folder, see
:mod:`vas.experiments.setup`) and returns its sections of REPORT.md (:mod:`vas.experiments.report`).
"""

from __future__ import annotations

from types import ModuleType

from vas.experiments import ablations, beta_knob, composition, frontier, tool_use, value_heads

EXPERIMENTS: dict[str, ModuleType] = {module.NAME: module for module in (frontier, value_heads, beta_knob, composition, ablations, tool_use)}
