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
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
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

