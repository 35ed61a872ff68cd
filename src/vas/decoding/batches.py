"""Many prompts through the decoding loop, run in batches or concurrently, each finished row kept at once
(:class:`vas.resume.RowLog`) so that an interrupted job resumes where it stopped:

* :func:`run_concurrently` runs the unfinished batches, ``concurrency`` at once, with a progress bar;
* :func:`generate` puts them together around the decoding loop (:func:`vas.decoding.loop.decode`), and
  :func:`sample_responses` around a server's whole-response sampling.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vas.decoding.loop import Steering, decode, run_sync
from vas.errors import VasError
from vas.policy.local import Prompt
from vas.resume import RowLog, chunk_seed, prompts_digest


def run_concurrently(policy, todo: Sequence[int], work: Callable[[int, Callable[[int], None]], Awaitable[int]], *,
                     concurrency: int, total: int, done: int, desc: str, progress: bool, log: RowLog | None = None) -> None:
    """Run the coroutine ``work(i, tick)`` for every i in ``todo``, at most ``concurrency`` at once, with a progress
    bar over ``total`` rows (``done`` of them finished before; ``work`` returns how many rows it finished).
    ``work`` may call ``tick(n)`` as it generates n tokens: the bar then shows the tokens generated so far, so
    that a long batch shows progress before its rows finish. On the
    first failure the rest are cancelled, and in every case the policy's HTTP client is closed if it has
    ``close``. ``work`` keeps its results in ``log``; a failure's message then says how many are kept, and a
    partial file without any is removed.

    Raises:
        VasError: if ``concurrency`` < 1; else what ``work`` raised first (a :class:`VasError` with the
            finished rows counted in its message).
    """
    if concurrency < 1:
        raise VasError(f"--concurrency must be ≥ 1, got {concurrency}")

    async def main():
        gate, failed = asyncio.Semaphore(concurrency), asyncio.Event()
        with tqdm(total=total, initial=done, desc=desc, unit="response", disable=not progress, miniters=0) as bar:
            tokens = 0

            def tick(n: int) -> None:
                nonlocal tokens
                tokens += n
                bar.set_postfix_str(f"{tokens} tokens", refresh=False)
                bar.update(0)  # redraws at most every mininterval (miniters=0: also between rows)

            async def one(i: int):
                async with gate:
                    if failed.is_set():  # a batch waiting for the gate when another failed never starts
                        return
                    try:
                        bar.update(await work(i, tick))
                    except BaseException:
                        failed.set()
                        raise

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
        run_sync(main())
    except VasError as exc:
        if log is None or not log.rows:
            if log is not None:
                log.abandon()
            raise
        raise VasError(f"{exc}; {len(log.rows)} of {total} finished responses are kept in {log.partial}: run the "
                       "same command again to resume") from None


def generate(policy, prompts: Sequence[Prompt], steering: Steering | None = None, out: str | Path | None = None, *,
             temperature: float = 0.7, max_new_tokens: int = 64, greedy: bool = False, seed: int = 0,
             batch_size: int = 8, concurrency: int = 1, settings: dict | None = None, progress: bool = True,
             desc: str = "generate", finish: bool = True) -> list[dict]:
    """One response per prompt through the decoding loop: a local policy decodes ``batch_size`` prompts per
    batch, one batch after another; a policy that answers requests (``policy.concurrent``, an API) decodes one
    prompt per batch, ``concurrency`` at once.

    With ``out``, finished rows are appended to ``<out>.partial`` as each batch finishes and written to ``out``
    (JSON lines) at the end; the same call resumes after an interrupt or a failure, refusing other settings.
    Batch b always draws with seed (seed, b), so a resumed run gives what an uninterrupted one would.

    Args:
        policy: π0 (:class:`vas.policy.local.LocalPolicy`, :class:`vas.policy.api.ApiPolicy`); an API policy is closed
            at the end.
        prompts: texts, or token id lists for a local policy.
        steering: value guidance (per-row β and weights follow the prompts), or None for plain sampling.
        settings: more JSON-able settings that a resumed run must share (model names …).
        finish: write the rows to ``out`` at the end and remove the partial file (False: return them and keep the
            partial file, for a caller that saves them in another form and then calls :meth:`RowLog.discard`,
            or that resumes them later).

    Returns:
        The rows in prompt order: ``prompt_index``, ``prompt`` (text prompts), ``response``, ``tokens`` (steps,
        the ending one included), ``finished``, ``kl`` (nats), ``outside_mass``, ``seconds`` (the batch's decoding
        time per row), ``response_ids`` (π0's token ids; None for an API policy) and ``logprobs`` (log π0 of
        each chosen token at the temperature).

    Raises:
        VasError: for batch_size or concurrency < 1; if ``out`` exists or its partial file holds other
            settings; and from :func:`vas.decoding.loop.decode` (finished rows are kept).
    """
    if batch_size < 1:
        raise VasError(f"--batch-size must be ≥ 1, got {batch_size}")
    if getattr(policy, "concurrent", False):
        batch_size = 1
    else:
        concurrency = 1
    batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
    log = None
    rows: dict[int, dict] = {}
    if out is not None:
        beta = torch.as_tensor(steering.beta).tolist() if steering else 0.0
        weights = torch.as_tensor(steering.weights).tolist() if steering else []
        log = RowLog(out, {"beta": beta, "weights": weights, "top_k": steering.top_k if steering else None,
                           "mask_outside_top_k": steering.mask_outside_top_k if steering else False,
                           "soft": torch.as_tensor(steering.soft).tolist() if steering else False,
                           "temperature": temperature, "max_new_tokens": max_new_tokens, "greedy": greedy,
                           "seed": seed, "batch_size": batch_size, "num_prompts": len(prompts),
                           "prompts_sha256": prompts_digest(prompts), "policy": getattr(policy, "settings", {}),
                           **(settings or {})})
        rows = log.rows
    lock = asyncio.Lock() if concurrency > 1 else None

    async def work(b: int, tick: Callable[[int], None]) -> int:
        index = batches[b]
        start = time.perf_counter()
        result = await decode(policy, [prompts[i] for i in index], steering.select(index) if steering else None,
                              temperature=temperature, max_new_tokens=max_new_tokens, greedy=greedy,
                              generator=torch.Generator().manual_seed(chunk_seed(seed, b)), value_lock=lock,
                              on_step=tick)
        seconds = (time.perf_counter() - start) / len(index)
        for j, i in enumerate(index):
            row = {"prompt_index": i, "prompt": prompts[i] if isinstance(prompts[i], str) else None,
                   "response": result.texts[j], "tokens": int(result.steps[j]), "finished": bool(result.finished[j]),
                   "kl": float(result.kl[j]), "outside_mass": float(result.outside_mass[j]), "seconds": seconds,
                   "response_ids": result.token_ids[j] if result.token_ids is not None else None,
                   "logprobs": result.base_logprobs[j]}
            if log is not None:
                log.append(row)
            else:
                rows[i] = row
        return len(index)

    todo = [b for b, index in enumerate(batches) if not all(i in rows for i in index)]
    run_concurrently(policy, todo, work, concurrency=concurrency, total=len(prompts), done=len(rows), desc=desc,
                     progress=progress, log=log)
    if log is None:
        return [rows[i] for i in sorted(rows)]
    return log.finish() if finish else log.ordered()


def sample_responses(policy, prompts: Sequence[str], out: str | Path, *, temperature: float, max_new_tokens: int,
                     seed: int = 0, concurrency: int = 8, settings: dict | None = None, progress: bool = True,
                     desc: str = "sample", finish: bool = True) -> list[dict]:
    """Whole responses sampled by a server (:meth:`vas.api.ApiPolicy.sample`, one request each, ``concurrency``
    at once; response r asks for seed (seed, r)), kept as they finish in ``<out>.partial``: the same
    resumable job as :func:`generate`, for plain sampling at the server's speed.

    Returns:
        The rows in prompt order: ``prompt_index``, ``prompt``, ``response``, ``tokens``, ``finished``, ``seconds``.

    Raises:
        VasError: as :func:`generate`; temperature < 0 or max_new_tokens < 1.
    """
    if not (0 <= temperature < math.inf) or max_new_tokens < 1:
        raise VasError(f"--temperature must be ≥ 0 and --max-new-tokens ≥ 1, got {temperature} and {max_new_tokens}")
    log = RowLog(out, {"temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed,
                       "num_prompts": len(prompts), "prompts_sha256": prompts_digest(prompts),
                       "policy": policy.settings, **(settings or {})})

    async def work(r: int, tick: Callable[[int], None]) -> int:
        start = time.perf_counter()
        c = await policy.sample(prompts[r], max_new_tokens=max_new_tokens, temperature=temperature, seed=chunk_seed(seed, r))
        log.append({"prompt_index": r, "prompt": prompts[r], "response": c.text, "tokens": c.tokens,
                    "finished": c.finished, "seconds": time.perf_counter() - start})
        return 1

    run_concurrently(policy, [r for r in range(len(prompts)) if r not in log.rows], work, concurrency=concurrency,
                     total=len(prompts), done=len(log.rows), desc=desc, progress=progress, log=log)
    return log.finish() if finish else log.ordered()
