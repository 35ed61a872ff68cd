"""Collect: sample responses from the frozen base policy π0 and score them with the reward (paper Sec. 3.3,
App. C.1: temperature 0.7).

The result is a `datasets` folder with one row per response. Work is done in chunks of ``batch_size``
responses; each finished chunk is saved atomically as a shard in ``<out>.partial/``, and chunk i always
uses the random seed (seed, i), so an interrupted collect resumes where it stopped and produces exactly
the rows an uninterrupted one would. When all chunks are done the shards are joined into ``<out>``
(atomically) and the partial folder is removed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from vas.errors import VasError
from vas.models import eos_token_ids
from vas.prompts import encode_prompts
from vas.rewards import Reward, score
from vas.sampling import sample
from vas.storage import (
    changed_settings,
    load_dataset_dir,
    require_absent,
    save_dataset_atomic,
    write_json_atomic,
)

COLUMNS = {
    "prompt": "prompt text as given (before the chat template)",
    "prompt_ids": "token ids fed to π0 (chat template applied)",
    "response": "decoded response text (special tokens removed)",
    "response_ids": "generated token ids, EOS included when generated",
    "logprobs": "log π0(x_t | s_{t-1}) of each response token, at the sampling temperature",
    "reward": "reward of the response (float)",
    "finished": "True if the response ended with EOS, False if cut at max_new_tokens",
    "prompt_index": "index of the prompt in the prompt list",
}
REQUIRED_FOR_TRAINING = {"prompt_ids", "response_ids", "reward"}
_META = "vas_collect.json"


def chunk_seed(seed: int, chunk: int) -> int:
    """The RNG seed of chunk ``chunk``: fixed by (seed, chunk) alone, so resuming changes nothing."""
    return (seed * 1_000_003 + chunk) % (2**63)


def collect(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    reward: Reward,
    out_dir: str | Path,
    *,
    samples_per_prompt: int = 1,
    temperature: float = 0.7,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    metadata: dict | None = None,
    progress: bool = True,
) -> datasets.Dataset:
    """Sample ``samples_per_prompt`` responses per prompt from π0, score them, save them to ``out_dir``.

    Args:
        policy, tokenizer: the frozen base policy π0 and its tokenizer.
        prompts: prompt texts (the chat template is applied here).
        reward: scores (prompt, response) pairs.
        out_dir: destination folder (``datasets`` format); ``<out_dir>.partial`` holds work in progress.
        metadata: JSON-able description of the run (model, reward spec …), stored with the data; a resume
            must pass the same metadata.

    Returns:
        The collected dataset, columns :data:`COLUMNS`, ``len(prompts) * samples_per_prompt`` rows.

    Raises:
        VasError: if ``out_dir`` exists already, a partial run used other settings, a reward is non-finite,
            or a prompt does not fit the context window.
    """
    out_dir = Path(out_dir)
    settings = {
        "samples_per_prompt": samples_per_prompt, "temperature": temperature, "max_new_tokens": max_new_tokens,
        "batch_size": batch_size, "seed": seed, "num_prompts": len(prompts), **(metadata or {}),
    }
    require_absent(out_dir)
    if samples_per_prompt < 1 or batch_size < 1:
        raise VasError("samples_per_prompt and batch_size must be ≥ 1")
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(samples_per_prompt)]
    prompt_ids = encode_prompts(tokenizer, prompts)
    chunks = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    eos_ids = eos_token_ids(policy, tokenizer)
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    meta_path = partial / _META
    if meta_path.exists():
        previous = json.loads(meta_path.read_text())
        if previous != settings:
            changed = changed_settings(previous, settings)
            raise VasError(f"{partial} was started with other settings ({', '.join(changed)}): delete it or restore them")
    else:
        write_json_atomic(meta_path, settings)

    done = sum((partial / f"shard-{c:05d}").exists() for c in range(len(chunks)))
    try:
        with tqdm(total=len(rows), initial=min(done * batch_size, len(rows)), desc="collect", unit="response",
                  disable=not progress) as bar:
            for c, chunk in enumerate(chunks):
                shard = partial / f"shard-{c:05d}"
                if shard.exists():
                    continue
                generator = torch.Generator(device=policy.device).manual_seed(chunk_seed(seed, c))
                out = sample(
                    policy, [prompt_ids[i] for i, _ in chunk], eos_token_ids=eos_ids, pad_token_id=tokenizer.pad_token_id,
                    temperature=temperature, max_new_tokens=max_new_tokens, generator=generator,
                )
                texts = tokenizer.batch_decode(out.token_ids, skip_special_tokens=True)
                rewards = score(reward, [p for _, p in chunk], texts)
                save_dataset_atomic(
                    datasets.Dataset.from_dict({
                        "prompt": [p for _, p in chunk],
                        "prompt_ids": [prompt_ids[i] for i, _ in chunk],
                        "response": texts,
                        "response_ids": out.token_ids,
                        "logprobs": out.base_logprobs,
                        "reward": rewards.tolist(),
                        "finished": out.finished.tolist(),
                        "prompt_index": [i for i, _ in chunk],
                    }),
                    shard,
                )
                bar.update(len(chunk))
    except BaseException:
        if not any(partial.glob("shard-*")):  # nothing finished: leave no trace of the failed start
            shutil.rmtree(partial, ignore_errors=True)
        raise
    data = datasets.concatenate_datasets([datasets.load_from_disk(str(partial / f"shard-{c:05d}")) for c in range(len(chunks))])
    save_dataset_atomic(data, out_dir)
    write_json_atomic(out_dir / _META, settings)
    shutil.rmtree(partial)
    return load_dataset_dir(out_dir, set(COLUMNS))



def collect_api(
    policy,
    value_tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    reward: Reward,
    out_dir: str | Path,
    *,
    samples_per_prompt: int = 1,
    temperature: float = 0.7,
    max_new_tokens: int = 64,
    seed: int = 0,
    concurrency: int = 8,
    value_prompt=None,
    metadata: dict | None = None,
    progress: bool = True,
) -> datasets.Dataset:
    """Sample π0's responses through an OpenAI-compatible endpoint (:class:`vas.api.ApiPolicy`), score them and
    save them for training a value model with ``value_tokenizer`` (Sec. 3.3, Sec. 4.4).

    One request per response (servers such as llama.cpp ignore ``n > 1``), ``concurrency`` at once; response
    r asks for seed (seed, r), which servers that honour seeds make reproducible. Every finished response is
    kept in ``<out_dir>.partial`` at once, so an interrupted or failed collection resumes. The token columns
    hold the *value model's* tokenization: ``prompt_ids`` its chat template of the prompt, ``response_ids``
    the response text re-tokenized, plus its EOS when the server ended the response (``finished``): exactly
    what :class:`vas.value.TextCandidateScorer` reads at decoding time. ``value_prompt`` (a str → str map, or
    None for the identity) chooses the prompt text the value model reads, as :class:`vas.text_sampling.TextSteering`'s
    does at decoding time. There is no ``logprobs`` column.

    Returns:
        The dataset: columns prompt, prompt_ids, response, response_ids, reward, finished, prompt_index.

    Raises:
        VasError: if ``out_dir`` exists, the partial file holds other settings, a request fails (finished
            responses are kept), or a reward is non-finite.
    """
    import math

    from vas.storage import RowLog
    from vas.text_sampling import prompts_digest, run_concurrently

    out_dir = Path(out_dir)
    if samples_per_prompt < 1:
        raise VasError("samples_per_prompt must be ≥ 1")
    if not (0 <= temperature < math.inf) or max_new_tokens < 1:
        raise VasError(f"temperature must be ≥ 0 and max_new_tokens ≥ 1, got {temperature} and {max_new_tokens}")
    if value_tokenizer.eos_token_id is None:
        raise VasError("the value model's tokenizer has no EOS token")
    settings = {"samples_per_prompt": samples_per_prompt, "temperature": temperature, "max_new_tokens": max_new_tokens,
                "seed": seed, "num_prompts": len(prompts), "prompts_sha256": prompts_digest(prompts),
                "policy": getattr(policy, "settings", {}), **(metadata or {})}
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(samples_per_prompt)]
    log = RowLog(out_dir, settings, key="row")

    async def work(r: int):
        i, prompt = rows[r]
        c = await policy.sample(prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=chunk_seed(seed, r))
        log.append({"row": r, "prompt_index": i, "response": c.text, "finished": c.finished})

    run_concurrently(policy, [r for r in range(len(rows)) if r not in log.rows], work, concurrency=concurrency,
                     total=len(rows), desc="collect", progress=progress, log=log)
    done = [log.rows[r] for r in range(len(rows))]
    prompt_ids = encode_prompts(value_tokenizer, [value_prompt(p) if value_prompt else p for p in prompts])
    texts = [d["response"] for d in done]
    eos = value_tokenizer.eos_token_id
    response_ids = [value_tokenizer(t, add_special_tokens=False)["input_ids"] + ([eos] if d["finished"] else [])
                    for t, d in zip(texts, done)]
    rewards = score(reward, [p for _, p in rows], texts)
    save_dataset_atomic(datasets.Dataset.from_dict({
        "prompt": [p for _, p in rows],
        "prompt_ids": [prompt_ids[i] for i, _ in rows],
        "response": texts,
        "response_ids": response_ids,
        "reward": rewards.tolist(),
        "finished": [d["finished"] for d in done],
        "prompt_index": [i for i, _ in rows],
    }), out_dir)
    write_json_atomic(out_dir / _META, settings)
    log.finish(write=False)
    return load_dataset_dir(out_dir, REQUIRED_FOR_TRAINING)
