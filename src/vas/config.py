"""Where the base policy π0 lives, as one dataclass: a local model, or a model behind an OpenAI-compatible API.

:class:`PolicyConfig` is shared by ``collect``, ``generate`` and ``evaluate``; the ``vas`` command builds its
options from the fields (each field's ``help`` is the option's help), and :meth:`PolicyConfig.load` turns it
into a :class:`vas.policies.LocalPolicy` or a :class:`vas.api.ApiPolicy`, checking what can be checked before
any weights load.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from vas.errors import VasError

EMBEDDED = "smollm2-135m-instruct"


def _help(text: str, *flags: str) -> dict:
    return {"help": text, "flags": flags}


@dataclass
class PolicyConfig:
    """π0: a local causal LM, or one behind an OpenAI-compatible endpoint (Sec. 4.4) when ``api_base_url`` is set.

    Attributes:
        base_model: the local model: ``smollm2-135m-instruct`` (embedded), a local directory or a hub id.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1`` …
        dtype: π0's dtype: ``auto`` (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16.
        api_base_url: the endpoint, e.g. ``http://127.0.0.1:8000/v1``; None for a local model.
        api_model: the model's name at the endpoint.
        api_key_env: the environment variable holding the API key.
        api_chat: use the chat endpoint (steering needs a server that continues a partial assistant
            message, e.g. vLLM's ``continue_final_message``).
        api_template: completions endpoint: format prompts with this local model's chat template.
        api_extra: extra JSON fields for every request (a JSON object, as text).
        api_stop: strings that end a response.
        api_stream: ask for each next token as a stream (completions endpoint).
        concurrency: requests in flight at once (API).
        timeout: seconds per request, in s; 429, 5xx and timeouts are retried with backoff.
    """

    base_model: str = field(default=EMBEDDED, metadata=_help(
        "Base policy π0: 'smollm2-135m-instruct' (embedded), a local directory or a hub id.", "--base-model", "-m"))
    device: str = field(default="auto", metadata=_help("'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1' …"))
    dtype: str = field(default="auto", metadata=_help("'auto' (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16."))
    api_base_url: Optional[str] = field(default=None, metadata=_help(
        "Use π0 behind this OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) instead of a local model."))
    api_model: str = field(default="default", metadata=_help("The model's name at --api-base-url."))
    api_key_env: str = field(default="OPENAI_API_KEY", metadata=_help("Environment variable holding the API key."))
    api_chat: bool = field(default=False, metadata=_help(
        "Use the chat endpoint (steering needs a server that continues a partial assistant message, e.g. vLLM)."))
    api_template: Optional[str] = field(default=None, metadata=_help(
        "Completions endpoint: format prompts with this local model's chat template (e.g. smollm2-135m-instruct); "
        "default: send them as they are."))
    api_extra: str = field(default="{}", metadata=_help(
        "Extra JSON fields for every request, e.g. '{\"top_k\": 0, \"min_p\": 0}' for llama.cpp."))
    api_stop: list[str] = field(default_factory=list, metadata=_help("A string that ends a response; repeat for several."))
    api_stream: bool = field(default=False, metadata=_help(
        "Ask for each next token as a stream (completions): the same answer, 4-5x faster from llama-cpp-python's "
        "server with a large vocabulary."))
    concurrency: int = field(default=8, metadata=_help("Requests in flight at once (API)."))
    timeout: float = field(default=60.0, metadata=_help("Seconds per request; 429, 5xx and timeouts are retried with backoff."))

    @property
    def name(self) -> str:
        """What names π0 in stored settings: the endpoint, or the local model."""
        return self.api_base_url or self.base_model

    def load(self, prompts: Sequence[str] | None = None, max_new_tokens: int = 0, steering=None):
        """π0 as a :class:`vas.api.ApiPolicy` (``api_base_url`` set) or a :class:`vas.policies.LocalPolicy`.

        For a local model, ``prompts`` are checked against its context window (with ``max_new_tokens``) and
        ``steering``'s k against its vocabulary, from its tokenizer and config, before its weights load.

        Raises:
            VasError: for a concurrency or timeout ≤ 0, ``api_extra`` that is not a JSON object, a template
                with the chat endpoint, or a model that cannot be found, a prompt that does not fit, or k too large.
        """
        if not self.concurrency > 0 or not (0 < self.timeout < math.inf):
            raise VasError(f"--concurrency and --timeout must be > 0, got {self.concurrency} and {self.timeout}")
        if self.api_base_url:
            return self._api()
        from vas.models import (
            check_fits,
            context_window,
            load_config,
            load_policy,
            load_tokenizer,
            resolve_device,
            resolve_dtype,
        )
        from vas.policies import LocalPolicy
        from vas.prompts import encode_prompts

        device = resolve_device(self.device)
        tokenizer = load_tokenizer(self.base_model)
        config = load_config(self.base_model)
        if prompts is not None:
            check_fits(encode_prompts(tokenizer, prompts), max_new_tokens, context_window(config))
        if steering is not None:
            steering.check_top_k(config.vocab_size)
        model = load_policy(self.base_model, device=device, dtype=resolve_dtype(self.dtype, device))
        return LocalPolicy(model, tokenizer)

    def _api(self):
        from vas.api import ApiPolicy, Endpoint, chat_template
        from vas.models import load_tokenizer

        try:
            extra_body = json.loads(self.api_extra)
        except json.JSONDecodeError:
            extra_body = None
        if not isinstance(extra_body, dict):
            raise VasError(f"--api-extra must be a JSON object, got {self.api_extra!r}")
        if self.api_template is not None and self.api_chat:
            raise VasError("--api-template is for the completions endpoint; the chat endpoint applies the server's template")
        endpoint = Endpoint(self.api_base_url, self.api_model, api_key=os.environ.get(self.api_key_env, "none"),
                            chat=self.api_chat, timeout=self.timeout, extra_body=extra_body, stop=tuple(self.api_stop),
                            stream=self.api_stream)
        return ApiPolicy(endpoint, chat_template(load_tokenizer(self.api_template)) if self.api_template else None)
