"""The one decoding loop: plain sampling from π0, VAS steering (Eq. 5), greedy or sampled, batched.

Plain sampling is this loop with no value model; Best-of-N and data collection reuse it with β = 0, so
every method in a comparison draws from the same π0 with the same temperature rule (see
:mod:`vas.guidance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from vas.errors import VasError
from vas.guidance import kl_divergence, steered_logprobs
from vas.models import cache_kwargs, context_window
from vas.value import CandidateScorer, ValueModel, position_ids_from_mask


@dataclass
class Steering:
    """Value guidance for :func:`sample`: π ∝ π0 · exp(β · Σ_i w_i V_i(s ⊕ x)) over π0's top-k (Eq. 5, Sec. 4.2).

    Attributes:
        value_models: one or more value models sharing the base policy's tokenizer.
        weights: one weight per value model (default 1 each); composition is linear (Sec. 4.2).
        beta: β ≥ 0 in practice (negative β steers towards low reward); β = 0 gives π0 exactly.
        top_k: k, the number of π0's most likely tokens scored by the value models, 1 ≤ k ≤ vocabulary size.
        mask_outside_top_k: sample only among the top-k (App. D.1's masked ablation) instead of giving the
            other tokens β·mean(V) as Eq. 5 does.
    """

    value_models: Sequence[ValueModel]
    weights: Sequence[float] | None = None
    beta: float = 1.0
    top_k: int = 10
    mask_outside_top_k: bool = False

    def __post_init__(self):
        if not self.value_models:
            raise VasError("steering needs at least one value model")
        if self.weights is None:
            self.weights = [1.0] * len(self.value_models)
        if len(self.weights) != len(self.value_models):
            raise VasError(f"{len(self.weights)} weights given for {len(self.value_models)} value models")
        if not math.isfinite(self.beta) or not all(math.isfinite(w) for w in self.weights):
            raise VasError(f"beta and the weights must be finite numbers, got beta={self.beta}, weights={self.weights}")

    def check_top_k(self, vocab_size: int) -> None:
        """Raise :class:`VasError` unless 1 ≤ k ≤ ``vocab_size``."""
        if not 1 <= self.top_k <= vocab_size:
            raise VasError(f"k must be between 1 and the vocabulary size {vocab_size}, got {self.top_k}")


def steer(
    steering: Steering,
    scorers: Sequence[CandidateScorer],
    base_logprobs: torch.Tensor,
    new_ids: torch.Tensor,
    new_mask: torch.Tensor,
) -> torch.Tensor:
    """One VAS step: π0's top-k (B, k) scored by every value model, combined by Eq. 5.

    Args:
        steering: β, k and the value models' weights.
        scorers: one :class:`CandidateScorer` per value model, in ``steering``'s order.
        base_logprobs: (B, V) log π0 at the sampling temperature.
        new_ids, new_mask: (B, P) tokens appended since the previous step (the prompt at the first step).

    Returns:
        (B, V) float32 log π of the steered policy.
    """
    candidates = base_logprobs.topk(steering.top_k, dim=-1).indices  # (B, k)
    values = sum(
        w * s.score(new_ids, new_mask, candidates).to(base_logprobs.device) for w, s in zip(steering.weights, scorers)
    )
    return steered_logprobs(base_logprobs, candidates, values, steering.beta, steering.mask_outside_top_k)


@dataclass
class Samples:
    """Output of :func:`sample` for B prompts; lists have one entry per prompt.

    Attributes:
        token_ids: generated ids per row (EOS included if generated), lengths T_b ≤ max_new_tokens.
        logprobs: log π(x_t|s_{t-1}) of each generated token under the sampling policy (float32).
        base_logprobs: log π0(x_t|s_{t-1}) of each generated token, π0 at the sampling temperature.
        kl: (B,) float32, Σ_t KL(π(·|s_t) ‖ π0(·|s_t)) in nats over the generated steps (0 without steering).
        finished: (B,) bool, True if the row ended with an EOS token (else it hit max_new_tokens).
    """

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    base_logprobs: list[list[float]]
    kl: torch.Tensor
    finished: torch.Tensor


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists: returns ids (B, L) int64 and mask (B, L) int64 (1 = real token)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def draw(logprobs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from ``exp(logprobs)`` by inverse-CDF sampling: (B, V) float → (B,) int64.

    One uniform number per row and a cumulative sum, instead of ``torch.multinomial``'s V exponential
    draws per row (≈ 8 ms a step for B = 8, V = 49k on 2 CPU cores, see BENCHMARKS.md). Zero-probability
    tokens are never drawn.
    """
    cdf = logprobs.float().exp().cumsum(dim=-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)


@torch.no_grad()
def sample(
    policy: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    *,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    steering: Steering | None = None,
    temperature: float = 0.7,
    max_new_tokens: int = 64,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> Samples:
    """Generate one response per prompt from π0, or from the VAS policy when ``steering`` is given.

    Each step: one forward of π0 over its KV cache → log π0 = log_softmax(logits / τ) (B, V); with
    steering, π0's top-k candidates (B, k) are scored by every value model in one batched forward each
    (:class:`vas.value.CandidateScorer`) and combined by Eq. 5 (:func:`vas.guidance.steered_logprobs`);
    then the token is sampled (or the argmax taken when ``greedy``). Each row stops at its own EOS.

    Args:
        policy: the frozen base causal LM π0.
        prompt_ids: B prompts as token id lists (chat template already applied), each non-empty.
        eos_token_ids: ids that end a response.
        pad_token_id: id fed for padding and finished rows (always masked out, may equal EOS).
        steering: value guidance, or None for plain sampling from π0.
        temperature: τ > 0 of π0 (applied before the augmentation, see :mod:`vas.guidance`).
        max_new_tokens: the most tokens generated per row.
        greedy: take argmax π instead of sampling.
        generator: torch RNG for reproducible sampling (on the policy's device).

    Returns:
        :class:`Samples`; decode ``token_ids`` with the tokenizer for text.

    Raises:
        VasError: for no or an empty prompt, a prompt that does not fit the context window, k out of
            range, a temperature ≤ 0 or max_new_tokens < 1.
    """
    if not (0 < temperature < math.inf):
        raise VasError(f"temperature must be a finite number > 0, got {temperature}")
    if max_new_tokens < 1:
        raise VasError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    if not prompt_ids:
        raise VasError("no prompts to generate from")
    if any(len(p) == 0 for p in prompt_ids):
        raise VasError("a prompt is empty after tokenization")
    window = context_window(policy)
    longest = max(len(p) for p in prompt_ids)
    if window is not None and longest + max_new_tokens > window:
        raise VasError(
            f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the context window of {window}"
        )
    if steering is not None:
        steering.check_top_k(policy.config.vocab_size)

    device = policy.device
    ids, mask = left_pad(prompt_ids, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    B = ids.shape[0]
    eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=device)
    cache = DynamicCache(config=policy.config)
    scorers = [CandidateScorer(m) for m in steering.value_models] if steering else []
    attention = mask
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    new_ids, new_mask = ids, mask
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    tokens, logps, base_logps = [], [], []
    kl = torch.zeros(B, dtype=torch.float32, device=device)

    for _ in range(max_new_tokens):
        out = policy(
            input_ids=new_ids,
            attention_mask=attention,
            position_ids=position_ids_from_mask(new_mask, lengths),
            **cache_kwargs(policy, cache),
            logits_to_keep=1,
        )
        lengths = lengths + new_mask.sum(dim=1)
        base = torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)  # (B, V) log π0
        if steering is not None:
            logp = steer(steering, scorers, base, new_ids, new_mask)
            kl += torch.where(finished, 0.0, kl_divergence(logp, base))
        else:
            logp = base
        if greedy:
            token = logp.argmax(dim=-1)
        else:
            token = draw(logp, generator)
        active = ~finished
        token = torch.where(active, token, torch.full_like(token, pad_token_id))
        tokens.append(token)
        logps.append(logp.gather(1, token[:, None]).squeeze(1))
        base_logps.append(base.gather(1, token[:, None]).squeeze(1))
        finished = finished | (active & torch.isin(token, eos))
        new_ids, new_mask = token[:, None], active.long()[:, None]
        attention = torch.cat([attention, new_mask], dim=1)
        if bool(finished.all()):
            break

    steps = torch.stack(tokens, dim=1).cpu()  # (B, T)
    step_logp = torch.stack(logps, dim=1).cpu()
    step_base = torch.stack(base_logps, dim=1).cpu()
    # A row's tokens run until (and including) its EOS; later slots are padding.
    is_eos = torch.isin(steps, eos.cpu())
    ended = is_eos.cumsum(dim=1) - is_eos.long()  # >0 strictly after the first EOS
    valid = ended == 0
    out_tokens, out_logp, out_base = [], [], []
    for row in range(B):
        n = int(valid[row].sum())
        out_tokens.append(steps[row, :n].tolist())
        out_logp.append(step_logp[row, :n].tolist())
        out_base.append(step_base[row, :n].tolist())
    return Samples(out_tokens, out_logp, out_base, kl.cpu(), finished.cpu())
