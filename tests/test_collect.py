"""Collection: resuming an interrupted run gives the same rows; bad rewards write nothing."""

import pytest
import torch

from vas.collect import COLUMNS, collect
from vas.config import CollectConfig
from vas.errors import VasError
from vas.models import load_policy, load_tokenizer
from vas.policy.local import LocalPolicy

PROMPTS = ["hello how are you", "what a day", "i hate it", "tell me the news", "great", "please write"]


def length_reward(prompts, responses):
    return torch.tensor([len(r) / 10 for r in responses])


class FailingPolicy(LocalPolicy):
    """π0, but failing when batch number ``fail_at`` starts (an interrupted job)."""

    def __init__(self, model, tokenizer, fail_at):
        super().__init__(model, tokenizer)
        self.calls, self.fail_at = 0, fail_at

    def start(self, prompts, max_new_tokens):
        self.calls += 1
        if self.calls == self.fail_at:
            raise VasError("injected failure")
        return super().start(prompts, max_new_tokens)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_policy(tiny_model_dir), load_tokenizer(tiny_model_dir)


def run(model, reward, out, fail_at=None, samples_per_prompt=2):
    policy = FailingPolicy(*model, fail_at=fail_at)
    return collect(policy, PROMPTS, reward, out,
                   CollectConfig(samples_per_prompt=samples_per_prompt, max_new_tokens=6, batch_size=4, seed=3),
                   progress=False)


def test_resume_gives_the_same_rows(model, tmp_path):
    whole = run(model, length_reward, tmp_path / "whole")
    assert len(whole) == 12 and set(COLUMNS) <= set(whole.column_names)
    with pytest.raises(VasError, match="injected failure; 4 of 12 finished responses are kept in .*resumed.partial"):
        run(model, length_reward, tmp_path / "resumed", fail_at=2)  # batch 0 kept, batch 1 failed
    assert not (tmp_path / "resumed").exists()
    kept = (tmp_path / "resumed.partial").read_text().splitlines()[1:]
    assert len(kept) == 4  # the settings line, then one row per response of batch 0
    resumed = run(model, length_reward, tmp_path / "resumed")
    assert resumed.to_list() == whole.to_list()
    assert not (tmp_path / "resumed.partial").exists()
    # rewards are the reward of the stored text, and prompts repeat samples_per_prompt times
    assert whole["prompt_index"] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert whole["reward"] == pytest.approx([len(r) / 10 for r in whole["response"]])


def test_resume_with_other_settings_is_refused(model, tmp_path):
    with pytest.raises(VasError, match="injected failure"):
        run(model, length_reward, tmp_path / "d", fail_at=2)
    with pytest.raises(VasError, match=r"other settings \(the prompts, --samples-per-prompt\)"):
        run(model, length_reward, tmp_path / "d", samples_per_prompt=3)


def test_non_finite_reward_writes_no_dataset_and_keeps_the_responses(model, tmp_path):
    def nan_reward(prompts, responses):
        return torch.full((len(responses),), float("nan"))

    with pytest.raises(VasError, match="non-finite"):
        run(model, nan_reward, tmp_path / "nan")
    assert not (tmp_path / "nan").exists()
    assert len((tmp_path / "nan.partial").read_text().splitlines()) == 1 + 12  # nothing sampled is lost
    resumed = run(model, length_reward, tmp_path / "nan", fail_at=1)  # a fixed reward: no sampling at all
    assert resumed.to_list() == run(model, length_reward, tmp_path / "whole").to_list()
    assert not (tmp_path / "nan.partial").exists()


def test_existing_output_is_refused(model, tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(VasError, match="exists already"):
        run(model, length_reward, tmp_path / "x")


def test_settings_are_checked_when_the_config_is_made(model, tmp_path):
    """The checks `vas collect` makes hold for a library user too: a setting ≤ 0, a value tokenizer with a local π0."""
    with pytest.raises(VasError, match=r"^--samples-per-prompt must be > 0, got 0$"):
        CollectConfig(samples_per_prompt=0)
    with pytest.raises(VasError, match=r"^--temperature must be > 0, got -1.0$"):
        CollectConfig(temperature=-1.0)
    with pytest.raises(VasError, match="--value-backbone is for collecting through an API"):
        collect(LocalPolicy(*model), PROMPTS, length_reward, tmp_path / "x", CollectConfig(), value_tokenizer=model[1])
    assert not (tmp_path / "x").exists()
