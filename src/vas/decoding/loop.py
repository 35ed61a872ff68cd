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

from vas.decoding.guidance import base_logprobs, kl_divergence, steered_logprobs, weighted_values
from vas.decoding.rules import ALL, LIBRARY, check_models, check_product, parse_number, parse_top_k, steered_models
from vas.errors import VasError
from vas.policy.local import Prompt
from vas.value.model import ValueModel
from vas.value.scorers import CandidateScorer, TextScorer


@dataclass
class Steering:
    """Value guidance: π ∝ π0 · exp(β · Σ_i w_i V_i(s ⊕ x)) over π0's top-k (Eq. 5, Sec. 4.2), as a library user
    gives it. It has two parts: what applies to the whole batch (the value models, k, masking, the value prompt),
    and the per-row β, weights and soft, shared by all rows or one per prompt, which :meth:`rows` turns into
    :class:`RowSettings`, the part the decoding step reads. The rules are :mod:`vas.decoding.rules`'.

    Attributes:
        value_models: the value models (each carries its tokenizer). None gives plain sampling (through the
            top-k, for a policy that tells only its top-k).
        weights: the value models' weights: (M,) shared by all rows (default 1 each), or a (B, M) tensor, one
            row per prompt. Composition is linear (Sec. 4.2).
        beta: β, a float shared by all rows or a (B,) tensor, one per prompt. β = 0 gives π0 exactly;
            negative β steers towards low reward.
        top_k: k, the number of π0's most likely tokens scored, ≥ 1 (capped by the support), or ``"all"``
            (:data:`vas.decoding.rules.ALL`): every token of the support, which only value models with the
            ``next`` head afford (Eq. 5 then has no token outside the top-k).
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
        VasError: naming the argument (``beta``, ``top_k``, ``weights``, ``soft``), for k < 1, a weight count that
            is not the number of value models, a β or weight that is not a finite float32 number, soft values
            without a distributional value model weighted ≠ 0, or k = all with a weighted value model that
            scores one candidate per token (a head other than ``next``).
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
        for name, values in ((LIBRARY.beta, self.beta), (LIBRARY.values, self.weights)):
            for value in torch.as_tensor(values, dtype=torch.float64).flatten().tolist():
                parse_number(value, name)
        parse_top_k(self.top_k, LIBRARY, typed=True)
        check_product(self.beta, weights, LIBRARY)
        heads = [(f"value_models[{i}]", getattr(m, "kind", "last")) for i, m in enumerate(self.value_models)]
        every_row = (weights != 0).reshape(-1, M).any(dim=0).tolist() if M else []
        check_models(heads, every_row, LIBRARY, top_k=self.top_k, soft=bool(torch.as_tensor(self.soft).any()) and M > 0)

    def rows(self, B: int, vocab_size: int | None = None) -> "RowSettings":
        """The per-row settings of B prompts, with k checked against the vocabulary.

        Args:
            B: the number of prompts.
            vocab_size: the largest k; None: not known (an API policy).

        Raises:
            VasError: if a per-row β, weight or soft tensor does not have B rows, or k exceeds ``vocab_size``
                with value models to score.
        """
        beta = torch.as_tensor(self.beta, dtype=torch.float32)
        weights = torch.as_tensor(self.weights, dtype=torch.float32)
        soft = torch.as_tensor(self.soft, dtype=torch.bool)
        if beta.dim() == 0:
            beta = beta.expand(B)
        if weights.dim() < 2:
            weights = weights.reshape(1, len(self.value_models)).expand(B, -1)
        if beta.shape != (B,) or weights.shape[0] != B or soft.shape not in ((), (B,)):
            raise VasError(f"per-row beta {tuple(beta.shape)}, weights {tuple(weights.shape)} and soft "
                           f"{tuple(soft.shape)} do not match the {B} prompts")
        if self.value_models:
            check_models([], [], LIBRARY, top_k=self.top_k, vocab_size=vocab_size)
        return RowSettings(beta, weights, soft.expand(B))

    def select(self, rows: Sequence[int]) -> "Steering":
        """This steering for a subset of the prompts (per-row β, weights and soft sliced; shared ones kept)."""
        beta = torch.as_tensor(self.beta, dtype=torch.float32)
        weights = torch.as_tensor(self.weights, dtype=torch.float32)
        index = torch.as_tensor(list(rows), dtype=torch.long)
        soft = torch.as_tensor(self.soft, dtype=torch.bool)
        return replace(self, beta=beta[index] if beta.dim() else self.beta,
                       weights=weights[index] if weights.dim() == 2 else self.weights,
                       soft=soft[index] if soft.dim() else self.soft)


@dataclass(frozen=True)
class RowSettings:
    """Each row's β, weights, soft and k: what one decoding step reads (:func:`steer`).

    Attributes:
        beta: (B,) float32, β of each row.
        weights: (B, M) float32, the weights of the M value models scored, in the scorers' order.
        soft: (B,) bool, rows guided by soft values.
        top_k: (B,) int64, each row's k (it uses its first k candidates by π0), or None: every row uses the
            steering's k.
    """

    beta: torch.Tensor
    weights: torch.Tensor
    soft: torch.Tensor
    top_k: torch.Tensor | None = None

    def steered_models(self) -> list[int]:
        """The value models these rows consult (:func:`vas.decoding.rules.steered_models`)."""
        return steered_models(self.beta, self.weights)

    def of_models(self, models: Sequence[int]) -> "RowSettings":
        """These settings with the weights of the given value models only (columns in that order)."""
        return replace(self, weights=self.weights[:, list(models)])

    def soft_betas(self) -> list[torch.Tensor | None]:
        """The β each value model's soft value is taken at, per row: β·w_i where the row asks for soft values,
        0 (the mean) elsewhere; None for every model when no row does.

        Returns:
            M tensors (B,) float32, or M Nones.
        """
        if not bool(self.soft.any()):
            return [None] * self.weights.shape[1]
        scale = self.beta * self.soft.to(self.beta.dtype)
        return [scale * self.weights[:, i] for i in range(self.weights.shape[1])]


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


def steer(rows: RowSettings, scorers: Sequence, rollout, base: torch.Tensor, active: torch.Tensor, *,
          top_k: int | str = 10, mask_outside_top_k: bool = False, failed: torch.Tensor | None = None) -> torch.Tensor:
    """One VAS step: π0's top-k candidates (B, k) scored by every value model and combined by Eq. 5.

    Args:
        rows: each row's β, weights (one column per scorer), soft and k (:class:`RowSettings`). A row with its
            own k uses its first k candidates; each scorer sees in every row as many as the rows that weight it
            use.
        scorers: one scorer per value model, in ``rows.weights``' column order (none: plain sampling).
        rollout: what the scorers read (the tokens appended, or the texts).
        base: (B, S) float32 log π0 at the sampling temperature over the rollout's support.
        active: (B,) bool, rows still generating.
        top_k: k of every row, an int or ``"all"``, where ``rows.top_k`` is None.
        mask_outside_top_k: give the tokens outside the top-k probability 0 (App. D.1) instead of Eq. 5's β·mean V.
        failed: None, or a (B,) bool tensor that receives the rows whose weighted values are not all finite
            (a value model's NaN or ±inf, or an overflowing weighted sum); those rows are then steered with
            values 0 instead of raising, for a caller that fails them alone (a server).

    Returns:
        (B, S) float32 log π of the steered policy.

    Raises:
        VasError: if a value is not finite and ``failed`` is None.
    """
    if not scorers and not mask_outside_top_k:
        return base
    B, support = base.shape
    batch_k = int(rows.top_k.max()) if rows.top_k is not None else top_k
    top_k = rows.top_k
    k = support if batch_k == ALL else min(batch_k, support)
    if k == support and top_k is None:  # every token of every row: Eq. 5 does not need them in π0's order
        candidates = torch.arange(support, device=base.device).expand(B, support)
    else:
        candidates = base.topk(k, dim=-1).indices  # (B, k), by π0's probability (rows with a smaller k take the first)
    if scorers:
        weights = rows.weights.cpu()
        values = weighted_values([_padded(s.score(rollout, candidates[:, :_read_by(i, weights, top_k, k)], active, beta=b), k)
                                  for i, (s, b) in enumerate(zip(scorers, rows.soft_betas()))], weights.to(base.device))
    else:
        values = torch.zeros(candidates.shape, device=base.device)
    if failed is not None:
        failed.copy_(~torch.isfinite(values).all(dim=1).to(failed.device))
        values = values.masked_fill(failed.to(values.device)[:, None], 0.0)
    counted = None
    if top_k is not None:
        counted = torch.arange(candidates.shape[1], device=base.device)[None, :] < top_k.to(base.device)[:, None]
    try:
        return steered_logprobs(base, candidates, values.to(base.device), rows.beta.to(base.device),
                                mask_outside_top_k=mask_outside_top_k, candidate_mask=counted)
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
        raise VasError(f"temperature must be a finite number > 0, got {temperature}")
    if max_new_tokens < 1:
        raise VasError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
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
    rows = steering.rows(B, getattr(policy, "vocab_size", None))
    used = rows.steered_models()
    scorers = [scorer_for(steering.value_models[i], rollout, prompts, steering.value_prompt) for i in used]
    rows = rows.of_models(used)
    how = {"top_k": steering.top_k, "mask_outside_top_k": steering.mask_outside_top_k}

    tally = _Tally(B)
    for _ in range(max_new_tokens):
        active = ~tally.finished
        told = (await rollout.next_logprobs(None if steering.top_k == ALL else steering.top_k)).float()  # (B, S), τ = 1
        base = base_logprobs(told, temperature)
        tuned = getattr(rollout, "tuned_logprobs", None)
        if tuned is not None:  # a fine-tuned policy π_θ is sampled; π0 beside it gives the exact KL
            logp = base_logprobs(tuned, temperature)
        elif value_lock is not None and scorers:
            async with value_lock:  # waits on the event loop; the forward runs in a worker thread
                logp = await asyncio.to_thread(steer, rows, scorers, rollout, base, active, **how)
        else:
            logp = steer(rows, scorers, rollout, base, active, **how)
        choice = logp.argmax(dim=-1) if greedy else draw(logp, generator)
        tally.add(active, told, base, logp, choice, rollout.advance(choice, active).cpu())
        if on_step is not None:
            on_step(int(active.sum()))
        if bool(tally.finished.all()):
            break
    return tally.decoded(rollout)


class _Tally:
    """What :func:`decode` counts per row over the steps: the chosen tokens' log π and log π0, the KL, the mass
    outside the support, the steps and the ends."""

    def __init__(self, B: int):
        self.finished = torch.zeros(B, dtype=torch.bool)
        self.kl, self.outside = torch.zeros(B), torch.zeros(B)
        self.steps = torch.zeros(B, dtype=torch.long)
        self.logps: list[list[float]] = [[] for _ in range(B)]
        self.base_logps: list[list[float]] = [[] for _ in range(B)]

    def add(self, active: torch.Tensor, told: torch.Tensor, base: torch.Tensor, logp: torch.Tensor,
            choice: torch.Tensor, ended: torch.Tensor) -> None:
        """One step of the ``active`` (B,) rows: ``told`` (B, S) log π0 at τ = 1 over the support, ``base`` at τ,
        ``logp`` (B, S) log π sampled from (``base`` itself for plain sampling: KL 0), ``choice`` (B,) and
        ``ended`` (B,) bool, the rows that ended on it."""
        if logp is not base:
            self.kl += torch.where(active, kl_divergence(logp, base).cpu(), 0.0)
        self.outside += torch.where(active, (1 - told.exp().sum(dim=-1)).clamp_min(0).cpu(), 0.0)
        chosen_logp = logp.gather(1, choice[:, None]).squeeze(1).tolist()
        chosen_base = base.gather(1, choice[:, None]).squeeze(1).tolist()
        for row in active.nonzero().flatten().tolist():
            self.logps[row].append(chosen_logp[row])
            self.base_logps[row].append(chosen_base[row])
        self.steps += active.long()
        self.finished |= active & ended

    def decoded(self, rollout) -> Decoded:
        return Decoded(rollout.response_texts(), getattr(rollout, "token_ids", None), self.logps, self.base_logps,
                       self.kl, self.finished, self.steps, self.outside / self.steps.clamp_min(1))


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
