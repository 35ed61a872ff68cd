"""Judges that steering was not optimised for, to catch reward hacking (paper Sec. 4, App. E).

* **A second scorer.** Score every response with a reward the value model never saw (e.g. TextBlob polarity
  when VAS optimised VADER) and report each method's win rate against plain sampling from π0.
* **An LLM judge.** Any OpenAI-compatible endpoint, asked the pairwise question of App. E.2 (“which output
  is preferred, Output (a) or Output (b)?”), one pair per request, the order of the pair drawn at random.

Win rates count a tie as half a win, so two samples of the same policy have a win rate of exactly 0.5.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vas.config import check_positive
from vas.errors import VasError


def _wins(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1 where x > y, 0.5 where equal, 0 where x < y (broadcast)."""
    return (x > y).float() + 0.5 * (x == y).float()


def win_rate_against_pool(judge_scores: torch.Tensor, pool_scores: torch.Tensor) -> torch.Tensor:
    """Per-prompt win rate of responses against π0's pool under a judge.

    Args:
        judge_scores: (P, m) judge score of m responses of the method under test for each prompt.
        pool_scores: (P, n) judge score of n plain π0 samples for the same prompts.

    Returns:
        (P,) float32: the mean over the m responses and the n pool samples of the win indicator.
    """
    return _wins(judge_scores[:, :, None], pool_scores[:, None, :]).mean(dim=(1, 2))


def best_of_n_win_rate(pool_rewards: torch.Tensor, pool_scores: torch.Tensor, N: int) -> torch.Tensor:
    """Per-prompt win rate of Best-of-N (chosen by the reward) against a plain π0 sample (both judged by the
    judge), estimated without bias from one pool of n samples per prompt.

    Over every N-subset S of the pool and every opponent j outside S: the best of S is the i-th smallest
    reward of S's members, and the pair (i, j) occurs in C(i−1, N−1) subsets when j ranks above i and in
    C(i−2, N−1) when j ranks below (S must hold i but not j); the estimate is the weighted mean of the win
    indicators over all pairs, the weights summing to C(n, N)·(n − N). N = 1 gives 0.5.

    Args:
        pool_rewards: (P, n) reward of the pool samples (what Best-of-N maximises).
        pool_scores: (P, n) judge score of the same samples.
        N: 1 ≤ N < n (an opponent must remain outside the subset).

    Returns:
        (P,) float32.

    Raises:
        ValueError: unless 1 ≤ N < n.
    """
    P, n = pool_rewards.shape
    if not 1 <= N < n:
        raise ValueError(f"need 1 ≤ N < n (pool size), got N={N}, n={n}")
    order = pool_rewards.argsort(dim=1)
    sorted_scores = pool_scores.gather(1, order)  # (P, n), by increasing reward
    pairwise = _wins(sorted_scores[:, :, None], sorted_scores[:, None, :])  # (P, n, n): best i vs opponent j
    weights = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):  # 0-based rank i has i samples below it
        for j in range(n):
            if j > i:
                weights[i, j] = math.comb(i, N - 1)
            elif j < i:
                weights[i, j] = math.comb(i - 1, N - 1)
    weights /= math.comb(n, N) * (n - N)
    return (pairwise.double() * weights).sum(dim=(1, 2)).float()


def read_responses(eval_dir: str | Path) -> list[dict]:
    """The rows of ``responses.jsonl`` written by :func:`vas.evaluate.evaluate`.

    Raises:
        VasError: if the file is missing or not JSON lines.
    """
    path = Path(eval_dir) / "responses.jsonl"
    if not path.is_file():
        raise VasError(f"{path} not found: pass the --out folder of `vas evaluate` (or an experiment's eval folder)")
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise VasError(f"{path} is not JSON lines: {exc}") from None


def pool_tensor(rows: Sequence[dict], key: str) -> torch.Tensor:
    """(P, n) tensor of ``key`` over the plain pool rows, indexed by prompt and sample."""
    plain = [r for r in rows if r["method"] == "plain"]
    P, n = 1 + max(r["prompt_index"] for r in plain), 1 + max(r["sample"] for r in plain)
    out = torch.full((P, n), float("nan"))
    for r in plain:
        out[r["prompt_index"], r["sample"]] = r[key]
    return out


# ---------------------------------------------------------------- LLM judge (App. E.2)

SYSTEM_PROMPT = ("You are helpful assistant whose goal is to decide on a preferred answer to a question in a "
                 "dialogue. Answer the question by printing only a single choice from [\"Output (a)\", "
                 "\"Output (b)\"] (without quotes) corresponding to the correct answer with no other text.")
USER_PROMPT = """In this task, we will ask you to select the preferred output AI model's responses. You will read an example, which is composed of the following: 1. A beginning of a conversation between an AI system ("Assistant") and a user ("User") 2. Output (a), the first output from the AI system 3. Output (b), the second output from the AI system. Your task is to decide which response is better. You should answer using only Output (a) or Output (b) without explanation.

## Example 1
### Instruction 1:
{instruction}
### Output (a) for example 1:
{output_a}
### Output (b) for example 1:
{output_b}
## Preferred Output for example 1:"""


