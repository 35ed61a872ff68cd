"""Evaluation: the Best-of-N estimator against brute force, the KL bound by hand, and a small run."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from helpers import random_value_model

from vas.config import EvaluateConfig
from vas.evaluate import best_of_n_kl_bound, best_of_n_weights, evaluate
from vas.models import load_policy, load_tokenizer
from vas.policy.local import LocalPolicy


@pytest.mark.parametrize("n, N", [(3, 2), (5, 1), (5, 3), (6, 6)])
def test_best_of_n_weights_equal_brute_force(n, N):
    rewards = torch.tensor([0.3, -1.0, 2.5, 0.7, 0.1, 4.0][:n], dtype=torch.float64)
    brute = sum(max(rewards[list(s)]) for s in itertools.combinations(range(n), N)) / math.comb(n, N)
    got = (rewards.sort().values * best_of_n_weights(n, N)).sum()
    assert float(got) == pytest.approx(float(brute), abs=1e-12)


def test_best_of_n_kl_bound_by_hand():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(4) == pytest.approx(math.log(4) - 0.75)


def length_reward(prompts, responses):
    return torch.tensor([len(r) / 10 for r in responses])


def test_small_evaluation_run(tiny_model_dir, tmp_path):
    policy, tokenizer = load_policy(tiny_model_dir), load_tokenizer(tiny_model_dir)
    report = evaluate(LocalPolicy(policy, tokenizer), ["hello", "what a day", "i hate it"], length_reward,
                      [random_value_model(tiny_model_dir)], tmp_path / "e",
                      EvaluateConfig(betas=(0.0, 3.0), top_k=5, best_of=(1, 2, 4), vas_samples_per_prompt=2,
                                     max_new_tokens=6, batch_size=4), progress=False)
    assert json.loads((tmp_path / "e" / "report.json").read_text()) == report
    assert not (tmp_path / "e.partial").exists()
    assert (tmp_path / "e" / "reward_vs_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bon = {b["n"]: b for b in report["best_of_n"]}
    assert bon[1]["reward"] == pytest.approx(report["plain"]["reward"], abs=1e-6)  # best of 1 is plain sampling
    assert report["plain"]["reward"] <= bon[2]["reward"] <= bon[4]["reward"]
    vas = {v["beta"]: v for v in report["vas"]}
    assert vas[0.0]["kl"] == pytest.approx(0.0, abs=1e-6) and vas[3.0]["kl"] > 0
    rows = [json.loads(line) for line in (tmp_path / "e" / "responses.jsonl").read_text().splitlines()]
    plain = [r for r in rows if r["method"] == "plain"]
    assert len(plain) == 3 * 4 and len(rows) == 3 * 4 + 2 * 3 * 2  # pool of 4, 2 β × 3 prompts × 2 samples
    for r in rows:  # every saved reward is the reward of the saved text
        assert r["reward"] == pytest.approx(len(r["response"]) / 10, abs=1e-5)
    assert sum(r["reward"] for r in plain) / len(plain) == pytest.approx(report["plain"]["reward"], abs=1e-5)
    for beta in (0.0, 3.0):
        steered = [r for r in rows if r["method"] == "vas" and r["beta"] == beta]
        assert sum(r["kl"] for r in steered) / 6 == pytest.approx(vas[beta]["kl"], abs=1e-5)
        assert sum(vas[beta]["reward_by_sample"]) / 2 == pytest.approx(vas[beta]["reward"], abs=1e-5)
        prompt_tokens = sum(len(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                              tokenize=True, return_dict=False))
                            for p in ["hello", "what a day", "i hate it"]) / 3
        generated = vas[beta]["policy_tokens"] - prompt_tokens
        assert generated == pytest.approx(sum(r["tokens"] for r in steered) / 6)
        assert vas[beta]["value_tokens"] == pytest.approx(prompt_tokens + generated * 6)  # k + 1 = 6 per token
    # the optimum's estimate on the saved pool: at the smallest α, each prompt's best pool response, at KL ≈ log 4
    pool = torch.tensor([r["reward"] for r in plain]).view(3, 4)
    optimum = report["optimum"]
    assert optimum["points"][0]["reward"] == pytest.approx(report["plain"]["reward"], abs=1e-6)
    assert optimum["max_reward"] == pytest.approx(float(pool.max(dim=1).values.mean()), abs=1e-6)
    assert optimum["kl_cap"] == pytest.approx(math.log(4))
    # Best-of-4 on a pool of 4 reaches the pool's mean best, which the optimum reaches at α → 0 with the mass
    # split over each prompt's tied best responses: KL mean log(4 / ties)
    ties = (pool == pool.max(dim=1, keepdim=True).values).sum(dim=1).double()
    if bon[4]["reward"] > report["plain"]["reward"] + 1e-5:
        assert bon[4]["kl_overhead"] == pytest.approx((math.log(4) - 3 / 4) / float(torch.log(4 / ties).mean()), rel=1e-4)
    curve_kl, curve_reward = zip(*[(p["kl"], p["reward"]) for p in optimum["points"]])
    for v in report["vas"]:  # VAS: its KL over the optimum's, interpolated along the curve
        if curve_reward[0] + 1e-5 < v["reward"] < curve_reward[-1] - 1e-5:
            assert v["kl_overhead"] == pytest.approx(v["kl"] / float(np.interp(v["reward"], curve_reward, curve_kl)))
        elif not curve_reward[0] - 1e-5 < v["reward"] < curve_reward[-1] + 1e-5:
            assert v["kl_overhead"] is None
    assert [row["n"] for row in report["kl_overhead"]] == [2, 4]


def test_an_interrupted_evaluation_resumes_and_refuses_other_settings(tiny_model_dir, tmp_path):
    from vas.errors import VasError

    policy = LocalPolicy(load_policy(tiny_model_dir), load_tokenizer(tiny_model_dir))
    value = [random_value_model(tiny_model_dir)]
    calls = []

    def failing_on_vas(prompts, responses):  # the pool's reward, then a failure at the first VAS condition
        calls.append(len(responses))
        if len(calls) == 2:
            raise VasError("reward server down")
        return length_reward(prompts, responses)

    settings = dict(betas=(3.0,), top_k=5, best_of=(1, 2), max_new_tokens=4, batch_size=4)
    config = EvaluateConfig(**settings)
    prompts = ["hello", "what a day"]
    with pytest.raises(VasError, match="reward server down"):
        evaluate(policy, prompts, failing_on_vas, value, tmp_path / "e", config, progress=False)
    assert not (tmp_path / "e").exists() and (tmp_path / "e.partial" / "plain.jsonl.partial").is_file()
    with pytest.raises(VasError, match=r"other settings \(--temperature\)"):
        evaluate(policy, prompts, length_reward, value, tmp_path / "e", EvaluateConfig(**settings, temperature=0.9),
                 progress=False)
    resumed = evaluate(policy, prompts, length_reward, value, tmp_path / "e", config, progress=False)
    whole = evaluate(policy, prompts, length_reward, value, tmp_path / "whole", config, progress=False)
    assert resumed["plain"] == {**whole["plain"], "seconds_per_prompt": resumed["plain"]["seconds_per_prompt"]}
    assert [v["reward"] for v in resumed["vas"]] == [v["reward"] for v in whole["vas"]]
    assert not (tmp_path / "e.partial").exists()


def test_summary_sentence_by_hand():
    from vas.evaluate import summary_sentence

    report = {"plain": {"reward": 0.474, "reward_sem": 0.03, "kl": 0.0, "seconds_per_prompt": 0.39},
              "vas": [{"beta": 2.0, "reward": 0.60, "reward_sem": 0.04, "kl": 0.15, "seconds_per_prompt": 0.7},
                      {"beta": 32.0, "reward": 0.872, "reward_sem": 0.02, "kl": 23.8, "seconds_per_prompt": 0.79}],
              "best_of_n": [{"n": 1, "reward": 0.474, "kl": 0.0, "seconds_per_prompt": 0.39},
                            {"n": 2, "reward": 0.59, "kl": 0.193, "seconds_per_prompt": 0.79},
                            {"n": 16, "reward": 0.930, "kl": 1.84, "seconds_per_prompt": 6.29}]}
    # gain 0.872 − 0.474 = 0.398, s.e. √(0.02² + 0.03²) = 0.036; β = 2 beats Best-of-2 (0.60 ≥ 0.59 at 0.15 ≤ 0.193)
    assert summary_sentence(report) == (
        "VAS's best β (32) reaches a mean reward of 0.872 against 0.474 for plain sampling (+0.398 ± 0.036) at "
        "KL 23.80 nats and 0.79 s per prompt; Best-of-16 reaches 0.930 at KL ≤ 1.84 and 6.29 s per prompt; "
        "at no more KL, VAS reaches the reward of Best-of-2.")
    report["vas"][0]["reward"] = 0.58
    assert summary_sentence(report).endswith("; no β reaches a Best-of-N reward (N > 1) at or below its KL.")


def test_kl_optimal_on_a_hand_worked_pool():
    """π*_α ∝ π0·exp(r/α) on 2 prompts × 3 samples: α → ∞ is plain sampling (KL 0), α → 0 puts all mass on
    each prompt's unique best sample (KL log 3), and α = 1/ln 2 weights prompt 0's samples 1 : 2 : 4."""
    import math

    from vas.evaluate import kl_optimal

    pool = torch.tensor([[0.0, 1.0, 2.0], [3.0, 1.0, 2.0]])
    reward, kl = kl_optimal(pool, 1e12)
    assert reward.tolist() == pytest.approx([1.0, 2.0]) and kl.tolist() == pytest.approx([0.0, 0.0], abs=1e-9)
    reward, kl = kl_optimal(pool, 1e-4)
    assert reward.tolist() == pytest.approx([2.0, 3.0]) and kl.tolist() == pytest.approx([math.log(3)] * 2)
    reward, kl = kl_optimal(torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]), 1 / math.log(2))
    w = [1 / 7, 2 / 7, 4 / 7]
    assert reward.tolist() == pytest.approx([10 / 7, 1.0])
    assert kl.tolist() == pytest.approx([sum(x * math.log(3 * x) for x in w), 0.0])
    with pytest.raises(ValueError, match="α must be > 0"):
        kl_optimal(pool, 0.0)


def test_optimum_frontier_spans_plain_to_best_of_the_pool():
    import math

    from vas.evaluate import optimum_frontier

    frontier = optimum_frontier(torch.tensor([[0.0, 1.0, 2.0], [3.0, 1.0, 2.0]]))
    points = frontier["points"]
    assert points[0] == {"alpha": None, "reward": 1.5, "reward_sem": pytest.approx(0.5), "kl": 0.0}
    assert points[-1]["reward"] == pytest.approx(2.5, abs=1e-3) and points[-1]["kl"] == pytest.approx(math.log(3), abs=1e-2)
    assert all(a["kl"] <= b["kl"] and a["reward"] <= b["reward"] for a, b in zip(points, points[1:]))
    assert frontier["kl_cap"] == pytest.approx(math.log(3)) and frontier["max_reward"] == 2.5
    # a near-tie (1e-3 apart) and an exact tie: the curve still ends exactly at the pool's mean best, the exact
    # tie's mass split over its two best responses (KL log(3/2))
    frontier = optimum_frontier(torch.tensor([[0.0, 0.4, 0.401], [1.0, 1.0, 0.0]], dtype=torch.float64))
    assert frontier["points"][-1] == {"alpha": 0.0, "reward": pytest.approx(0.7005), "reward_sem": pytest.approx(0.2995),
                                      "kl": pytest.approx((math.log(3) + math.log(1.5)) / 2)}
    assert frontier["max_reward"] == pytest.approx(0.7005)
    for bad, message in (([[0.0, float("nan")]], "non-finite"), ([[0.0], [1.0]], "samples ≥ 2")):
        with pytest.raises(ValueError, match=message):
            optimum_frontier(torch.tensor(bad))


def test_kl_at_reward_and_overhead_by_hand():
    from vas.evaluate import kl_at_reward, kl_overhead, overhead_table

    # a curve from plain (0, 0.5) through (1, 0.6) and (3, 0.9): reward 0.7 is a third of the way from 1 to 3
    assert kl_at_reward([(3.0, 0.9), (0.0, 0.5), (1.0, 0.6)], 0.7) == pytest.approx(1 + 2 / 3)
    assert kl_at_reward([(0.0, 0.5), (1.0, 0.6)], 0.7) is None  # out of the measured range
    assert kl_at_reward([(0.0, 0.5), (1.0, 0.6)], 0.4) == 0.0
    # a dip is not smoothed over: the first segment that reaches the reward counts
    assert kl_at_reward([(0.0, 0.5), (1.0, 0.8), (2.0, 0.6), (3.0, 1.0)], 0.7) == pytest.approx(2 / 3)
    # the curve's top within float32 rounding (Best-of-M and the optimum's α → 0 both at the pool's mean maximum)
    assert kl_at_reward([(0.0, 0.5), (1.0, 0.8)], 0.8 + 3e-8) == 1.0
    assert kl_at_reward([(0.0, 0.5), (1.0, 0.8)], 0.8 + 1e-5) is None
    optimum = {"points": [{"kl": 0.0, "reward": 0.5}, {"kl": 0.5, "reward": 0.7}, {"kl": 1.0, "reward": 0.8}],
               "kl_cap": 1.0}
    assert kl_overhead(2.0, 0.75, optimum) == pytest.approx(2.0 / 0.75)  # the optimum needs 0.75 nats for 0.75
    assert kl_overhead(2.0, 0.5, optimum) is None and kl_overhead(2.0, 0.85, optimum) is None
    assert kl_overhead(0.0, 0.5 + 3e-8, optimum) is None  # Best-of-1: plain sampling's reward, summed otherwise
    report = {"plain": {"reward": 0.5}, "optimum": optimum,
              "vas": [{"kl": 1.0, "reward": 0.6}, {"kl": 3.0, "reward": 0.8}],
              "best_of_n": [{"n": 1, "kl": 0.0, "reward": 0.5}, {"n": 2, "kl": 0.2, "reward": 0.7},
                            {"n": 4, "kl": 0.6, "reward": 0.9}],
              "finetuned": [{"name": "dpo", "kl": 2.0, "reward": 0.65}]}
    table = overhead_table(report)
    assert [row["n"] for row in table] == [2, 4]
    # reward 0.7: the optimum needs 0.5; VAS 1 + 2·(0.1/0.2) = 2; Best-of-2 0.2; DPO never reaches 0.7
    assert table[0]["optimum_kl"] == pytest.approx(0.5)
    assert table[0]["methods"]["VAS"] == {"kl": pytest.approx(2.0), "overhead": pytest.approx(4.0)}
    assert table[0]["methods"]["Best-of-N"] == {"kl": pytest.approx(0.2), "overhead": pytest.approx(0.4)}
    assert table[0]["methods"]["dpo"] == {"kl": None, "overhead": None}
    # reward 0.9: beyond the optimum's estimate and VAS's range
    assert table[1]["optimum_kl"] is None and table[1]["methods"]["VAS"] == {"kl": None, "overhead": None}


def test_summary_sentence_names_the_kl_overhead():
    from vas.evaluate import summary_sentence

    report = {"plain": {"reward": 0.5, "reward_sem": 0.03, "kl": 0.0, "seconds_per_prompt": 0.4},
              "vas": [{"beta": 4.0, "reward": 0.75, "reward_sem": 0.04, "kl": 3.0, "seconds_per_prompt": 0.8}],
              "best_of_n": [],
              "optimum": {"points": [{"kl": 0.0, "reward": 0.5}, {"kl": 0.5, "reward": 0.7}, {"kl": 1.0, "reward": 0.8}],
                          "kl_cap": 1.1}}
    # the optimum reaches 0.75 at 0.75 nats: 3.0 / 0.75 = 4.0×
    assert ("; the KL-optimal policy π0·exp(r/α)/Z, estimated on π0's pool, reaches that reward at KL 0.75, so VAS's "
            "KL overhead there is 4.0×.") in summary_sentence(report)
    report["vas"][0]["reward"] = 0.9
    assert "beyond what the KL-optimal policy's estimate on π0's pool reaches (0.800 at KL 1.00; the estimate's KL " \
           "is capped at log M = 1.10)" in summary_sentence(report)


def test_saved_optimum_reads_the_pool_back(tmp_path):
    """The optimum of a report written before it existed, from the plain rows of responses.jsonl (in any order;
    VAS rows ignored), equals the one of the same pool; a folder without plain rows is refused."""
    from vas.errors import VasError
    from vas.evaluate import optimum_frontier, saved_optimum

    pool = [[0.0, 1.0, 2.0], [3.0, 1.0, 2.0]]
    rows = [{"method": "plain", "prompt_index": p, "sample": s, "reward": pool[p][s]} for s in range(3) for p in (1, 0)]
    rows.append({"method": "vas", "prompt_index": 0, "sample": 0, "reward": 9.0})
    (tmp_path / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert saved_optimum(tmp_path) == optimum_frontier(torch.tensor(pool))
    with pytest.raises(VasError, match="holds no plain π0 samples"):
        saved_optimum(tmp_path / "missing")


def test_config_and_comparison_checks_by_hand():
    """The checks `vas evaluate` makes hold for a library user too."""
    from vas.errors import VasError
    from vas.evaluate import check_comparison, plan_conditions

    assert EvaluateConfig(best_of=[1.0, 4.0]).best_of == (1, 4)
    for best_of in ((), (0, 2), (2.5,), (4097,)):
        with pytest.raises(VasError, match="--best-of needs integers from 1 to 4096"):
            EvaluateConfig(best_of=best_of)
    with pytest.raises(VasError, match=r"^--batch-size must be > 0, got 0$"):
        EvaluateConfig(batch_size=0)
    with pytest.raises(VasError, match="nothing to compare with plain sampling and Best-of-N"):
        check_comparison([], [], local=True)
    with pytest.raises(VasError, match="--policy evaluates a fine-tuned policy beside a local π0"):
        check_comparison(["value"], ["adapter"], local=False)
    plan = plan_conditions(EvaluateConfig(betas=(2, 0.5), best_of=(1, 8), vas_samples_per_prompt=3, seed=5))
    assert [(c.method, c.file, c.samples, c.seed, c.beta) for c in plan] == [
        ("plain", "plain.jsonl", 8, 5, 0.0), ("vas", "vas-beta2.jsonl", 3, 6, 2), ("vas", "vas-beta0.5.jsonl", 3, 6, 0.5)]
