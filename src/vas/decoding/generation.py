"""The one-call library entry point: :func:`generate` steers a transformers model as ``model.generate`` users
expect, and returns each response with its KL to π0."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vas.decoding.batches import generate as generate_rows
from vas.decoding.loop import Steering
from vas.policy.local import LocalPolicy
from vas.value.model import ValueModel


@dataclass
class Generation:
    """One response of :func:`generate`.

    Attributes:
        prompt: the prompt text.
        text: the response (special tokens dropped).
        kl: Σ_t KL(π(·|s_t) ‖ π0(·|s_t)) in nats over the response's steps (0 without steering).
        tokens: tokens generated, the EOS included.
        finished: True if the response ended with EOS, False if cut at ``max_new_tokens``.
    """

    prompt: str
    text: str
    kl: float
    tokens: int
    finished: bool


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
             value_models: Sequence[ValueModel] = (), weights: Sequence[float] | torch.Tensor | None = None,
             beta: float | torch.Tensor = 1.0, top_k: int | str = 10, soft: bool | torch.Tensor = False, temperature: float = 0.7, max_new_tokens: int = 64,
             greedy: bool = False, seed: int = 0, batch_size: int = 8, progress: bool = False) -> list[Generation]:
    """Generate one response per prompt from π ∝ π0 · exp(β Σ_i w_i V_i(s ⊕ x)) over π0's top-k (Eq. 5,
    Sec. 4.2), or from π0 itself without value models.

    Args:
        model: π0, any transformers causal LM (frozen; never trained).
        tokenizer: its tokenizer; its chat template formats the prompts.
        prompts: B prompt texts.
        value_models: value models (:meth:`vas.ValueModel.from_pretrained`); one sharing π0's tokenizer scores
            token ids, one with another tokenizer reads text.
        weights: (M,) one per value model (default 1 each), or (B, M) one row per prompt.
        beta: β, a float or (B,) one per prompt; 0 gives π0.
        top_k: k, π0's most likely tokens scored at each step, or ``"all"`` for every token (value models with
            the ``next`` head, which score every next token from one forward).
        soft: guide with soft values at β (distributional value models; :class:`vas.decoding.loop.Steering`), a
            bool or (B,) one per prompt.
        temperature: τ > 0 of π0; β·V is added after it (see :mod:`vas.decoding.guidance`).
        max_new_tokens: the most tokens per response.
        greedy: take argmax π instead of sampling.
        seed: seeds the draws (batch b uses (seed, b)).
        batch_size: prompts decoded together.
        progress: show a progress bar.

    Returns:
        One :class:`Generation` per prompt, in order.

    Raises:
        vas.VasError: for bad settings (k, β, weights, temperature, a prompt that does not fit the context window,
            ``soft`` without a distributional value model).
    """
    steering = Steering(value_models, weights, beta=beta, top_k=top_k, soft=soft) if value_models else None
    rows = generate_rows(LocalPolicy(model, tokenizer), list(prompts), steering, temperature=temperature,
                         max_new_tokens=max_new_tokens, greedy=greedy, seed=seed, batch_size=batch_size,
                         progress=progress)
    return [Generation(r["prompt"], r["response"], r["kl"], r["tokens"], r["finished"]) for r in rows]
