"""λ-returns for value regression: TD(λ), TD(0) and Monte-Carlo targets.

Paper: VAS (Han et al., 2024) Sec. 3.3 and App. C.1 train V^{π0} by regressing TD(λ) targets with γ = 1,
λ = 0.95 and the reward given only at the end of the episode.

Conventions (one trajectory, t = 0 … T):

* s_0 is the prompt, s_t the prompt plus t response tokens, s_T the finished response.
* The reward r arrives on reaching s_T and the value of a finished state is its reward: G_T = r.
* G_t = γ · [(1 − λ) · V(s_{t+1}) + λ · G_{t+1}] for t < T (no intermediate rewards), where the value of the
  finished state is its reward, V(s_T) = r, never the value model's prediction V̂(s_T).

λ = 0 gives TD(0) targets G_t = γ V(s_{t+1}) (so G_{T−1} = γ r); λ = 1 with γ = 1 gives the Monte-Carlo
return G_t = r.

The recursion is linear, so it applies unchanged to return *distributions* (γ = 1): with V(s_t) the predicted
histogram over fixed atoms and r as a histogram (:func:`vas.value.heads.two_hot`), G_t is the distributional
λ-return, the mixture (1 − λ)·Σ_{n=1}^{T−t−1} λ^{n−1}·Z(s_{t+n}) + λ^{T−t−1}·δ_r, whose mean is the scalar λ-return
of the means. (The distributional head gives, in r's place, two-hot of its own point value at s_T:
:mod:`vas.value.heads`.)
"""

from __future__ import annotations

import torch


def lambda_returns(
    values: torch.Tensor,
    rewards: torch.Tensor,
    state_mask: torch.Tensor,
    *,
    lam: float = 0.95,
    gamma: float = 1.0,
) -> torch.Tensor:
    """λ-returns G_t for a batch of left-aligned trajectories (paper Sec. 3.3, App. C.1; Sutton & Barto 12.1).

    Args:
        values: (B, S) float, V(s_t) for states t = 0 … S−1, left-aligned (index 0 is s_0); or (B, S, n), a
            distribution over n atoms per state. Entries where ``state_mask`` is 0, and each row's last state
            s_T (whose value is its reward), are ignored. Treated as constants (no gradient flows through the
            targets).
        rewards: (B,) float, the reward of each finished trajectory; (B, n) with distributions.
        state_mask: (B, S) bool or {0, 1}, 1 for real states. Each row must be a prefix of ones of length
            T_b + 1 ≥ 1 (states s_0 … s_{T_b}).
        lam: λ ∈ [0, 1]. 0 → TD(0), 1 → Monte-Carlo (with γ = 1).
        gamma: discount γ ∈ [0, 1].

    Returns:
        (B, S) float32 targets (or (B, S, n)); G_{T_b} = r_b at each row's last state, 0 at masked positions.

    Raises:
        ValueError: if ``lam`` or ``gamma`` is outside [0, 1], shapes disagree, or a row has no state.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if (values.shape[:2] != state_mask.shape or values.dim() not in (2, 3) or state_mask.dim() != 2
            or rewards.shape != values.shape[:1] + values.shape[2:]):
        raise ValueError(
            f"shapes disagree: values {tuple(values.shape)}, state_mask {tuple(state_mask.shape)}, "
            f"rewards {tuple(rewards.shape)}"
        )
    mask = state_mask.bool()
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("every trajectory needs at least one state (s_0)")
    values = values.detach().float()
    rewards = rewards.detach().float().to(values.device)
    last = lengths - 1  # (B,) index of s_T
    B, S = values.shape[:2]
    # the value of the finished state is its reward: bootstrapping from s_T uses r, not V̂(s_T)
    trailing = (1,) * (values.dim() - 2)  # broadcast the per-row masks over a distribution's atoms
    is_last = (torch.arange(S, device=values.device)[None, :] == last[:, None]).view(B, S, *trailing)
    values = torch.where(is_last, rewards[:, None], values)
    returns = torch.zeros_like(values)
    last = last.view(B, *trailing)
    # G at step t+1, carried backwards; rows whose last state is beyond t are reset to r at t == last.
    g_next = torch.zeros_like(rewards)
    for t in range(S - 1, -1, -1):
        if t + 1 < S:
            bootstrap = gamma * ((1.0 - lam) * values[:, t + 1] + lam * g_next)
        else:
            bootstrap = torch.zeros_like(g_next)
        g_t = torch.where(last == t, rewards, bootstrap)
        g_t = torch.where(t > last, torch.zeros_like(g_t), g_t)
        returns[:, t] = g_t
        g_next = g_t
    return returns
