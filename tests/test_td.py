"""λ-returns against hand-worked trajectories and the forward-view definition (Sutton & Barto eq. 12.3)."""

import pytest
import torch

from vas.value.td import lambda_returns

# One trajectory s_0 … s_3 (T = 3), reward 1 at the end. V(s_3) = 0.9 is ignored: G_3 = r.
VALUES = torch.tensor([[0.1, 0.4, 0.7, 0.9]])
MASK = torch.ones(1, 4, dtype=torch.bool)
REWARD = torch.tensor([1.0])


@pytest.mark.parametrize(
    "lam, expected",
    [
        (0.0, [0.4, 0.7, 1.0, 1.0]),  # TD(0): G_t = V(s_{t+1}), and V(s_3) is the reward, not 0.9
        (1.0, [1.0, 1.0, 1.0, 1.0]),  # Monte-Carlo: G_t = r
        # G_2 = .05·r + .95·1 = 1; G_1 = .05·.7 + .95·1 = .985; G_0 = .05·.4 + .95·.985 = .95575
        (0.95, [0.95575, 0.985, 1.0, 1.0]),
    ],
)
def test_hand_worked_trajectory(lam, expected):
    got = lambda_returns(VALUES, REWARD, MASK, lam=lam, gamma=1.0)
    torch.testing.assert_close(got, torch.tensor([expected]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("lam, expected", [(0.0, [0.4, 1.0, 1.0]), (0.5, [0.7, 1.0, 1.0])])
def test_state_before_the_end_bootstraps_from_the_reward(lam, expected):
    # V(s_0), V(s_1), V(s_2) = 0.2, 0.4, 0.7 with s_2 finished and r = 1: the prediction 0.7 must not be used.
    # λ = 0.5: G_1 = .5·r + .5·G_2 = 1; G_0 = .5·.4 + .5·1 = .7
    got = lambda_returns(torch.tensor([[0.2, 0.4, 0.7]]), REWARD, torch.ones(1, 3, dtype=torch.bool), lam=lam)
    torch.testing.assert_close(got, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_discount_with_monte_carlo():
    got = lambda_returns(VALUES, REWARD, MASK, lam=1.0, gamma=0.9)
    torch.testing.assert_close(got, torch.tensor([[0.729, 0.81, 0.9, 1.0]]), atol=1e-6, rtol=0)


def forward_view(values, reward, lam, gamma):
    """G^λ_t = (1−λ) Σ_{n=1}^{T−t} λ^{n−1} G^{(n)}_t + λ^{T−t} γ^{T−t} r, with n-step returns
    G^{(n)}_t = γ^n V(s_{t+n}) (no intermediate reward), where V(s_T) = r: the finished state's value is its
    reward."""
    T = len(values) - 1
    values = values[:T] + [reward]
    out = []
    for t in range(T + 1):
        if t == T:
            out.append(reward)
            continue
        g = sum((1 - lam) * lam ** (n - 1) * gamma**n * values[t + n] for n in range(1, T - t + 1))
        g += lam ** (T - t) * gamma ** (T - t) * reward
        out.append(g)
    return out


def test_variable_lengths_match_forward_view():
    torch.manual_seed(0)
    lengths = [5, 2, 1, 7]
    width = max(lengths)
    values = torch.randn(4, width)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    rewards = torch.randn(4)
    got = lambda_returns(values, rewards, mask, lam=0.8, gamma=0.97)
    for b, n in enumerate(lengths):
        expected = forward_view(values[b, :n].tolist(), float(rewards[b]), 0.8, 0.97)
        torch.testing.assert_close(got[b, :n], torch.tensor(expected), atol=1e-5, rtol=0)
        assert bool((got[b, n:] == 0).all())


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="lam"):
        lambda_returns(VALUES, REWARD, MASK, lam=1.5)
    with pytest.raises(ValueError, match="at least one state"):
        lambda_returns(VALUES, REWARD, torch.zeros(1, 4, dtype=torch.bool))
