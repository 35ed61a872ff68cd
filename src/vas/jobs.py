"""Long jobs: many prompts, run in batches or concurrently, each finished row kept at once so that an
interrupted job resumes where it stopped and gives what an uninterrupted one would.

This is the one resume mechanism of ``collect``, ``generate``, ``evaluate`` and the experiments:

* :class:`RowLog` keeps finished rows in ``<out>.partial`` (one JSON line each) and refuses to resume under
  other settings;
* :func:`chunk_seed` fixes the seed of batch i by (seed, i) alone;
* :func:`run_concurrently` runs the unfinished batches, ``concurrency`` at once, with a progress bar;
* :func:`generate` puts them together around the decoding loop (:func:`vas.decoding.loop.decode`), and
  :func:`sample_responses` around a server's whole-response sampling;
* :func:`trainer_checkpoint` resumes a training run (``vas train``, ``vas finetune``) from its newest
  checkpoint, refusing other settings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vas.decoding.loop import Steering, decode, run_sync
from vas.errors import VasError
from vas.policy.local import Prompt
from vas.storage import require_absent, write_text_atomic


def chunk_seed(seed: int, chunk: int) -> int:
    """The RNG seed of batch ``chunk``: fixed by (seed, chunk) alone, so resuming changes nothing."""
    return (seed * 1_000_003 + chunk) % (2**63)


def prompts_digest(prompts: Sequence[Prompt]) -> str:
    """A short hash of the prompt list: a resumed run must have the same prompts, not only as many."""
    return hashlib.sha256(json.dumps([p if isinstance(p, str) else list(p) for p in prompts]).encode()).hexdigest()[:16]


class RowLog:
    """The finished rows of a long job, kept as they finish so that an interrupted job resumes.

    Rows are appended as JSON lines to ``<out>.partial`` (its first line holds the job's settings), one
    ``write`` and ``fsync`` per row; a line torn by a crash is dropped on reopening. :meth:`finish` writes
    all rows to ``out`` atomically, in key order, and removes the partial file.

    Args:
        out: the final JSON-lines file (must not exist).
        settings: JSON-able settings of the job; a partial file with finished rows under other settings is
            refused (one without rows is started afresh).
        key: the row field that identifies a row (an int).

    Raises:
        VasError: if ``out`` exists, or the partial file holds rows made with other settings.
    """

    def __init__(self, out: str | Path, settings: dict, key: str = "prompt_index"):
        self.out, self.key = Path(out), key
        require_absent(self.out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        settings = json.loads(json.dumps(settings))
        self.rows: dict[int, dict] = {}
        if self.partial.is_dir():
            raise VasError(f"{self.partial} is a folder of chunks from an older version of vas: delete it to start over")
        if self.partial.exists():
            lines = self.partial.read_text(encoding="utf-8", errors="replace").split("\n")
            previous = json.loads(lines[0])
            if previous != settings and any(line.strip() for line in lines[1:]):
                changed = option_names(changed_settings(previous, settings))
                raise VasError(f"{self.partial} was started with other settings ({', '.join(changed)}): "
                               "delete it or restore them")
            for line in lines[1:] if previous == settings else []:  # no finished row: new settings are fine
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # the torn last line of a crash, or the final newline
                self.rows[row[key]] = row
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.partial, "".join(json.dumps(r) + "\n" for r in [settings, *self.rows.values()]))

    def abandon(self) -> None:
        """Remove the partial file if it holds no finished row (a run that failed before finishing one)."""
        if not self.rows:
            self.partial.unlink(missing_ok=True)

    def append(self, row: dict) -> None:
        """Keep one finished row (durably)."""
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")  # ASCII: a torn line never splits a character
            f.flush()
            os.fsync(f.fileno())
        self.rows[row[self.key]] = row

    def ordered(self) -> list[dict]:
        """The finished rows in key order (the partial file stays: the caller saves them in another form,
        then calls :meth:`discard`)."""
        return [self.rows[k] for k in sorted(self.rows)]

    def finish(self) -> list[dict]:
        """Write every row to ``out`` as JSON lines (atomically, in key order), remove the partial file, and
        return the rows."""
        rows = self.ordered()
        write_text_atomic(self.out, "".join(json.dumps(r) + "\n" for r in rows))
        self.discard(self.out)
        return rows

    @staticmethod
    def discard(out: str | Path) -> None:
        """Remove the partial file of ``out`` (once its rows are saved elsewhere)."""
        out = Path(out)
        out.with_name(out.name + ".partial").unlink(missing_ok=True)


def changed_settings(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ between two settings dicts, nested dicts as ``outer.inner``."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += changed_settings(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(prefix + k)
    return out


_OPTION_NAMES = {"num_prompts": "the prompts", "prompts_sha256": "the prompts", "weights": "the --value weights",
                 "base": "--base-model", "learning_rate": "--lr", "lam": "--lambda", "data": "the data",
                 "value_sha256": "the value models (retrained since)"}


def option_names(keys: Sequence[str]) -> list[str]:
    """What a user changed, named by the command's options, from settings keys (:func:`changed_settings`):
    ``max_new_tokens`` → ``--max-new-tokens``, ``config.learning_rate`` → ``--lr``, any ``policy.*`` → π0's options.
    Duplicates are dropped."""
    names = []
    for key in keys:
        last = key.rsplit(".", 1)[-1]
        if key.startswith("policy."):
            name = "π0 (--base-model, --dtype or --api-*)"
        else:
            name = _OPTION_NAMES.get(last, "--" + last.replace("_", "-"))
        if name not in names:
            names.append(name)
    return names


def trainer_checkpoint(checkpoint_dir: str | Path, settings: dict) -> str | None:
    """The one way a :class:`transformers.Trainer` run resumes: ``checkpoint_dir`` keeps the run's settings in
    ``vas_train.json`` beside the Trainer's checkpoints; an existing folder must hold the same settings.

    Returns:
        The newest complete checkpoint (its ``trainer_state.json``, which the Trainer writes last, a whole JSON
        document: an interrupt while saving leaves a newer, incomplete one, which is skipped), or None to start
        afresh.

    Raises:
        VasError: if ``checkpoint_dir`` holds an interrupted run with other settings (named by option).
    """
    checkpoint_dir = Path(checkpoint_dir)
    settings = json.loads(json.dumps(settings))
    settings_file = checkpoint_dir / "vas_train.json"
    if checkpoint_dir.exists():
        previous = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        if previous != settings:
            raise VasError(f"{checkpoint_dir} holds an interrupted run with other settings "
                           f"({', '.join(option_names(changed_settings(previous, settings)))}): restore them to resume "
                           "it, or delete it")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(settings_file, json.dumps(settings))
    checkpoints = sorted((c for c in checkpoint_dir.glob("checkpoint-*") if _complete(c)),
                         key=lambda c: int(c.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def _complete(checkpoint: Path) -> bool:
    """Whether the Trainer finished saving ``checkpoint``: its ``trainer_state.json``, written last and not
    atomically, holds a whole JSON document (an interrupt during that write leaves it empty or cut short)."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


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


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a finished JSON-lines file written by :func:`generate` or :meth:`RowLog.finish`."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
