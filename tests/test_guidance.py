"""Eq. 5 and the exact KL against hand-worked numbers."""

import math

import pytest
import torch

from vas.decoding.guidance import kl_divergence, steered_logprobs

BASE = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))


def test_eq5_hand_worked():
    # candidates {0, 1} with V = 1, 0; non-candidate 2 gets mean V = 0.5; β = 2
    got = steered_logprobs(BASE, torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]), beta=2.0).exp()
    unnormalised = torch.tensor([0.5 * math.e**2, 0.3 * math.e**0, 0.2 * math.e**1])
    torch.testing.assert_close(got, (unnormalised / unnormalised.sum())[None], atol=1e-6, rtol=0)


def test_masked_variant_hand_worked():
    # App. D.1's masked ablation: token 2 (outside the top-k) gets probability 0, the rest as in Eq. 5
    got = steered_logprobs(BASE, torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]), beta=2.0,
                           mask_outside_top_k=True).exp()
    unnormalised = torch.tensor([0.5 * math.e**2, 0.3, 0.0])
    torch.testing.assert_close(got, (unnormalised / unnormalised.sum())[None], atol=1e-6, rtol=0)
    assert math.isfinite(float(kl_divergence(got.log(), BASE)))


def test_beta_zero_is_base_policy():
    torch.manual_seed(0)
    base = torch.log_softmax(torch.randn(4, 50), dim=-1)
    cands = base.topk(7, dim=-1).indices
    got = steered_logprobs(base, cands, torch.randn(4, 7) * 10, beta=0.0)
    assert torch.equal(got, base)  # π0 bit for bit, not renormalised
    mixed = steered_logprobs(base, cands, torch.randn(4, 7) * 10, beta=torch.tensor([0.0, 2.0, 0.0, -1.0]))
    assert torch.equal(mixed[[0, 2]], base[[0, 2]]) and not torch.allclose(mixed[1], base[1])


def test_equal_values_leave_policy_unchanged():
    # V constant over the candidates → every token gets the same bonus → π = π0 whatever β
    got = steered_logprobs(BASE, torch.tensor([[2, 0]]), torch.tensor([[0.7, 0.7]]), beta=9.0)
    torch.testing.assert_close(got, BASE, atol=1e-6, rtol=0)


def test_kl_hand_worked():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    q = torch.tensor([[0.25, 0.25, 0.5]])
    # Σ p log(p/q) = 2 · 0.5 · log 2; the zero-probability token contributes nothing
    got = kl_divergence(p.log(), q.log())
    torch.testing.assert_close(got, torch.tensor([math.log(2.0)]), atol=1e-6, rtol=0)
    torch.testing.assert_close(kl_divergence(q.log(), q.log()), torch.zeros(1), atol=1e-7, rtol=0)


def test_rejects_non_finite_values():
    with pytest.raises(ValueError, match="non-finite"):
        steered_logprobs(BASE, torch.tensor([[0, 1]]), torch.tensor([[float("nan"), 0.0]]), beta=1.0)


@pytest.mark.parametrize("beta, chosen", [(3e38, 0), (-3e38, 1), (1e30, 0)])
def test_huge_beta_gives_the_limit_and_a_finite_kl(beta, chosen):
    # |β|·ΔV overflows float32: π must still be the limit, all mass on the candidate with the largest β·V, and
    # KL(π‖π0) = −log π0(that candidate): log 2 for token 0, −log 0.3 for token 1
    got = steered_logprobs(BASE, torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]), beta=torch.tensor([beta]))
    expected = torch.zeros(3)
    expected[chosen] = 1.0
    torch.testing.assert_close(got.exp(), expected[None], atol=1e-6, rtol=0)
    torch.testing.assert_close(kl_divergence(got, BASE), -BASE[0, chosen:chosen + 1], atol=1e-6, rtol=0)


def test_rejects_beta_that_is_not_finite_in_float32():
    with pytest.raises(ValueError, match="beta must be a finite float32"):
        steered_logprobs(BASE, torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]), beta=1e39)


def test_extreme_kl_warning_threshold():
    from vas.decoding.guidance import EXTREME_KL_PER_TOKEN, extreme_kl_warning

    assert extreme_kl_warning(EXTREME_KL_PER_TOKEN * 10, 10) is None
    assert "1.50 nats per token" in extreme_kl_warning(15.0, 10)
    assert extreme_kl_warning(0.0, 0) is None
