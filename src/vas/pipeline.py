"""Collect → train with finished stages reused: the part shared by ``vas demo`` and ``vas experiment``.

A stage whose output folder exists is reused, so an interrupted run continues where it stopped (collection
also resumes inside its stage, see :mod:`vas.collect`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vas.config import TrainConfig
from vas.errors import VasError
from vas.storage import write_json_atomic


@dataclass(frozen=True)
class Recipe:
    """How samples are collected from π0 and how the value model is trained on them (App. C.1, Table 4).

    ``backbone_layers`` keeps the value model's first L backbone layers (None: all of them); ``head``,
    ``mean_over`` and ``bins`` choose its head (:mod:`vas.value.heads`). The training settings default to :class:`vas.config.TrainConfig`'s (``vas train``'s), and LoRA's α is the rank.
    """

    samples_per_prompt: int = 2
    max_new_tokens: int = 40
    epochs: float = TrainConfig.epochs
    learning_rate: float = TrainConfig.learning_rate
    lora_rank: int = TrainConfig.lora_rank
    batch_size: int = TrainConfig.batch_size
    lam: float = TrainConfig.lam
    backbone_layers: int | None = None
    head: str = TrainConfig.head
    mean_over: str = TrainConfig.mean_over
    bins: int = TrainConfig.bins


def collected_samples(
    directory: Path,
    *,
    policy,
    prompts: Sequence[str],
    reward_spec: str,
    recipe: Recipe,
    seed: int,
    progress: bool,
    log: Callable[[str], None],
    batch_size: int | None = None,
    metadata: dict | None = None,
) -> datasets.Dataset:
    """``recipe.samples_per_prompt`` responses per prompt from ``policy`` (π0: a :class:`vas.policy.local.LocalPolicy`
    or a :class:`vas.serving.engine.VllmPolicy`) scored by ``reward_spec``, collected into ``directory``
    (:func:`vas.collect.collect`, ``batch_size`` responses per batch, default ``recipe.batch_size``), or loaded
    from it if it exists."""
    from vas.collect import COLUMNS, collect
    from vas.config import CollectConfig
    from vas.rewards import load_reward
    from vas.storage import load_dataset_dir

    if directory.exists():
        log(f"samples: reusing {directory}")
        return load_dataset_dir(directory, set(COLUMNS))
    log(f"collecting {len(prompts)}×{recipe.samples_per_prompt} responses from π0 → {directory}")
    return collect(policy, prompts, load_reward(reward_spec), directory,
                   CollectConfig(samples_per_prompt=recipe.samples_per_prompt, max_new_tokens=recipe.max_new_tokens,
                                 batch_size=batch_size or recipe.batch_size, seed=seed), progress=progress,
                   metadata={"reward": reward_spec, **(metadata or {})})


def rescored(data: datasets.Dataset, reward_spec: str) -> datasets.Dataset:
    """The same responses with their ``reward`` column replaced by ``reward_spec``'s scores (in memory), so
    several value models for different rewards can be trained on one collection of π0 samples (Sec. 4.2)."""
    from vas.rewards import load_reward, score

    rewards = score(load_reward(reward_spec), data["prompt"], data["response"])
    return data.remove_columns("reward").add_column("reward", rewards.tolist())


def trained_value_model(
    directory: Path,
    data: datasets.Dataset,
    *,
    tokenizer: PreTrainedTokenizerBase,
    base_model: str,
    recipe: Recipe,
    seed: int,
    device: torch.device,
    progress: bool,
    log: Callable[[str], None],
    metadata: dict | None = None,
) -> Path:
    """Train a value model on ``data`` with ``recipe`` into ``directory`` (:func:`vas.value.train.train_value_model`),
    or reuse ``directory`` if it exists. Returns ``directory`` (load it with
    :meth:`vas.value.model.ValueModel.from_pretrained`)."""
    from vas.value.train import train_value_model

    if directory.exists():
        log(f"value model: reusing {directory}")
        return directory
    layers = f", {recipe.backbone_layers} backbone layers" if recipe.backbone_layers else ""
    log(f"training a value model ({recipe.head} head, TD(λ), λ={recipe.lam:g}, {len(data)} responses{layers}) → "
        f"{directory}")
    config = TrainConfig(backbone=base_model, backbone_layers=recipe.backbone_layers, lam=recipe.lam,
                         epochs=recipe.epochs, learning_rate=recipe.learning_rate, lora_rank=recipe.lora_rank,
                         lora_alpha=recipe.lora_rank, batch_size=recipe.batch_size, head=recipe.head,
                         mean_over=recipe.mean_over, bins=recipe.bins, seed=seed)
    train_value_model(data, directory, config, tokenizer=tokenizer, device=device, progress=progress, log=log,
                      metadata={"base_model": base_model, **(metadata or {})})
    return directory


def samples_and_value_model(
    out: Path,
    *,
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    base_model: str,
    prompts: Sequence[str],
    reward_spec: str,
    recipe: Recipe,
    seed: int,
    device: torch.device,
    progress: bool,
    log: Callable[[str], None],
    metadata: dict | None = None,
) -> tuple[datasets.Dataset, Path]:
    """:func:`collected_samples` into ``out/samples``, then :func:`trained_value_model` into ``out/value``.

    Returns:
        The collected dataset and the value model's folder.
    """
    metadata = {"reward": reward_spec, **(metadata or {})}
    from vas.policy.local import LocalPolicy

    data = collected_samples(out / "samples", policy=LocalPolicy(policy, tokenizer), prompts=prompts,
                             reward_spec=reward_spec, recipe=recipe, seed=seed, progress=progress, log=log,
                             metadata={"base_model": base_model, **metadata})
    value_dir = trained_value_model(out / "value", data, tokenizer=tokenizer, base_model=base_model, recipe=recipe,
                                    seed=seed, device=device, progress=progress, log=log, metadata=metadata)
    return data, value_dir


def claim(out: Path, size, *, seed: int, base_model: str) -> None:
    """Record in ``out/settings.json`` that ``out`` holds a run (the demo, an experiment) of this ``size`` (a
    dataclass), seed and base model, so that a rerun reuses its stages only under the same settings.

    Raises:
        VasError: if ``out`` holds results made with other settings, or stages without ``settings.json`` (made
            before settings were recorded).
    """
    settings = json.loads(json.dumps({"size": asdict(size), "seed": seed, "base_model": base_model}))
    recorded = Path(out) / "settings.json"
    if not recorded.is_file() and (Path(out) / "samples").exists():
        raise VasError(f"{out} holds stages made before their settings were recorded: use another --out, or delete "
                       f"{out} to start over")
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        raise VasError(f"{out} holds results made with other settings (size, seed or base model): use another "
                       f"--out, or delete {out} to start over")
    write_json_atomic(recorded, settings)
