"""V(s_t ⊕ x) for the k candidates x of each row while decoding: the value model's (:mod:`vas.value.model`)
candidate scorers.

:class:`CandidateScorer` keeps the value model's KV cache of the prefix and scores all k candidates of all rows
in one forward pass: the query is ``[tokens new since the last step, x_1 … x_k]`` with a 4D attention mask in
which each candidate sees the prefix and itself only, all candidates sitting at the row's next position. The
candidates' keys are then cropped from the cache, so the prefix is never re-fed and the cache is never copied.

A value model with a tokenizer of its own (an API base policy, or any other policy tokenizer) scores
candidate *strings* instead: :class:`TextScorer` (one :class:`TextCandidateScorer` per row). Both scorers answer
the decoding loop through the same call, ``score(rollout, candidates, active, beta=None) -> (B, k)`` (``beta``:
soft values, per row) (:func:`vas.decoding.loop.scorer_for` picks one).
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from vas.errors import VasError
from vas.models import crop_cache, position_ids_from_mask
from vas.policy.local import Appended
from vas.value.heads import RunningMean
from vas.value.model import ValueModel


class CandidateScorer:
    """V(s_t ⊕ x) for the k candidates of every row, over a KV cache of the prefix (one forward per step).

    Call :meth:`score` once per decoding step; it reads the tokens appended since the previous call from the
    rollout (``rollout.appended``: the whole left-padded prompt at the first call, the chosen token
    afterwards). State is per generation: make a new scorer for each new batch of prompts. The value model
    must share π0's tokenizer. A ``mean`` head keeps each row's running mean of the hidden states
    (:class:`vas.value.heads.RunningMean`) next to the cache, so it too costs one forward per step. A ``next``
    head reads no candidate at all: the forward covers the new tokens only, and Q(s, x) of every candidate comes
    from the hidden state at s's last token (kept per row for a step that appends nothing).
    """

    def __init__(self, model: ValueModel):
        self.model = model
        self.cache = DynamicCache(config=model.backbone.config)
        self.past_mask: torch.Tensor | None = None  # (B, S_past) {0,1}: real tokens in the cache
        self.lengths: torch.Tensor | None = None  # (B,) real tokens in the cache
        self.pool = RunningMean()  # the mean head's window sums
        self.window_start: torch.Tensor | None = None  # (B,) the mean head's first pooled position; -1: not fed yet
        self.state: torch.Tensor | None = None  # (B, H) the next head's hidden state at each row's last token

    def reorder(self, rows: Sequence[int]) -> None:
        """Keep the cached rows ``rows``, in that order; a row ``-1`` is a new one with nothing fed yet. For a
        batch whose members change between steps (a server's): rows that leave free their cache, columns no
        row uses are dropped, and when the cache has grown much wider than the longest row (rows that joined at
        different steps each bring their padding) every row's tokens are gathered into the longest row's width.

        Args:
            rows: for each row of the new batch, its row in the current one, or -1.
        """
        if self.past_mask is None:  # nothing fed yet: every row starts empty at the first score
            return
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.past_mask.device)
        kept = index >= 0
        source = index.clamp_min(0)
        self.cache.batch_select_indices(source)  # new rows copy row 0's keys; their mask hides them
        self.past_mask = self.past_mask[source] * kept[:, None]
        self.lengths = self.lengths[source] * kept
        self.pool.select(source, kept)
        self.window_start = torch.where(kept, self.window_start[source], -1)
        self.state = self.state[source] * kept[:, None]
        longest = int(self.lengths.max()) if len(self.lengths) else 0
        if self.past_mask.shape[1] > 1.5 * longest + 8:
            self._compact(longest)
        else:  # drop the columns no row uses any more
            used = self.past_mask.bool().any(dim=0)
            if not bool(used.all()):
                columns = used.nonzero().flatten()
                for layer in self.cache.layers:
                    if layer.get_seq_length() > 0:
                        layer.keys, layer.values = layer.keys[:, :, columns], layer.values[:, :, columns]
                self.past_mask = self.past_mask[:, columns]

    def _compact(self, width: int) -> None:
        """Gather each row's cached tokens, in order, into the last ``width`` columns (the longest row's
        length), so that prompts that joined at different steps do not widen the cache for every row."""
        B, S = self.past_mask.shape
        # a stable sort puts each row's padding first and its real tokens after, both in their order
        columns = torch.sort(self.past_mask, dim=1, stable=True).indices[:, S - width:]  # (B, width)
        self.past_mask = self.past_mask.gather(1, columns)
        for layer in self.cache.layers:
            if layer.get_seq_length() > 0:
                index = columns[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)

    @torch.no_grad()
    def score(self, rollout, candidates: torch.Tensor, active: torch.Tensor | None = None,
              beta: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`score_appended` of the rollout's ``appended`` (:class:`vas.policy.local.Appended`); ``active`` is
        unused (finished rows are masked by ``appended``), for the scorers' common signature."""
        return self.score_appended(rollout.appended, candidates, beta)

    def score_appended(self, appended: Appended, candidates: torch.Tensor,
                       beta: torch.Tensor | None = None) -> torch.Tensor:
        """Append the new tokens to the prefix and return V(prefix ⊕ x) for each candidate x.

        Args:
            appended: ids (B, P) int64 appended since the last call (P ≥ 0), mask (B, P) {0,1} with 0 for padding
                (left padding, finished rows), and optionally each row's prompt length, where the mean head's
                window starts (otherwise a row's first call appends its prompt).
            candidates: (B, k) int64 candidate next tokens.
            beta: (B,) float32 β of each row for soft values (distributional head), or None for V^π0.

        Returns:
            (B, k) float32 values.
        """
        model = self.model
        device = model.device
        new_ids, new_mask = appended.ids.to(device), appended.mask.to(device).long()
        candidates = candidates.to(device)
        B, P = new_ids.shape
        if self.past_mask is None:
            self.past_mask = new_mask.new_zeros(B, 0)
            self.lengths = new_mask.new_zeros(B)
            self.window_start = new_mask.new_full((B,), -1)
            self.state = torch.zeros(B, model.backbone.config.hidden_size, device=device)
        if model.kind == "next":
            if P:  # left-padded: a row's newest token is in the last column, if it got any
                hidden, _ = self._feed(new_ids, new_mask, candidates[:, :0])
                self.state = torch.where(new_mask[:, -1:].bool(), hidden[:, -1], self.state)
            return model.head(self.state, candidates)
        hidden, new_positions = self._feed(new_ids, new_mask, candidates)
        if model.kind == "mean":
            first = self.window_start < 0  # rows fed for the first time: their prompt is known now
            prompt_lengths = appended.prompt_lengths
            prompt_lengths = self.lengths if prompt_lengths is None else prompt_lengths.to(device)
            self.window_start = torch.where(first, model.window_start(prompt_lengths), self.window_start)
            self.pool.extend(hidden[:, :P], new_mask.bool() & (new_positions >= self.window_start[:, None]))
            features = self.pool.peek(hidden[:, P:])
        else:
            features = hidden[:, P:]
        return model.values(model.head(features), None if beta is None else beta.to(device)[:, None])

    def _feed(self, new_ids: torch.Tensor, new_mask: torch.Tensor,
              candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward over ``[new tokens, candidates]``: the new tokens (B, P) join the cache, the k candidates
        (B, k) are read at the row's next position, each seeing the prefix and itself, and leave no trace.
        Returns the hidden states (B, P + k, H) float32 and the new tokens' positions (B, P) int64."""
        model = self.model
        device = model.device
        B, P = new_ids.shape
        k = candidates.shape[1]
        S = self.past_mask.shape[1]
        new_positions = position_ids_from_mask(new_mask, self.lengths)
        lengths = self.lengths + new_mask.sum(dim=1)
        positions = torch.cat([new_positions, lengths[:, None].expand(B, k)], dim=1)

        # allowed[b, q, key] over keys [past S | new P | candidates k]
        causal = torch.tril(torch.ones(P, P, dtype=torch.bool, device=device))
        allowed = torch.zeros(B, P + k, S + P + k, dtype=torch.bool, device=device)
        allowed[:, :, :S] = self.past_mask.bool()[:, None, :]
        allowed[:, :P, S : S + P] = causal[None] & new_mask.bool()[:, None, :]
        allowed[:, P:, S : S + P] = new_mask.bool()[:, None, :]
        diagonal = torch.arange(P + k, device=device)
        allowed[:, diagonal, S + diagonal] = True  # each query sees itself (candidates: only themselves)
        dtype = model.backbone.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)

        hidden = model.hidden_states(torch.cat([new_ids, candidates], dim=1), mask[:, None], position_ids=positions,
                                     cache=self.cache)
        if k:
            self.cache.crop(-k)
        self.past_mask = torch.cat([self.past_mask, new_mask], dim=1)
        self.lengths = lengths
        return hidden, new_positions


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class TextCandidateScorer:
    """V(s ⊕ x) for candidate *texts*, for a value model with its own tokenizer (one prompt; Sec. 4.4).

    The base policy's tokens are never seen: the state is text. For each candidate, the response text after
    it, c, the value model reads ``prompt_ids + tokenize(c)`` (an ending candidate, ``None``, reads
    ``prompt_ids + tokenize(text) + [EOS]``), the same tokenization its training rows had
    (:func:`vas.collect.collect` through an API). Appending text can change the last few tokens (merges), so the KV
    cache keeps only the prefix that every candidate's tokenization shares; it is cropped back when a later
    step re-tokenizes the end of the text differently. One forward per call: the new stable tokens, then all
    candidate suffixes laid side by side in one row, each seeing the cache, the new tokens and itself
    (custom 4D mask, the same idea as :class:`CandidateScorer`).
    """

    def __init__(self, model: ValueModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int]):
        if model.kind == "next":
            raise VasError("a value model with the next head scores π0's own next tokens, not text: it needs a local "
                           "π0 with its tokenizer, reading the prompt as π0 does (no value prompt, no API policy)")
        if not prompt_ids:
            raise VasError("the value model's prompt is empty after tokenization")
        if tokenizer.eos_token_id is None:
            raise VasError("the value model's tokenizer has no EOS token: ending candidates cannot be scored")
        self.model, self.tokenizer = model, tokenizer
        self.prompt_ids = list(prompt_ids)
        self.cache = DynamicCache(config=model.backbone.config)
        self.cached_ids: list[int] = []  # the ids whose keys and values are in the cache
        self.cached_hidden = torch.zeros(0, model.backbone.config.hidden_size)  # their hidden states (mean head)

    def sequence(self, text: str, candidate: str | None) -> list[int]:
        """The value model's ids of the state whose response is ``candidate`` (``None``: ``text`` ends)."""
        if candidate is None:
            return self.prompt_ids + self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return self.prompt_ids + self.tokenizer(candidate, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def score(self, text: str, candidates: Sequence[str | None], beta: float | None = None) -> torch.Tensor:
        """V(prompt ⊕ c) for each candidate response text c.

        Args:
            text: the response so far.
            candidates: k response texts, each ``text`` with one candidate appended (``None``: ``text`` ends).
            beta: β for soft values (distributional head), or None for V^π0.

        Returns:
            (k,) float32 values.
        """
        sequences = [self.sequence(text, c) for c in candidates]
        stable = min(min(common_prefix_length(sequences[0], s) for s in sequences), min(map(len, sequences)) - 1)
        keep = common_prefix_length(self.cached_ids, sequences[0][:stable])
        crop_cache(self.cache, keep)
        new = sequences[0][keep:stable]
        suffixes = [s[stable:] for s in sequences]  # each ≥ 1 token
        device = self.model.device
        P, lengths = len(new), [len(s) for s in suffixes]
        Q = P + sum(lengths)
        positions = list(range(keep, stable)) + [stable + j for n in lengths for j in range(n)]
        allowed = torch.zeros(Q, keep + Q, dtype=torch.bool)
        allowed[:, :keep] = True
        allowed[:, keep : keep + P] = torch.tril(torch.ones(Q, P, dtype=torch.bool))  # suffix rows see all new tokens
        start, ends = P, []
        for n in lengths:  # each suffix sees itself causally
            allowed[start : start + n, keep + start : keep + start + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            start += n
            ends.append(start - 1)
        dtype = self.model.backbone.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        ids = torch.tensor([new + [t for s in suffixes for t in s]], device=device)
        model = self.model
        hidden = model.hidden_states(ids, mask[None, None].to(device), position_ids=torch.tensor([positions], device=device),
                                     cache=self.cache)[0]  # (Q, H)
        crop_cache(self.cache, stable)
        self.cached_ids = sequences[0][:stable]
        if model.kind == "mean":  # the window's hidden states: cached prefix, new stable tokens, each suffix
            start = int(model.window_start(torch.tensor(len(self.prompt_ids))))
            self.cached_hidden = torch.cat([self.cached_hidden[:keep].to(hidden.device), hidden[:P]])
            prefix = self.cached_hidden[start:]
            offsets = [P + sum(lengths[:i]) for i in range(len(lengths))]
            features = torch.stack([torch.cat([prefix, hidden[o : o + n]])[max(0, start - len(self.cached_hidden)):].mean(0)
                                    for o, n in zip(offsets, lengths)])
        else:
            features = hidden[ends]
        return model.values(model.head(features), beta).float().cpu()


class TextScorer:
    """The batch form of :class:`TextCandidateScorer`: one per row, each with the row's prompt as the value
    model reads it (through its own chat template), scored one row after another.

    Args:
        model: a value model carrying its tokenizer.
        prompts: the B prompt texts the value model reads.
    """

    def __init__(self, model: ValueModel, prompts: Sequence[str]):
        if model.tokenizer is None:
            raise VasError("the value model has no tokenizer: load it with ValueModel.from_pretrained")
        from vas.prompts import encode_prompts

        self.rows = [TextCandidateScorer(model, model.tokenizer, ids)
                     for ids in encode_prompts(model.tokenizer, list(prompts))]

    def score(self, rollout, candidates: torch.Tensor, active: torch.Tensor,
              beta: torch.Tensor | None = None) -> torch.Tensor:
        """V of each candidate (B, k) float32 of the rollout's active rows (0 for finished rows), read as text
        (``rollout.response_texts()``, ``rollout.candidate_texts``); soft at each row's ``beta`` (B,) if given."""
        texts, options = rollout.response_texts(), rollout.candidate_texts(candidates)
        values = torch.zeros(candidates.shape, dtype=torch.float32)
        for row in active.nonzero().flatten().tolist():
            values[row] = self.rows[row].score(texts[row], options[row], None if beta is None else float(beta[row]))
        return values
