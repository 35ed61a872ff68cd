"""An OpenAI-compatible endpoint as the base policy π0 (paper Sec. 4.4: a black-box model steered through
the top-k log-probabilities of its next token).

Two requests, both through the official ``openai`` client (``AsyncOpenAI``: timeouts, and retries with
exponential backoff on connection errors, 408, 409, 429 and 5xx):

* :meth:`ApiPolicy.next_token`: one token with its top-k log-probabilities (``max_tokens=1``) for the text so
  far: what VAS steers with, one request per generated token.
* :meth:`ApiPolicy.sample`: a whole response sampled by the server at temperature τ: plain sampling, and
  the collection of π0's samples for training a value model (Sec. 3.3).

Both endpoints are supported. The completions endpoint takes the prompt text as given (apply the model's
chat template first, e.g. with ``template``) and the response so far appended to it. The chat endpoint
sends the prompt as a user message and the response so far as a partial assistant message that the server
must *continue* (vLLM's ``continue_final_message``); a server that instead closes that message and opens a
new one (llama.cpp, OpenAI) cannot be steered through chat: use its completions endpoint.

Log-probabilities are requested at temperature 1 (the model's own distribution; τ is applied by the caller,
:func:`vas.decoding.guidance.base_logprobs`). llama.cpp returns special tokens (EOS, end of turn) as empty strings; other servers
may spell them out (``<|im_end|>``): pass those as ``stop`` strings. An empty candidate, or one that completes
a stop string, ends the response and is returned as ``None``.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import openai
import torch

from vas.errors import VasError

END = None  # the candidate that ends the response
# llama.cpp's server truncates its samples by default (top-k 40, min-p 0.05, repetition penalty 1.1): these
# request fields turn that off, so that sampled responses come from π0 itself
LLAMA_CPP_UNTRUNCATED = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
# llama.cpp's server gives no log-probabilities when its own sample ends the response: after this many more
# such answers (each a fresh draw at temperature 1) the end is taken as certain
SAMPLED_END_RETRIES = 4


@dataclass(frozen=True)
class Endpoint:
    """Where π0 lives.

    Attributes:
        base_url: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``.
        model: the model name the server expects.
        api_key: the key (any string for servers that need none).
        chat: use the chat endpoint instead of completions (see the module docstring).
        timeout: seconds per request before it is abandoned (and retried).
        max_retries: retries per request on connection errors, 408, 409, 429 and 5xx, with exponential backoff.
        extra_body: extra JSON fields for every request, e.g. ``{"top_k": 0, "min_p": 0, "repeat_penalty": 1}``
            for llama.cpp, whose default samplers otherwise truncate π0.
        stop: strings that end a response (besides special tokens, which arrive as empty strings).
        stream: ask for each next token as a stream (completions endpoint only). The answer is the same; it
            matters for speed on llama-cpp-python's server, which then computes log-probabilities for the new
            token only instead of for every prompt token (0.3 s against 1.4 s per token for Gemma-3-270M's
            262k vocabulary and a 650-token prompt, on 2 CPU cores).
    """

    base_url: str
    model: str
    api_key: str = "none"
    chat: bool = False
    timeout: float = 60.0
    max_retries: int = 5
    extra_body: dict = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stream: bool = False


@dataclass
class Completion:
    """One sampled response: its text, the number of tokens the server generated, and whether it ended by
    itself (``finish_reason == "stop"``) rather than at the token limit."""

    text: str
    tokens: int
    finished: bool


class ApiPolicy:
    """π0 behind an OpenAI-compatible endpoint (async; share one instance between concurrent rollouts).

    For the decoding loop (:func:`vas.decoding.loop.decode`) its support is the top-k tokens the server tells, as
    text (:class:`ApiRollout`); :meth:`sample` asks the server for whole responses (plain sampling). Jobs run
    its rollouts one prompt each, several at once (``concurrent``).

    Args:
        endpoint: the server, model and request settings.
        template: maps a prompt to the text sent to the completions endpoint (e.g. the model's chat template);
            identity by default. Not used with the chat endpoint.
    """

    concurrent = True

    def __init__(self, endpoint: Endpoint, template: Callable[[str], str] | None = None):
        if not re.match(r"https?://", endpoint.base_url):
            raise VasError(f"the API base URL must start with http:// or https://, got {endpoint.base_url!r}")
        if endpoint.stream and endpoint.chat:
            raise VasError("streaming next tokens (--api-stream) works with the completions endpoint only")
        self.endpoint = endpoint
        self.template = template or (lambda prompt: prompt)
        self._client: tuple[asyncio.AbstractEventLoop, openai.AsyncOpenAI] | None = None

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The HTTP client of the running event loop (each ``asyncio.run`` of a job gets its own)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            e = self.endpoint
            self._client = (loop, openai.AsyncOpenAI(base_url=e.base_url, api_key=e.api_key, timeout=e.timeout,
                                                     max_retries=e.max_retries))
        return self._client[1]

    def start(self, prompts, max_new_tokens: int) -> "ApiRollout":
        """A rollout of one response per prompt (text prompts only), one request per row and step.

        Raises:
            VasError: for no prompt, or prompts given as token ids.
        """
        return ApiRollout(self, prompts)

    async def _request(self, extra: dict | None = None, **kwargs):
        e = self.endpoint
        body = {**e.extra_body, **(extra or {})} or None
        try:
            if e.chat:
                return await self.client.chat.completions.create(model=e.model, extra_body=body, **kwargs)
            answer = await self.client.completions.create(model=e.model, extra_body=body, **kwargs)
            return [chunk async for chunk in answer] if kwargs.get("stream") else answer
        except openai.APITimeoutError:
            raise VasError(f"{e.base_url}: no answer within {e.timeout:g} s ({e.max_retries} retries)") from None
        except openai.APIConnectionError:
            raise VasError(f"cannot reach {e.base_url} ({e.max_retries} retries)") from None
        except openai.APIStatusError as exc:
            message = re.sub(r"^Error code: \d+ - ", "", _one_line(exc.message))
            hint = " (does the base URL end in /v1?)" if exc.status_code == 404 else ""
            raise VasError(f"{e.base_url} answered HTTP {exc.status_code}{hint}: {message}") from None
        except openai.OpenAIError as exc:
            raise VasError(f"{e.base_url}: {type(exc).__name__}: {_one_line(str(exc))}") from None

    def _messages(self, prompt: str, text: str) -> list[dict]:
        messages = [{"role": "user", "content": prompt}]
        if text:
            messages.append({"role": "assistant", "content": text})
        return messages

    async def next_token(self, prompt: str, text: str, top_k: int) -> list[tuple[str | None, float]]:
        """π0's top-k next tokens after ``prompt ⊕ text``, at temperature 1.

        Args:
            prompt: the prompt (before the template).
            text: the response so far.
            top_k: k, how many candidates to ask for (servers cap it: 5 for older OpenAI models, 20 now).

        Returns:
            At most k (candidate, log p) pairs, most likely first. The candidate is the token's text, or ``None``
            for a token that ends the response. Tokens with the same text are merged (their probabilities
            added; the completions endpoint's answer, a dict keyed by text, keeps only one of them), tokens that
            are only part of a character are skipped, and extra entries (llama.cpp adds the sampled token) are
            dropped.

        Raises:
            VasError: if the request fails, the answer has no log-probabilities, or it has fewer than k.
        """
        e = self.endpoint
        pairs, ended = await self._top_logprobs(prompt, text, top_k)
        # llama.cpp's server answers without log-probabilities when it samples the end of the response, and when
        # its cache holds the prompt whole (e.g. the text so far plus the token it sampled last time); and a
        # completions answer, a dict keyed by text, loses tokens whose text repeats. Ask again, for more, after a
        # different prompt.
        for _ in range(SAMPLED_END_RETRIES if not e.chat else 0):
            if len(pairs) >= top_k:
                break
            await self._request(prompt="\n", max_tokens=1)
            pairs, ended = await self._top_logprobs(prompt, text, 2 * top_k - len(pairs))
        if not pairs and ended:
            return [(END, 0.0)]  # it sampled the end every time: π0's end is all but certain
        if not pairs:
            raise VasError(f"{e.base_url} returned no log-probabilities: the server must support "
                           f"{'logprobs/top_logprobs' if e.chat else 'logprobs'} for steering")
        if len(pairs) < top_k:
            raise VasError(f"{e.base_url} returned {len(pairs)} log-probabilities where --top-k {top_k} were asked: "
                           f"use --top-k {len(pairs)} or less")
        merged: dict[str | None, float] = {}
        for token, logprob in pairs:
            if "\ufffd" in token:
                continue  # part of a multi-byte character: no text to append
            key = self.candidate(token, text)
            merged[key] = float(np.logaddexp(merged[key], logprob)) if key in merged else float(logprob)
        return sorted(merged.items(), key=lambda kv: -kv[1])[:top_k]

    async def _top_logprobs(self, prompt: str, text: str, top_k: int) -> tuple[list[tuple[str, float]], bool]:
        """The answer's (token text, log p) pairs for the next token (empty if it has none), and whether the
        server's own sample was the end of the response."""
        if self.endpoint.chat:
            extra = {"continue_final_message": True, "add_generation_prompt": False} if text else None
            answer = await self._request(extra, messages=self._messages(prompt, text), max_tokens=1, temperature=1.0,
                                         top_p=1.0, logprobs=True, top_logprobs=top_k)
            content = answer.choices[0].logprobs.content if answer.choices and answer.choices[0].logprobs else None
            return ([(t.token, t.logprob) for t in content[0].top_logprobs] if content else []), False
        request = dict(prompt=self.template(prompt) + text, max_tokens=1, temperature=1.0, top_p=1.0, logprobs=top_k)
        if self.endpoint.stream:  # the chunks' choices, read as one: the first logprobs, the last finish reason
            choices = [c.choices[0] for c in await self._request(stream=True, **request) if c.choices]
            tops = [c.logprobs.top_logprobs for c in choices if c.logprobs is not None and c.logprobs.top_logprobs]
            top = tops[0] if tops else None
            finish = next((c.finish_reason for c in reversed(choices) if c.finish_reason), None)
            sampled = "".join(c.text or "" for c in choices)
        else:
            answer = await self._request(**request)
            if not answer.choices:
                return [], False
            choice = answer.choices[0]
            top = choice.logprobs.top_logprobs if choice.logprobs is not None else None
            finish, sampled = choice.finish_reason, choice.text
        return (list(top[0].items()) if top and top[0] else []), finish == "stop" and not sampled

    def candidate(self, token: str, text: str = "") -> str | None:
        """The candidate a token's text stands for after the response ``text``: ``None`` (the end) for an empty
        text, or when ``text + token`` completes a stop string; else the token's text."""
        if token == "":
            return END
        tail = text[-max((len(s) for s in self.endpoint.stop), default=0):] + token
        if any(s in tail and s not in tail[: -len(token)] for s in self.endpoint.stop):
            return END
        return token

    @property
    def settings(self) -> dict:
        """What decides this policy's answers (the API key left out), for resumed runs to check."""
        e = self.endpoint
        return {"base_url": e.base_url, "model": e.model, "chat": e.chat, "extra_body": e.extra_body,
                "stop": list(e.stop), "template": self.template("{prompt}")}

    async def sample(self, prompt: str, *, max_new_tokens: int, temperature: float, seed: int | None = None) -> Completion:
        """One response sampled by the server from π0 at temperature τ (top-p 1).

        Raises:
            VasError: if the request fails.
        """
        e = self.endpoint
        common = dict(max_tokens=max_new_tokens, temperature=temperature, top_p=1.0, seed=seed,
                      **({"stop": list(e.stop)} if e.stop else {}))
        if e.chat:
            answer = await self._request(messages=self._messages(prompt, ""), **common)
            text = answer.choices[0].message.content or ""
        else:
            answer = await self._request(prompt=self.template(prompt), **common)
            text = answer.choices[0].text
        tokens = answer.usage.completion_tokens if answer.usage is not None else 0
        return Completion(text, tokens, answer.choices[0].finish_reason == "stop")

    async def close(self) -> None:
        if self._client is not None:
            await self._client[1].close()
            self._client = None


class ApiRollout:
    """The state of one batch on an :class:`ApiPolicy`: each row's response text so far. Each step asks for
    every unfinished row's top-k next tokens concurrently; the support is the k candidates told (fewer where
    same-text tokens merged: the rest is padded with −inf)."""

    def __init__(self, policy: ApiPolicy, prompts):
        if not prompts:
            raise VasError("no prompts to generate from")
        if any(not isinstance(p, str) for p in prompts):
            raise VasError("an API base policy takes prompts as text, not token ids")
        self.policy, self.prompts = policy, list(prompts)
        self.texts = [""] * len(prompts)
        self.ended = [False] * len(prompts)
        self.options: list[list[str | None]] = [[END] for _ in prompts]

    async def next_logprobs(self, top_k: int | None) -> torch.Tensor:
        if top_k is None:
            raise VasError("an API base policy tells only its top-k next tokens: give --top-k K (a number, not all)")
        rows = [i for i, ended in enumerate(self.ended) if not ended]
        answers = await asyncio.gather(*(self.policy.next_token(self.prompts[i], self.texts[i], top_k) for i in rows))
        width = max([len(a) for a in answers] + [1])
        logprobs = torch.full((len(self.prompts), width), -torch.inf, dtype=torch.float64)
        logprobs[:, 0] = 0.0  # finished rows: one certain entry
        self.options = [[END] for _ in self.prompts]
        for i, pairs in zip(rows, answers):
            self.options[i] = [c for c, _ in pairs]
            logprobs[i, : len(pairs)] = torch.tensor([lp for _, lp in pairs], dtype=torch.float64)
        return logprobs

    def advance(self, choice, active):
        ended = torch.zeros(len(self.prompts), dtype=torch.bool)
        for i in active.nonzero().flatten().tolist():
            candidate = self.options[i][int(choice[i])]
            if candidate is END:
                ended[i] = self.ended[i] = True
            else:
                self.texts[i] += candidate
        return ended

    def response_texts(self) -> list[str]:
        return list(self.texts)

    def candidate_texts(self, candidates) -> list[list[str | None]]:
        out = []
        for text, options, row in zip(self.texts, self.options, candidates.tolist()):
            picked = [options[j] if j < len(options) else END for j in row]
            out.append([END if c is END else text + c for c in picked])
        return out


def chat_template(tokenizer) -> Callable[[str], str]:
    """The prompt → text map of a local tokenizer's chat template (user turn, assistant turn opened), for the
    completions endpoint of a chat model; the identity if the tokenizer has no template. Rendered prompts are
    cached: steering asks for the same prompt once per token."""
    if not getattr(tokenizer, "chat_template", None):
        return lambda prompt: prompt

    @functools.lru_cache(maxsize=4096)
    def render(prompt: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)

    return render


def _one_line(text: str, limit: int = 400) -> str:
    """A server's message on one line (whitespace runs joined), cut at ``limit`` characters."""
    text = " ".join((text or "").split())
    return (text[:limit] + " …" if len(text) > limit else text) or "(no message)"
