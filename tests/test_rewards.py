"""Rewards: hand-worked word counts, weighted specs, the classifier reward against a direct forward pass,
callables, and the checks on what a reward returns."""

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from vas.errors import VasError
from vas.models import load_tokenizer
from vas.rewards import ClassifierReward, load_reward, score

RESPONSES = ["I love this, what a wonderful day!", "This is awful and I hate it.", "one two three"]


def test_word_count_rewards_by_hand():
    assert load_reward("verbosity")(["p"] * 3, RESPONSES).tolist() == pytest.approx([0.07, 0.07, 0.03])
    assert load_reward("brevity")(["p"] * 3, RESPONSES).tolist() == pytest.approx([-0.07, -0.07, -0.03])
    # 2·verbosity + 0.5·brevity = 1.5·words/100
    assert load_reward("verbosity=2, brevity=0.5")(["p"] * 3, RESPONSES).tolist() == pytest.approx([0.105, 0.105, 0.045])


def test_positivity_and_offensiveness_order_responses():
    pos = load_reward("positivity")(["p"] * 3, RESPONSES)
    assert pos[0] > 0.5 and pos[1] < -0.5 and pos[2] == 0.0  # VADER compound: neutral text scores exactly 0
    off = load_reward("offensive")(["p"] * 2, ["you are a stupid idiot", "have a nice day"])
    assert off[0] > 0.5 > off[1] and bool(((off >= 0) & (off <= 1)).all())


def test_classifier_reward_matches_direct_forward(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    reward = ClassifierReward(str(tmp_path / "rm"), label=1)
    got = reward(["hello", "what a day"], ["fine thanks", "great news"])
    for i, (p, r) in enumerate([("hello", "fine thanks"), ("what a day", "great news")]):
        enc = tokenizer(p, r, return_tensors="pt")
        assert got[i].item() == pytest.approx(model(**enc).logits[0, 1].item(), abs=1e-5)
    assert load_reward(f"hf:{tmp_path / 'rm'}")(["a"], ["b"]).shape == (1,)


def test_callable_reward(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text("def exclaim(prompts, responses):\n    return [r.count('!') for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("myrewards", None)
    assert load_reward("py:myrewards:exclaim")(["p", "p"], ["hi!!", "no"]).tolist() == [2.0, 0.0]


def test_callable_reward_from_the_current_folder(tmp_path, monkeypatch):
    """The `vas` script does not put the current folder on sys.path (python -m does): a py: reward module there is
    found all the same; a module that is nowhere gets a message saying where it was looked for."""
    import os

    (tmp_path / "herereward.py").write_text("def f(prompts, responses):\n    return [len(r) for r in responses]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") != str(tmp_path)])
    sys.modules.pop("herereward", None)
    assert load_reward("py:herereward:f")(["p", "p"], ["abc", ""]).tolist() == [3.0, 0.0]
    with pytest.raises(VasError, match=r"no module 'nowhere_xyz' in the current folder or on PYTHONPATH \(run vas "
                                       r"where nowhere_xyz.py is, or set PYTHONPATH to its folder\)"):
        load_reward("py:nowhere_xyz:f")


def test_bad_specs_and_outputs():
    with pytest.raises(VasError, match="unknown reward 'happiness'"):
        load_reward("happiness")
    with pytest.raises(VasError, match="bad weight"):
        load_reward("positivity=lots")
    with pytest.raises(VasError, match="cannot import reward function"):
        load_reward("py:no_such_module_xyz:f")
    with pytest.raises(VasError, match="non-finite value"):
        score(lambda p, r: torch.tensor([1.0, float("nan")]), ["a", "b"], ["x", "y"])
    with pytest.raises(VasError, match="returned 1 values for 2 responses"):
        score(lambda p, r: torch.tensor([1.0]), ["a", "b"], ["x", "y"])
