"""VAS as a transformers :class:`~transformers.LogitsProcessor`, for users of ``model.generate``.

transformers applies user logits processors *before* its own temperature / top-k / top-p warpers, which
would divide β·V by the temperature and cut the steered distribution at the model's default top-k. So this
processor applies π0's temperature itself and returns the steered log-probabilities of Eq. 5, and
``generate`` must be called with neutral warpers — :func:`generate_kwargs` gives them::

    processor = VASLogitsProcessor(steering, enc["attention_mask"], temperature=0.7)
    model.generate(**enc, logits_processor=[processor], **generate_kwargs(), max_new_tokens=64)

The processor keeps the value models' KV caches between steps. It recognises a new prompt or a rewound
prefix by comparing token ids and rebuilds its caches then; for a new batch of prompts call
:meth:`VASLogitsProcessor.reset` with their attention mask (or make a new processor).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from vas.decoding.loop import Steering, steer
from vas.errors import VasError
from vas.decoding.guidance import base_logprobs
from vas.policy.local import Appended
from vas.value.scorers import CandidateScorer


def generate_kwargs(greedy: bool = False) -> dict:
    """``generate`` arguments that leave the processor's distribution untouched (no extra warping)."""
    if greedy:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "typical_p": 1.0}


class VASLogitsProcessor(LogitsProcessor):
    """Eq. 5 inside ``model.generate``: returns log π(·|s) (B, V) float32 from π0's scores (B, V).

    Args:
        steering: value models sharing the model's tokenizer, weights, β and k, shared or per row (see
            :class:`vas.decoding.loop.Steering`).
        attention_mask: (B, L0) {0,1} mask of the (left-padded) prompts passed to ``generate``.
        temperature: π0's temperature τ, applied here before the augmentation.

    Raises:
        VasError: if ``generate`` is called with a batch the mask does not describe.
    """

    def __init__(self, steering: Steering, attention_mask: torch.Tensor, temperature: float = 0.7):
        if temperature <= 0:
            raise VasError(f"temperature must be > 0, got {temperature}")
        self.steering, self.temperature = steering, temperature
        self.reset(attention_mask)

    def reset(self, attention_mask: torch.Tensor) -> None:
        """Start over for a new batch of prompts whose mask is ``attention_mask`` (B, L0)."""
        self.prompt_mask = attention_mask.long()
        self.prompt_lengths = self.prompt_mask.sum(dim=1)  # (B,) where each row's response starts (mean heads)
        self.scorers: list[CandidateScorer] = []
        self.seen: torch.Tensor | None = None  # (B, L) ids already fed to the value models
        self.appended: Appended | None = None  # what the scorers read next (this object is their rollout)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        B, L = input_ids.shape
        L0 = self.prompt_mask.shape[1]
        if B != self.prompt_mask.shape[0] or L < L0:
            raise VasError(f"generate was called with {B} rows of length {L}, but the processor's attention mask is "
                           f"{tuple(self.prompt_mask.shape)}: call reset() with the new prompts' mask")
        continues = (
            self.seen is not None and self.seen.shape[1] == L - 1 and torch.equal(input_ids[:, :-1], self.seen)
        )
        if continues:
            new_ids, new_mask = input_ids[:, -1:], torch.ones(B, 1, dtype=torch.long, device=input_ids.device)
        else:  # first step, new prompt or rewound prefix: rebuild the caches from the whole sequence
            self.scorers = [CandidateScorer(m) for m in self.steering.value_models]
            ones = torch.ones(B, L - L0, dtype=torch.long, device=input_ids.device)
            new_ids, new_mask = input_ids, torch.cat([self.prompt_mask.to(input_ids.device), ones], dim=1)
        self.seen = input_ids.clone()
        rows = self.steering.rows(B, scores.shape[-1])
        self.appended = Appended(new_ids, new_mask, self.prompt_lengths)
        base = base_logprobs(scores, self.temperature)
        return steer(rows, self.scorers, self, base, torch.ones(B, dtype=torch.bool), top_k=self.steering.top_k,
                     mask_outside_top_k=self.steering.mask_outside_top_k)
