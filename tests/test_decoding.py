"""The decoding loop: π0's logprobs against a plain forward pass, β = 0, batch/padding invariance, value-model
composition, per-row EOS, and bad k / prompt lengths."""

import warnings

import pytest
import torch
from helpers import random_value_model

from vas.decoding.loop import Steering, draw, sample
from vas.errors import VasError
from vas.models import load_policy, load_tokenizer
from vas.policy.local import LocalPolicy

PROMPTS = [[5, 17, 33, 2, 40], [9, 12], [77, 3, 101, 56, 8, 19, 230]]


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def value_model(tiny_model_dir):
    return random_value_model(tiny_model_dir, seed=11)


def run(policy, prompts, steering=None, greedy=False, seed=0, eos=(2,), **kw):
    local = LocalPolicy(policy, TOKENIZER[0], eos_token_ids=list(eos), pad_token_id=2)
    return sample(local, prompts, steering, greedy=greedy, max_new_tokens=kw.pop("max_new_tokens", 8),
                  generator=torch.Generator().manual_seed(seed), **kw)


TOKENIZER = []


@pytest.fixture(autouse=True, scope="module")
def _tokenizer(tokenizer):
    TOKENIZER[:] = [tokenizer]


def test_base_logprobs_match_a_full_forward(policy):
    out = run(policy, PROMPTS, temperature=0.7)
    for prompt, tokens, logps in zip(PROMPTS, out.token_ids, out.base_logprobs):
        ids = torch.tensor([prompt + tokens])
        logits = policy(ids).logits[0, len(prompt) - 1 : -1] / 0.7
        expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(logps), expected, atol=1e-4, rtol=0)
    assert out.kl.abs().max() == 0


def test_beta_zero_gives_base_policy(policy, value_model):
    plain = run(policy, PROMPTS, seed=4)
    steered = run(policy, PROMPTS, Steering([value_model], beta=0.0, top_k=5), seed=4)
    assert steered.token_ids == plain.token_ids
    for a, b in zip(steered.logprobs, plain.base_logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    torch.testing.assert_close(steered.kl, torch.zeros(3), atol=1e-6, rtol=0)


def test_steering_changes_the_distribution(policy, value_model):
    steered = run(policy, PROMPTS, Steering([value_model], beta=5.0, top_k=10), greedy=True)
    assert float(steered.kl.min()) > 0  # an independent check that the guidance is live
    for lp, bp in zip(steered.logprobs, steered.base_logprobs):
        assert any(abs(a - b) > 1e-3 for a, b in zip(lp, bp))


def test_greedy_steered_row_alone_equals_row_in_padded_batch(policy, value_model):
    steering = Steering([value_model], beta=3.0, top_k=8)
    batch = run(policy, PROMPTS, steering, greedy=True, max_new_tokens=10)
    for b, prompt in enumerate(PROMPTS):
        alone = run(policy, [prompt], steering, greedy=True, max_new_tokens=10)
        assert alone.token_ids[0] == batch.token_ids[b]
        torch.testing.assert_close(alone.kl[0], batch.kl[b], atol=1e-4, rtol=1e-4)


def test_weighted_value_models_equal_one_summed_model(policy, tiny_model_dir):
    # Two value models sharing one backbone (identical LoRA) with different heads: w1·V1 + w2·V2 is the
    # value model whose head is w1·h1 + w2·h2.
    first = random_value_model(tiny_model_dir, seed=21)
    second = random_value_model(tiny_model_dir, seed=21)
    summed = random_value_model(tiny_model_dir, seed=21)
    with torch.no_grad():
        torch.nn.init.normal_(second.head.weight, std=1.0)
        second.head.bias.fill_(-0.3)
        summed.head.weight.copy_(0.7 * first.head.weight + 1.5 * second.head.weight)
        summed.head.bias.copy_(0.7 * first.head.bias + 1.5 * second.head.bias)
    composed = run(policy, PROMPTS, Steering([first, second], [0.7, 1.5], beta=2.0, top_k=6), seed=9)
    single = run(policy, PROMPTS, Steering([summed], beta=2.0, top_k=6), seed=9)
    assert composed.token_ids == single.token_ids
    for a, b in zip(composed.logprobs, single.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)
    torch.testing.assert_close(composed.kl, single.kl, atol=1e-4, rtol=1e-4)


def test_each_row_stops_at_its_own_eos(policy):
    free = run(policy, PROMPTS, greedy=True, eos=())  # no EOS: every row runs to max_new_tokens
    # declare a token that only row 1 generates an EOS: row 1 ends there, the other rows run on unchanged
    others = set(free.token_ids[0]) | set(free.token_ids[2])
    stop = next(t for t in free.token_ids[1] if t not in others)
    out = run(policy, PROMPTS, greedy=True, eos=(stop,))
    assert out.token_ids[1] == free.token_ids[1][: free.token_ids[1].index(stop) + 1]
    assert out.finished.tolist() == [False, True, False]
    assert out.token_ids[0] == free.token_ids[0] and out.token_ids[2] == free.token_ids[2]
    assert out.steps.tolist() == [8, len(out.token_ids[1]), 8]


def test_a_mixed_batch_equals_each_row_alone(policy, tiny_model_dir):
    """Per-row β and weights: one batch of three users' settings gives what each row gives alone."""
    models = [random_value_model(tiny_model_dir, seed=31), random_value_model(tiny_model_dir, seed=32)]
    beta = torch.tensor([0.0, 3.0, -2.0])
    weights = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.5, 2.0]])
    batch = run(policy, PROMPTS, Steering(models, weights, beta=beta, top_k=6), greedy=True, max_new_tokens=6)
    for b, prompt in enumerate(PROMPTS):
        alone = run(policy, [prompt], Steering(models, weights[b].tolist(), beta=float(beta[b]), top_k=6),
                    greedy=True, max_new_tokens=6)
        assert alone.token_ids[0] == batch.token_ids[b]
        torch.testing.assert_close(alone.kl[0], batch.kl[b], atol=1e-4, rtol=1e-4)
    assert float(batch.kl[0]) == 0 and float(batch.kl[1]) > 0 and float(batch.kl[2]) > 0


