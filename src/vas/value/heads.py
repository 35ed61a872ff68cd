"""How a value model turns the backbone's hidden states into values: its head.

Four heads, chosen at training time and stored in the value model's config (``"head"``):

* ``last``: V(s_t) = w·h_t + b, the hidden state at the last token of s_t (paper Sec. 3.3, App. C.1).
* ``mean``: V(s_t) = w·mean(h_{a} … h_t) + b, the running mean of the hidden states over a window that starts at
  the prompt's last token (``mean_over="response"``: s_0 and the response tokens) or at the first token
  (``"all"``: the prompt too). While decoding, the mean is updated one token at a time (:class:`RunningMean`).
* ``distributional``: a histogram over ``bins`` evenly spaced atoms z_1 … z_n spanning the reward's range,
  p(z_i | s_t) = softmax(W·h_t + b)_i, and one more output, a point value V̂(s_t) = w·h_t + b trained like the
  ``last`` head (TD(λ) on the reward). The histogram is trained by cross-entropy on distributional λ-returns
  (:func:`vas.value.td.lambda_returns`) that end at :func:`two_hot` (V̂(s_T)) instead of the reward: it spreads
  only over where π0's continuations lead, not over the model's own error about the reward of a finished
  response, which steering cannot reach (a finished state's histogram is a point, V̂(s_T)). Its value is V̂
  (V^π0); its soft value at strength β is V̂ plus the histogram's :func:`soft_excess`, the trimmed histogram's
  soft value less its mean (:meth:`vas.value.model.ValueModel.values`). Value models saved before the point
  value (no ``"point_value"`` in their config) load as a histogram alone, whose mean takes V̂'s place.
* ``next``: Q(s_t, x) = V(s_t ⊕ x) for every next token x at once, from the hidden state at s_t's last token
  (:class:`NextTokenHead`): one token per row per step while decoding, instead of one per candidate.

The soft value Q_β(s) = (1/β)·log E_π0[exp(β·r) | s] is the guide of the KL-regularised optimal policy:
π*(x|s) ∝ π0(x|s)·exp(β·Q_β(s ⊕ x)) for a terminal reward r (Q#, Zhou et al., 2025); it tends to V^π0(s) as
β → 0 and is exact for every β given the return's distribution, which the distributional head predicts
(:func:`soft_value` trims its tails, which the head cannot predict).
"""

from __future__ import annotations

import torch
from torch import nn

SMALL_BETA = 1e-6
"""Below this |β| the soft value is the (trimmed) histogram's mean (their difference is O(β·Var r))."""
TAIL = 0.05
"""The share of a distributional head's mass trimmed from each end before its soft value (:func:`soft_value`)."""


