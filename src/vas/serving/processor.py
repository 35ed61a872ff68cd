"""VAS inside vLLM: a v1-engine logits processor that steers each request by its own β, k and mix of value models.

Per request (``SamplingParams.extra_args`` offline, ``vllm_xargs`` in an OpenAI request body):

- ``vas_beta``: β, a finite number; absent or 0 leaves the request untouched, with no value-model work;
- ``vas_top_k``: k, 1 ≤ k ≤ the vocabulary size (default: the server's);
- ``vas_values``: ``"NAME=WEIGHT,NAME=WEIGHT"`` over the value models loaded at start-up (a bare ``NAME`` has
  weight 1; default: every loaded value model with weight 1). Composition is linear (Sec. 4.2);
- ``vas_soft``: ``true`` to guide with soft values at the request's β (distributional value models,
  :class:`vas.decoding.loop.Steering`'s ``soft``); default false, V^π0.

Each step the processor gives every steered request π ∝ π0_τ · exp(β Σ_i w_i V_i(s ⊕ x)) over π0's top-k,
and β·mean V to the other tokens (Eq. 5), with the project's temperature rule
(:mod:`vas.decoding.guidance`): π0_τ = softmax(logits / τ), and β·V is not divided by τ. vLLM runs
logits processors that can change the argmax on the raw logits *before* it divides by the temperature, so
the processor returns τ·log π, which vLLM's division turns into log π. A greedy request (temperature 0)
takes argmax(log π0 + β·V) at τ = 1 (Sec. 4.4). The request's own top-k, top-p and min-p, when set, then cut
the steered distribution, as they would cut π0.

The value models are loaded once, in each worker, and must share the base model's tokenizer (they read its
token ids). Each value model keeps one KV cache over the steered requests of the batch
(:class:`vas.value.model.CandidateScorer`): a request's row is added when it is first steered (its prompt and
any earlier output are fed then), dropped when it leaves or is preempted (a preempted request comes back as
a new one and is fed again), and batch moves and swaps only reorder rows. Each step costs one value-model
forward per value model that some steered request weights ≠ 0, for all steered requests together.

Nothing in a request names a path or code: value models are chosen by the names given at start-up. The
start-up settings reach vLLM's processes through the environment variable :data:`SETTINGS_ENV`
(:class:`Settings`), which ``vas serve`` and :mod:`vas.serving.engine` set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import weakref
from dataclasses import asdict, dataclass
from functools import cache

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vas.decoding.guidance import base_logprobs, kl_divergence
from vas.decoding.loop import Steering, steer
from vas.errors import VasError
from vas.policy.local import Appended
from vas.value.model import CandidateScorer, ValueModel, check_same_tokenizer, value_head

SETTINGS_ENV = "VAS_VLLM_SETTINGS"
FIELDS = ("vas_beta", "vas_top_k", "vas_values", "vas_soft", "vas_id")
GREEDY_EPS = 1e-5  # vLLM treats a temperature below this as greedy
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class Settings:
    """What a server (or an offline engine) steers with; JSON in the environment variable :data:`SETTINGS_ENV`.

    Attributes:
        values: value-model name → folder, in the order of the weights.
        vocab_size: the base model's vocabulary size (the largest k).
        top_k: k for requests that do not give ``vas_top_k``.
        max_top_k: the largest k a request may ask for (each step scores the largest k of the batch in every
            steered row, so one huge k would cost every request).
        dtype: the value models' dtype (``"auto"``, ``"float32"``, ``"bfloat16"`` …).
        record: keep each request's per-step steering statistics under its ``vas_id`` until
            :func:`take_statistics` fetches them (the offline engine's KL; off for a server).
    """

    values: dict[str, str]
    vocab_size: int
    top_k: int = 10
    max_top_k: int = 100
    dtype: str = "auto"
    record: bool = False

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


_head = cache(value_head)  # the served value models are loaded once: their heads do not change


@dataclass(frozen=True)
class RequestSteering:
    """One request's steering: β, k and one weight per loaded value model (``Settings.values`` order)."""

    beta: float
    top_k: int
    weights: tuple[float, ...]
    record_id: str | None = None
    soft: bool = False


def _number(name: str, value, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}") from None
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise ValueError(f"{name} must be a finite number (|x| ≤ 3.4e38, float32), got {value!r}")
    return number


def parse_weights(text, names: list[str]) -> tuple[float, ...]:
    """``"NAME=WEIGHT,NAME=WEIGHT"`` → one weight per name in ``names`` (0 for names not listed).

    Raises:
        ValueError: naming ``vas_values``, for an unknown or repeated name or a weight that is not finite.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f'vas_values must be a non-empty string "NAME=WEIGHT,NAME=WEIGHT" (a bare NAME has weight 1), '
                         f'got {text!r}')
    weights = dict.fromkeys(names, 0.0)
    seen = set()
    for part in text.split(","):
        name, sep, weight = part.strip().partition("=")
        name = name.strip()
        if not name:
            raise ValueError(f"vas_values has an empty entry: {text!r}")
        if name not in weights:
            raise ValueError(f"vas_values names an unknown value model {name!r}; this server has: {', '.join(names)}")
        if name in seen:
            raise ValueError(f"vas_values names the value model {name!r} twice")
        seen.add(name)
        weights[name] = _number(f"vas_values' weight of {name!r}", weight) if sep else 1.0
    return tuple(weights.values())


def parse_request(extra_args: dict | None, settings: Settings) -> RequestSteering | None:
    """The steering a request asks for, or None when it asks for none (no ``vas_beta``, or β = 0).

    Raises:
        ValueError: naming the field, for an unknown ``vas_*`` field, a β or weight that is not a finite
            number, an unknown value-model name, or k outside 1 … vocabulary size. vLLM answers it with
            HTTP 400 before any work is done; also for k above the server's ``max_top_k``.
    """
    args = extra_args or {}
    unknown = sorted(k for k in args if k.startswith("vas_") and k not in FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; VAS reads {', '.join(FIELDS[:4])}")
    names = list(settings.values)
    beta = _number("vas_beta", args["vas_beta"]) if "vas_beta" in args else 0.0
    top_k = settings.top_k
    if "vas_top_k" in args:
        if isinstance(args["vas_top_k"], float) and not args["vas_top_k"].is_integer():
            raise ValueError(f"vas_top_k must be an integer, got {args['vas_top_k']!r}")
        top_k = int(_number("vas_top_k", args["vas_top_k"], integer=not isinstance(args["vas_top_k"], float)))
        largest = min(settings.vocab_size, settings.max_top_k)
        if not 1 <= top_k <= largest:
            raise ValueError(f"vas_top_k must be between 1 and {largest} (the vocabulary size {settings.vocab_size}, "
                             f"at most the server's --max-top-k {settings.max_top_k}), got {top_k}")
    weights = parse_weights(args["vas_values"], names) if "vas_values" in args else (1.0,) * len(names)
    if any(abs(beta * w) > FLOAT32_MAX for w in weights):
        raise ValueError(f"vas_beta times a vas_values weight must stay within float32 (3.4e38), got β = {beta}")
    soft = args.get("vas_soft", False)  # vLLM's vllm_xargs model turns JSON true into 1
    if isinstance(soft, str) and soft.lower() in ("true", "false"):
        soft = soft.lower() == "true"
    if isinstance(soft, float) or soft not in (True, False):
        raise ValueError(f"vas_soft must be true or false, got {soft!r}")
    soft = bool(soft)
    if soft and not any(w and _head(path) == "distributional" for w, path in zip(weights, settings.values.values())):
        raise ValueError("vas_soft needs a distributional value model among those the request weights (vas train "
                         "--head distributional)")
    if beta == 0 or not any(weights):
        return None
    record = str(args["vas_id"]) if "vas_id" in args and settings.record else None
    return RequestSteering(beta, top_k, weights, record, soft)


def request_error(body: dict, settings: Settings) -> str | None:
    """What is wrong with the steering of an OpenAI request body, or None: ``vas_*`` fields outside
    ``vllm_xargs`` (vLLM would ignore them), misspelt ones, or :func:`parse_request`'s errors."""
    misplaced = sorted(k for k in body if k.lower().startswith("vas_"))
    if misplaced:
        return f"{misplaced[0]} must go inside vllm_xargs (extra_body={{'vllm_xargs': {{...}}}} in the openai client)"
    xargs = body.get("vllm_xargs")
    if not isinstance(xargs, dict):
        return None  # absent, or vLLM's own validation answers
    miscased = sorted(k for k in xargs if k.lower().startswith("vas_") and k != k.lower())
    if miscased:
        return f"unknown field {miscased[0]!r}; VAS reads {', '.join(FIELDS[:4])} (lower case)"
    try:
        parse_request(xargs, settings)
    except ValueError as exc:
        return str(exc)
    return None


STEERED_PATHS = ("/v1/completions", "/v1/chat/completions")


async def check_steering(request, call_next):
    """ASGI middleware of ``vas serve`` (vLLM's ``--middleware``): answers a bad steering request with HTTP 400
    before vLLM starts a response, so streamed requests get the status too, and fields vLLM would silently
    drop are refused. Requests that fail the API key are left to vLLM's authentication (401)."""
    from starlette.responses import JSONResponse

    if request.method == "POST" and request.url.path in STEERED_PATHS and _authorized(request):
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None  # vLLM answers malformed JSON itself
        if isinstance(body, dict):
            message = request_error(body, Settings.from_env())
            if message is not None:
                return JSONResponse({"error": {"message": message, "type": "BadRequestError", "param": None,
                                               "code": 400}}, status_code=400)
    return await call_next(request)


def _authorized(request) -> bool:
    key = os.environ.get("VLLM_API_KEY")
    return not key or request.headers.get("authorization") == f"Bearer {key}"


@dataclass(eq=False)
class _Request:
    """A steered request in the batch: its steering, τ, and its prompt and (live) output token ids."""

    steering: RequestSteering
    temperature: float  # τ of π0; 1 for a greedy request
    prompt: list[int]
    output: list[int]  # vLLM's running list of the request's output tokens

    def since(self, fed: int) -> list[int]:
        """The request's known tokens from position ``fed`` on (up to any placeholder, −1, of a token that
        asynchronous scheduling has not filled in yet)."""
        P = len(self.prompt)
        tokens = self.prompt[fed:] + self.output if fed < P else self.output[fed - P:]
        return tokens[: tokens.index(-1)] if -1 in tokens else tokens

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)