@pytest.mark.parametrize("k", [5, "all"])
def test_a_next_head_batch_equals_each_row_alone_as_rows_finish(policy, tiny_model_dir, k):
    """Rows that end early (EOS) stop feeding the next head's state while the others go on: each row of the batch
    gives what it gives alone, token for token, with the same KL."""
    model = random_value_model(tiny_model_dir, seed=33, head="next")
    steering = Steering([model], beta=2.0, top_k=k)
    eos = tuple(range(2, 300, 9))  # many ends, so that rows finish at different steps
    batch = run(policy, PROMPTS, steering, greedy=True, eos=eos, max_new_tokens=12)
    assert len(set(batch.steps.tolist())) > 1 and float(batch.kl.min()) > 0
    for b, prompt in enumerate(PROMPTS):
        alone = run(policy, [prompt], steering, greedy=True, eos=eos, max_new_tokens=12)
        assert alone.token_ids[0] == batch.token_ids[b]
        torch.testing.assert_close(alone.kl[0], batch.kl[b], atol=1e-4, rtol=1e-4)


def test_a_batch_at_beta_zero_does_no_value_model_work(policy, value_model, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a value model was called at β = 0")

    monkeypatch.setattr(type(value_model), "forward", fail)
    out = run(policy, PROMPTS, Steering([value_model], beta=torch.zeros(3), top_k=5), seed=4)
    assert out.token_ids == run(policy, PROMPTS, seed=4).token_ids


@pytest.mark.parametrize("k, message", [(0, "must be an integer ≥ 1 or .all., got 0"), (-1, "must be an integer ≥ 1 or .all., got -1"),
                                        (10**6, "must be between 1 and the vocabulary size")])
def test_bad_k(policy, value_model, k, message):
    with pytest.raises(VasError, match=message):
        run(policy, PROMPTS, Steering([value_model], beta=1.0, top_k=k))


def test_prompt_longer_than_context_window(policy):
    with pytest.raises(VasError, match="exceeds the context window of 256"):
        run(policy, [[5] * 250], max_new_tokens=8)


def test_draw_matches_the_distribution_and_never_draws_zero_probability_tokens():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    logprobs = probs.log().expand(20000, 2, 5).reshape(40000, 5)
    tokens = draw(logprobs, torch.Generator().manual_seed(0)).view(20000, 2)
    counts = torch.stack([torch.bincount(tokens[:, r], minlength=5) for r in range(2)]).float() / 20000
    # 4 standard errors of a frequency estimated from 20000 draws is < 0.015.
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)
    assert counts[0, 1] == 0 and counts[0, 4] == 0 and counts[1, 4] == 1


def test_decoding_uses_no_deprecated_cache_argument(policy, value_model):
    # transformers 5.x renamed forward's past_key_values to cache and removes the old name in 5.40.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        run(policy, PROMPTS, Steering([value_model], beta=2.0, top_k=4), max_new_tokens=3)
