"""The one decoding loop: plain sampling from π0 and VAS steering (Eq. 5), sampled or greedy, batched, for a
local model or one behind an API, with value models that share π0's tokenizer or read text.

Each step (:func:`decode`):

1. the rollout gives log π0 at temperature 1 over its support (the vocabulary, or the top-k an API told);
2. :func:`vas.decoding.guidance.base_logprobs` applies the temperature τ: that is π0;
3. :func:`steer` takes π0's top-k candidates (B, k), scores them with every value model (B, k) and combines
   them by Eq. 5 with each row's β and weights;
4. a token is drawn (:func:`draw`) or the argmax taken, and the rollout advances.

Plain sampling is the same loop without value models (or with β = 0): collection, Best-of-N and VAS draw
from the same π0 with the same temperature rule. A batch whose rows all have β = 0 does no value-model work.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from vas.errors import VasError
from vas.decoding.guidance import base_logprobs, kl_divergence, steered_logprobs, weighted_values
from vas.policy.local import Prompt
from vas.value.heads import reads_each_candidate
from vas.value.model import ValueModel
from vas.value.scorers import CandidateScorer, TextScorer


ALL = "all"
"""k that steers every token of π0's support (``--top-k all``, ``"vas_top_k": "all"``)."""


def parse_top_k(text: str | int, name: str = "--top-k") -> int | str:
    """k as a user writes it (``"10"``, ``10``, ``10.0`` or ``"all"``, any case) → an int ≥ 1 or :data:`ALL`.

    Raises:
        VasError: for anything else; the message names ``name`` (the CLI's flag, or a request's field).
    """
    if isinstance(text, str) and text.strip().lower() == ALL:
        return ALL
    k = None
    if isinstance(text, (str, int, float)) and not isinstance(text, bool):
        try:
            k = int(text) if not isinstance(text, float) or text.is_integer() else None
        except ValueError:
            pass
    if k is None or k < 1:
        raise VasError(f"{name} must be an integer ≥ 1 or 'all', got {str(text)[:60]!r}")
    return k


