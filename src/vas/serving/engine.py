"""π0 in a ``vllm.LLM`` engine: collect, generate and evaluate with ``--engine vllm``.

:class:`VllmPolicy` decodes a whole batch inside vLLM (:meth:`VllmPolicy.decode`, which
:func:`vas.decoding.loop.decode` hands the batch to), steered by the same logits processor as ``vas serve``
(:mod:`vas.serving.processor`), and returns the same :class:`vas.decoding.loop.Decoded` as the project's own
loop: π0's log-probabilities of the chosen tokens at the temperature, and the exact per-step KL(π‖π0),
which the processor records per request and this process fetches from vLLM's worker afterwards.

The engine starts at the first batch (about 40 s for SmolLM2 on 2 CPU cores) with the value models of that
batch's steering, loaded by the worker from their folders (``ValueModel.name_or_path``) in their dtype.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from vas.errors import VasError
from vas.serving.processor import SETTINGS_ENV, Settings, StepRecord


class VllmPolicy:
    """π0 served by a ``vllm.LLM`` engine in this process (its workers are spawned: scripts need an
    ``if __name__ == "__main__":`` guard).

    Args:
        base_model: π0's spec (:func:`vas.models.resolve_model`).
        dtype: π0's dtype in vLLM (``auto``: vLLM's choice).
        gpu_memory_utilization: vLLM's memory share; None: 0.3 on a CPU-only machine, vLLM's default otherwise.
    """

    concurrent = False

    def __init__(self, base_model: str, *, dtype: str = "auto", gpu_memory_utilization: float | None = None):
        from vas.models import load_config, load_tokenizer, resolve_model
        from vas.serving.server import require_vllm

        require_vllm()
        self.base_model, self.dtype = base_model, dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.model_dir = resolve_model(base_model)
        self.tokenizer = load_tokenizer(base_model)
        self.vocab_size = load_config(base_model).vocab_size
        self.values: dict[str, str] | None = None  # name → folder, fixed when the engine starts
        self.engine = None
        self._ids = itertools.count()

    @property
    def settings(self) -> dict:
        """What decides this policy's answers, for resumed jobs to check."""
        return {"engine": "vllm", "model": self.base_model, "dtype": self.dtype}

    def _start(self, folders: list[str], heads: list[str], value_dtype: str) -> None:
        import logging
        import os

        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's spawned processes read it at start-up
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep stdout for the results
        logging.getLogger("vllm").setLevel(os.environ["VLLM_LOGGING_LEVEL"])
        from vllm import LLM

        from vas.serving.processor import VllmLogitsProcessor
        from vas.models import has_accelerator
        from vas.serving.server import CPU_MEMORY_SHARE

        self.values = {f"v{i}": path for i, path in enumerate(folders)}
        os.environ[SETTINGS_ENV] = Settings(self.values, self.vocab_size, dtype=value_dtype, record=True,
                                            heads=dict(zip(self.values, heads))).to_env()
        memory = self.gpu_memory_utilization
        if memory is None:
            memory = CPU_MEMORY_SHARE if not has_accelerator() else 0.9
        self.engine = LLM(self.model_dir, dtype=self.dtype, logits_processors=[VllmLogitsProcessor],
                          logprobs_mode="processed_logprobs", gpu_memory_utilization=memory,
                          worker_extension_cls="vas.serving.processor.WorkerExtension")

    def shutdown(self) -> None:
        """Shut down the engine's worker, if started (a later batch starts a new one)."""
        if self.engine is not None:
            self.engine.llm_engine.engine_core.shutdown()
            self.engine = None

    def _prefill_groups(self, lengths: list[int]) -> list[range]:
        """The batch split into runs of consecutive prompts that vLLM prefills in one step each. On a CPU, vLLM
        0.32 fails on a seeded request whose prefill is split over steps (its CPU generator cannot rewind: "CPU
        Generator does not use offset"), so there each run's prompt tokens stay within the scheduler's
        per-step budget (``max_num_batched_tokens``) and its requests within ``max_num_seqs``; on an accelerator
        the batch is one run.

        Raises:
            VasError: on a CPU, for a prompt longer than the per-step budget.
        """
        from vas.models import has_accelerator

        if has_accelerator():
            return [range(len(lengths))]
        scheduler = self.engine.llm_engine.vllm_config.scheduler_config
        budget = scheduler.max_num_batched_tokens
        if lengths and max(lengths) > budget:
            raise VasError(f"--engine vllm on a CPU prefills a prompt in one step of at most {budget} tokens; prompt "
                           f"{lengths.index(max(lengths)) + 1} of the batch has {max(lengths)}: shorten it or use the "
                           "default engine")
        groups, start, total = [], 0, 0
        for b, n in enumerate(lengths):
            if b > start and (total + n > budget or b - start == scheduler.max_num_seqs):
                groups.append(range(start, b))
                start, total = b, 0
            total += n
        return groups + [range(start, len(lengths))] if lengths else groups

    def _names(self, steering) -> list[str]:
        """The engine's names of ``steering``'s value models, starting the engine with them if needed."""
        from vas.value.model import check_same_tokenizer

        folders = [m.name_or_path for m in steering.value_models] if steering is not None else []
        if any(f is None for f in folders):
            raise VasError("the vLLM engine loads value models from their folders: give ValueModel.from_pretrained's "
                           "models or load_value_models(..., load=False)'s folders")
        for model, folder in zip(steering.value_models if folders else [], folders):
            check_same_tokenizer(self.tokenizer, model.tokenizer, folder)
        if self.engine is None:
            dtypes = {str(m.dtype).removeprefix("torch.") for m in steering.value_models} if folders else set()
            self._start(folders, [m.kind for m in steering.value_models] if folders else [],
                        dtypes.pop() if len(dtypes) == 1 else "auto")
        known = {path: name for name, path in self.values.items()}
        missing = [f for f in folders if f not in known]
        if missing:
            raise VasError(f"the vLLM engine was started with other value models ({', '.join(self.values.values())}); "
                           f"it cannot load {missing[0]} now: use one set of value models per process")
        return [known[f] for f in folders]

    def decode(self, prompts: Sequence, steering, *, temperature: float, max_new_tokens: int, greedy: bool,
               generator: torch.Generator | None):
        """The batch decoded by vLLM: see :func:`vas.decoding.loop.decode` (same arguments and result).

        Each request draws with its own seed, taken from ``generator``; a greedy request takes
        argmax(log π0 + β·V) at τ = 1 (Sec. 4.4), as vLLM's temperature 0 does.

        Raises:
            VasError: for greedy decoding at τ ≠ 1, top-k masking or a value prompt (not in the processor),
                value models with another tokenizer than π0's or other than those the engine started with,
                an empty prompt or one that does not fit the context window, or a value model that returned a
                non-finite value.
        """
        from vllm import SamplingParams, TokensPrompt

        from vas.decoding.loop import Decoded, Steering
        from vas.decoding.rules import ALL, steered_models
        from vas.models import check_fits
        from vas.prompts import encode_prompts

        steering = steering or Steering()
        if greedy and temperature != 1.0:
            raise VasError("--engine vllm decodes greedily at τ = 1, argmax(log π0 + β·V) (Sec. 4.4): pass "
                           "--temperature 1 with --greedy")
        if steering.mask_outside_top_k or steering.value_prompt is not None:
            raise VasError("--engine vllm steers by Eq. 5 on π0's own prompt: it has no top-k masking and no "
                           "value prompt; use the default engine for those")
        if steering.top_k == ALL and steering.value_models:
            raise VasError("--engine vllm takes a number for --top-k: its per-step records (the KL and log π0) would "
                           "hold the whole vocabulary with -k all; use the default engine or vas serve for -k all")
        B = len(prompts)
        rows = steering.rows(B, self.vocab_size)
        names = self._names(steering)
        ids = [encode_prompts(self.tokenizer, [p])[0] if isinstance(p, str) else list(p) for p in prompts]
        if any(not p for p in ids):
            raise VasError("a prompt is empty")
        check_fits(ids, max_new_tokens, self.engine.llm_engine.model_config.max_model_len)
        seeds = torch.randint(0, 2**31 - 1, (B,), generator=generator).tolist()
        record = [f"{next(self._ids)}" for _ in range(B)]
        params = []
        for b in range(B):
            extra = {"vas_id": record[b]}
            if names and steered_models(rows.beta[b:b + 1], rows.weights[b:b + 1]):
                extra.update(vas_beta=float(rows.beta[b]), vas_top_k=steering.top_k, vas_soft=bool(rows.soft[b]),
                             vas_values=dict(zip(names, rows.weights[b].tolist())))
            params.append(SamplingParams(temperature=0.0 if greedy else temperature, max_tokens=max_new_tokens,
                                         seed=seeds[b], logprobs=0, extra_args=extra, skip_special_tokens=True))
        outputs = []
        for group in self._prefill_groups([len(p) for p in ids]):
            outputs += self.engine.generate([TokensPrompt(prompt_token_ids=ids[b]) for b in group],
                                            [params[b] for b in group], use_tqdm=False)
        stats = self.engine.collective_rpc("vas_statistics", args=(record,))[0]
        texts, tokens, logps, base_logps = [], [], [], []
        kl, finished = torch.zeros(B), torch.zeros(B, dtype=torch.bool)
        for b, out in enumerate(outputs):
            completion = out.outputs[0]
            steps = {int(k): StepRecord(**v) for k, v in stats.get(record[b], {}).items()}
            failure = next((s.error for t, s in steps.items() if s.error and t < len(completion.token_ids)), None)
            if failure is not None:
                raise VasError(f"steering failed for prompt {b + 1} of the batch: {failure}")
            chosen = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]  # log π
            base = [lp - _shift(steps.get(t), tok) for t, (tok, lp) in enumerate(zip(completion.token_ids, chosen))]
            texts.append(completion.text)
            tokens.append(list(completion.token_ids))
            logps.append(chosen)
            base_logps.append(base)
            kl[b] = sum(s.kl for t, s in steps.items() if t < len(completion.token_ids))
            finished[b] = completion.finish_reason == "stop"
        steps = torch.tensor([len(t) for t in tokens])
        return Decoded(texts, tokens, logps, base_logps, kl, finished, steps, torch.zeros(B))


def _shift(step: StepRecord | None, token: int) -> float:
    """log π(x) − log π0(x) at a recorded step (0 for an unsteered one)."""
    if step is None:
        return 0.0
    if token in step.candidates:
        return step.candidate_shift[step.candidates.index(token)]
    return step.other_shift
