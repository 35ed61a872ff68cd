"""Value training: the batch layout by hand, learning a learnable signal, save/reload, resume."""

import datasets
import pytest
import torch

from vas.config import TrainConfig
from vas.errors import VasError
from vas.models import load_tokenizer
from vas.storage import load_dataset_dir
from vas.value.train import ValueCollator, split_by_prompt, train_value_model
from vas.value.model import ValueModel


def test_collator_layout_by_hand():
    batch = ValueCollator(pad_token_id=0)([
        {"prompt_ids": [1, 2, 3], "response_ids": [4, 5], "reward": 0.5},
        {"prompt_ids": [6], "response_ids": [7, 8, 9, 10], "reward": -1.0},
    ])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    # states s_0 … s_T sit at the last prompt token … the last response token
    assert batch["state_index"].tolist() == [[2, 3, 4, 0, 0], [0, 1, 2, 3, 4]]
    assert batch["state_mask"].tolist() == [[True, True, True, False, False], [True] * 5]
    assert batch["reward"].tolist() == [0.5, -1.0]


def make_data(tokenizer, n_prompts=24):
    """Reward 1 for prompts that mention 'happy', 0 otherwise; V(s) can learn it from the prompt."""
    rows = {"prompt_ids": [], "response_ids": [], "reward": [], "prompt_index": []}
    g = torch.Generator().manual_seed(0)
    for i in range(n_prompts):
        happy = i % 2 == 0
        text = f"{'happy' if happy else 'awful'} news number {i}"
        for _ in range(2):
            rows["prompt_ids"].append(tokenizer(text)["input_ids"])
            rows["response_ids"].append(torch.randint(3, 250, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist())
            rows["reward"].append(1.0 if happy else 0.0)
            rows["prompt_index"].append(i)
    return datasets.Dataset.from_dict(rows)


def test_training_learns_a_learnable_signal(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    data = make_data(tokenizer)
    config = TrainConfig(backbone=tiny_model_dir, epochs=8, learning_rate=3e-3, batch_size=8, lora_rank=8,
                         val_fraction=0.25, lam=0.95)
    lines = []
    metrics = train_value_model(data, tmp_path / "v", config, tokenizer=tokenizer, progress=False, log=lines.append)
    # rewards are 0/1 with mean ½: the initial model (every V = the mean reward) has MSE 0.25
    last = metrics["history"][-1]
    assert last["eval_mc_mse"] < 0.1
    # the baseline: the reward's variance over the validation states, each response counted once per state
    _, val = split_by_prompt(data, 0.25, seed=0)
    weights = torch.tensor([len(r) + 1.0 for r in val["response_ids"]], dtype=torch.float64)
    rewards = torch.tensor(val["reward"], dtype=torch.float64)
    mean = (weights * rewards).sum() / weights.sum()
    assert last["eval_reward_var"] == pytest.approx(float((weights * (rewards - mean) ** 2).sum() / weights.sum()))
    assert last["eval_explained"] == pytest.approx(1 - last["eval_mc_mse"] / last["eval_reward_var"])
    assert len(lines) == 8 and lines[-1].startswith("epoch 8.00: validation MSE to the rewards ")
    model = ValueModel.from_pretrained(tmp_path / "v")
    happy, awful = (torch.tensor([tokenizer(f"{w} news number 99")["input_ids"]]) for w in ("happy", "awful"))
    assert model(happy, torch.ones_like(happy))[0, -1] > 0.7
    assert model(awful, torch.ones_like(awful))[0, -1] < 0.3


@pytest.mark.parametrize("head", ["mean", "distributional"])
def test_every_head_learns_a_learnable_signal(tiny_model_dir, tmp_path, head):
    """The mean and distributional heads learn the same signal as the last-token head, and reload with their head;
    the distributional head's atoms span the training rewards."""
    tokenizer = load_tokenizer(tiny_model_dir)
    data = make_data(tokenizer)
    config = TrainConfig(backbone=tiny_model_dir, epochs=8, learning_rate=3e-3, batch_size=8, lora_rank=8,
                         val_fraction=0.25, lam=0.95, head=head, bins=11 if head == "distributional" else 51)
    metrics = train_value_model(data, tmp_path / "v", config, tokenizer=tokenizer, progress=False)
    assert metrics["history"][-1]["eval_mc_mse"] < 0.1  # the constant ½ has 0.25
    model = ValueModel.from_pretrained(tmp_path / "v")
    assert model.kind == head
    if head == "distributional":
        assert model.support.tolist() == pytest.approx(torch.linspace(0, 1, 11).tolist())
    happy, awful = (torch.tensor([tokenizer(f"{w} news number 99")["input_ids"]]) for w in ("happy", "awful"))
    length = torch.tensor([happy.shape[1]])
    assert model(happy, torch.ones_like(happy), prompt_lengths=length)[0, -1] > 0.7
    assert model(awful, torch.ones_like(awful), prompt_lengths=length)[0, -1] < 0.3


def test_evaluation_line_by_hand():
    from vas.value.train import describe_evaluation

    metrics = {"eval_mc_mse": 0.05, "eval_reward_var": 0.2, "eval_explained": 0.75, "eval_loss": 0.01,
               "eval_final_mse": 0.02}
    assert describe_evaluation(metrics, 1.0) == (
        "epoch 1.00: validation MSE to the rewards 0.0500, against their variance 0.2000: 75% explained "
        "(MSE to the TD(λ) targets 0.0100, at finished responses 0.0200)")
    worse = describe_evaluation({**metrics, "eval_mc_mse": 0.255, "eval_reward_var": 0.218, "eval_explained": -0.17}, 1.0)
    assert "-17% explained" in worse and "worse than predicting the mean reward" in worse
    weak = describe_evaluation({**metrics, "eval_mc_mse": 0.213, "eval_reward_var": 0.218, "eval_explained": 0.023}, 2.0)
    assert "2% explained" in weak and weak.endswith("a weak value model, barely better than predicting the mean "
                                                    "reward: VAS will steer little (more data or epochs may help)")


def test_same_seed_same_value_model_whatever_the_global_rng(tiny_model_dir, tmp_path):
    """CPU training is a function of the seed, data and settings: the global generators' state before the call
    (which the demo's collection stage moves) changes nothing, bit for bit."""
    from safetensors.torch import load_file

    tokenizer = load_tokenizer(tiny_model_dir)
    data = make_data(tokenizer, n_prompts=8)
    config = TrainConfig(backbone=tiny_model_dir, epochs=1, learning_rate=1e-3, batch_size=4, lora_rank=4,
                         val_fraction=0.25, seed=3)
    weights = []
    for run, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)
        train_value_model(data, tmp_path / f"v{run}", config, tokenizer=tokenizer, progress=False)
        weights.append({**load_file(tmp_path / f"v{run}" / "value_head.safetensors"),
                        **load_file(tmp_path / f"v{run}" / "adapter_model.safetensors")})
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_split_keeps_prompts_together(tiny_model_dir):
    data = make_data(load_tokenizer(tiny_model_dir), n_prompts=10)
    train, val = split_by_prompt(data, 0.2, seed=0)
    assert len(val) == 4 and len(train) == 16
    assert not set(train["prompt_index"]) & set(val["prompt_index"])


def test_non_finite_reward_refused(tiny_model_dir, tmp_path):
    data = datasets.Dataset.from_dict({"prompt_ids": [[1, 2]] * 4, "response_ids": [[3]] * 4,
                                       "reward": [0.0, float("inf"), 1.0, 0.0], "prompt_index": [0, 1, 2, 3]})
    with pytest.raises(VasError, match="non-finite"):
        train_value_model(data, tmp_path / "v", TrainConfig(backbone=tiny_model_dir), tokenizer=load_tokenizer(tiny_model_dir),
                          progress=False)
    assert not (tmp_path / "v").exists()


def test_dataset_missing_columns(tmp_path):
    datasets.Dataset.from_dict({"prompt_ids": [[1]], "reward": [1.0]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(VasError, match="lacks required columns: response_ids"):
        load_dataset_dir(tmp_path / "d", {"prompt_ids", "response_ids", "reward"})


class Interrupt(Exception):
    pass


def test_rerun_resumes_from_the_checkpoint(tiny_model_dir, tmp_path):
    """An interrupted run, called again with the same settings and data, resumes at its last checkpoint's step
    with that checkpoint's weights and ends with the uninterrupted run's value model, bit for bit; called with
    other settings or data, it is refused."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class StopAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                raise Interrupt

    class FirstStep(TrainerCallback):
        seen = []

        def on_step_begin(self, args, state, control, model=None, **kw):
            self.seen.append((state.global_step, float(model.head.bias.detach())))

    tokenizer = load_tokenizer(tiny_model_dir)
    data = make_data(tokenizer, n_prompts=12)
    kwargs = dict(config=TrainConfig(backbone=tiny_model_dir, epochs=2, learning_rate=1e-3, batch_size=4, lora_rank=4,
                                     val_fraction=0.25, save_steps=2), tokenizer=tokenizer, progress=False)
    train_value_model(data, tmp_path / "whole", **kwargs)
    with pytest.raises(Interrupt):
        train_value_model(data, tmp_path / "resumed", callbacks=[StopAtStep3()], **kwargs)
    assert not (tmp_path / "resumed").exists()
    saved_bias = float(load_file(tmp_path / "resumed.checkpoints" / "checkpoint-2" / "value_head.safetensors")["bias"])
    other = {**kwargs, "config": TrainConfig(**{**kwargs["config"].__dict__, "learning_rate": 2e-3})}
    with pytest.raises(VasError, match=r"resumed.checkpoints holds an interrupted run with other settings "
                                       r"\(--lr\): restore them"):
        train_value_model(data, tmp_path / "resumed", **other)
    with pytest.raises(VasError, match=r"other settings \(the data\)"):
        train_value_model(make_data(tokenizer, n_prompts=14), tmp_path / "resumed", **kwargs)
    # what an interrupt while saving leaves: a checkpoint without its state, or with the state cut short; skipped
    (tmp_path / "resumed.checkpoints" / "checkpoint-4").mkdir()
    (tmp_path / "resumed.checkpoints" / "checkpoint-6").mkdir()
    (tmp_path / "resumed.checkpoints" / "checkpoint-6" / "trainer_state.json").write_text('{"global_step": 6, "log')
    (tmp_path / "resumed.checkpoints" / "checkpoint-8").mkdir()
    (tmp_path / "resumed.checkpoints" / "checkpoint-8" / "trainer_state.json").write_text("")
    train_value_model(data, tmp_path / "resumed", callbacks=[FirstStep()], **kwargs)
    assert not (tmp_path / "resumed.checkpoints").exists()
    assert FirstStep.seen[0] == (2, saved_bias)
    assert [step for step, _ in FirstStep.seen] == list(range(2, 10))  # 18 training rows, batch 4: 5 steps × 2 epochs
    whole, resumed = ValueModel.from_pretrained(tmp_path / "whole"), ValueModel.from_pretrained(tmp_path / "resumed")
    ids = torch.tensor([tokenizer("happy news number 5")["input_ids"]])
    assert torch.equal(resumed(ids, torch.ones_like(ids)), whole(ids, torch.ones_like(ids)))
