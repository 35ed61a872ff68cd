"""The HTTP side of ``vas serve``, as one ASGI middleware in front of vLLM's OpenAI server (vLLM's
``--middleware``): the API key on every path, steering errors as HTTP 400 before any response starts, and the
read-only list of the served value models that clients (``vas playground``) build their controls from.

Nothing here loads code or a path named in a request: value models are the ones named at start-up
(:class:`vas.serving.processor.Settings`), and their folders are never shown.
"""

from __future__ import annotations

import hmac
import json
import os

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the processor imports vLLM, which a client of this module (vas playground) does without
    from vas.serving.processor import Settings

STEERED_PATHS = ("/v1/completions", "/v1/chat/completions", "/invocations")
VALUE_MODELS_PATH = "/v1/vas/value_models"
OPEN_PATHS = ("/health", "/ping")
"""The paths that answer without the API key (liveness probes); vLLM itself guards only ``/v1``."""


def value_models(settings: Settings) -> dict:
    """What ``GET`` :data:`VALUE_MODELS_PATH` answers: each served value model's name, head, reward, data size
    and validation R² (the share of the rewards' variance it explains, from ``vas train``; None where its
    config does not say), and the server's k settings. No path.

    Returns:
        ``{"value_models": [{"name", "head", "reward", "train_rows", "val_rows", "validation_r2"}, …],
        "top_k": int or "all", "max_top_k": int, "vocab_size": int}``.
    """
    from vas.value.model import value_summary

    return {"value_models": [{"name": name, **value_summary(path)} for name, path in settings.values.items()],
            "top_k": settings.top_k, "max_top_k": min(settings.max_top_k, settings.vocab_size),
            "vocab_size": settings.vocab_size}


async def check_requests(request, call_next):
    """The middleware (see the module docstring). With an API key, every path but :data:`OPEN_PATHS` needs it
    (vLLM guards only ``/v1``: ``/metrics`` answered anyone): HTTP 401. A bad steering request gets HTTP 400
    naming the field, streamed requests too, and ``vas_*`` fields vLLM would silently drop are refused."""
    from starlette.responses import JSONResponse

    from vas.serving.processor import Settings, request_error

    def error(message: str, status: int):
        kind = {400: "BadRequestError", 401: "AuthenticationError"}[status]
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                            status_code=status)

    path = request.url.path
    if not _authorized(request):
        if path not in OPEN_PATHS and request.method != "OPTIONS":
            return error("this server needs its API key: send the header 'Authorization: Bearer KEY'", 401)
        return await call_next(request)
    if request.method == "GET" and path == VALUE_MODELS_PATH:
        return JSONResponse(value_models(Settings.from_env()))
    if request.method == "POST" and path in STEERED_PATHS:
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None  # vLLM answers malformed JSON itself
        if isinstance(body, dict):
            message = request_error(body, Settings.from_env())
            if message is not None:
                return error(message, 400)
    return await call_next(request)


def _authorized(request) -> bool:
    """Whether the request carries the API key (``Authorization: Bearer KEY``, the scheme in any case, as vLLM
    reads it), compared in constant time; True when the server has no key."""
    key = os.environ.get("VLLM_API_KEY")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return not key or (scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), key.encode()))