class _LiveScorer:
    """A :class:`CandidateScorer` whose rows follow the steered requests of a changing batch."""

    def __init__(self, model: ValueModel):
        self.scorer = CandidateScorer(model)
        self.rows: list[_Request] = []

    def score(self, batch: "_Batch", candidates: torch.Tensor, active: torch.Tensor,
              beta: torch.Tensor | None = None) -> torch.Tensor:
        old = {id(r): i for i, r in enumerate(self.rows)}
        fed = self.scorer.lengths.tolist() if self.scorer.lengths is not None else []
        # a row whose request now has fewer tokens than were fed (vLLM discarded some) starts again
        order = [i if i >= 0 and fed[i] <= len(r) else -1 for i, r in ((old.get(id(r), -1), r) for r in batch.requests)]
        if order != list(range(len(self.rows))):
            self.scorer.reorder(order)
        self.rows = list(batch.requests)
        fed = self.scorer.lengths.tolist() if self.scorer.lengths is not None else [0] * len(order)
        new = [r.since(n) for r, n in zip(batch.requests, fed)]
        P = max(map(len, new))
        ids = torch.zeros(len(new), P, dtype=torch.long)
        mask = torch.zeros(len(new), P, dtype=torch.long)
        for i, tokens in enumerate(new):  # left padding
            if tokens:
                ids[i, P - len(tokens):] = torch.tensor(tokens)
                mask[i, P - len(tokens):] = 1
        prompt_lengths = torch.tensor([len(r.prompt) for r in batch.requests])
        return self.scorer.score(_Appending(Appended(ids, mask), prompt_lengths), candidates, beta=beta)


