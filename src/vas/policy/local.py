"""The base policy π0 behind one small interface, for the one decoding loop (:func:`vas.decoding.loop.decode`).

A policy starts a :class:`Rollout` for a batch of prompts. Each step the loop asks the rollout for π0's
next-token log-probabilities at temperature 1, over a *support*: the whole vocabulary (a local model,
:class:`LocalPolicy`), or only the top-k tokens a server told (an API model, :class:`vas.policy.api.ApiPolicy`).
The loop picks one entry of the support per row and hands it back with :meth:`Rollout.advance`.

Value models read the state either as token ids (when they share π0's tokenizer: the ids appended since the
last step, :class:`Appended`) or as text (:meth:`Rollout.response_texts` and
:meth:`Rollout.candidate_texts`), so one loop serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Union

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from vas import models
from vas.errors import VasError
from vas.models import cache_kwargs, check_fits, context_window, left_pad, position_ids_from_mask
from vas.prompts import encode_prompts

# A prompt is its text (the chat template is applied), or token ids used as they are (local policies only).
Prompt = Union[str, Sequence[int]]


@dataclass
class Appended:
    """Token ids appended to every row since the previous step (the left-padded prompts at the first step).

    Attributes:
        ids: (B, P) int64.
        mask: (B, P) int64 {0, 1}; 0 for left padding and for rows that have finished.
        prompt_lengths: (B,) int64, the tokens of each row's own prompt, for a caller that feeds a prompt and
            earlier output at once (a server, a rewound ``generate``); None: a row's first tokens are its prompt.
            The mean head's window starts at the prompt's last token.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    prompt_lengths: torch.Tensor | None = None


class Rollout(Protocol):
    """One batch of responses being decoded (state lives here, not in the policy)."""

    async def next_logprobs(self, top_k: int | None) -> torch.Tensor:
        """(B, S) float: log π0(x | s_t) at temperature 1 over the support, −inf for padding entries.

        ``top_k`` is the number of candidates the caller will score (policies that tell only their top-k ask
        for that many; None where the caller needs no candidates).
        """
        ...

    def advance(self, choice: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Append the chosen support entry (B,) int64 to every ``active`` (B,) bool row; returns (B,) bool:
        the row's response has ended with this choice."""
        ...

    def response_texts(self) -> list[str]:
        """The B responses so far, as text."""
        ...

    def candidate_texts(self, candidates: torch.Tensor) -> list[list[str | None]]:
        """For candidates (B, k) int64 (support entries), the response text after appending each; None for a
        candidate that ends the response."""
        ...


class LocalPolicy:
    """A local transformers causal LM as π0: the full next-token distribution, with a KV cache.

    With ``tuned``, responses are sampled from that fine-tuned policy π_θ instead (a baseline such as DPO,
    :mod:`vas.finetune`), and π0 runs beside it on the same tokens, so that the decoding loop measures the
    exact KL(π_θ ‖ π0) at every step: each rollout then also gives π_θ's next-token log-probabilities
    (:attr:`LocalRollout.tuned_logprobs`).

    Args:
        model: the frozen base causal LM.
        tokenizer: its tokenizer (its chat template formats text prompts).
        eos_token_ids: ids that end a response (default: the tokenizer's EOS and the generation config's).
        pad_token_id: id fed for padding and finished rows, always masked out (default: the tokenizer's pad,
            else its EOS).
        tuned: the fine-tuned policy π_θ, a causal LM with π0's vocabulary (e.g. π0 with a LoRA adapter merged).
        tuned_name: what names π_θ in stored settings (its adapter folder).

    Raises:
        VasError: if ``tuned``'s vocabulary size differs from π0's.
    """

    concurrent = False  # one model: jobs run its batches one after another

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                 eos_token_ids: Sequence[int] | None = None, pad_token_id: int | None = None,
                 tuned: PreTrainedModel | None = None, tuned_name: str | None = None):
        if tuned is not None and tuned.config.vocab_size != model.config.vocab_size:
            raise VasError(f"the fine-tuned policy's vocabulary ({tuned.config.vocab_size}) is not π0's "
                           f"({model.config.vocab_size})")
        self.model, self.tokenizer, self.tuned, self.tuned_name = model, tokenizer, tuned, tuned_name
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else models.eos_token_ids(model, tokenizer)
        pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.eos_token_ids[0]

    @property
    def settings(self) -> dict:
        """What decides this policy's answers, for resumed jobs to check: the model, its dtype, the end and pad ids."""
        settings = {"model": str(self.model.name_or_path), "dtype": str(self.model.dtype),
                    "eos_token_ids": self.eos_token_ids, "pad_token_id": self.pad_token_id}
        return settings if self.tuned is None else {**settings, "tuned": self.tuned_name or str(self.tuned.name_or_path)}

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def start(self, prompts: Sequence[Prompt], max_new_tokens: int) -> "LocalRollout":
        """A rollout of one response per prompt.

        Raises:
            VasError: for no prompt, an empty one, or one that does not fit the context window with
                ``max_new_tokens``.
        """
        return LocalRollout(self, prompts, max_new_tokens)