def parse_verdict(text: str) -> str | None:
    """``"a"`` or ``"b"`` from a judge's answer such as ``Output (b)``; None if it names neither or both."""
    found = set(re.findall(r"output\s*\(?\s*([ab])\b", text.lower()))
    return found.pop() if len(found) == 1 else None


class LLMJudge:
    """Pairwise judge behind any OpenAI-compatible chat endpoint (the official ``openai`` client).

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or a local server's ``http://127.0.0.1:8000/v1``.
        model: the judge model's name.
        api_key: the key (any string for servers that need none).
        timeout: seconds per request; the client retries 429 and 5xx answers ``max_retries`` times with
            exponential backoff.

    Raises:
        VasError: if ``timeout`` is not > 0.
    """

    def __init__(self, base_url: str, model: str, api_key: str, timeout: float = 60.0, max_retries: int = 4):
        from openai import OpenAI

        check_positive(timeout=timeout)
        self.model, self.base_url = model, base_url
        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)

    def prefer(self, instruction: str, output_a: str, output_b: str) -> str | None:
        """``"a"``, ``"b"`` or None (an answer naming neither). Raises :class:`VasError` if the request fails."""
        import openai

        try:
            answer = self.client.chat.completions.create(
                model=self.model, temperature=0.0, max_tokens=8,
                messages=[{"role": "system", "content": SYSTEM_PROMPT},
                          {"role": "user", "content": USER_PROMPT.format(instruction=instruction, output_a=output_a,
                                                                         output_b=output_b)}])
        except openai.OpenAIError as exc:
            raise VasError(f"the judge endpoint {self.base_url} failed: {type(exc).__name__}: {exc}") from None
        return parse_verdict(answer.choices[0].message.content or "")


def check_judged(betas: Sequence[float], best_of: Sequence[int]) -> None:
    """Raise :class:`VasError` if neither a β nor an N is chosen: nothing to judge."""
    if not betas and not best_of:
        raise VasError("nothing to judge: pass --betas and/or --best-of")


def llm_win_rates(rows: Sequence[dict], judge: LLMJudge, *, betas: Sequence[float], best_of: Sequence[int],
                  seed: int = 0, progress: bool = False) -> tuple[dict, list[dict]]:
    """Win rates against plain sampling under an LLM judge, from :func:`vas.evaluate.evaluate`'s responses.

    For each prompt the plain reference is pool sample 0; VAS at β is its first sample; Best-of-N is the
    highest-reward sample among pool samples 1 … N (so it never contains the reference). Each pair is shown
    in a random order (``seed``); an answer naming neither output counts as a tie. ``progress`` shows a bar over
    the requests.

    Returns:
        (summary: ``{method: {"win_rate", "win_rate_sem", "pairs", "unparsed"}}``, one verdict row per pair).

    Raises:
        VasError: if neither a β nor an N is chosen (:func:`check_judged`), or a β or N is not in the responses
            (N must be below the pool size).
    """
    check_judged(betas, best_of)
    rng = random.Random(seed)
    plain = {(r["prompt_index"], r["sample"]): r for r in rows if r["method"] == "plain"}
    prompts = sorted({p for p, _ in plain})
    n_pool = 1 + max(s for _, s in plain)
    contenders: dict[str, dict[int, dict]] = {}
    for beta in betas:
        chosen = {r["prompt_index"]: r for r in rows if r["method"] == "vas" and r["beta"] == beta and r["sample"] == 0}
        if not chosen:
            raise VasError(f"no VAS responses at β={beta:g} in these results")
        contenders[f"vas β={beta:g}"] = chosen
    for N in best_of:
        if not 1 <= N < n_pool:
            raise VasError(f"Best-of-{N} needs a pool of more than {N} samples; this one has {n_pool}")
        contenders[f"best-of-{N}"] = {p: max((plain[p, s] for s in range(1, N + 1)), key=lambda r: r["reward"])
                                      for p in prompts}
    summary, verdicts = {}, []
    bar = tqdm(total=len(contenders) * len(prompts), desc="judge", unit="pair", disable=not progress)
    for method, chosen in contenders.items():
        wins = []
        for p in prompts:
            reference, candidate = plain[p, 0], chosen[p]
            swap = rng.random() < 0.5
            a, b = (reference, candidate) if swap else (candidate, reference)
            verdict = judge.prefer(reference["prompt"], a["response"], b["response"])
            win = 0.5 if verdict is None else float((verdict == "a") != swap)
            wins.append(win)
            verdicts.append({"method": method, "prompt_index": p, "candidate_first": not swap, "verdict": verdict,
                             "win": win})
            bar.update()
        w = torch.tensor(wins)
        summary[method] = {"win_rate": float(w.mean()),
                           "win_rate_sem": float(w.std() / len(w) ** 0.5) if len(w) > 1 else 0.0,
                           "pairs": len(wins), "unparsed": sum(v["verdict"] is None for v in verdicts
                                                               if v["method"] == method)}
    bar.close()
    return summary, verdicts
