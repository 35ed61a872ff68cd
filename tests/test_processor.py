"""The LogitsProcessor inside model.generate equals the library's own loop, and never serves a stale cache."""

from helpers import random_value_model

from vas.decoding.loop import Steering, sample
from vas.models import left_pad, load_policy, load_tokenizer
from vas.policy.local import LocalPolicy
from vas.decoding.processor import VASLogitsProcessor, generate_kwargs

PROMPTS = [[5, 17, 33, 2, 40], [9, 12], [77, 3, 101, 56, 8, 19, 230]]
OTHER = [[44, 45, 46], [200, 201, 202, 203]]


def ours(policy, prompts, steering):
    local = LocalPolicy(policy, load_tokenizer(policy.name_or_path), eos_token_ids=[2], pad_token_id=2)
    return sample(local, prompts, steering, greedy=True, max_new_tokens=8).token_ids


def theirs(policy, prompts, processor):
    ids, mask = left_pad(prompts, 2)
    out = policy.generate(input_ids=ids, attention_mask=mask, logits_processor=[processor], max_new_tokens=8,
                          pad_token_id=2, eos_token_id=2, **generate_kwargs(greedy=True))
    return out[:, ids.shape[1]:].tolist()


def same(mine, hf):
    """Rows equal up to our row's end (generate pads rows that ended early with the pad/EOS id 2)."""
    return all(row == hf_row[: len(row)] and all(t == 2 for t in hf_row[len(row):]) for row, hf_row in zip(mine, hf))


def test_processor_in_generate_equals_sample(tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    steering = Steering([random_value_model(tiny_model_dir, seed=2)], beta=4.0, top_k=6)
    _, mask = left_pad(PROMPTS, 2)
    assert same(ours(policy, PROMPTS, steering), theirs(policy, PROMPTS, VASLogitsProcessor(steering, mask, temperature=0.7)))


def test_reused_processor_rebuilds_for_new_prompts(tiny_model_dir):
    policy = load_policy(tiny_model_dir)
    steering = Steering([random_value_model(tiny_model_dir, seed=2)], beta=4.0, top_k=6)
    _, mask = left_pad(PROMPTS, 2)
    processor = VASLogitsProcessor(steering, mask, temperature=0.7)
    theirs(policy, PROMPTS, processor)
    # same batch again: the prefix is rewound to the prompt, the caches must be rebuilt
    assert same(ours(policy, PROMPTS, steering), theirs(policy, PROMPTS, processor))
    _, other_mask = left_pad(OTHER, 2)
    processor.reset(other_mask)
    assert same(ours(policy, OTHER, steering), theirs(policy, OTHER, processor))