def visible_text(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """The decoded text of ``ids`` (special tokens dropped), without a trailing partial multi-byte character,
    which has no text yet. Whole sequences are decoded, never a token alone (leading spaces, merges)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).rstrip("\ufffd")


class LocalRollout:
    """The state of one batch on a :class:`LocalPolicy`: π0's KV cache and the tokens so far."""

    def __init__(self, policy: LocalPolicy, prompts: Sequence[Prompt], max_new_tokens: int):
        self.policy = policy
        prompt_ids = [encode_prompts(policy.tokenizer, [p])[0] if isinstance(p, str) else list(p) for p in prompts]
        check_fits(prompt_ids, max_new_tokens, context_window(policy.model))
        device = policy.model.device
        ids, mask = left_pad(prompt_ids, policy.pad_token_id)
        self.appended = Appended(ids.to(device), mask.to(device))
        self.attention = self.appended.mask
        self.lengths = torch.zeros(len(prompt_ids), dtype=torch.long, device=device)
        self.cache = DynamicCache(config=policy.model.config)
        self.tuned_cache = DynamicCache(config=policy.tuned.config) if policy.tuned is not None else None
        self.tuned_logprobs: torch.Tensor | None = None  # (B, V) log π_θ at τ = 1, from the last next_logprobs
        self.eos = torch.as_tensor(policy.eos_token_ids, dtype=torch.long, device=device)
        self.token_ids: list[list[int]] = [[] for _ in prompt_ids]

    def _logprobs(self, model: PreTrainedModel, cache: DynamicCache) -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=self.appended.ids, attention_mask=self.attention,
                        position_ids=position_ids_from_mask(self.appended.mask, self.lengths),
                        **cache_kwargs(model, cache), logits_to_keep=1)
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    async def next_logprobs(self, top_k: int | None = None) -> torch.Tensor:
        base = self._logprobs(self.policy.model, self.cache)
        if self.tuned_cache is not None:
            self.tuned_logprobs = self._logprobs(self.policy.tuned, self.tuned_cache)
        self.lengths = self.lengths + self.appended.mask.sum(dim=1)
        return base

    def advance(self, choice: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        choice = choice.to(self.attention.device)
        active = active.to(self.attention.device)
        token = torch.where(active, choice, torch.full_like(choice, self.policy.pad_token_id))
        chosen = token.tolist()  # one device sync per step
        for row in active.nonzero().flatten().tolist():
            self.token_ids[row].append(chosen[row])
        self.appended = Appended(token[:, None], active.long()[:, None])
        self.attention = torch.cat([self.attention, self.appended.mask], dim=1)
        return active & torch.isin(token, self.eos)

    def response_texts(self) -> list[str]:
        return [visible_text(self.policy.tokenizer, ids) for ids in self.token_ids]

    def candidate_texts(self, candidates: torch.Tensor) -> list[list[str | None]]:
        eos = set(self.policy.eos_token_ids)
        return [[None if c in eos else visible_text(self.policy.tokenizer, ids + [c]) for c in row]
                for ids, row in zip(self.token_ids, candidates.tolist())]
