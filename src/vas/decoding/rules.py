"""The steering settings' rules, in one place: β, k, the value models' weights (``X=Y`` specs) and soft values.

Every entry point parses and checks a user's steering with these functions: the CLI (``vas generate``,
``vas evaluate``, ``vas serve``), the library (:class:`vas.decoding.loop.Steering`, :func:`vas.generate`) and
vLLM's processors (:func:`vas.serving.processor.parse_request`). Each caller names the settings in its own words
(:class:`Names`: a CLI flag, a library argument or a request field), and every rule raises
:class:`vas.errors.VasError`, a ``ValueError``: the CLI prints it as a ``vas: error:`` line, the library raises it,
and vLLM answers a request with HTTP 400.

The rules (Eq. 5, Sec. 4.2):

- β is a finite float32 number; β = 0 is π0 itself.
- k is an integer from 1 to the vocabulary size, or ``"all"``, which only value models with the ``next`` head
  afford (they score every token from one forward); a server may cap k for the other heads.
- a value model's weight is a finite float32 number, and β·w stays within float32.
- a value model with weight 0 in every row, or every value model of a row with β = 0, does no work
  (:func:`steered_models`).
- soft values need a distributional value model with a weight ≠ 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from vas.errors import VasError
from vas.value.heads import reads_each_candidate

ALL = "all"
"""k that steers every token of π0's support (``--top-k all``, ``top_k="all"``, ``"vas_top_k": "all"``)."""

FLOAT32_MAX = 3.4028234663852886e38
"""The largest finite float32: β, the weights and their products must stay within it."""

SHOWN = 60
"""The most characters of a user's value that an error message echoes."""


def shown(value) -> str:
    """``repr(value)``, cut to :data:`SHOWN` characters: an error names what was wrong without echoing a huge
    value back."""
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN - 1]}…"


@dataclass(frozen=True)
class Names:
    """What a caller calls each steering setting in its errors.

    Attributes:
        beta: β.
        top_k: k.
        values: the value models and their weights.
        soft: soft values.
        max_top_k: the largest k allowed to value models that read one token per candidate (a server's).
        all: how the caller writes k = :data:`ALL`.
    """

    beta: str
    top_k: str
    values: str
    soft: str
    max_top_k: str = "max_top_k"
    all: str = ALL


CLI = Names("--beta", "--top-k", "--value", "--soft", "--max-top-k")
LIBRARY = Names("beta", "top_k", "weights", "soft", all=repr(ALL))
REQUEST = Names("vas_beta", "vas_top_k", "vas_values", "vas_soft", "the server's --max-top-k", all='"all"')


