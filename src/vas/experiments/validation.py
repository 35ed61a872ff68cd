"""Validation labels for value models (paper App. C.1): cut held-out π0 responses halfway, sample
completions of each half from π0, and label the half-finished state with their mean reward.

The label is an unbiased Monte-Carlo estimate of V^π0(s) at a state the value model never saw, so the value
model's mean squared error to it measures how well V estimates π0's expected return, which a model's
training loss (against its own bootstrapped TD(λ) targets) does not.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vas.decoding.loop import sample
from vas.errors import VasError
from vas.models import left_pad
from vas.policy.local import LocalPolicy
from vas.rewards import Reward, score
from vas.value.model import ValueModel


@dataclass(frozen=True)
class HalfwayLabels:
    """Half-finished states and their Monte-Carlo values.

    Attributes:
        prompt_ids: one token id list per state (chat template applied).
        prefix_ids: the first ⌊T/2⌋ response tokens of each state.
        labels: (S,) float32, mean reward of the completions of each state.
        label_variance: (S,) float32, sample variance of those rewards divided by the number of completions,
            i.e. the squared standard error of each label: its mean is the part of any model's MSE that
            comes from the labels' own noise.
    """

    prompt_ids: list[list[int]]
    prefix_ids: list[list[int]]
    labels: torch.Tensor
    label_variance: torch.Tensor


def halfway_labels(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    reward: Reward,
    *,
    completions: int = 10,
    max_new_tokens: int,
    temperature: float = 0.7,
    batch_size: int = 40,
    seed: int = 0,
) -> HalfwayLabels:
    """Label the state prompt ⊕ (first half of each response) with the mean reward of ``completions``
    completions sampled from π0 (App. C.1: ten), each allowed the tokens the response had left
    (``max_new_tokens`` − ⌊T/2⌋), so the labels refer to the same token limit as training.

    Args:
        prompts, prompt_ids, response_ids: S held-out responses of π0 (e.g. columns of a collected dataset).
        reward: scores the full response text (first half ⊕ completion).

    Returns:
        :class:`HalfwayLabels` for the S states.

    Raises:
        VasError: if the inputs differ in length, ``completions`` < 2, or a response is longer than
            ``max_new_tokens``.
    """
    if not len(prompts) == len(prompt_ids) == len(response_ids):
        raise VasError("prompts, prompt_ids and response_ids must have the same length")
    if completions < 2:
        raise VasError(f"completions must be at least 2, got {completions}")
    if any(len(r) > max_new_tokens for r in response_ids):
        raise VasError(f"a response is longer than max_new_tokens={max_new_tokens}")
    local = LocalPolicy(policy, tokenizer)
    cuts = [len(r) // 2 for r in response_ids]
    by_budget = defaultdict(list)  # one sample() call serves states with the same number of tokens left
    for i, cut in enumerate(cuts):
        by_budget[max_new_tokens - cut].append(i)
    rewards = torch.zeros(len(prompts), completions)
    per_batch = max(1, batch_size // completions)
    calls = 0
    for budget, members in sorted(by_budget.items()):
        for start in range(0, len(members), per_batch):
            rows = members[start : start + per_batch]
            contexts = [list(prompt_ids[i]) + list(response_ids[i][: cuts[i]]) for i in rows for _ in range(completions)]
            generator = torch.Generator().manual_seed(seed * 7919 + calls)
            calls += 1
            out = sample(local, contexts, temperature=temperature, max_new_tokens=budget, generator=generator)
            texts = tokenizer.batch_decode(
                [list(response_ids[i][: cuts[i]]) + c for i, c in zip((i for i in rows for _ in range(completions)),
                                                                      out.token_ids)],
                skip_special_tokens=True)
            scored = score(reward, [prompts[i] for i in rows for _ in range(completions)], texts)
            rewards[rows] = scored.view(len(rows), completions)
    return HalfwayLabels(
        prompt_ids=[list(p) for p in prompt_ids],
        prefix_ids=[list(r[:c]) for r, c in zip(response_ids, cuts)],
        labels=rewards.mean(dim=1),
        label_variance=rewards.var(dim=1, unbiased=True) / completions,
    )


@torch.no_grad()
def state_value_predictions(value_model: ValueModel, labels: HalfwayLabels, pad_token_id: int,
                            batch_size: int = 32) -> torch.Tensor:
    """V(prompt ⊕ prefix) for each state of ``labels``: (S,) float32."""
    contexts = [p + r for p, r in zip(labels.prompt_ids, labels.prefix_ids)]
    prompt_lengths = torch.tensor([len(p) for p in labels.prompt_ids])
    values = []
    for start in range(0, len(contexts), batch_size):
        ids, mask = left_pad(contexts[start : start + batch_size], pad_token_id)
        device = value_model.device
        values.append(value_model(ids.to(device), mask.to(device),
                                  prompt_lengths=prompt_lengths[start : start + batch_size].to(device))[:, -1].float().cpu())
    return torch.cat(values)


def value_mse(value_model: ValueModel, labels: HalfwayLabels, pad_token_id: int) -> dict[str, float]:
    """The value model's error on the halfway states.

    Returns:
        ``mse``: mean (V − label)²; ``label_noise``: mean squared standard error of the labels (the MSE a
        perfect V^π0 would still show); ``label_variance``: variance of the labels (the MSE of the best
        constant); ``explained``: 1 − mse / label_variance.
    """
    predictions = state_value_predictions(value_model, labels, pad_token_id)
    mse = float((predictions - labels.labels).square().mean())
    variance = float(labels.labels.var(unbiased=False))
    return {"mse": mse, "label_noise": float(labels.label_variance.mean()), "label_variance": variance,
            "explained": 1.0 - mse / variance if variance > 0 else float("nan")}
