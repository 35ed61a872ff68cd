"""Value Augmented Sampling's next-token rule (paper Eq. 5) and the exact per-step KL.

Temperature rule, used everywhere (collection, steering, KL): the base policy π0 *is* the language model at
sampling temperature τ, π0(x|s) = softmax(logits / τ). The value model was trained on samples from exactly
this π0, so the augmentation is applied after the temperature, and β·V is never divided by τ:

    log π(x|s) = log π0(x|s) + β·V(s ⊕ x) − log Z        for x in π0's top-k
    log π(x|s) = log π0(x|s) + β·mean_k V(s ⊕ ·) − log Z   for every other token        (Eq. 5)

By default no token is masked (App. D.1 shows masking hurts), so a row can never become all −inf; the
masked variant of App. D.1 (π restricted to the top-k) is available for the ablation. β and the value
models' weights may differ from row to row (one batch, many users' settings).
"""

from __future__ import annotations

import torch


def base_logprobs(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """log π0 at the sampling temperature τ: log_softmax(logits / τ) over the last dimension.

    The one place the temperature rule lives. ``logits`` may be raw logits over the vocabulary, or
    log-probabilities (at temperature 1) over any subset of it, such as the k tokens an API told: the result
    is π0 at τ renormalised over that subset.

    Args:
        logits: (B, S) float.
        temperature: τ > 0, a float, or a (B, 1) float tensor with one τ per row.

    Returns:
        (B, S) float32, normalised over S.
    """
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def weighted_values(values: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i V_i(s ⊕ x): the linear composition of M value models (Sec. 4.2), per row.

    Args:
        values: M tensors (B, k) float, V_i for each candidate.
        weights: (B, M) float, each row's weights.

    Returns:
        (B, k) float32.
    """
    return sum(weights[:, i, None].float() * v.float().to(weights.device) for i, v in enumerate(values))


def steered_logprobs(
    base_logprobs: torch.Tensor,
    candidate_ids: torch.Tensor,
    candidate_values: torch.Tensor,
    beta: float | torch.Tensor,
    mask_outside_top_k: bool = False,
    candidate_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probabilities of the steered policy π (paper Eq. 5).

    Args:
        base_logprobs: (B, V) float, log π0(·|s_t), normalised, already at the sampling temperature.
        candidate_ids: (B, k) int64, the top-k token ids of π0 (any k distinct ids per row work).
        candidate_values: (B, k) float, V(s_t ⊕ x) for each candidate (weighted sum if several value models).
        beta: β, the strength of the value guidance: a float, or a (B,) tensor with one β per row. β = 0
            returns ``base_logprobs`` itself, i.e. π0 bit for bit (KL exactly 0). Any finite β gives a finite KL: as |β| grows, π
            concentrates on the candidates with the largest β·V.
        mask_outside_top_k: give tokens outside the candidates probability 0 instead of β·mean(V) (the
            masked variant of App. D.1; not Eq. 5). β = 0 then gives π0 renormalised over the top-k.
        candidate_mask: (B, k) bool or None: which candidates of each row count, for rows with a smaller k
            than others (the first k_b of a row sorted by π0). The others are treated as tokens outside the
            top-k. None: all count.

    Returns:
        (B, V) float32 log π(·|s_t), normalised over the vocabulary.

    Raises:
        ValueError: if the shapes disagree, or a value or β is not finite (β in float32).
    """
    if candidate_ids.shape != candidate_values.shape or candidate_ids.shape[0] != base_logprobs.shape[0]:
        raise ValueError(
            f"shapes disagree: base_logprobs {tuple(base_logprobs.shape)}, candidate_ids "
            f"{tuple(candidate_ids.shape)}, candidate_values {tuple(candidate_values.shape)}"
        )
    candidate_values = candidate_values.float()
    if not bool(torch.isfinite(candidate_values).all()):
        raise ValueError("value model returned a non-finite value")
    beta = torch.as_tensor(beta, dtype=torch.float32, device=candidate_values.device)
    if not bool(torch.isfinite(beta).all()):
        raise ValueError(f"beta must be a finite float32 number, got {beta.tolist()}")
    if beta.dim():
        if beta.shape != candidate_ids.shape[:1]:
            raise ValueError(f"beta has shape {tuple(beta.shape)}, expected ({candidate_ids.shape[0]},): one per row")
        beta = beta[:, None]
    counted = (torch.ones(candidate_ids.shape, dtype=torch.bool) if candidate_mask is None
               else candidate_mask.bool()).to(candidate_values.device)
    # Every logit is shifted by −β·V_ref, V_ref being the counted candidate value with the largest β·V (it
    # cancels in the normalisation): every bonus is then ≤ 0, so for any finite β it is finite or −inf, never
    # +inf or NaN, and the reference candidate keeps a finite logit. Huge β thus gives the limit: π concentrated
    # on the candidates with the best β·V, and a finite KL.
    reference = torch.where(beta >= 0, candidate_values.masked_fill(~counted, -torch.inf).max(dim=1, keepdim=True).values,
                            candidate_values.masked_fill(~counted, torch.inf).min(dim=1, keepdim=True).values)  # (B, 1)
    # V̄(s_t), Eq. 5's value outside the top-k: the mean over the counted candidates
    mean_value = (candidate_values * counted).sum(dim=1, keepdim=True) / counted.sum(dim=1, keepdim=True)  # (B, 1)
    base_logprobs = base_logprobs.float()
    outside = beta * (mean_value - reference)  # (B, 1) or scalar: the bonus of every token outside the top-k
    candidates = base_logprobs.gather(1, candidate_ids) + torch.where(counted, beta * (candidate_values - reference), outside)
    if mask_outside_top_k:
        logits = torch.full_like(base_logprobs, -torch.inf)
        candidates = candidates.masked_fill(~counted, -torch.inf)
    else:
        logits = base_logprobs + outside
    steered = torch.log_softmax(logits.scatter(1, candidate_ids, candidates), dim=-1)
    # β = 0 rows are π0 itself (renormalising would move them by rounding, and give a KL of ~1e-7 per step)
    return steered if mask_outside_top_k else torch.where(beta == 0, base_logprobs, steered)


def kl_divergence(logprobs: torch.Tensor, base_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(π(·|s) ‖ π0(·|s)) in nats for each row: Σ_x π(x) (log π(x) − log π0(x)).

    Args:
        logprobs: (B, V) float, log π, normalised.
        base_logprobs: (B, V) float, log π0, normalised.

    Returns:
        (B,) float32, ≥ 0 up to rounding. Summed over the generated steps it gives the sequence-level
        KL(π‖π0) of a response (the chain rule of KL).
    """
    logprobs = logprobs.float()
    p = logprobs.exp()
    # 0·log 0 = 0: tokens with π(x) = 0 contribute nothing even where log π0(x) = −inf.
    diff = torch.where(p > 0, logprobs - base_logprobs.float(), torch.zeros_like(p))
    return (p * diff).sum(dim=-1).clamp_min(0.0)


EXTREME_KL_PER_TOKEN = 1.0
"""KL(π‖π0) per generated token, in nats, above which steered text is flagged as far from π0. The frontier
experiment's largest β (32, report/REPORT.md) reaches 0.6 nats per token."""


def extreme_kl_warning(kl: float, tokens: float) -> str | None:
    """A one-line warning when ``kl`` nats over ``tokens`` generated tokens exceed :data:`EXTREME_KL_PER_TOKEN`
    per token, else None."""
    per_token = kl / max(tokens, 1)
    if per_token <= EXTREME_KL_PER_TOKEN:
        return None
    return (f"KL(π‖π0) is {per_token:.2f} nats per token (more than {EXTREME_KL_PER_TOKEN:g}): the text is far from "
            "what π0 writes and is likely degenerate; a smaller --beta keeps it closer")