def parse_number(value, name: str) -> float:
    """A finite float32 number as a user writes it (an int, a float or a numeric string; not a bool).

    Raises:
        VasError: naming ``name``, for anything else, NaN, ±inf or a magnitude above :data:`FLOAT32_MAX`.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise VasError(f"{name} must be a number, got {shown(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VasError(f"{name} must be a number, got {shown(value)}") from None
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise VasError(f"{name} must be finite, a number with |x| ≤ 3.4e38 (float32), got {shown(value)}")
    return number


def parse_beta(value, names: Names) -> float:
    """β: a finite float32 number (:func:`parse_number`)."""
    return parse_number(value, names.beta)


def parse_top_k(value, names: Names, typed: bool = False) -> int | str:
    """k as a user writes it (``"10"``, ``10``, ``10.0`` or ``"all"``, any case) → an int ≥ 1 or :data:`ALL`;
    ``typed``: only an int ≥ 1 or :data:`ALL` itself (a library argument).

    Raises:
        VasError: naming ``names.top_k``, for anything else.
    """
    if value == ALL or (not typed and isinstance(value, str) and value.strip().lower() == ALL):
        return ALL
    k = None
    if isinstance(value, int if typed else (str, int, float)) and not isinstance(value, bool):
        try:
            k = int(value) if not isinstance(value, float) or value.is_integer() else None
        except ValueError:
            pass
    if k is None or k < 1:
        raise VasError(f"{names.top_k} must be an integer ≥ 1 or 'all', got {shown(value)}")
    return k


def parse_soft(value, names: Names) -> bool:
    """Soft values on or off: a bool, ``1``/``0`` (vLLM's ``vllm_xargs`` turns JSON ``true`` into 1) or
    ``"true"``/``"false"`` (any case).

    Raises:
        VasError: naming ``names.soft``, for anything else.
    """
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, float) or value not in (True, False):
        raise VasError(f"{names.soft} must be true or false, got {shown(value)}")
    return bool(value)


def split_spec(spec: str, name: str, *, at_last: bool) -> tuple[str, str | None]:
    """``"X=Y"`` → (X, Y), stripped; a bare ``"X"`` → (X, None). Split at the last ``=`` (``at_last``: Y is a
    number, X may be a path) or at the first (Y is a path, X a name).

    Raises:
        VasError: naming ``name``, for an empty X or an empty Y after ``=``.
    """
    x, sep, y = spec.rpartition("=") if at_last else spec.partition("=")
    if not sep:
        x, y = spec, None
    x, y = x.strip(), (y.strip() if y is not None else None)
    if not x or y == "":
        raise VasError(f"{name} has an empty entry: {shown(spec)}")
    return x, y


def parse_weighted(spec: str, names: Names) -> tuple[str, float]:
    """``"X=WEIGHT"`` → (X, WEIGHT), split at the last ``=``; a bare ``"X"`` has weight 1. X is a value model's
    folder (the CLI, the library) or a served value model's name (a request).

    Raises:
        VasError: naming ``names.values``, for an empty entry or a weight that is not a finite float32 number.
    """
    x, weight = split_spec(spec, names.values, at_last=True)
    return x, 1.0 if weight is None else parse_number(weight, f"the weight of {shown(x)} in {names.values}")


def parse_weights(values: str | Mapping[str, float], known: Sequence[str], names: Names) -> tuple[float, ...]:
    """A served request's weights, ``"NAME=WEIGHT,NAME=WEIGHT"`` (or a mapping NAME → weight) → one weight per
    name of ``known`` (0 for a name not listed).

    Raises:
        VasError: naming ``names.values``, for an empty string or mapping, an unknown or repeated name, or a weight that is
            not a finite float32 number.
    """
    if isinstance(values, Mapping) and values:
        pairs = [(str(name), parse_number(w, f"the weight of {shown(name)} in {names.values}")) for name, w in values.items()]
    elif isinstance(values, str) and values.strip():
        pairs = [parse_weighted(part, names) for part in values.split(",")]
    else:
        raise VasError(f'{names.values} must be a non-empty string "NAME=WEIGHT,NAME=WEIGHT" (a bare NAME has weight 1), '
                       f"got {shown(values)}")
    weights = dict.fromkeys(known, 0.0)
    seen = set()
    for name, weight in pairs:
        if name not in weights:
            raise VasError(f"{names.values} names an unknown value model {shown(name)}; this server has: {', '.join(known)}")
        if name in seen:
            raise VasError(f"{names.values} names the value model {shown(name)} twice")
        seen.add(name)
        weights[name] = weight
    return tuple(weights.values())


def check_product(beta, weights, names: Names) -> None:
    """β·w must stay within float32 for every weight w of every row.

    Args:
        beta: β: a number, or (B,) one per row.
        weights: (M,) weights shared by the rows, or (B, M) one row per β.

    Raises:
        VasError: naming ``names.beta`` and ``names.values``.
    """
    beta = torch.as_tensor(beta, dtype=torch.float64)
    products = beta.reshape(beta.shape + (1,)) * torch.as_tensor(weights, dtype=torch.float64)
    if products.numel() and float(products.abs().max()) > FLOAT32_MAX:
        raise VasError(f"{names.beta} times a {names.values} weight must stay within float32 (3.4e38), got "
                       f"β = {shown(beta.tolist())}")


def check_models(heads: Sequence[tuple[str, str]], weights: Sequence[float], names: Names, *, top_k: int | str,
                 soft: bool = False, vocab_size: int | None = None, max_top_k: int | None = None) -> None:
    """Check k and soft against the value models a steering weights.

    Args:
        heads: (label, head) of each value model: its folder, argument or served name, and its head
            (:data:`vas.value.heads.HEADS`), in the order of ``weights``.
        weights: their weights; a value model weighted 0 is not checked.
        top_k: k (:func:`parse_top_k`).
        soft: whether soft values are asked for.
        vocab_size: the vocabulary size, the largest k; None: not known (an API policy).
        max_top_k: the largest k for value models that read one token per candidate (a server's cap), or None.

    Raises:
        VasError: for k = all with a weighted value model whose head is not ``next``; k above the vocabulary
            size, or above ``max_top_k`` with a weighted value model that reads one token per candidate; soft
            values without a weighted distributional value model.
    """
    weighted = [(label, head) for (label, head), w in zip(heads, weights) if w]
    per_candidate = [(label, head) for label, head in weighted if reads_each_candidate(head)]
    if top_k == ALL and per_candidate:
        raise VasError(f"{names.top_k} {names.all} needs value models with the next head; {per_candidate[0][0]!r} "
                       f"has the {per_candidate[0][1]} head, which would read every token of the vocabulary at every "
                       "step (vas train --head next)")
    if top_k != ALL:
        capped = [m for m in per_candidate if max_top_k is not None and top_k > max_top_k]
        if capped and (vocab_size is None or max_top_k < vocab_size):
            raise VasError(f"{names.top_k} must be between 1 and {max_top_k} (at most {names.max_top_k} {max_top_k} for "
                           f"value model {capped[0][0]!r}, which reads one token per candidate; the vocabulary size is "
                           f"{vocab_size}) or {names.all}, got {top_k}")
        if vocab_size is not None and top_k > vocab_size:
            raise VasError(f"{names.top_k} must be between 1 and the vocabulary size {vocab_size}, or {names.all}, "
                           f"got {top_k}")
    if soft and "distributional" not in [head for _, head in weighted]:
        raise VasError(f"{names.soft} needs a distributional value model with a weight ≠ 0 (vas train --head "
                       "distributional); " + (", ".join(f"{label} has the {head} head" for label, head in heads)
                                              or f"no {names.values} was given"))


def steered_models(beta, weights) -> list[int]:
    """The value models a batch consults: none when every row has β = 0, else those with a weight ≠ 0 in some row.

    Args:
        beta: (B,) β of each row (a tensor or a sequence).
        weights: (B, M) weights of each row.

    Returns:
        The indices of the consulted value models, ascending.
    """
    beta, weights = torch.as_tensor(beta), torch.as_tensor(weights)
    if not bool((beta != 0).any()):
        return []
    return [i for i in range(weights.shape[-1]) if bool((weights[..., i] != 0).any())]
