"""Evaluate: reward against KL(π‖π0) for plain sampling, VAS over a β grid, and Best-of-N, with their cost.

For every held-out prompt:

* **plain**: ``n_pool`` samples from π0 (the pool); mean reward, KL 0.
* **Best-of-N** for each N ≤ n_pool: the expected reward of the best of N samples, estimated without bias
  from the pool (:func:`best_of_n_weights`), with the analytic KL bound log N − (N−1)/N (Stiennon et al.
  2020; Beirami et al. 2024). Cost: N samples and N reward calls per prompt.
* **VAS** at each β: ``vas_samples_per_prompt`` steered samples per prompt; the exact sequence KL
  Σ_t KL(π(·|s_t) ‖ π0(·|s_t)).
* **the KL-optimal policy** π*_α ∝ π0·exp(r/α) over a grid of α, estimated on the pool by self-normalised
  weights (:func:`kl_optimal`): the limit of reward against KL. Its KL is capped at log n_pool, so at high KL it
  is a lower bound on the optimum's reward. Each method's **KL overhead** is its KL divided by the optimum's at
  the same reward (:func:`kl_overhead`; :func:`overhead_table` at each Best-of-N reward).
* **fine-tuned policies** π_θ (:mod:`vas.finetune`: DPO, RLOO, GRPO), as many samples per prompt as VAS, with
  the same exact sequence KL(π_θ ‖ π0) on their own samples (π0 runs beside π_θ on the same tokens), and their
  training cost.

Cost is given twice: wall seconds per prompt, and the tokens each model reads per prompt (independent of
the machine): ``policy_tokens`` = prompt + response for each of the N samples of Best-of-N (the pool
repeats the prompt) or the one of VAS or of a fine-tuned policy; ``value_tokens`` = prompt + (k + 1) per
generated token for each of VAS's value models (1 instead of k + 1 for one with the ``next`` head). A fine-tuned policy (its LoRA adapter merged) is the same
network as π0, so its decoding time is plain π0's time per generated token times its tokens; the measured
time, which includes π0's forward for the KL, is kept beside it.

Writes ``report.json``, ``responses.jsonl`` (every response: method, β, sample, prompt, text, reward, KL,
tokens) and ``reward_vs_kl.png`` (atomically).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vas.config import EvaluateConfig
from vas.decoding.loop import Steering
from vas.errors import VasError
from vas.decoding.batches import generate
from vas.policy.local import LocalPolicy
from vas.prompts import encode_prompts
from vas.rewards import Reward, score
from vas.storage import replace_atomic, require_absent, write_json_atomic, write_text_atomic
from vas.value.model import ValueModel


def _digest(path: Path) -> str:
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]


def best_of_n_weights(n: int, N: int) -> torch.Tensor:
    """Weights w (n,) such that Σ_i w_i r_(i), over rewards sorted ascending, is the expected maximum of N
    draws without replacement from the n: w_i = C(i−1, N−1) / C(n, N) (i = 1 … n). Sums to 1.

    Raises:
        ValueError: unless 1 ≤ N ≤ n.
    """
    if not 1 <= N <= n:
        raise ValueError(f"need 1 ≤ N ≤ n, got N={N}, n={n}")
    return torch.tensor([math.comb(i - 1, N - 1) / math.comb(n, N) for i in range(1, n + 1)], dtype=torch.float64)


def best_of_n_kl_bound(N: int) -> float:
    """KL(π_BoN ‖ π0) ≤ log N − (N−1)/N nats."""
    return math.log(N) - (N - 1) / N


def kl_optimal(pool_rewards: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL-regularised optimum π*_α(y|x) ∝ π0(y|x)·exp(r(x, y)/α) (Korbak et al. 2022; Rafailov et al.
    2023), estimated on M samples of π0 per prompt by self-normalised importance weights
    w_i = exp(r_i/α) / Σ_j exp(r_j/α): on the pool, π* puts mass w_i on sample i where π0 puts 1/M.

    Args:
        pool_rewards: (P, M) float rewards of M π0 samples for each of P prompts.
        alpha: the KL coefficient α > 0, in reward units (``inf``: plain sampling).

    Returns:
        Per prompt (P,) float64: the expected reward Σ_i w_i r_i and the KL Σ_i w_i log(M w_i) in nats. The KL
        is at most log M (all mass on one sample), so at small α the estimate is a lower bound on the optimum's
        reward: π* may reach rewards the pool never drew.

    Raises:
        ValueError: if ``alpha`` ≤ 0 or ``pool_rewards`` is not 2-D.
    """
    if not alpha > 0:
        raise ValueError(f"α must be > 0, got {alpha}")
    if pool_rewards.dim() != 2:
        raise ValueError(f"pool_rewards must be (prompts, samples), got shape {tuple(pool_rewards.shape)}")
    r = pool_rewards.double()
    log_w = torch.log_softmax(r / alpha, dim=1)  # α = inf: uniform, plain sampling
    w = log_w.exp()
    return (w * r).sum(dim=1), (w * (log_w + math.log(r.shape[1]))).sum(dim=1).clamp_min(0.0)