@dataclass
class Steering:
    """Value guidance: π ∝ π0 · exp(β · Σ_i w_i V_i(s ⊕ x)) over π0's top-k (Eq. 5, Sec. 4.2).

    Attributes:
        value_models: the value models (each carries its tokenizer). None gives plain sampling (through the
            top-k, for a policy that tells only its top-k).
        weights: the value models' weights: (M,) shared by all rows (default 1 each), or a (B, M) tensor, one
            row per prompt. Composition is linear (Sec. 4.2).
        beta: β, a float shared by all rows or a (B,) tensor, one per prompt. β = 0 gives π0 exactly;
            negative β steers towards low reward.
        top_k: k, the number of π0's most likely tokens scored, ≥ 1 (capped by the support), or ``"all"``
            (:data:`ALL`): every token of the support, which only value models with the ``next`` head afford
            (Eq. 5 then has no token outside the top-k).
        mask_outside_top_k: sample only among the top-k (App. D.1's masked ablation) instead of giving the
            other tokens β·mean(V) as Eq. 5 does. A policy that tells only its top-k is always masked.
        value_prompt: maps a prompt to the text that value models reading text see (through their own chat
            template), e.g. the task without a long constant instruction; the same map must have built their
            training rows (:func:`vas.collect.collect`). Default: the prompt itself.
        soft: guide with soft values instead of V^π0: each distributional value model i gives
            Q_{β·w_i}(s ⊕ x) = (1/(β w_i))·log E_π0[exp(β w_i r_i) | s ⊕ x] (its histogram's, trimmed, moved onto its
            point value: :meth:`vas.value.model.ValueModel.values`), so
            that π ∝ π0·exp(β Σ_i w_i Q_i) is the KL-regularised optimal policy for Σ_i w_i r_i when the returns
            are independent; value models with one value per state use it as is (a point mass). A bool shared
            by all rows, or a (B,) bool tensor, one per prompt.

    Raises:
        VasError: for k < 1, a weight count that is not the number of value models, a β or weight that
            is not finite, soft values asked of value models none of which is distributional, or k = all with
            a value model that scores one candidate per token (a head other than ``next``).
    """

    value_models: Sequence[ValueModel] = ()
    weights: Sequence[float] | torch.Tensor | None = None
    beta: float | torch.Tensor = 1.0
    top_k: int | str = 10
    mask_outside_top_k: bool = False
    value_prompt: Callable[[str], str] | None = None
    soft: bool | torch.Tensor = False

    def __post_init__(self):
        M = len(self.value_models)
        if self.weights is None:
            self.weights = [1.0] * M
        weights = torch.as_tensor(self.weights, dtype=torch.float32)
        if weights.shape[-1:] != (M,) and not (M == 0 and weights.numel() == 0):
            raise VasError(f"{weights.shape[-1] if weights.dim() else 1} weights given for {M} value models")
        beta = torch.as_tensor(self.beta, dtype=torch.float32)
        if not bool(torch.isfinite(beta).all()) or not bool(torch.isfinite(weights).all()):
            raise VasError(f"--beta and the --value weights must be finite float32 numbers (|x| < 3.4e38), got "
                           f"beta={self.beta}, weights={self.weights}")
        if self.top_k == ALL:
            slow = [m for m in self.value_models if reads_each_candidate(getattr(m, "kind", "last"))]
            if slow:
                raise VasError(f"--top-k all needs value models with the next head (vas train --head next); a "
                               f"{slow[0].kind} head would read every token of the vocabulary at every step")
        elif isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise VasError(f"--top-k must be an integer ≥ 1 or 'all', got {self.top_k!r}")
        if bool(torch.as_tensor(self.soft).any()) and M and not any(getattr(m, "kind", "last") == "distributional" for m in self.value_models):
            raise VasError("--soft needs a distributional value model (vas train --head distributional); these give "
                           "one value per state")

    def check_top_k(self, vocab_size: int | None) -> None:
        """Raise :class:`VasError` if k exceeds the vocabulary (None: not known, as for an API policy)."""
        if vocab_size is not None and self.top_k != ALL and self.top_k > vocab_size:
            raise VasError(f"--top-k must be between 1 and the vocabulary size {vocab_size}, got {self.top_k}")

    def select(self, rows: Sequence[int]) -> "Steering":
        """This steering for a subset of the prompts (per-row β, weights and soft sliced; shared ones kept)."""
        beta = torch.as_tensor(self.beta, dtype=torch.float32)
        weights = torch.as_tensor(self.weights, dtype=torch.float32)
        index = torch.as_tensor(list(rows), dtype=torch.long)
        soft = torch.as_tensor(self.soft, dtype=torch.bool)
        return replace(self, beta=beta[index] if beta.dim() else self.beta,
                       weights=weights[index] if weights.dim() == 2 else self.weights,
                       soft=soft[index] if soft.dim() else self.soft)

    def rows(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's β (B,) and weights (B, M), float32.

        Raises:
            VasError: if a per-row β, weight or soft tensor does not have B rows.
        """
        beta = torch.as_tensor(self.beta, dtype=torch.float32)
        weights = torch.as_tensor(self.weights, dtype=torch.float32)
        if beta.dim() == 0:
            beta = beta.expand(B)
        if weights.dim() < 2:
            weights = weights.reshape(1, len(self.value_models)).expand(B, -1)
        if beta.shape != (B,) or weights.shape[0] != B or torch.as_tensor(self.soft).shape not in ((), (B,)):
            raise VasError(f"per-row beta {tuple(beta.shape)}, weights {tuple(weights.shape)} and soft "
                           f"{tuple(torch.as_tensor(self.soft).shape)} do not match the {B} prompts")
        return beta, weights

    def soft_betas(self, beta: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor | None]:
        """The β each value model's soft value is taken at, per row: β·w_i where the row asks for soft values,
        0 (the mean) elsewhere; None for every model when no row does.

        Args:
            beta: (B,) float32, from :meth:`rows`.
            weights: (B, M) float32 weights of the value models scored.

        Returns:
            M tensors (B,) float32, or M Nones.
        """
        soft = torch.as_tensor(self.soft, dtype=torch.bool)
        if not bool(soft.any()):
            return [None] * weights.shape[1]
        scale = beta * soft.expand(beta.shape).to(beta.dtype)
        return [scale * weights[:, i] for i in range(weights.shape[1])]


def scorer_for(model: ValueModel, rollout, prompts: Sequence[Prompt], value_prompt: Callable[[str], str] | None):
    """The candidate scorer of ``model`` for ``rollout``: token ids (:class:`vas.value.scorers.CandidateScorer`) when
    the value model shares the policy's tokenizer and reads the policy's own prompt, else text
    (:class:`vas.value.scorers.TextScorer`, which reads ``value_prompt(prompt)``).

    Raises:
        VasError: if the value model reads text but the prompts are token ids, or has the ``next`` head (which
            reads π0's tokens only).
    """
    policy_tokenizer = getattr(getattr(rollout, "policy", None), "tokenizer", None)
    shares = (policy_tokenizer is not None and model.tokenizer is not None
              and policy_tokenizer.get_vocab() == model.tokenizer.get_vocab())
    if shares and value_prompt is None and hasattr(rollout, "appended"):
        return CandidateScorer(model)
    if any(not isinstance(p, str) for p in prompts):
        raise VasError("a value model with another tokenizer than π0's reads text: give the prompts as text")
    return TextScorer(model, [value_prompt(p) if value_prompt else p for p in prompts])


def steer(steering: Steering, scorers: Sequence, rollout, base: torch.Tensor, active: torch.Tensor,
          beta: torch.Tensor, weights: torch.Tensor, top_k: torch.Tensor | None = None,
          failed: torch.Tensor | None = None) -> torch.Tensor:
    """One VAS step: π0's top-k candidates (B, k) scored by every value model and combined by Eq. 5.

    Args:
        steering: k and whether to mask the tokens outside the top-k.
        scorers: one scorer per value model, in ``weights``' column order (none: plain sampling).
        rollout: what the scorers read (the tokens appended, or the texts).
        base: (B, S) float32 log π0 at the sampling temperature over the rollout's support.
        active: (B,) bool, rows still generating.
        beta: (B,) float32 β of each row.
        weights: (B, M) float32 weights of each row.
        top_k: (B,) int64 k of each row, at most ``steering.top_k`` (all ``steering.top_k`` if None). A row uses
            its first k candidates; each scorer sees in every row as many as the rows that weight it use.
        failed: None, or a (B,) bool tensor that receives the rows whose weighted values are not all finite
            (a value model's NaN or ±inf, or an overflowing weighted sum); those rows are then steered with
            values 0 instead of raising, for a caller that fails them alone (a server).

    Returns:
        (B, S) float32 log π of the steered policy.
    """
    if not scorers and not steering.mask_outside_top_k:
        return base
    B, support = base.shape
    k = support if steering.top_k == ALL else min(steering.top_k, support)
    if k == support and top_k is None:  # every token of every row: Eq. 5 does not need them in π0's order
        candidates = torch.arange(support, device=base.device).expand(B, support)
    else:
        candidates = base.topk(k, dim=-1).indices  # (B, k), by π0's probability (rows with a smaller k take the first)
    if scorers:
        soft = steering.soft_betas(beta.cpu(), weights.cpu())
        values = weighted_values([_padded(s.score(rollout, candidates[:, :_read_by(i, weights, top_k, k)], active, beta=b), k)
                                  for i, (s, b) in enumerate(zip(scorers, soft))], weights.to(base.device))
    else:
        values = torch.zeros(candidates.shape, device=base.device)
    if failed is not None:
        failed.copy_(~torch.isfinite(values).all(dim=1).to(failed.device))
        values = values.masked_fill(failed.to(values.device)[:, None], 0.0)
    counted = None
    if top_k is not None:
        counted = torch.arange(candidates.shape[1], device=base.device)[None, :] < top_k.to(base.device)[:, None]
    try:
        return steered_logprobs(base, candidates, values.to(base.device), beta.to(base.device),
                                mask_outside_top_k=steering.mask_outside_top_k, candidate_mask=counted)
    except ValueError as exc:
        raise VasError(f"steering failed: {exc}") from None


def _read_by(i: int, weights: torch.Tensor, top_k: torch.Tensor | None, k: int) -> int:
    """How many candidates scorer ``i`` reads: the most that any row weighting it uses (``k`` when rows share k)."""
    if top_k is None:
        return k
    weighting = (weights[:, i] != 0).to(top_k.device)
    return min(k, int(top_k[weighting].max())) if bool(weighting.any()) else 1


def _padded(values: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k') values → (B, k), zeros for the candidates a scorer did not read (no row that weights it uses them)."""
    return torch.nn.functional.pad(values, (0, k - values.shape[1]))


@dataclass
class Decoded:
    """Output of :func:`decode` for B prompts; lists have one entry per prompt.

    Attributes:
        texts: the responses (special tokens dropped).
        token_ids: generated π0 token ids per row (EOS included if generated); None for an API policy.
        logprobs: log π(x_t|s_{t-1}) of each chosen token under the sampling policy (float).
        base_logprobs: log π0(x_t|s_{t-1}) of each chosen token, π0 at the sampling temperature (over the
            support: renormalised over the top-k for a policy that tells only those).
        kl: (B,) float32, Σ_t KL(π(·|s_t) ‖ π0(·|s_t)) in nats over the generated steps, π the steered or
            fine-tuned policy (0 for plain sampling).
        finished: (B,) bool, True if the row ended by itself (EOS), False if cut at ``max_new_tokens``.
        steps: (B,) int64, steps taken (tokens generated, the ending one included).
        outside_mass: (B,) float32, mean over steps of the probability π0 (at temperature 1) puts outside the
            support it told: 0 for a local policy.
    """

    texts: list[str]
    token_ids: list[list[int]] | None
    logprobs: list[list[float]]
    base_logprobs: list[list[float]]
    kl: torch.Tensor
    finished: torch.Tensor
    steps: torch.Tensor
    outside_mass: torch.Tensor


def draw(logprobs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from ``exp(logprobs)`` by inverse-CDF sampling: (B, V) float → (B,) int64.

    One uniform number per row and a cumulative sum, instead of ``torch.multinomial``'s V exponential
    draws per row. Zero-probability tokens are never drawn. The uniform numbers come from ``generator`` on
    the CPU, so a seed gives the same draws on any device.
    """
    cdf = logprobs.float().exp().cumsum(dim=-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, generator=generator).to(cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)


async def decode(policy, prompts: Sequence[Prompt], steering: Steering | None = None, *, temperature: float = 0.7,
                 max_new_tokens: int = 64, greedy: bool = False, generator: torch.Generator | None = None,
                 value_lock: asyncio.Lock | None = None, on_step: Callable[[int], None] | None = None) -> Decoded:
    """Generate one response per prompt from π0, from the VAS policy (Eq. 5) when ``steering`` has value
    models and a row's β ≠ 0, or from a fine-tuned policy π_θ when the policy carries one
    (:class:`vas.policy.local.LocalPolicy` ``tuned``; the KL is then KL(π_θ ‖ π0), both at temperature τ). Each
    row stops at its own end.

    Args:
        policy: π0: :class:`vas.policy.local.LocalPolicy`, :class:`vas.policy.api.ApiPolicy`, or anything with
            ``start(prompts, max_new_tokens)`` returning a :class:`vas.policy.local.Rollout`; or an engine that
            decodes whole batches itself with the same rule (:class:`vas.serving.engine.VllmPolicy`), which gets
            the batch through its ``decode`` method.
        prompts: B prompts, texts (chat template applied by the policy) or token id lists (local policies).
        steering: value models, weights, β and k (per row or shared); None for plain sampling.
        temperature: τ > 0 of π0, applied before the augmentation (:mod:`vas.decoding.guidance`).
        max_new_tokens: the most tokens generated per row.
        greedy: take argmax π (Sec. 4.4) instead of sampling.
        generator: torch RNG for reproducible draws (CPU).
        value_lock: serialises value-model forwards between concurrent rollouts, which then run in a worker
            thread so that other rollouts' requests go on meanwhile.
        on_step: called after each step with the number of tokens it generated (the rows still active), e.g.
            to show progress.

    Returns:
        :class:`Decoded`.

    Raises:
        VasError: for a temperature ≤ 0, max_new_tokens < 1, value models with a fine-tuned policy, no or an empty prompt, one that does not fit the
            context window, k larger than the vocabulary, per-row settings that do not match the prompts, a
            failed request, or a value model that returns a non-finite value.
    """
    if not (0 < temperature < math.inf):
        raise VasError(f"--temperature must be a finite number > 0, got {temperature}")
    if max_new_tokens < 1:
        raise VasError(f"--max-new-tokens must be ≥ 1, got {max_new_tokens}")
    if hasattr(policy, "decode"):  # an engine that runs the whole loop itself (vLLM, vas.serving.engine)
        decoded = policy.decode(prompts, steering, temperature=temperature, max_new_tokens=max_new_tokens,
                                greedy=greedy, generator=generator)
        if on_step is not None:
            on_step(int(decoded.steps.sum()))
        return decoded
    steering = steering or Steering()
    if getattr(policy, "tuned", None) is not None and steering.value_models:
        raise VasError("VAS steers π0: a fine-tuned policy is sampled as it is, without value models")
    rollout = policy.start(prompts, max_new_tokens)
    B = len(prompts)
    beta, weights = steering.rows(B)
    if steering.value_models:
        steering.check_top_k(getattr(policy, "vocab_size", None))
    # value models are consulted only if some row has β ≠ 0, and only those with a weight ≠ 0 in some row
    used = [i for i in range(len(steering.value_models)) if bool((beta != 0).any()) and bool((weights[:, i] != 0).any())]
    scorers = [scorer_for(steering.value_models[i], rollout, prompts, steering.value_prompt) for i in used]
    weights = weights[:, used]

    finished = torch.zeros(B, dtype=torch.bool)
    kl, outside = torch.zeros(B), torch.zeros(B)
    steps = torch.zeros(B, dtype=torch.long)
    logps: list[list[float]] = [[] for _ in range(B)]
    base_logps: list[list[float]] = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        active = ~finished
        told = (await rollout.next_logprobs(None if steering.top_k == ALL else steering.top_k)).float()  # (B, S), τ = 1
        base = base_logprobs(told, temperature)
        tuned = getattr(rollout, "tuned_logprobs", None)
        if tuned is not None:  # a fine-tuned policy π_θ is sampled; π0 beside it gives the exact KL
            logp = base_logprobs(tuned, temperature)
        elif value_lock is not None and scorers:
            async with value_lock:  # waits on the event loop; the forward runs in a worker thread
                logp = await asyncio.to_thread(steer, steering, scorers, rollout, base, active, beta, weights)
        else:
            logp = steer(steering, scorers, rollout, base, active, beta, weights)
        choice = logp.argmax(dim=-1) if greedy else draw(logp, generator)
        if logp is not base:  # plain sampling: π = π0, KL 0
            kl += torch.where(active, kl_divergence(logp, base).cpu(), 0.0)
        outside += torch.where(active, (1 - told.exp().sum(dim=-1)).clamp_min(0).cpu(), 0.0)
        chosen_logp = logp.gather(1, choice[:, None]).squeeze(1).tolist()
        chosen_base = base.gather(1, choice[:, None]).squeeze(1).tolist()
        for row in active.nonzero().flatten().tolist():
            logps[row].append(chosen_logp[row])
            base_logps[row].append(chosen_base[row])
        ended = rollout.advance(choice, active).cpu()
        steps += active.long()
        finished |= active & ended
        if on_step is not None:
            on_step(int(active.sum()))
        if bool(finished.all()):
            break
    token_ids = getattr(rollout, "token_ids", None)
    return Decoded(rollout.response_texts(), token_ids, logps, base_logps, kl, finished, steps,
                   outside / steps.clamp_min(1))


def run_sync(coroutine):
    """Run a coroutine to completion from synchronous code, also where an event loop is already running (a
    notebook): then in a worker thread with a loop of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = asyncio.run(coroutine)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def sample(policy, prompts: Sequence[Prompt], steering: Steering | None = None, **kwargs) -> Decoded:
    """:func:`decode` from synchronous code (same arguments)."""
    return run_sync(decode(policy, prompts, steering, **kwargs))
