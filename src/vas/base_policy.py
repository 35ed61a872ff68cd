"""π0 from its :class:`vas.config.PolicyConfig`: a :class:`vas.policy.local.LocalPolicy`, a
:class:`vas.serving.engine.VllmPolicy` (``engine="vllm"``) or a :class:`vas.policy.api.ApiPolicy` (``api_base_url``
set), checking what can be checked before any weights load.

It sits above every kind of policy it builds (the vLLM one lives in :mod:`vas.serving`), so that the configs stay
plain data. The module imports no torch at load time (the CLI imports it); the model code is imported when a
policy is built.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from vas.config import PolicyConfig
from vas.errors import VasError


def build_policy(config: PolicyConfig, prompts: Sequence[str] | None = None, max_new_tokens: int = 0,
                 top_k: int | str | None = None):
    """π0 as a :class:`vas.policy.api.ApiPolicy` (``api_base_url`` set) or a :class:`vas.policy.local.LocalPolicy`.

    For a local model, ``prompts`` are checked against its context window (with ``max_new_tokens``) and
    ``top_k`` (k for value models, if any) against its vocabulary, from its tokenizer and config, before its
    weights load.

    Raises:
        VasError: for a concurrency or timeout ≤ 0, ``api_extra`` that is not a JSON object, a template
            with the chat endpoint, or a model that cannot be found, a prompt that does not fit, or k too large.
    """
    if not config.concurrency > 0 or not (0 < config.timeout < math.inf):
        raise VasError(f"--concurrency and --timeout must be > 0, got {config.concurrency} and {config.timeout}")
    if config.engine not in ("transformers", "vllm"):
        raise VasError(f"--engine must be 'transformers' or 'vllm', got {config.engine!r}")
    if config.api_base_url:
        if config.engine != "transformers":
            raise VasError("--engine vllm runs a local model: leave out --api-base-url (or serve it with vas serve)")
        return _api_policy(config)
    from vas.models import (
        check_fits,
        context_window,
        load_config,
        load_policy,
        load_tokenizer,
        resolve_device,
        resolve_dtype,
    )
    from vas.policy.local import LocalPolicy
    from vas.prompts import encode_prompts

    device = resolve_device(config.device)
    tokenizer = load_tokenizer(config.base_model)
    model_config = load_config(config.base_model)
    if prompts is not None:
        check_fits(encode_prompts(tokenizer, prompts), max_new_tokens, context_window(model_config))
    if top_k is not None:
        from vas.decoding.rules import CLI, check_models

        check_models([], [], CLI, top_k=top_k, vocab_size=model_config.vocab_size)
    if config.engine == "vllm":
        from vas.serving.engine import VllmPolicy

        return VllmPolicy(config.base_model, dtype=str(resolve_dtype(config.dtype, device)).removeprefix("torch."))
    model = load_policy(config.base_model, device=device, dtype=resolve_dtype(config.dtype, device))
    return LocalPolicy(model, tokenizer)


def _api_policy(config: PolicyConfig):
    """π0 behind ``config.api_base_url`` (:func:`build_policy`)."""
    from vas.models import load_tokenizer
    from vas.policy.api import ApiPolicy, Endpoint, chat_template

    try:
        extra_body = json.loads(config.api_extra)
    except json.JSONDecodeError:
        extra_body = None
    if not isinstance(extra_body, dict):
        raise VasError(f"--api-extra must be a JSON object, got {config.api_extra!r}")
    if config.api_template is not None and config.api_chat:
        raise VasError("--api-template is for the completions endpoint; the chat endpoint applies the server's template")
    endpoint = Endpoint(config.api_base_url, config.api_model, api_key=os.environ.get(config.api_key_env, "none"),
                        chat=config.api_chat, timeout=config.timeout, extra_body=extra_body,
                        stop=tuple(config.api_stop), stream=config.api_stream)
    return ApiPolicy(endpoint, chat_template(load_tokenizer(config.api_template)) if config.api_template else None)
