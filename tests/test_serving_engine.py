"""The offline vLLM engine path (`--engine vllm`): steered decoding, KL and log-probabilities against the
project's own loop, and `collect` through vLLM against a teacher-forced forward of π0. float32 on both sides."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from helpers import random_value_model  # noqa: E402

from vas.config import EMBEDDED_MODEL  # noqa: E402
from vas.base_policy import build_policy  # noqa: E402
from vas.config import PolicyConfig  # noqa: E402
from vas.decoding.batches import generate  # noqa: E402
from vas.decoding.loop import Steering, sample  # noqa: E402
from vas.errors import VasError  # noqa: E402
from vas.models import embedded_model_dir  # noqa: E402
from vas.value.model import ValueModel  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["hi", "Tell me about cats.", "Write a short poem about the sea, the wind and the stars at night, please."]


@pytest.fixture(scope="module")
def values(embedded_value_dir):
    return [ValueModel.from_pretrained(embedded_value_dir(name)) for name in "ab"]


@pytest.fixture(scope="module")
def engine(values):
    policy = build_policy(PolicyConfig(base_model=EMBEDDED_MODEL, engine="vllm", dtype="float32"))
    assert policy.engine is None  # it starts with the first batch's value models
    sample(policy, ["hi"], Steering(values, beta=1.0), max_new_tokens=1)
    yield policy
    del policy.engine


def test_steered_greedy_rows_equal_the_projects_own_loop_with_their_kl(engine, embedded_local, values):
    steering = Steering(values, weights=torch.tensor([[1.0, -0.5], [0.0, 1.0], [1.0, 1.0]]),
                        beta=torch.tensor([3.0, -4.0, 0.0]), top_k=10)
    kwargs = dict(temperature=1.0, max_new_tokens=12, greedy=True, seed=0, progress=False)
    want = generate(embedded_local, PROMPTS, steering, **kwargs)
    got = generate(engine, PROMPTS, steering, **kwargs)
    for w, g in zip(want, got):
        assert g["response_ids"] == w["response_ids"]
        assert g["response"] == w["response"]
        assert (g["tokens"], g["finished"]) == (w["tokens"], w["finished"])
        assert g["kl"] == pytest.approx(w["kl"], rel=1e-3, abs=1e-4)
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-3)  # log π0 of each chosen token
    assert got[0]["kl"] > 0.1 and got[2]["kl"] == 0.0  # β = 0: π0, KL 0


def test_collect_through_vllm_stores_pi0s_logprobs_at_the_temperature(engine, embedded_local, tmp_path):
    from vas.collect import collect
    from vas.config import CollectConfig
    from vas.rewards import load_reward

    data = collect(engine, PROMPTS[:2], load_reward("brevity"), tmp_path / "data",
                   CollectConfig(samples_per_prompt=2, temperature=0.7, max_new_tokens=10, seed=1), progress=False)
    assert len(data) == 4
    for row in data:  # a teacher-forced forward of π0 at τ = 0.7 gives the same log-probabilities
        ids = torch.tensor([row["prompt_ids"] + row["response_ids"]])
        with torch.no_grad():
            logits = embedded_local.model(ids).logits[0, len(row["prompt_ids"]) - 1 : -1]
        want = torch.log_softmax(logits / 0.7, dim=-1).gather(1, torch.tensor(row["response_ids"])[:, None])[:, 0]
        assert row["logprobs"] == pytest.approx(want.tolist(), abs=1e-3)
    again = collect(engine, PROMPTS[:2], load_reward("brevity"), tmp_path / "again",
                    CollectConfig(samples_per_prompt=2, temperature=0.7, max_new_tokens=10, seed=1), progress=False)
    assert again["response_ids"] == data["response_ids"]  # a seed gives the same samples


def test_a_batch_beyond_one_prefill_step_is_split_into_steps_that_fit(engine, embedded_local, tmp_path):
    """On a CPU, a seeded batch whose prompts exceed vLLM's per-step token budget (which vLLM 0.32 fails on:
    "CPU Generator does not use offset") is decoded in runs of consecutive prompts that fit it, in order."""
    from vas.collect import collect
    from vas.config import CollectConfig
    from vas.rewards import load_reward

    budget = engine.engine.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    assert [list(g) for g in engine._prefill_groups([3, 4, 2, 7])] == [[0, 1, 2, 3]]
    assert [list(g) for g in engine._prefill_groups([budget - 1, 2, budget, 1, 1])] == [[0], [1], [2], [3, 4]]
    seqs = engine.engine.llm_engine.vllm_config.scheduler_config.max_num_seqs
    assert [len(g) for g in engine._prefill_groups([1] * (seqs + 1))] == [seqs, 1]
    with pytest.raises(VasError, match=f"prompt 2 of the batch has {budget + 1}"):
        engine._prefill_groups([1, budget + 1])
    prompt = "Write a short poem about the sea, the wind and the stars at night, please. " * 4
    rows = budget // len(embedded_local.tokenizer(prompt)["input_ids"]) + 8  # more prompt tokens than one step takes
    data = collect(engine, [prompt] * rows, load_reward("brevity"), tmp_path / "data",
                   CollectConfig(samples_per_prompt=1, max_new_tokens=2, batch_size=rows, seed=1), progress=False)
    assert len(data) == rows and data["prompt_index"] == list(range(rows))
    ids = torch.tensor([data[-1]["prompt_ids"] + data[-1]["response_ids"]])  # the last row, in the second run
    with torch.no_grad():
        logits = embedded_local.model(ids).logits[0, len(data[-1]["prompt_ids"]) - 1 : -1]
    want = torch.log_softmax(logits / 0.7, dim=-1).gather(1, torch.tensor(data[-1]["response_ids"])[:, None])[:, 0]
    assert data[-1]["logprobs"] == pytest.approx(want.tolist(), abs=1e-3)


def test_the_engine_keeps_the_value_models_it_started_with(engine, values, tmp_path):
    random_value_model(str(embedded_model_dir()), seed=9, num_layers=1).save_pretrained(tmp_path / "other")
    other = ValueModel.from_pretrained(tmp_path / "other")
    with pytest.raises(VasError, match="other value models"):
        sample(engine, ["hi"], Steering([other], beta=1.0), max_new_tokens=2)


def test_greedy_at_another_temperature_and_options_the_processor_lacks_are_refused(engine, values):
    with pytest.raises(VasError, match="--temperature 1"):
        sample(engine, ["hi"], Steering(values, beta=1.0), greedy=True, temperature=0.7, max_new_tokens=2)
    with pytest.raises(VasError, match="masking"):
        sample(engine, ["hi"], Steering(values, beta=1.0, mask_outside_top_k=True), max_new_tokens=2)


def test_the_cli_hands_vllm_folders_and_loads_no_weights(engine, values):
    """With --engine vllm the CLI describes the --value folders (vLLM's worker loads them), and they steer as
    the loaded value models do."""
    from vas.cli import _value_models, _value_specs
    from vas.value.model import ValueModelFolder

    specs, _ = _value_specs([f"{values[0].name_or_path}=2", values[1].name_or_path], "10", False)
    folders = _value_models(specs, PolicyConfig(base_model=EMBEDDED_MODEL, engine="vllm"), "float32")
    weights = [w for _, w in specs]
    assert [type(f) for f in folders] == [ValueModelFolder] * 2 and weights == [2.0, 1.0]
    assert [(f.name_or_path, f.kind, f.dtype) for f in folders] == [(v.name_or_path, "last", torch.float32) for v in values]
    kwargs = dict(temperature=1.0, max_new_tokens=8, greedy=True, seed=0, progress=False)
    want = generate(engine, PROMPTS[:2], Steering(values, weights, beta=3.0), **kwargs)
    got = generate(engine, PROMPTS[:2], Steering(folders, weights, beta=3.0), **kwargs)
    assert [g["response_ids"] for g in got] == [w["response_ids"] for w in want]
    assert [g["kl"] for g in got] == pytest.approx([w["kl"] for w in want])
