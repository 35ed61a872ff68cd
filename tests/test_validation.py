"""App. C.1's halfway labels and the value model's error on them, checked by independent bookkeeping."""

import pytest
import torch
from helpers import random_value_model

from vas.errors import VasError
from vas.models import load_policy, load_tokenizer
from vas.prompts import encode_prompts
from vas.experiments.validation import halfway_labels, value_mse


class Recording:
    """Reward = characters / 10, remembering every (prompt, text) it scores."""

    def __init__(self):
        self.seen = []

    def __call__(self, prompts, responses):
        self.seen += list(zip(prompts, responses))
        return torch.tensor([len(r) / 10 for r in responses])


def test_halfway_labels_are_means_over_completions_of_the_first_half(tiny_model_dir):
    policy, tokenizer = load_policy(tiny_model_dir), load_tokenizer(tiny_model_dir)
    prompts = ["hello there", "what a day", "i hate it"]
    prompt_ids = encode_prompts(tokenizer, prompts)
    responses = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]  # halves: 3, 1 and 0 tokens kept
    reward = Recording()
    labels = halfway_labels(policy, tokenizer, prompts, prompt_ids, responses, reward, completions=4,
                            max_new_tokens=8, batch_size=8, seed=1)
    assert labels.prefix_ids == [[5, 6, 7], [11], []]
    assert len(reward.seen) == 3 * 4
    for i, prompt in enumerate(prompts):
        texts = [t for p, t in reward.seen if p == prompt]
        prefix = tokenizer.decode(labels.prefix_ids[i], skip_special_tokens=True)
        assert len(texts) == 4 and all(t.startswith(prefix) for t in texts)
        rewards = torch.tensor([len(t) / 10 for t in texts])
        assert float(labels.labels[i]) == pytest.approx(float(rewards.mean()), abs=1e-6)
        assert float(labels.label_variance[i]) == pytest.approx(float(rewards.var() / 4), abs=1e-6)


def test_value_mse_matches_unpadded_forward(tiny_model_dir):
    policy, tokenizer = load_policy(tiny_model_dir), load_tokenizer(tiny_model_dir)
    prompts = ["hello there", "what a lovely long day it is", "i"]
    prompt_ids = encode_prompts(tokenizer, prompts)
    labels = halfway_labels(policy, tokenizer, prompts, prompt_ids, [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15]],
                            lambda p, r: torch.tensor([len(x) / 10 for x in r]), completions=3, max_new_tokens=6)
    model = random_value_model(tiny_model_dir, seed=3)
    with torch.no_grad():  # each state alone, no padding: V at its last token
        direct = torch.stack([model(torch.tensor([p + r]), torch.ones(1, len(p) + len(r), dtype=torch.long))[0, -1]
                              for p, r in zip(labels.prompt_ids, labels.prefix_ids)])
    got = value_mse(model, labels, tokenizer.pad_token_id)
    assert got["mse"] == pytest.approx(float((direct - labels.labels).square().mean()), rel=1e-5)
    variance = float(((labels.labels - labels.labels.mean()) ** 2).mean())
    assert got["label_variance"] == pytest.approx(variance, rel=1e-5)
    assert got["explained"] == pytest.approx(1 - got["mse"] / variance, rel=1e-5)


def test_halfway_labels_reject_bad_input(tiny_model_dir):
    policy, tokenizer = load_policy(tiny_model_dir), load_tokenizer(tiny_model_dir)
    ids = encode_prompts(tokenizer, ["a"])
    with pytest.raises(VasError, match="longer than max_new_tokens"):
        halfway_labels(policy, tokenizer, ["a"], ids, [[1, 2, 3]], Recording(), max_new_tokens=2)
    with pytest.raises(VasError, match="at least 2"):
        halfway_labels(policy, tokenizer, ["a"], ids, [[1]], Recording(), completions=1, max_new_tokens=2)
