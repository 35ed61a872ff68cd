"""Collect → train with finished stages reused: the part shared by ``vas demo`` and ``vas experiment``.

A stage whose output folder exists is reused, so an interrupted run continues where it stopped (collection
also resumes inside its stage, see :mod:`vas.collect`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Recipe:
    """How samples are collected from π0 and how the value model is trained on them (App. C.1, Table 4)."""

    samples_per_prompt: int = 2
    max_new_tokens: int = 40
    epochs: float = 2.0
    learning_rate: float = 1e-3
    lora_rank: int = 16
    batch_size: int = 16
    lam: float = 0.95


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
    """Collect ``recipe.samples_per_prompt`` scored responses per prompt into ``out/samples`` and train a
    value model on them into ``out/value``; either folder, if present, is reused as is.

    Returns:
        The collected dataset and the value model's folder (load it with
        :meth:`vas.value.ValueModel.from_pretrained`).
    """
    from vas.collect import COLUMNS, collect
    from vas.rewards import load_reward
    from vas.storage import load_dataset_dir
    from vas.train import train_value_model

    samples_dir, value_dir = out / "samples", out / "value"
    metadata = {"base_model": base_model, "reward": reward_spec, **(metadata or {})}
    if samples_dir.exists():
        log(f"samples: reusing {samples_dir}")
        data = load_dataset_dir(samples_dir, set(COLUMNS))
    else:
        log(f"collecting {len(prompts)}×{recipe.samples_per_prompt} responses from π0 → {samples_dir}")
        data = collect(policy, tokenizer, prompts, load_reward(reward_spec), samples_dir,
                       samples_per_prompt=recipe.samples_per_prompt, max_new_tokens=recipe.max_new_tokens,
                       batch_size=recipe.batch_size, seed=seed, progress=progress, metadata=metadata)
    if value_dir.exists():
        log(f"value model: reusing {value_dir}")
    else:
        log(f"training the value model (TD(λ), λ={recipe.lam:g}) → {value_dir}")
        metrics = train_value_model(data, value_dir, backbone=base_model, pad_token_id=tokenizer.pad_token_id,
                                    tokenizer=tokenizer, lam=recipe.lam, epochs=recipe.epochs,
                                    learning_rate=recipe.learning_rate, lora_rank=recipe.lora_rank,
                                    lora_alpha=recipe.lora_rank, batch_size=recipe.batch_size, seed=seed,
                                    device=device, progress=progress, metadata=metadata)
        log(f"      validation MSE (TD(λ) targets) {metrics.get('eval_loss', float('nan')):.4f}, "
            f"(reward labels) {metrics.get('eval_mc_mse', float('nan')):.4f}")
    return data, value_dir