def optimum_frontier(pool_rewards: torch.Tensor, points: int = 60) -> dict:
    """The estimated KL-optimal frontier (:func:`kl_optimal`) over a grid of α from 100 to 0.003 times the
    rewards' mean standard deviation within a prompt (geometric), plus plain sampling (α = ∞).

    The estimate is the optimum over the pool's M samples per prompt, not over all responses: at a given
    reward its KL is above the true optimum's (for Gaussian rewards and M = 16, 10 % above at Best-of-2's
    reward and 13 % one standard deviation above the mean), and its KL cannot pass log M. KL overheads against it are therefore lower bounds,
    and a method near the optimum (Best-of-N, whose KL is itself a bound) can show one below 1.

    Args:
        pool_rewards: (P, M) float rewards of π0's pool, M ≥ 2.

    Returns:
        ``points``: one ``{"alpha", "reward", "reward_sem", "kl"}`` per α, in increasing KL, ending at the
        α → 0 limit (``alpha`` 0: the mass split evenly over each prompt's best samples, KL log(M / their
        number)); ``kl_cap``: log M nats, the most KL the estimate can show; ``max_reward``: the pool's mean
        best reward, the limit's.

    Raises:
        ValueError: if ``pool_rewards`` is not 2-D with M ≥ 2, or holds a non-finite reward.
    """
    r = pool_rewards.double()
    if r.dim() != 2 or r.shape[1] < 2:
        raise ValueError(f"pool_rewards must be (prompts, samples ≥ 2), got shape {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise ValueError("pool_rewards holds a non-finite reward")
    spread = float(r.std(dim=1).mean())  # within prompts: what the weights compare
    spread = spread if spread > 0 else 1.0
    alphas = [math.inf] + (spread * torch.logspace(2, -2.5, points, dtype=torch.float64)).tolist()
    frontier = []
    for alpha in alphas:
        reward, kl = kl_optimal(r, alpha)
        frontier.append({"alpha": alpha if math.isfinite(alpha) else None, "reward": float(reward.mean()),
                         "reward_sem": standard_error(reward), "kl": float(kl.mean())})
    best = r.max(dim=1).values
    ties = (r == best[:, None]).sum(dim=1).double()
    frontier.append({"alpha": 0.0, "reward": float(best.mean()), "reward_sem": standard_error(best),
                     "kl": float(torch.log(r.shape[1] / ties).mean())})
    return {"points": frontier, "kl_cap": math.log(r.shape[1]), "max_reward": float(best.mean())}


def saved_optimum(eval_dir: str | Path) -> dict:
    """:func:`optimum_frontier` of the π0 pool saved in an evaluation's ``responses.jsonl`` (for a report
    written before the optimum was part of it).

    Raises:
        VasError: if the folder has no ``responses.jsonl`` with plain samples.
        ValueError: from :func:`optimum_frontier`, if it has one plain sample per prompt.
    """
    path = Path(eval_dir) / "responses.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    plain = sorted(((r["prompt_index"], r["sample"], r["reward"]) for r in rows if r["method"] == "plain"))
    if not plain:
        raise VasError(f"{path} holds no plain π0 samples to estimate the KL-optimal policy on")
    P = plain[-1][0] + 1
    return optimum_frontier(torch.tensor([r for _, _, r in plain], dtype=torch.float64).view(P, -1))


def _above(reward: float, than: float) -> bool:
    """``reward`` > ``than`` by more than float32 rounding (1e-6, relative): rewards summed in different
    precisions, such as Best-of-M's and the optimum's α → 0 limit on the same pool, compare equal."""
    return reward - than > 1e-6 * max(1.0, abs(reward))


def kl_at_reward(points: Sequence[tuple[float, float]], reward: float) -> float | None:
    """The least KL at which a method's measured curve reaches ``reward``: ``points`` are its (KL, reward)
    pairs, joined in order of KL by straight lines (the first point is plain sampling's, (0, its reward), for
    a method that starts there). None if no point or segment reaches ``reward``: it is out of the method's
    measured range (no extrapolation). A ``reward`` above the curve's highest by no more than float32 rounding
    counts as that highest (:func:`_above`)."""
    points = sorted(points)
    if points and not _above(reward, max(r for _, r in points)):
        reward = min(reward, max(r for _, r in points))
    if points and points[0][1] >= reward:
        return points[0][0]
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if r1 >= reward > r0:
            return k0 + (k1 - k0) * (reward - r0) / (r1 - r0)
    return None


def kl_overhead(kl: float, reward: float, optimum: dict) -> float | None:
    """A method's KL divided by the KL the estimated optimum (:func:`optimum_frontier`) needs for the same
    ``reward`` ("KL overhead"; 1 = as efficient as the estimate, a lower bound on the overhead against the true
    π*, see :func:`optimum_frontier`). None where it is undefined: a reward at or below plain
    sampling's, within float32 rounding (π* needs no KL for it) or above what the optimum's estimate reaches on the pool."""
    curve = [(p["kl"], p["reward"]) for p in optimum["points"]]
    if not _above(reward, curve[0][1]):  # Best-of-1 included
        return None
    needed = kl_at_reward(curve, reward)
    return None if needed is None or needed <= 0 else kl / needed


def with_overheads(report: dict) -> dict:
    """Set, in place, each method's ``kl_overhead`` (:func:`kl_overhead`) and the report's ``kl_overhead`` table
    (:func:`overhead_table`) from its ``optimum`` (None: no overheads); returns ``report``."""
    for entry in report["best_of_n"] + report["vas"] + report.get("finetuned", []):
        entry["kl_overhead"] = kl_overhead(entry["kl"], entry["reward"], report["optimum"]) if report["optimum"] else None
    report["kl_overhead"] = overhead_table(report) if report["optimum"] else []
    return report


def method_curves(report: dict) -> dict[str, list[tuple[float, float]]]:
    """Each method's measured (KL, reward) points from :func:`evaluate`'s report, each starting at plain
    sampling's (0, reward): ``VAS`` (its β grid), ``Best-of-N`` (KL: the bound) and each fine-tuned policy by
    name."""
    start = [(0.0, report["plain"]["reward"])]
    curves = {"VAS": start + [(v["kl"], v["reward"]) for v in report["vas"]],
              "Best-of-N": start + [(b["kl"], b["reward"]) for b in report["best_of_n"] if b["n"] > 1]}
    for f in report.get("finetuned", []):
        curves[f["name"]] = start + [(f["kl"], f["reward"])]
    return {name: curve for name, curve in curves.items() if len(curve) > 1}


def overhead_table(report: dict) -> list[dict]:
    """The KL each method needs for each Best-of-N reward (N > 1) and its KL overhead there
    (:func:`kl_at_reward` on the method's curve, divided by the optimum's KL for that reward).

    Returns:
        One ``{"n", "reward", "optimum_kl", "methods": {NAME: {"kl", "overhead"}}}`` per N; ``kl`` is None where
        the reward is out of the method's measured range, ``overhead`` also where the optimum's estimate does not
        reach it (``optimum_kl`` None).
    """
    optimum = report["optimum"]
    curve = [(p["kl"], p["reward"]) for p in optimum["points"]]
    rows = []
    for b in report["best_of_n"]:
        if b["n"] == 1:
            continue
        optimum_kl = kl_at_reward(curve, b["reward"])
        methods = {}
        for name, points in method_curves(report).items():
            kl = kl_at_reward(points, b["reward"])
            methods[name] = {"kl": kl, "overhead": kl / optimum_kl if kl is not None and optimum_kl else None}
        rows.append({"n": b["n"], "reward": b["reward"], "optimum_kl": optimum_kl, "methods": methods})
    return rows


def tokens_read(prompt_tokens: float | None, generated: float, times: int = 1) -> float | None:
    """Tokens a model reads per prompt: ``times`` × (prompt + generated), None where the prompt's length is
    unknown (an API policy)."""
    return None if prompt_tokens is None else times * (prompt_tokens + generated)


def standard_error(x: torch.Tensor) -> float:
    """Standard error of the mean of the 1-D tensor ``x`` (0 for fewer than two values)."""
    return float(x.std(unbiased=True) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def responses(policy, prompts: Sequence, steering: Steering | None, path: Path, *, top_k: int | str,
              **run) -> list[dict]:
    """The rows of one decoding condition (:func:`vas.decoding.batches.generate`), kept in ``<path>.partial`` until the
    report is written: a rerun resumes them, and refuses them if the condition's settings changed. Plain
    sampling (``steering`` None) asks a policy that tells only its top-k for ``top_k`` tokens; a local one
    samples π0."""
    return generate(policy, prompts, steering or Steering(top_k=top_k), path, finish=False, **run)


@dataclass(frozen=True)
class Condition:
    """One decoding condition of an evaluation (:func:`plan_conditions`).

    Attributes:
        method: ``plain`` (π0's pool), ``vas`` or ``finetuned``.
        file: its rows' file in ``<out>.partial``.
        samples: samples per prompt.
        seed: the seed its samples are drawn with.
        desc: its progress bar's label.
        beta: VAS's β (0 for the others).
        tuned: the fine-tuned policy (:class:`vas.finetune.Finetuned`) of a ``finetuned`` condition.
    """

    method: str
    file: str
    samples: int
    seed: int
    desc: str
    beta: float = 0.0
    tuned: Any = None


@dataclass
class Sampled:
    """A condition's samples: the prompts as sampled (each repeated ``condition.samples`` times), the
    decoding rows (:func:`vas.decoding.batches.generate`), their rewards ((prompts × samples,) float32) and the seconds
    scoring took."""

    condition: Condition
    prompts: list[str]
    results: list[dict]
    rewards: torch.Tensor
    reward_seconds: float

    def column(self, key: str) -> torch.Tensor:
        """The rows' ``key`` (``tokens``, ``kl``) as a float32 tensor."""
        return torch.tensor([r[key] for r in self.results], dtype=torch.float32)


def plan_conditions(config: EvaluateConfig, finetuned: Sequence = ()) -> list[Condition]:
    """The conditions ``config`` asks for, in the order they run: π0's pool (``max(config.best_of)`` samples
    per prompt, which plain sampling, Best-of-N and the optimum read), VAS at each β, then each fine-tuned policy
    (``config.vas_samples_per_prompt`` samples per prompt each, with seed + 1)."""
    m, seed = config.vas_samples_per_prompt, config.seed + 1
    return ([Condition("plain", "plain.jsonl", max(config.best_of), config.seed, "π0 samples")]
            + [Condition("vas", f"vas-beta{beta:g}.jsonl", m, seed, f"VAS β={beta:g}", beta=beta)
               for beta in config.betas]
            + [Condition("finetuned", f"finetuned-{_digest(tuned.path)}.jsonl", m, seed, tuned.name, tuned=tuned)
               for tuned in finetuned])


def check_comparison(value_models: Sequence, finetuned: Sequence, *, local: bool) -> None:
    """Raise :class:`VasError` unless an evaluation compares something with plain sampling and Best-of-N (value
    models, or fine-tuned policies: anything of which only the count matters) and its fine-tuned policies run
    beside π0 in this process (``local``: a :class:`vas.policy.local.LocalPolicy`)."""
    if finetuned and not local:
        raise VasError("--policy evaluates a fine-tuned policy beside a local π0 on the default engine: leave out "
                       "--api-base-url and --engine vllm")
    if not value_models and not finetuned:
        raise VasError("nothing to compare with plain sampling and Best-of-N: give --value and/or --policy")


def check_names(finetuned: Sequence) -> None:
    """Raise :class:`VasError` if two fine-tuned policies (:class:`vas.finetune.Finetuned`) share a name."""
    names = [tuned.name for tuned in finetuned]
    if len(set(names)) < len(names):
        raise VasError(f"two fine-tuned policies have the same name ({', '.join(n for n in names if names.count(n) > 1)}): "
                       "evaluate them separately")


def sample_condition(condition: Condition, policy, prompts: Sequence[str], reward: Reward, partial: Path, *,
                     steering: Steering | None, **run) -> Sampled:
    """Sample ``condition`` (its rows kept in ``partial``, :func:`responses`) and score its responses. A
    fine-tuned condition samples π_θ (its LoRA merged into a copy of π0) with π0 beside it for the KL."""
    repeated = [p for p in prompts for _ in range(condition.samples)]
    sampler, tuned = policy, condition.tuned
    if tuned is not None:
        sampler = LocalPolicy(policy.model, policy.tokenizer, eos_token_ids=policy.eos_token_ids,
                              pad_token_id=policy.pad_token_id, tuned=tuned.load(), tuned_name=str(tuned.path))
        run = {**run, "settings": {**run["settings"], "finetuned": tuned.info}}
    results = responses(sampler, repeated, steering, partial / condition.file, seed=condition.seed,
                        desc=condition.desc, **run)
    del sampler  # a fine-tuned one holds its merged copy of π0
    t0 = time.perf_counter()
    rewards = score(reward, repeated, [r["response"] for r in results])
    return Sampled(condition, repeated, results, rewards, time.perf_counter() - t0)


def sample_statistics(sampled: Sampled, prompts: int) -> dict:
    """The statistics of a sampled condition's entry: ``reward`` (mean), ``reward_sem`` (over prompts, of
    per-prompt means), ``reward_by_sample`` (the mean over prompts of each prompt's j-th sample), ``kl`` (nats per
    response), ``kl_sem`` and ``length`` (tokens)."""
    m = sampled.condition.samples
    rewards, kl = sampled.rewards.view(prompts, m), sampled.column("kl")
    return {"reward": float(sampled.rewards.mean()), "reward_sem": standard_error(rewards.mean(dim=1)),
            "reward_by_sample": rewards.mean(dim=0).tolist(), "kl": float(kl.mean()),
            "kl_sem": standard_error(kl.view(prompts, m).mean(dim=1)), "length": float(sampled.column("tokens").mean())}


def pool_entries(pool: Sampled, prompts: int, prompt_tokens: float | None,
                 best_of: Sequence[int]) -> tuple[dict, list[dict]]:
    """Plain sampling's entry and one Best-of-N entry per N of ``best_of`` (:func:`best_of_n_weights` on the
    pool, KL: the bound, cost: N samples and their scoring) from π0's pool."""
    n_pool = pool.condition.samples
    stats = sample_statistics(pool, prompts)
    seconds = sum(r["seconds"] for r in pool.results)
    plain = {**{key: stats[key] for key in ("reward", "reward_sem", "kl", "length")},
             "seconds_per_prompt": seconds / (prompts * n_pool),
             "policy_tokens": tokens_read(prompt_tokens, stats["length"]), "value_tokens": 0.0}
    pool_r, pool_len = pool.rewards.view(prompts, n_pool), pool.column("tokens").view(prompts, n_pool)
    per_sample = (seconds + pool.reward_seconds) / (prompts * n_pool)
    order = pool_r.argsort(dim=1)
    best_of_n = []
    for N in best_of:
        w = best_of_n_weights(n_pool, N).float()
        per_prompt = (pool_r.gather(1, order) * w).sum(dim=1)
        best_of_n.append({
            "n": N, "reward": float(per_prompt.mean()), "reward_sem": standard_error(per_prompt),
            "kl": best_of_n_kl_bound(N), "kl_is_bound": True,
            "length": float((pool_len.gather(1, order) * w).sum(dim=1).mean()),
            "seconds_per_prompt": N * per_sample, "policy_tokens": tokens_read(prompt_tokens, stats["length"], N),
            "value_tokens": 0.0,
        })
    return plain, best_of_n


def steered_entry(sampled: Sampled, prompts: int, prompt_tokens: float | None, *, value_models: Sequence[ValueModel],
                  top_k: int | str, seconds_per_token: float) -> dict:
    """A VAS condition's entry (its ``beta``; value models read prompt + (k + 1) tokens per generated token, 1
    with the ``next`` head) or a fine-tuned one's (``name``, ``method``, ``kl_coef``, ``path``, ``training``; its
    time is plain π0's ``seconds_per_token`` times its tokens, the measured time beside it)."""
    stats = sample_statistics(sampled, prompts)
    length, tuned = stats["length"], sampled.condition.tuned
    measured = sum(r["seconds"] for r in sampled.results) / len(sampled.results)
    cost = {"policy_tokens": tokens_read(prompt_tokens, length)}
    if tuned is None:
        cost["value_tokens"] = None if prompt_tokens is None else sum(
            tokens_read(prompt_tokens, length * (1 if model.kind == "next" else top_k + 1)) for model in value_models)
        return {"beta": sampled.condition.beta, **stats, "seconds_per_prompt": measured, **cost}
    return {"name": tuned.name, "method": tuned.info["method"], "kl_coef": tuned.info["kl_coef"],
            "path": str(tuned.path), **stats, "seconds_per_prompt": seconds_per_token * length,
            "measured_seconds_per_prompt": measured, **cost, "value_tokens": 0.0, "training": tuned.info["training"]}


def evaluate(
    policy,
    prompts: Sequence[str],
    reward: Reward,
    value_models: Sequence[ValueModel],
    out_dir: str | Path,
    config: EvaluateConfig,
    *,
    weights: Sequence[float] | None = None,
    finetuned: Sequence = (),
    concurrency: int = 1,
    progress: bool = True,
    metadata: dict | None = None,
) -> dict:
    """Run the comparison on held-out ``prompts`` and write ``report.json``, ``responses.jsonl`` and
    ``reward_vs_kl.png`` into ``out_dir``.

    Every condition goes through the one decoding loop (:func:`vas.decoding.batches.generate`), so a local π0
    (:class:`vas.policy.local.LocalPolicy`) and one behind an API (:class:`vas.policy.api.ApiPolicy`, whose plain
    samples are then π0 restricted to its top-k, as its VAS samples are) are evaluated alike. Each finished
    condition is kept in ``<out_dir>.partial/`` until the report is written, so an interrupted evaluation
    resumes where it stopped.

    ``config`` says which conditions run (:func:`plan_conditions`); ``value_models`` steer VAS with
    ``weights``; ``finetuned`` are :class:`vas.finetune.Finetuned` policies π_θ, sampled with π0 (a local
    ``policy``) beside them.

    Returns:
        The report: ``plain``, ``vas`` (one entry per β), ``best_of_n`` (one per N) and ``finetuned`` (one per
        fine-tuned policy, with ``name``, ``method``, ``kl_coef``, ``path``, ``measured_seconds_per_prompt`` and
        ``training``: its wall ``seconds`` and samples, :func:`vas.finetune.finetune`) with ``reward``
        (mean), ``reward_sem`` (over prompts, of per-prompt means), ``kl`` (nats per response), ``length``
        (tokens), ``seconds_per_prompt`` (decoding time per response; for an API run with concurrency, request
        latency rather than wall time), ``policy_tokens`` and ``value_tokens`` (per prompt; None for an API
        policy, whose tokenizer is the server's); VAS entries
        also have ``reward_by_sample`` (the mean over prompts of the j-th of the ``vas_samples_per_prompt``
        independent samples of each prompt, for j = 1 … m); plus ``examples`` (the first prompts' responses
        under each method) and ``settings``.

    Raises:
        VasError: if there is nothing to compare (no value model, no fine-tuned policy), ``out_dir`` exists,
            fine-tuned policies are given without a local π0 (:func:`check_comparison`) or share a name,
            or from decoding (finished conditions are kept).
    """
    check_comparison(value_models, finetuned, local=isinstance(policy, LocalPolicy))
    check_names(finetuned)
    out_dir = Path(out_dir)
    require_absent(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    run = dict(temperature=config.temperature, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
               concurrency=concurrency, progress=progress, top_k=config.top_k,
               settings={**(metadata or {}), "n_pool": max(config.best_of)})
    sampled = []
    for condition in plan_conditions(config, finetuned):
        steering = None if condition.method != "vas" else Steering(
            value_models, weights, beta=condition.beta, top_k=config.top_k, soft=config.soft)
        sampled.append(sample_condition(condition, policy, prompts, reward, partial, steering=steering, **run))
    report = evaluation_report(sampled, prompts, getattr(policy, "tokenizer", None), config,
                               value_models=value_models, weights=weights, metadata=metadata)
    write_evaluation(out_dir, report, [row for s in sampled for row in response_rows(s)])
    return report


def evaluation_report(sampled: Sequence[Sampled], prompts: Sequence[str], tokenizer, config: EvaluateConfig, *,
                      value_models: Sequence[ValueModel], weights: Sequence[float] | None,
                      metadata: dict | None) -> dict:
    """:func:`evaluate`'s report from its sampled conditions (:func:`plan_conditions`' order: π0's pool
    first), with each method's KL overhead (:func:`with_overheads`). ``tokenizer`` counts the prompts' tokens;
    None (an API policy, whose tokenizer is the server's) leaves the token counts None."""
    P = len(prompts)
    prompt_tokens = (sum(len(ids) for ids in encode_prompts(tokenizer, prompts)) / P) if tokenizer else None
    pool, steered = sampled[0], sampled[1:]
    n_pool = pool.condition.samples
    plain, best_of_n = pool_entries(pool, P, prompt_tokens, config.best_of)
    seconds_per_token = (sum(r["seconds"] for r in pool.results)  # plain π0's, which a merged adapter shares
                         / max(float(pool.column("tokens").sum()), 1.0))
    entries = [steered_entry(s, P, prompt_tokens, value_models=value_models, top_k=config.top_k,
                             seconds_per_token=seconds_per_token) for s in steered]
    pool_r = pool.rewards.view(P, n_pool)
    return with_overheads({
        "settings": {**(metadata or {}), "prompts": P, "n_pool": n_pool, "top_k": config.top_k,
                     "vas_samples_per_prompt": config.vas_samples_per_prompt, "soft": config.soft,
                     "temperature": config.temperature, "max_new_tokens": config.max_new_tokens,
                     "seed": config.seed, "weights": list(weights or [])},
        "plain": plain,
        "best_of_n": best_of_n,
        "vas": [e for s, e in zip(steered, entries) if s.condition.tuned is None],
        "finetuned": [e for s, e in zip(steered, entries) if s.condition.tuned is not None],
        "examples": examples(sampled, prompts),
        "optimum": optimum_frontier(pool_r) if n_pool > 1 else None,  # one sample: nothing to reweight
    })


def examples(sampled: Sequence[Sampled], prompts: Sequence[str], count: int = 3) -> list[dict]:
    """The first ``count`` prompts' responses under each method: plain (π0's first sample), Best-of-M (the
    pool's best, M its size), each β's (``vas_beta_B``) and each fine-tuned policy's (by name) first sample."""
    pool, steered = sampled[0], sampled[1:]
    n_pool = pool.condition.samples
    best = pool.rewards.view(len(prompts), n_pool).argmax(dim=1)
    rows = []
    for i in range(min(count, len(prompts))):
        example = {"prompt": prompts[i], "plain": pool.results[i * n_pool]["response"],
                   f"best_of_{n_pool}": pool.results[i * n_pool + int(best[i])]["response"]}
        for s in steered:
            tuned = s.condition.tuned
            example[f"vas_beta_{s.condition.beta:g}" if tuned is None else tuned.name] = \
                s.results[i * s.condition.samples]["response"]
        rows.append(example)
    return rows


def response_rows(sampled: Sampled) -> list[dict]:
    """A sampled condition's lines of ``responses.jsonl``: method, β, the fine-tuned policy's name, prompt
    index, sample, prompt, response, tokens, KL and reward."""
    condition, m = sampled.condition, sampled.condition.samples
    policy = {} if condition.tuned is None else {"policy": condition.tuned.name}
    return [{"method": condition.method, "beta": condition.beta, **policy, "prompt_index": i // m, "sample": i % m,
             "prompt": sampled.prompts[i], "response": r["response"], "tokens": r["tokens"], "kl": r["kl"],
             "reward": x} for i, (r, x) in enumerate(zip(sampled.results, sampled.rewards.tolist()))]


def write_evaluation(out_dir: Path, report: dict, rows: Sequence[dict]) -> None:
    """Write ``report.json``, ``responses.jsonl`` and ``reward_vs_kl.png`` into ``out_dir`` at once (made in
    ``<out_dir>.partial/report``, then renamed), and drop ``<out_dir>.partial``."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    tmp = partial / "report"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_json_atomic(tmp / "report.json", report)
    write_text_atomic(tmp / "responses.jsonl", "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    plot_reward_vs_kl(report, tmp / "reward_vs_kl.png")
    tmp.rename(out_dir)
    shutil.rmtree(partial)


def summary_sentence(report: dict) -> str:
    """One sentence on where VAS stands, from :func:`evaluate`'s report: its best β against plain sampling (the
    difference with its standard error), the largest Best-of-N, and which Best-of-N rewards some β reaches at no
    more KL than their bound, and VAS's KL overhead against the estimated optimum (where the report has it)."""
    plain = report["plain"]
    parts = []
    if report["vas"]:
        best = max(report["vas"], key=lambda v: v["reward"])
        gain_sem = math.hypot(best["reward_sem"], plain["reward_sem"])
        parts.append(f"VAS's best β ({best['beta']:g}) reaches a mean reward of {best['reward']:.3f} against "
                     f"{plain['reward']:.3f} for plain sampling ({best['reward'] - plain['reward']:+.3f} ± "
                     f"{gain_sem:.3f}) at KL {best['kl']:.2f} nats and {best['seconds_per_prompt']:.2f} s per prompt")
        if report.get("optimum"):
            parts.append(optimum_clause(report["optimum"], best))
    if report["best_of_n"]:
        top = max(report["best_of_n"], key=lambda b: b["n"])
        parts.append(f"Best-of-{top['n']} reaches {top['reward']:.3f} at KL ≤ {top['kl']:.2f} and "
                     f"{top['seconds_per_prompt']:.2f} s per prompt")
    if report["vas"] and report["best_of_n"]:
        matched = [b["n"] for b in report["best_of_n"] if b["n"] > 1
                   and any(v["reward"] >= b["reward"] and v["kl"] <= b["kl"] for v in report["vas"])]
        parts.append(f"at no more KL, VAS reaches the reward of {', '.join(f'Best-of-{n}' for n in matched)}" if matched
                     else "no β reaches a Best-of-N reward (N > 1) at or below its KL")
    return "; ".join(parts) + "."


def optimum_clause(optimum: dict, point: dict) -> str:
    """How much more KL than the estimated optimum (:func:`optimum_frontier`) a method's ``point`` needs for its
    reward, as a clause of :func:`summary_sentence`."""
    curve = [(p["kl"], p["reward"]) for p in optimum["points"]]
    overhead = kl_overhead(point["kl"], point["reward"], optimum)
    if overhead is not None:
        return (f"the KL-optimal policy π0·exp(r/α)/Z, estimated on π0's pool, reaches that reward at KL "
                f"{kl_at_reward(curve, point['reward']):.2f}, so VAS's KL overhead there is {overhead:.1f}×")
    if not _above(point["reward"], curve[0][1]):
        return "that reward is no more than plain sampling's, which the KL-optimal policy reaches at KL 0"
    return (f"that reward is beyond what the KL-optimal policy's estimate on π0's pool reaches ({curve[-1][1]:.3f} "
            f"at KL {curve[-1][0]:.2f}; the estimate's KL is capped at log M = {optimum['kl_cap']:.2f})")


def plot_reward_vs_kl(report: dict, path: str | Path) -> None:
    """Reward against KL(π‖π0) for plain sampling, VAS (one point per β), Best-of-N (KL bound), the fine-tuned
    policies and the estimated KL-optimal frontier (where the report has it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    bon = report["best_of_n"]
    ax.errorbar([b["kl"] for b in bon], [b["reward"] for b in bon], yerr=[b["reward_sem"] for b in bon],
                marker="s", capsize=3, label="Best-of-N (KL bound)")
    for b in bon:
        ax.annotate(f"N={b['n']}", (b["kl"], b["reward"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    vas = sorted(report["vas"], key=lambda v: v["kl"])
    ax.errorbar([v["kl"] for v in vas], [v["reward"] for v in vas], yerr=[v["reward_sem"] for v in vas],
                marker="o", capsize=3, label="VAS (exact KL)")
    for v in vas:
        ax.annotate(f"β={v['beta']:g}", (v["kl"], v["reward"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for f in report.get("finetuned", []):
        ax.errorbar([f["kl"]], [f["reward"]], yerr=[f["reward_sem"]], marker="D", capsize=3, linestyle="none",
                    label=f"{f['name']} (exact KL)")
    if report.get("optimum"):
        points = report["optimum"]["points"]
        ax.plot([p["kl"] for p in points], [p["reward"] for p in points], color="grey", linestyle="--",
                label=f"KL-optimal π0·exp(r/α)/Z (estimate on π0's pool; KL ≤ log M = {report['optimum']['kl_cap']:.2f})")
    plain = report["plain"]
    ax.errorbar([0.0], [plain["reward"]], yerr=[plain["reward_sem"]], marker="*", markersize=12, color="black",
                capsize=3, linestyle="none", label="plain sampling (π0)")
    ax.set_xlabel("KL(π ‖ π0) per response [nats]")
    ax.set_ylabel("mean reward (held-out prompts)")
    ax.set_title(f"Reward vs KL ({report['settings']['prompts']} held-out prompts, ±1 s.e.)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with replace_atomic(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
