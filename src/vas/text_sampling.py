"""VAS at the text level: for a base policy that only tells its top-k next tokens as text (an API model,
Sec. 4.4) or whose tokenizer differs from the value models'.

Each step asks the policy for its top-k next tokens with log p (temperature 1), applies the temperature
rule of :mod:`vas.guidance` (log π0(x|s) = log p(x|s) / τ), scores every candidate string with each value
model (:class:`vas.value.TextCandidateScorer`, its own tokenizer) and combines them by Eq. 5:

    log π(x|s) = log π0(x|s) + β·Σ_i w_i V_i(s ⊕ x) − log Z      over the k returned tokens.

The rest of π0's distribution is not known to a black-box client, so π is normalised over the k returned
tokens: App. D.1's masked variant, which Sec. 4.4 also uses (it takes the argmax, ``greedy``). With k = 20
at τ = 0.7 the tokens outside hold little mass; :attr:`TextResult.outside_mass` measures it (at τ = 1) for
every response. The KL reported is the exact per-step KL(π ‖ π0 restricted to the same k tokens), summed.

:func:`generate` runs many prompts concurrently (one coroutine per prompt, at most ``concurrency`` at once),
appends each finished response to ``<out>.partial`` as it finishes, and resumes from it after an interrupt
or a failure.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from vas.errors import VasError
from vas.guidance import kl_divergence, steered_logprobs
from vas.models import cache_kwargs, crop_cache
from vas.prompts import encode_prompts
from vas.storage import RowLog
from vas.value import TextCandidateScorer, ValueModel, common_prefix_length


class TopKPolicy(Protocol):
    """A base policy that tells its next-token top-k as text (:class:`vas.api.ApiPolicy`, :class:`LocalTopKPolicy`)."""

    async def next_token(self, prompt: str, text: str, top_k: int) -> list[tuple[str | None, float]]:
        """k (candidate text or ``None`` for the end, log p at temperature 1) pairs, most likely first."""
        ...


@dataclass
class TextSteering:
    """Value guidance at the text level: value models with their tokenizers, weights (Sec. 4.2), β and k.

    Attributes:
        value_models: (value model, its tokenizer) pairs; none gives plain sampling through the top-k.
        weights: one per value model (default 1 each).
        beta: β; 0 gives π0 restricted to its top-k.
        top_k: k, at most what the server returns.
        value_prompt: maps the policy's prompt to the prompt the value models read (each through its own chat
            template), e.g. the task without a long constant instruction; the same map must have built the
            training rows (:func:`vas.collect.collect_api`). Default: the policy's prompt.
    """

    value_models: Sequence[tuple[ValueModel, object]] = ()
    weights: Sequence[float] | None = None
    beta: float = 1.0
    top_k: int = 10
    value_prompt: Callable[[str], str] | None = None

    def __post_init__(self):
        self.weights = list(self.weights) if self.weights is not None else [1.0] * len(self.value_models)
        if len(self.weights) != len(self.value_models):
            raise VasError(f"{len(self.weights)} weights given for {len(self.value_models)} value models")
        if self.top_k < 1:
            raise VasError(f"k must be ≥ 1, got {self.top_k}")
        if not math.isfinite(self.beta) or not all(math.isfinite(w) for w in self.weights):
            raise VasError(f"beta and the weights must be finite numbers, got beta={self.beta}, weights={self.weights}")


@dataclass
class TextResult:
    """One response of :func:`steer_text`.

    Attributes:
        response: the response text.
        tokens: the policy's tokens generated (= requests made).
        finished: True if the response ended by itself, False if cut at ``max_new_tokens``.
        kl: Σ_t KL(π ‖ π0|top-k) in nats (0 without value models).
        outside_mass: mean over steps of 1 − Σ_top-k p (at temperature 1): the probability π0 puts outside
            the tokens the policy told.
    """

    response: str
    tokens: int
    finished: bool
    kl: float
    outside_mass: float


async def steer_text(policy: TopKPolicy, prompt: str, steering: TextSteering, *, temperature: float = 0.7,
                     max_new_tokens: int = 64, greedy: bool = False, seed: int = 0,
                     value_lock: asyncio.Lock | None = None) -> TextResult:
    """Generate one response, one policy request per token, steered by Eq. 5 over the top-k.

    Args:
        policy: the base policy π0 (top-k at the text level).
        prompt: the prompt text (each value model applies its own chat template, as in training).
        steering: value models, weights, β and k.
        temperature: τ > 0 applied to π0's log-probabilities before the augmentation.
        max_new_tokens: the most tokens (requests) per response.
        greedy: take argmax π (Sec. 4.4) instead of sampling.
        seed: seeds this response's draws.
        value_lock: serialises value-model forwards between concurrent prompts (they run in a worker thread).

    Returns:
        :class:`TextResult`.

    Raises:
        VasError: from the policy (failed request, missing or too few log-probabilities), or for a value model
            that returns a non-finite value.
    """
    if not (0 < temperature < math.inf):
        raise VasError(f"temperature must be a finite number > 0, got {temperature}")
    value_prompt = steering.value_prompt(prompt) if steering.value_prompt else prompt
    scorers = [TextCandidateScorer(model, tokenizer, encode_prompts(tokenizer, [value_prompt])[0])
               for model, tokenizer in steering.value_models] if steering.beta != 0 else []
    rng = random.Random(seed)
    text, kl, outside, finished, steps = "", 0.0, 0.0, False, 0
    while steps < max_new_tokens:
        pairs = (await policy.next_token(prompt, text, steering.top_k))[: steering.top_k]
        candidates = [c for c, _ in pairs]
        logp = torch.tensor([lp for _, lp in pairs], dtype=torch.float64)
        outside += max(0.0, 1.0 - float(logp.exp().sum()))
        base = torch.log_softmax(logp / temperature, dim=0).float()[None]  # (1, k) log π0 restricted to the top-k
        if scorers:
            values = await _values(scorers, steering.weights, text, candidates, value_lock)
            ids = torch.arange(len(candidates))[None]
            try:
                steered = steered_logprobs(base, ids, values[None], steering.beta)
            except ValueError as exc:
                raise VasError(f"steering failed: {exc}") from None
            kl += float(kl_divergence(steered, base)[0])
        else:
            steered = base
        probs = steered[0].double().exp()
        choice = int(probs.argmax()) if greedy else rng.choices(range(len(candidates)), weights=probs.tolist())[0]
        steps += 1
        if candidates[choice] is None:
            finished = True
            break
        text += candidates[choice]
    return TextResult(text, steps, finished, kl, outside / max(steps, 1))


async def _values(scorers, weights, text, candidates, lock) -> torch.Tensor:
    def run():
        return sum(w * s.score(text, candidates) for w, s in zip(weights, scorers))

    if lock is None:
        return run()
    async with lock:
        return await asyncio.to_thread(run)


def run_concurrently(policy, todo: Sequence[int], work, *, concurrency: int, total: int, desc: str,
                     progress: bool, log: RowLog | None = None) -> None:
    """Run the coroutine ``work(i)`` for every i in ``todo``, at most ``concurrency`` at once, with a progress bar
    over ``total`` items; on the first failure cancel the rest, and in every case close the policy (its
    HTTP client) if it has ``close``. ``work`` keeps its results in ``log``; a failure's message then says how
    many are kept, and a partial file without any is removed.

    Raises:
        VasError: if ``concurrency`` < 1; else what ``work`` raised first (a :class:`VasError` with the
            finished rows counted in its message).
    """
    if concurrency < 1:
        raise VasError(f"concurrency must be ≥ 1, got {concurrency}")

    async def main():
        gate = asyncio.Semaphore(concurrency)
        with tqdm(total=total, initial=total - len(todo), desc=desc, unit="response", disable=not progress) as bar:
            async def one(i: int):
                async with gate:
                    await work(i)
                    bar.update(1)

            tasks = [asyncio.create_task(one(i)) for i in todo]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                close = getattr(policy, "close", None)
                if close is not None:
                    await close()

    try:
        asyncio.run(main())
    except VasError as exc:
        if log is None or not log.rows:
            if log is not None:
                log.abandon()
            raise
        raise VasError(f"{exc}; {len(log.rows)} of {total} finished responses are kept in {log.partial}: run the "
                       "same command again to resume") from None


def prompts_digest(prompts: Sequence[str]) -> str:
    """A short hash of the prompt list: a resumed run must have the same prompts, not only as many."""
    import hashlib

    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]


def generate(policy: TopKPolicy, prompts: Sequence[str], steering: TextSteering, out: str | Path, *,
             temperature: float = 0.7, max_new_tokens: int = 64, greedy: bool = False, seed: int = 0,
             concurrency: int = 8, settings: dict | None = None, progress: bool = True) -> list[dict]:
    """Steer every prompt (concurrently) and write one JSON line per response to ``out``; closes the policy.

    Finished responses are appended to ``<out>.partial`` as they finish, so a cancelled or failed run keeps
    them, and the same call resumes with the rest (refusing if the settings, the prompts or the policy's
    settings changed). Response i always uses seed (seed, i), so a resumed run gives what an uninterrupted
    one would.

    Returns:
        The rows in prompt order: prompt_index, prompt, response, tokens, finished, kl, outside_mass, seconds.

    Raises:
        VasError: for a temperature ≤ 0 or max_new_tokens < 1; if ``out`` exists, the partial file holds rows
            made with other settings, or a request fails (after retries; finished rows are kept).
    """
    import time

    from vas.collect import chunk_seed

    if not (0 < temperature < math.inf) or max_new_tokens < 1:
        raise VasError(f"temperature must be > 0 and max_new_tokens ≥ 1, got {temperature} and {max_new_tokens}")
    settings = {"beta": steering.beta, "top_k": steering.top_k, "weights": list(steering.weights),
                "temperature": temperature, "max_new_tokens": max_new_tokens, "greedy": greedy, "seed": seed,
                "num_prompts": len(prompts), "prompts_sha256": prompts_digest(prompts),
                "policy": getattr(policy, "settings", {}), **(settings or {})}
    log = RowLog(out, settings)
    lock = asyncio.Lock()

    async def work(i: int):
        start = time.perf_counter()
        result = await steer_text(policy, prompts[i], steering, temperature=temperature, max_new_tokens=max_new_tokens,
                                  greedy=greedy, seed=chunk_seed(seed, i), value_lock=lock)
        log.append({"prompt_index": i, "prompt": prompts[i], **asdict(result), "seconds": time.perf_counter() - start})

    run_concurrently(policy, [i for i in range(len(prompts)) if i not in log.rows], work, concurrency=concurrency,
                     total=len(prompts), desc="steer", progress=progress, log=log)
    return log.finish()


class LocalTopKPolicy:
    """A local transformers causal LM behind the :class:`TopKPolicy` interface, so that value models with
    another tokenizer can steer it through the text-level path.

    Candidate texts are found by decoding whole sequences (``decode(ids + [x])`` minus ``decode(ids)``), never a
    token alone (leading spaces and byte-level merges). A token that is only part of a multi-byte character
    has no text to append and is skipped (the next most likely token takes its place); EOS and special
    tokens are the end (``None``). A KV cache of the longest stable prefix is kept between calls.

    Args:
        model: the base policy π0.
        tokenizer: its tokenizer (chat template applied to the prompt).
        eos_token_ids: ids that end a response.
    """

    def __init__(self, model, tokenizer, eos_token_ids: Sequence[int]):
        from transformers import DynamicCache

        self.model, self.tokenizer, self.eos = model, tokenizer, set(eos_token_ids)
        self._new_cache = lambda: DynamicCache(config=model.config)
        self._cache, self._cached_ids = None, []
        self._prompt: tuple[str | None, list[int]] = (None, [])

    async def next_token(self, prompt: str, text: str, top_k: int) -> list[tuple[str | None, float]]:
        with torch.no_grad():
            return self._next_token(prompt, text, top_k)

    def _next_token(self, prompt: str, text: str, top_k: int) -> list[tuple[str | None, float]]:
        if self._prompt[0] != prompt:  # the chat template once per prompt, not once per token
            self._prompt = (prompt, encode_prompts(self.tokenizer, [prompt])[0])
        prompt_ids = self._prompt[1]
        response_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids = prompt_ids + response_ids
        keep = common_prefix_length(self._cached_ids, ids[:-1])
        if self._cache is None or keep == 0:
            self._cache, keep = self._new_cache(), 0
        crop_cache(self._cache, keep)
        out = self.model(input_ids=torch.tensor([ids[keep:]], device=self.model.device),
                         position_ids=torch.arange(keep, len(ids), device=self.model.device)[None],
                         **cache_kwargs(self.model, self._cache), logits_to_keep=1)
        self._cached_ids = ids
        logp = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
        before = self.tokenizer.decode(response_ids, skip_special_tokens=True)
        merged: dict[str | None, float] = {}
        top = logp.topk(min(len(logp), 2 * top_k + 8))  # spares for skipped tokens
        for lp, token in zip(top.values.tolist(), top.indices.tolist()):
            if token in self.eos:
                piece = None
            else:
                after = self.tokenizer.decode(response_ids + [token], skip_special_tokens=True)
                piece = after[len(os.path.commonprefix([before, after])):] or None
                if piece is not None and "\ufffd" in piece:
                    continue  # part of a multi-byte character: no text to append
            merged[piece] = float(torch.logaddexp(torch.tensor(merged[piece]), torch.tensor(lp))) if piece in merged else lp
            if len(merged) >= top_k:
                break
        pairs = list(merged.items())
        return pairs
