"""Collect: sample responses from the frozen base policy π0 and score them with the reward (paper Sec. 3.3,
App. C.1: temperature 0.7).

The result is a `datasets` folder with one row per response. A local π0 samples through the decoding loop in
batches (:func:`vas.decoding.batches.generate`); a π0 behind an API answers one request per whole response
(:meth:`vas.policy.api.ApiPolicy.sample`). Either way finished responses are kept in ``<out>.partial`` as they
finish (:class:`vas.resume.RowLog`), so an interrupted collect resumes and produces exactly the rows an
uninterrupted one would; the dataset appears atomically at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from vas.config import CollectConfig
from vas.policy.api import ApiPolicy
from vas.errors import VasError
from vas.decoding.batches import generate, sample_responses
from vas.resume import RowLog
from vas.policy.local import LocalPolicy
from vas.prompts import encode_prompts
from vas.rewards import Reward, score
from vas.storage import load_dataset_dir, require_absent, save_dataset_atomic, write_json_atomic

COLUMNS = {
    "prompt": "prompt text as given (before the chat template)",
    "prompt_ids": "token ids the value model reads (the chat template applied)",
    "response": "decoded response text (special tokens removed)",
    "response_ids": "response token ids for the value model, EOS included when generated",
    "logprobs": "log π0(x_t | s_{t-1}) of each response token, at the sampling temperature (local π0 only)",
    "reward": "reward of the response (float)",
    "finished": "True if the response ended by itself, False if cut at max_new_tokens",
    "prompt_index": "index of the prompt in the prompt list",
}
REQUIRED_FOR_TRAINING = {"prompt_ids", "response_ids", "reward"}
_META = "vas_collect.json"


def load_collected(path: str | Path, required: set[str]) -> tuple[datasets.Dataset, dict]:
    """The dataset folder written by :func:`collect`, checked for the ``required`` columns, and its collection
    settings (``vas_collect.json``: the sampling settings and the run's metadata, e.g. ``base_model`` and
    ``reward``; empty if absent).

    Raises:
        VasError: if the folder is missing, not a dataset, or lacks a required column.
    """
    dataset = load_dataset_dir(path, required)
    meta_file = Path(path) / _META
    return dataset, json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def collect(
    policy: LocalPolicy | ApiPolicy,
    prompts: Sequence[str],
    reward: Reward,
    out_dir: str | Path,
    config: CollectConfig,
    *,
    value_tokenizer: PreTrainedTokenizerBase | None = None,
    value_prompt: Callable[[str], str] | None = None,
    concurrency: int = 8,
    metadata: dict | None = None,
    progress: bool = True,
) -> datasets.Dataset:
    """Sample ``config.samples_per_prompt`` responses per prompt from π0, score them, save them to ``out_dir``.

    A local π0 (:class:`vas.policy.local.LocalPolicy`) samples ``config.batch_size`` responses per batch, batch b
    with seed (config.seed, b); its token columns are its own ids and ``logprobs`` holds log π0 of each token. A π0
    behind an API (:class:`vas.policy.api.ApiPolicy`) is asked for whole responses, ``concurrency`` at once (servers
    such as llama.cpp ignore ``n > 1``), response r with seed (seed, r); its token columns hold the *value
    model's* tokenization (``value_tokenizer``): ``prompt_ids`` its chat template of ``value_prompt(prompt)``,
    ``response_ids`` the response text re-tokenized plus its EOS when the server ended the response, which
    is what :class:`vas.value.scorers.TextScorer` reads while decoding; ``logprobs`` is then empty.

    Args:
        reward: scores (prompt, response) pairs.
        config: the sampling settings (:class:`vas.config.CollectConfig`).
        out_dir: destination folder (``datasets`` format); ``<out_dir>.partial`` holds work in progress.
        metadata: JSON-able description of the run (model, reward spec …), stored with the data; a resume
            must pass the same metadata.

    Returns:
        The collected dataset, columns :data:`COLUMNS`, ``len(prompts) * config.samples_per_prompt`` rows.

    Raises:
        VasError: if ``value_tokenizer`` is given with a local π0, ``out_dir`` exists already, a partial run used other settings, a request fails
            (finished responses are kept), a reward is non-finite, or a prompt does not fit the context window.
    """
    if value_tokenizer is not None and not isinstance(policy, ApiPolicy):
        raise VasError("--value-backbone is for collecting through an API (--api-base-url)")
    out_dir = Path(out_dir)
    require_absent(out_dir)
    rows = [(i, p) for i, p in enumerate(prompts) for _ in range(config.samples_per_prompt)]
    repeated = [p for _, p in rows]
    settings = {"samples_per_prompt": config.samples_per_prompt, **(metadata or {})}
    sampling = {"temperature": config.temperature, "max_new_tokens": config.max_new_tokens, "seed": config.seed}
    run = dict(**sampling, settings=settings, progress=progress, desc="collect",
               finish=False)  # the rows stay in <out>.partial until the dataset is saved
    if isinstance(policy, ApiPolicy):
        if value_tokenizer is None or value_tokenizer.eos_token_id is None:
            raise VasError("collecting through an API needs the value model's tokenizer, with an EOS token")
        done = sample_responses(policy, repeated, out_dir, concurrency=concurrency, **run)
        prompt_ids = encode_prompts(value_tokenizer, [value_prompt(p) if value_prompt else p for p in prompts])
        eos = value_tokenizer.eos_token_id
        response_ids = [value_tokenizer(d["response"], add_special_tokens=False)["input_ids"] + ([eos] if d["finished"] else [])
                        for d in done]
        logprobs = [[] for _ in done]
    else:
        done = generate(policy, repeated, None, out_dir, batch_size=config.batch_size, **run)
        prompt_ids = encode_prompts(policy.tokenizer, prompts)
        response_ids = [d["response_ids"] for d in done]
        logprobs = [d["logprobs"] for d in done]
    texts = [d["response"] for d in done]
    try:
        rewards = score(reward, repeated, texts)
    except VasError as exc:
        raise VasError(f"{exc}; the {len(done)} sampled responses are kept in {out_dir}.partial: fix the reward and "
                       "run the same command again") from None
    save_dataset_atomic(datasets.Dataset.from_dict({
        "prompt": repeated,
        "prompt_ids": [prompt_ids[i] for i, _ in rows],
        "response": texts,
        "response_ids": response_ids,
        "logprobs": logprobs,
        "reward": rewards.tolist(),
        "finished": [d["finished"] for d in done],
        "prompt_index": [i for i, _ in rows],
    }), out_dir)
    write_json_atomic(out_dir / _META, {**sampling, "num_prompts": len(prompts), **settings})
    RowLog.discard(out_dir)
    return load_dataset_dir(out_dir, REQUIRED_FOR_TRAINING)