@dataclass
class _Appending:
    appended: Appended
    prompt_lengths: torch.Tensor  # (B,) each row's prompt tokens (the mean head's window starts at the last)


@dataclass
class _Batch:
    requests: list[_Request]


@dataclass
class StepRecord:
    """One steered step of a recorded request, enough to recover log π0 of the token vLLM then drew from
    log π of it (vLLM's processed log-prob): log π0(x) = log π(x) − shift(x), where shift(x) is
    ``candidate_shift[j]`` for x = ``candidates[j]`` and ``other_shift`` for every other token."""

    kl: float  # KL(π(·|s_t) ‖ π0(·|s_t)), nats
    candidates: list[int]
    candidate_shift: list[float]
    other_shift: float


_processors: "weakref.WeakSet[VllmLogitsProcessor]" = weakref.WeakSet()


class VllmLogitsProcessor(LogitsProcessor):
    """Eq. 5 in vLLM's v1 sampler, per request (see the module docstring). Pass the class to
    ``vllm.LLM(logits_processors=[...])`` or its name, ``vas.serving.processor:VllmLogitsProcessor``, to
    ``vllm serve --logits-processors``, with :data:`SETTINGS_ENV` set (:class:`Settings`).

    Raises:
        VasError: at start-up, if the settings are missing or a value model does not exist, is not a value
            model, or has another tokenizer than the base model.
    """

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams):
        parse_request(sampling_params.extra_args, Settings.from_env())

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        from vas.models import load_tokenizer, resolve_value_dtype

        self.settings = Settings.from_env()
        dtype = resolve_value_dtype(self.settings.dtype, torch.device(device))
        self.models = [ValueModel.from_pretrained(path, device=device, dtype=dtype)
                       for path in self.settings.values.values()]
        base_tokenizer = load_tokenizer(vllm_config.model_config.tokenizer)
        for name, model in zip(self.settings.values, self.models):
            check_same_tokenizer(base_tokenizer, model.tokenizer, name)
        self.scorers = [_LiveScorer(m) for m in self.models]
        self.requests: dict[int, _Request] = {}  # batch index → steered request
        logging.getLogger("vllm").info(
            "VAS: value models %s (%s); vas_top_k %d by default, at most %d",
            ", ".join(f"{name}={path}" for name, path in self.settings.values.items()), dtype,
            self.settings.top_k, self.settings.max_top_k)
        self.records: dict[str, dict[int, StepRecord]] = {}  # vas_id → output position → step
        _processors.add(self)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            steering = parse_request(params.extra_args, self.settings)
            if steering is None or prompt is None:
                self.requests.pop(index, None)
                continue
            temperature = params.temperature if params.temperature >= GREEDY_EPS else 1.0
            self.requests[index] = _Request(steering, temperature, prompt, output)
        for a, b, direction in batch_update.moved:
            first, second = self.requests.pop(a, None), self.requests.pop(b, None)
            if first is not None:
                self.requests[b] = first
            if direction == MoveDirectionality.SWAP and second is not None:
                self.requests[a] = second
        if not self.requests:  # the last steered request left: free the value models' caches
            self.scorers = [_LiveScorer(m) for m in self.models]

    @torch.no_grad()
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
        rows = torch.tensor(index, device=logits.device)
        temperature = torch.tensor([[r.temperature] for r in requests], device=logits.device)
        beta = torch.tensor([r.steering.beta for r in requests])
        weights = torch.tensor([r.steering.weights for r in requests])
        top_k = torch.tensor([r.steering.top_k for r in requests])
        used = [i for i in range(len(self.models)) if bool((weights[:, i] != 0).any())]
        soft = torch.tensor([r.steering.soft for r in requests])
        steering = Steering([self.models[i] for i in used], top_k=int(top_k.max()), soft=soft)
        base = base_logprobs(logits[rows], temperature)  # (B, V) log π0 at each request's τ
        logp = steer(steering, [self.scorers[i] for i in used], _Batch(requests), base,
                     torch.ones(len(index), dtype=torch.bool), beta, weights[:, used], top_k)
        for i, scorer in enumerate(self.scorers):
            if i not in used and scorer.rows:  # free the caches of a value model no request uses now
                self.scorers[i] = _LiveScorer(self.models[i])
        self._record(requests, base, logp, int(top_k.max()))
        logits[rows] = (logp * temperature).to(logits.dtype)  # vLLM divides by τ next
        return logits

    def _record(self, requests: list[_Request], base: torch.Tensor, logp: torch.Tensor, k: int) -> None:
        recorded = [j for j, r in enumerate(requests) if r.steering.record_id is not None]
        if not recorded:
            return
        kl = kl_divergence(logp[recorded], base[recorded]).tolist()
        shift = logp[recorded] - base[recorded]  # (R, V): the top-k's β·(V − V̄) − log Z, −log Z elsewhere
        candidates = base[recorded].topk(k, dim=-1).indices
        for n, j in enumerate(recorded):
            r = requests[j]
            ids = candidates[n, : r.steering.top_k]
            outside = torch.ones(shift.shape[1], dtype=torch.bool, device=shift.device)
            outside[ids] = False
            other = float(shift[n][outside][0]) if bool(outside.any()) else 0.0  # −log Z
            step = StepRecord(kl[n], ids.tolist(), shift[n, ids].tolist(), other)
            self.records.setdefault(r.steering.record_id, {})[len(r.output)] = step


def take_statistics(record_ids: list[str]) -> dict[str, dict[int, StepRecord]]:
    """The recorded steps of the given ``vas_id``\\ s, removed from this process's processors (called in vLLM's
    worker through :class:`WorkerExtension`)."""
    found: dict[str, dict[int, StepRecord]] = {}
    for processor in list(_processors):
        for record_id in record_ids:
            if record_id in processor.records:
                found[record_id] = processor.records.pop(record_id)
    return found


class WorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``) so that ``LLM.collective_rpc("vas_statistics", …)``
    fetches the recorded steps without sending code to the worker."""

    def vas_statistics(self, record_ids: list[str]) -> dict[str, dict[int, dict]]:
        return {key: {pos: asdict(step) for pos, step in steps.items()}
                for key, steps in take_statistics(record_ids).items()}