def atoms(low: float, high: float, bins: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The distributional head's support: ``bins`` evenly spaced returns from ``low`` to ``high``, (bins,) float32."""
    return torch.linspace(low, high, bins, dtype=torch.float32, device=device)


def two_hot(returns: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """Each return as a distribution on the two atoms around it, whose mean is the return (clamped to the
    support's range): (…) float → (…, n) float32 that sums to 1.

    Raises:
        ValueError: if the support has fewer than 2 atoms.
    """
    n = support.numel()
    if n < 2:
        raise ValueError(f"a distributional head needs at least 2 atoms, got {n}")
    low, high = float(support[0]), float(support[-1])
    position = (returns.float().clamp(low, high) - low) / (high - low) * (n - 1)  # in [0, n-1]
    below = position.floor().clamp(max=n - 2)
    upper = position - below  # weight of the atom above
    out = torch.zeros(*returns.shape, n, dtype=torch.float32, device=returns.device)
    out.scatter_(-1, below.long().unsqueeze(-1), (1 - upper).unsqueeze(-1))
    out.scatter_add_(-1, below.long().unsqueeze(-1) + 1, upper.unsqueeze(-1))
    return out


def trim_tails(probs: torch.Tensor, share: float) -> torch.Tensor:
    """Remove ``share`` of the mass from each end of a histogram and renormalise: (…, n) → (…, n), the same dtype.

    The lowest atoms give up ``share`` of the mass and the highest atoms another ``share`` (one atom may give up
    both), so the histogram's middle 1 − 2·share remains; a point mass stays itself.

    Raises:
        ValueError: unless 0 ≤ ``share`` < 0.5.
    """
    if not 0.0 <= share < 0.5:
        raise ValueError(f"the share trimmed from each tail must be in [0, 0.5), got {share}")
    below = probs.cumsum(dim=-1) - probs  # mass strictly below each atom
    above = probs.flip(-1).cumsum(dim=-1).flip(-1) - probs  # strictly above
    removed = (share - below).clamp_min(0).minimum(probs) + (share - above).clamp_min(0).minimum(probs)
    return (probs - removed).clamp_min(0) / (1 - 2 * share)


def soft_value(log_probs: torch.Tensor, support: torch.Tensor, beta: torch.Tensor | float | None,
               tail: float = TAIL) -> torch.Tensor:
    """(1/β)·log Σ_i p̃_i·exp(β·z_i): the soft value of a return distributed as p on the atoms z, with ``tail``
    of the mass trimmed from each end (p̃ = :func:`trim_tails` (p, ``tail``)); the mean of the untrimmed p where
    β is None.

    Why trimmed: at large β the soft value is set by the histogram's highest atoms, however little mass they
    hold: β·Q_β → β·z_max + log p(z_max). A softmax head gives every atom some mass, and cross-entropy training
    barely constrains the tail's shape (a probability of 10⁻⁴ or 10⁻⁸ on an atom no target reaches costs about
    the same), so an untrimmed soft value is the same top atom for every candidate and stops steering. Trimmed,
    it runs from the middle's mean (β → 0) to the histogram's 1 − ``tail`` quantile (β → +∞; its ``tail``
    quantile as β → −∞), all parts of the histogram that training pins down.

    Args:
        log_probs: (…, n) log p, normalised over the last dimension.
        support: (n,) the atoms z.
        beta: None, a float, or a tensor broadcastable to ``log_probs.shape[:-1]``; negative β gives the
            risk-averse soft value; |β| < :data:`SMALL_BETA` gives the trimmed histogram's mean.
        tail: the share of the mass trimmed from each end, in [0, 0.5) (0: the exact soft value of p).

    Returns:
        (…) float32. Computed in float64 after renormalising p, so that the limit β → 0 is reached smoothly
        (an error ε in Σp would otherwise add ε/β).

    Raises:
        ValueError: if ``tail`` is outside [0, 0.5).
    """
    if beta is None:  # the untrimmed histogram's mean
        return _trimmed_soft_value(log_probs, support, 0.0, 0.0)[0].float()
    return _trimmed_soft_value(log_probs, support, beta, tail)[1].float()


def soft_excess(log_probs: torch.Tensor, support: torch.Tensor, beta: torch.Tensor | float,
                tail: float = TAIL) -> torch.Tensor:
    """Q_β − E[z] of the trimmed histogram (:func:`soft_value`): how far the soft value lies above its mean (below,
    for β < 0), (…) float32, computed in float64; 0 where |β| < :data:`SMALL_BETA`. Arguments as for
    :func:`soft_value`."""
    mean, soft = _trimmed_soft_value(log_probs, support, beta, tail)
    return (soft - mean).float()


def _trimmed_soft_value(log_probs: torch.Tensor, support: torch.Tensor, beta: torch.Tensor | float,
                        tail: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The trimmed histogram's mean and soft value (the mean where |β| < :data:`SMALL_BETA`), both (…) float64."""
    log_probs = log_probs.double()
    log_probs = log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True)  # float32 rounding of Σp, /β below
    z = support.to(log_probs)
    probs = trim_tails(log_probs.exp(), tail)
    mean = (probs * z).sum(dim=-1)
    beta = torch.as_tensor(beta, dtype=torch.float64, device=log_probs.device).expand(mean.shape)
    small = beta.abs() < SMALL_BETA
    safe = torch.where(small, torch.ones_like(beta), beta)
    soft = torch.logsumexp(probs.log() + safe.unsqueeze(-1) * z, dim=-1) / safe
    return mean, torch.where(small, mean, soft)


class RunningMean:
    """The ``mean`` head's running state per row: the sum of the hidden states in the window so far and their count.

    A full forward starts from an empty state; a cached scorer keeps one across decoding steps, so each new
    token costs one addition and no re-feed.
    """

    def __init__(self):
        self.total: torch.Tensor | None = None  # (B, H) float32
        self.count: torch.Tensor | None = None  # (B,) float32

    def extend(self, hidden: torch.Tensor, joins: torch.Tensor) -> torch.Tensor:
        """Add the tokens that join the window and return the mean at each position.

        Args:
            hidden: (B, P, H) float32 hidden states of P new tokens, in order.
            joins: (B, P) bool, the tokens that are in the window (real tokens at or after its start).

        Returns:
            (B, P, H) float32: the window's mean up to each position (the position's own hidden state where
            the window has not started yet).
        """
        B, P, H = hidden.shape
        if self.total is None:
            self.total = hidden.new_zeros(B, H)
            self.count = hidden.new_zeros(B)
        weight = joins.to(hidden.dtype)
        total = self.total[:, None, :] + (hidden * weight[..., None]).cumsum(dim=1)
        count = self.count[:, None] + weight.cumsum(dim=1)
        means = torch.where(count[..., None] > 0, total / count.clamp_min(1)[..., None], hidden)
        if P:
            self.total, self.count = total[:, -1], count[:, -1]
        return means

    def peek(self, hidden: torch.Tensor) -> torch.Tensor:
        """The window's mean if each of k alternative next tokens joined it, without adding them.

        Args:
            hidden: (B, k, H) float32 hidden states of the k candidates.

        Returns:
            (B, k, H) float32.
        """
        if self.total is None:
            return hidden
        return (self.total[:, None, :] + hidden) / (self.count[:, None, None] + 1)

    def select(self, index: torch.Tensor, kept: torch.Tensor) -> None:
        """Keep rows ``index`` (B',) in that order; rows where ``kept`` is False start empty."""
        if self.total is not None:
            self.total = torch.where(kept[:, None], self.total[index], 0.0)
            self.count = torch.where(kept, self.count[index], 0.0)


GATHER_LIMIT = 256
"""Above this many candidates per state the ``next`` head scores the whole vocabulary and picks the candidates'
values, instead of gathering each candidate's embedding."""


class NextTokenHead(nn.Module):
    """The ``next`` head: Q(s, x) for every next token x from the hidden state h_s at the last token of s, so one
    value-model forward over s scores all of π0's candidates at once (Q(s, ·) over the vocabulary, as CD-Q's).

    Q(s, x) = w·h_s + b + ê_xᵀ·A·h_s / H, where ê_x is the backbone's own (frozen) input embedding of x, the LM
    head of a model with tied embeddings, scaled to unit root mean square: the head learns (w, b) and A (H × H),
    H² + H + 1 numbers whatever the vocabulary's size. A starts at 0, so every Q(s, x) starts at the state's
    baseline w·h_s + b. The unit-RMS embedding and the 1/H keep an optimiser step's change of the token term
    about that of the baseline (an Adam step moves every entry of A at once). Token ids beyond the embedding
    (the padding rows of a wider LM head, which π0's tokenizer never emits) get the baseline.

    Q(s_t, x) is V(s_t ⊕ x): trained on the λ-return of s_{t+1} for the token x_{t+1} taken at s_t
    (:func:`vas.value.td.lambda_returns`), and used as V(s ⊕ x) in Eq. 5.

    Args:
        hidden_size: H, the backbone's hidden size.
        embeddings: the backbone's input embedding (V, H); kept by reference, neither trained nor saved.
        device: where the head's parameters live (float32).
    """

    def __init__(self, hidden_size: int, embeddings: nn.Embedding, device: torch.device | str = "cpu"):
        super().__init__()
        self.baseline = nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
        self.mix = nn.Linear(hidden_size, hidden_size, bias=False, device=device, dtype=torch.float32)
        nn.init.zeros_(self.baseline.weight)
        nn.init.zeros_(self.mix.weight)
        self._embeddings = (embeddings,)  # a tuple: not a submodule, so neither trained nor saved with the head
        self._scale: tuple[torch.Tensor, torch.Tensor] | None = None  # (E it was computed for, 1 / RMS of each row)

    @property
    def embedding_weight(self) -> torch.Tensor:
        """E, (V, H) in the backbone's dtype."""
        return self._embeddings[0].weight

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Q(s, x) for the given next tokens, or for every token of the vocabulary; computed in float32.

        Args:
            hidden: (…, H) float32 hidden states h_s.
            tokens: (…, k) int64 next tokens per state, or None for all V tokens.

        Returns:
            (…, k) or (…, V) float32.
        """
        mixed = self.mix(hidden) / hidden.shape[-1]  # (…, H)
        baseline = self.baseline(hidden)  # (…, 1)
        weight = self.embedding_weight
        V = weight.shape[0]
        if tokens is not None:
            inside = tokens < V
            tokens = tokens.clamp(max=V - 1)
        if tokens is None or tokens.shape[-1] > GATHER_LIMIT:  # one (…, H) × (H, V) product beats gathering k rows
            if self._scale is None or self._scale[0] is not weight:  # E is frozen: its rows' RMS once
                self._scale = (weight, unit_rms_scale(weight))
            scores = (mixed @ weight.float().T) * self._scale[1]  # (…, V)
            if tokens is None:
                return baseline + scores
            scores = scores.gather(-1, tokens)
        else:
            chosen = weight[tokens].float()  # (…, k, H)
            scores = ((chosen * mixed.unsqueeze(-2)).sum(dim=-1)) * unit_rms_scale(chosen)
        return baseline + scores.masked_fill(~inside, 0.0)


def unit_rms_scale(vectors: torch.Tensor) -> torch.Tensor:
    """1 / RMS of each vector: (…, H) → (…) float32 (0 for an all-zero vector)."""
    mean_square = vectors.float().pow(2).mean(dim=-1)
    return torch.where(mean_square > 0, mean_square.clamp_min(1e-30).rsqrt(), 0.0)


def reads_each_candidate(head: str) -> bool:
    """Whether a value model with this head reads one value-model token per candidate x of V(s ⊕ x) (every head
    but ``next``): such a model cannot afford k = all, and a server's ``max_top_k`` bounds its k."""
    return head != "next"


class DistributionalHead(nn.Linear):
    """The distributional head: hidden states (…, H) → (…, bins + 1), the histogram's logits then V̂.

    V̂ is a linear map of the hidden states, trained with the backbone exactly like the ``last`` head; the
    histogram's logits are a linear map of the same hidden states detached, so its cross-entropy trains only
    the head's histogram rows and the backbone learns what V̂ needs (at inference the two are one linear map).
    """

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        histogram = nn.functional.linear(hidden.detach(), self.weight[:-1], self.bias[:-1])
        point = nn.functional.linear(hidden, self.weight[-1:], self.bias[-1:])
        return torch.cat([histogram, point], dim=-1)


def make_head(kind: str, hidden_size: int, embeddings: nn.Embedding, *, bins: int, point_value: bool = True,
              device: torch.device | str = "cpu") -> nn.Module:
    """A new (zero-initialised) head of the given kind on hidden states of size ``hidden_size``: an
    ``nn.Linear`` to 1 output (``last``, ``mean``) or to ``bins`` logits and, with ``point_value``, V̂
    (``distributional``: bins + 1 outputs, V̂ last), or a :class:`NextTokenHead` over ``embeddings``' vocabulary
    (``next``). Parameters float32 on ``device``."""
    if kind == "next":
        return NextTokenHead(hidden_size, embeddings, device)
    if kind == "distributional" and point_value:
        linear = DistributionalHead(hidden_size, bins + 1, device=device, dtype=torch.float32)
    else:
        linear = nn.Linear(hidden_size, bins if kind == "distributional" else 1, device=device, dtype=torch.float32)
    nn.init.zeros_(linear.weight)
    return linear
