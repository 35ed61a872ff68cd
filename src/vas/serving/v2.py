"""The VAS logits processor on vLLM's Model Runner V2 (vLLM ≥ 0.34, and vLLM 0.32 on GPUs): per-slot
steering set by ``add_request``, the step's rows read from ``LogitsContext``, the tokens read on the device from
the runner's request state; Eq. 5 and the value-model caches are :class:`vas.serving.processor.BatchSteerer`'s.

vLLM constructs it through :class:`vas.serving.processor.VllmLogitsProcessor`, the class to register.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor

from vas.serving.processor import BatchSteerer, RequestSteering, Row, steering_of


@dataclass(frozen=True)
class _Slot:
    """The steered request in a slot: a key new at every ``add_request`` (slots are recycled, and a preempted
    request is added again), its steering and τ."""

    key: int
    steering: RequestSteering
    temperature: float  # τ of π0; 1 for a greedy request


class V2Processor(LogitsProcessor):
    """:class:`vas.serving.processor.VllmLogitsProcessor` on Model Runner V2.

    Args:
        vllm_config: vLLM's config.
        req_states: the runner's per-slot request state (``LogitsProcRequestState``), read only:
            ``all_token_ids.gpu`` (slots × max_model_len, committed tokens), ``prompt_len.np`` and
            ``prefill_len.np`` (slots,) on the host, and ``device``.

    Raises:
        ValueError: under speculative decoding (see :class:`vas.serving.processor.BatchSteerer`) or with prompt
            embeddings (requests without token ids).
    """

    def __init__(self, vllm_config, req_states):
        if getattr(vllm_config.model_config, "enable_prompt_embeds", False):
            raise ValueError("VAS steering reads token ids: it does not run with --enable-prompt-embeds")
        self.steerer = BatchSteerer(vllm_config, req_states.device, "V2")
        self.req_states = req_states
        self.slots: dict[int, _Slot] = {}  # slot → steered request; a slot re-added unsteered is dropped
        self._keys = itertools.count()

    def add_request(self, req_idx: int, sampling_params) -> bool:
        steered = steering_of(sampling_params, self.steerer.settings)
        if steered is None:
            self.slots.pop(req_idx, None)
            return False
        self.slots[req_idx] = _Slot(next(self._keys), *steered)
        return True

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        """Steer the rows of steered requests in place.

        Args:
            logits: (num_logits_rows, V) float32 raw logits; without speculative decoding one row per request,
                row i for batch position i (slot ``ctx.idx_mapping_np[i]``).
            ctx: the step's ``LogitsContext``: ``idx_mapping_np`` (num_reqs,) slots and
                ``seq_lens_upper_bound_np`` (num_reqs,) tokens visible to the token being sampled (exact
                without speculative decoding), both on the host.

        Returns:
            ``logits``, with each steered row replaced by τ·log π (Eq. 5); the rows of other requests, and of
            requests still prefilling their prompt in chunks (their token is discarded), untouched.
        """
        slots = np.asarray(ctx.idx_mapping_np)
        assert logits.shape[0] == len(slots), "one logits row per request (speculative decoding is refused)"
        lengths = np.asarray(ctx.seq_lens_upper_bound_np)[: len(slots)]
        prefill = self.req_states.prefill_len.np
        index = [i for i, s in enumerate(slots.tolist()) if s in self.slots and lengths[i] >= prefill[s]]
        if not index:
            self.steerer.release()
            return logits
        # rows in the order the requests arrived: vLLM reorders its batch every step, and following that
        # order would reorder the value models' caches every step
        index.sort(key=lambda i: self.slots[int(slots[i])].key)
        prompt_len = self.req_states.prompt_len.np
        rows = []
        for i in index:
            slot = self.slots[int(slots[i])]
            rows.append(Row(slot.key, slot.steering, slot.temperature, int(prompt_len[slots[i]]), int(lengths[i]),
                            int(slots[i])))
        tokens = self.req_states.all_token_ids.gpu
        at = torch.tensor(index, device=logits.device)
        out = self.steerer.steer(logits[at], rows, lambda rows, starts: _gather(tokens, rows, starts))
        logits[at] = out.to(logits.dtype)
        return logits


def _gather(tokens: torch.Tensor, rows: list[Row], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``starts[b]`` … ``rows[b].length`` of each row's slot (its ``source``), left-padded, gathered on
    the device in one indexing op without a sync: (ids, mask), each (B, P) int64
    (:data:`vas.serving.processor.Reader`)."""
    counts = [r.length - s for r, s in zip(rows, starts)]
    P = max(counts, default=0)
    device = tokens.device
    slots = torch.tensor([r.source for r in rows], dtype=torch.long, device=device)
    count = torch.tensor(counts, device=device)
    end = torch.tensor([r.length for r in rows], device=device)
    offsets = torch.arange(P, device=device)
    mask = offsets[None, :] >= (P - count)[:, None]  # (B, P): the last count[b] columns are real
    positions = (end[:, None] - P + offsets[None, :]).clamp_min(0)
    ids = tokens[slots[:, None], positions].long() * mask
    return ids, mask.long()
