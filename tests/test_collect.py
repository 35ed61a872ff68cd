"""Collection: resuming an interrupted run gives the same rows; bad rewards write nothing."""

import pytest
import torch

from vas.collect import COLUMNS, collect
from vas.errors import VasError
from vas.models import load_policy, load_tokenizer

PROMPTS = ["hello how are you", "what a day", "i hate it", "tell me the news", "great", "please write"]


def length_reward(prompts, responses):
    return torch.tensor([len(r) / 10 for r in responses])


class FailingReward:
    """Scores like ``length_reward`` but raises on call number ``fail_at`` (an interrupted job)."""

    def __init__(self, fail_at):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, prompts, responses):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return length_reward(prompts, responses)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_policy(tiny_model_dir), load_tokenizer(tiny_model_dir)


def run(model, reward, out):
    policy, tokenizer = model
    return collect(policy, tokenizer, PROMPTS, reward, out, samples_per_prompt=2, max_new_tokens=6,
                   batch_size=4, seed=3, progress=False)


def test_resume_gives_the_same_rows(model, tmp_path):
    whole = run(model, length_reward, tmp_path / "whole")
    assert len(whole) == 12 and set(COLUMNS) <= set(whole.column_names)
    with pytest.raises(KeyboardInterrupt):
        run(model, FailingReward(fail_at=2), tmp_path / "resumed")  # chunk 0 saved, chunk 1 lost
    assert not (tmp_path / "resumed").exists()
    assert sorted(p.name for p in (tmp_path / "resumed.partial").glob("shard-*")) == ["shard-00000"]
    resumed = run(model, length_reward, tmp_path / "resumed")
    assert resumed.to_list() == whole.to_list()
    assert not (tmp_path / "resumed.partial").exists()
    # rewards are the reward of the stored text, and prompts repeat samples_per_prompt times
    assert whole["prompt_index"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert whole["reward"] == pytest.approx([len(r) / 10 for r in whole["response"]])


def test_resume_with_other_settings_is_refused(model, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(model, FailingReward(fail_at=2), tmp_path / "d")
    policy, tokenizer = model
    with pytest.raises(VasError, match="other settings"):
        collect(policy, tokenizer, PROMPTS, length_reward, tmp_path / "d", samples_per_prompt=3,
                max_new_tokens=6, batch_size=4, seed=3, progress=False)


def test_non_finite_reward_writes_nothing(model, tmp_path):
    def nan_reward(prompts, responses):
        return torch.full((len(responses),), float("nan"))

    with pytest.raises(VasError, match="non-finite"):
        run(model, nan_reward, tmp_path / "nan")
    assert not (tmp_path / "nan").exists() and not (tmp_path / "nan.partial").exists()


def test_existing_output_is_refused(model, tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(VasError, match="exists already"):
        run(model, length_reward, tmp_path / "x")
