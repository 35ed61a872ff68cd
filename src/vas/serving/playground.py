"""``vas playground``: a page over ``vas serve`` that answers one prompt twice, side by side and streamed:
plain π0 and steered by the page's β, k and one weight per served value model, from the same seed.

The page is Gradio's (the ``playground`` extra); it builds its controls from the server's value models
(``GET /v1/vas/value_models``, :mod:`vas.serving.middleware`) and talks to the server through the official
``openai`` client, as any client would. Beside each answer it shows the tokens generated, the wall time, and
the KL to π0 where it is known: 0 for the plain answer, which *is* π0; the server's OpenAI API returns π0's
log-probabilities only, so the steered answer's KL is not reported there (``vas generate`` and
``--engine vllm`` record it exactly). Errors (a server that went away, one without value models, a setting
the server refuses, an empty prompt) are shown on the page, and every request has a time limit.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx

from vas.errors import VasError
from vas.serving.middleware import VALUE_MODELS_PATH

CONNECT_SECONDS = 5.0


@dataclass
class Server:
    """A running ``vas serve`` as the page sees it.

    Attributes:
        url: its base URL (``http://HOST:PORT``; the API under ``/v1``).
        api_key: the key it needs, or None.
        model: the served model's name (from ``/v1/models``).
        value_models: the served value models (``GET /v1/vas/value_models``'s entries).
        top_k: k for requests that do not choose one.
        max_top_k: the largest k it accepts.
    """

    url: str
    api_key: str | None
    model: str
    value_models: list[dict] = field(default_factory=list)
    top_k: int = 10
    max_top_k: int = 100


def connect(url: str, api_key: str | None = None, timeout: float = 30.0) -> Server:
    """Ask the server at ``url`` what it serves. A server without a value-model list (an OpenAI-compatible
    server that is not ``vas serve``) gives a :class:`Server` without value models: the page then answers
    plainly and says why.

    Raises:
        VasError: one line, if it cannot be reached, refuses the key, or lists no model at ``/v1/models`` (not
            an OpenAI-compatible server).
    """
    url = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=CONNECT_SECONDS), headers=headers) as client:
            listing = client.get(f"{url}{VALUE_MODELS_PATH}")
            models = client.get(f"{url}/v1/models")
    except httpx.HTTPError as exc:
        raise VasError(f"cannot reach a server at {url}: {exc or type(exc).__name__} (is vas serve running there?)") from None
    if 401 in (listing.status_code, models.status_code):
        raise VasError(f"the server at {url} needs its API key: give --api-key")
    try:
        names = [m["id"] for m in models.json()["data"]] if models.status_code == 200 else []
    except (ValueError, KeyError, TypeError):
        names = []
    if not names:
        raise VasError(f"the server at {url} lists no model at /v1/models (HTTP {models.status_code}): is it an "
                       "OpenAI-compatible server such as vas serve?")
    info = listing.json() if listing.status_code == 200 else {}
    largest = int(info.get("max_top_k", 100))
    top_k = info.get("top_k", 10)  # "all" (vas serve --top-k all): the slider starts at its largest k
    return Server(url, api_key, names[0], info.get("value_models", []), largest if top_k == "all" else int(top_k),
                  largest)


NO_VALUE_MODELS = ("this server serves no value models (it is not vas serve, or lists none): only plain answers "
                   "here; start vas serve --value NAME=DIR to steer")


@dataclass
class Answer:
    """One streamed answer as it grows."""

    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    error: str | None = None
    done: bool = False


async def stream(server: Server, prompt: str, *, temperature: float, max_tokens: int, seed: int,
                 xargs: dict | None, answer: Answer, changed: asyncio.Event, timeout: float) -> None:
    """Stream one chat completion into ``answer``, setting ``changed`` at every piece; a failure is kept in
    ``answer.error`` (the server's own message for an HTTP 400)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.api_key or "-", max_retries=0,
                                timeout=openai.Timeout(timeout, connect=CONNECT_SECONDS))
    start = time.perf_counter()
    try:
        chunks = await client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": prompt}], temperature=temperature,
            max_tokens=max_tokens, seed=seed, stream=True, stream_options={"include_usage": True},
            extra_body={"vllm_xargs": xargs} if xargs else None)
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                answer.text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                answer.tokens = chunk.usage.completion_tokens
            answer.seconds = time.perf_counter() - start
            changed.set()
    except openai.APIStatusError as exc:
        answer.error = _message(exc)
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        answer.error = f"no answer from {server.url}: {exc}"
    finally:
        answer.seconds = time.perf_counter() - start
        answer.done = True
        changed.set()
        await client.close()


def _message(exc) -> str:
    """The server's error message of an HTTP error, else the error itself."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return f"HTTP {exc.status_code}: {body['message']}"
    return f"HTTP {exc.status_code}: {exc.message}"


def steering(server: Server, beta: float, top_k: int, weights) -> dict:
    """The request's ``vllm_xargs``: β, k and one weight per served value model (``"NAME=W,…"``).

    Raises:
        VasError: for a β, k or weight that is not a finite number (the page's number boxes accept any).
    """
    numbers = [beta, top_k, *weights]
    if any(n is None or n != n or n in (float("inf"), float("-inf")) for n in numbers):
        raise VasError("β, k and every weight need a finite number")
    values = ",".join(f"{m['name']}={float(w):g}" for m, w in zip(server.value_models, weights))
    return {"vas_beta": float(beta), "vas_top_k": int(top_k), "vas_values": values}


def stats(label: str, answer: Answer, kl: str) -> str:
    """The line shown under an answer: tokens, time and KL, or its error."""
    if answer.error:
        return f"**{label}** · ⚠ {answer.error}"
    if not answer.done:
        return f"**{label}** · generating… {answer.seconds:.1f} s"
    return f"**{label}** · {answer.tokens} tokens · {answer.seconds:.1f} s · KL to π0: {kl}"


STEERED_KL = "not reported by the server (its API returns π0's log-probabilities only)"


def build(server: Server, timeout: float = 300.0):
    """The Gradio page for ``server``.

    Returns:
        A ``gradio.Blocks`` app (launch it with ``.launch(server_name=…, server_port=…)``).
    """
    import gradio as gr

    with gr.Blocks(title="vas playground", analytics_enabled=False) as page:
        gr.Markdown(f"## VAS playground · `{server.model}`\nOne prompt, two answers from the same seed: plain π0, "
                    "and π0 steered by the value models below (π ∝ π0 · exp(β Σ wᵢ Vᵢ) over π0's top-k, Eq. 5).")
        if not server.value_models:
            gr.Markdown(f"⚠ {NO_VALUE_MODELS}", elem_id="notice")
        prompt = gr.Textbox(label="Prompt", lines=3, value="How was your weekend?", elem_id="prompt")
        with gr.Row():
            beta = gr.Slider(-32, 32, value=4, step=0.5, label="β", elem_id="beta")
            top_k = gr.Slider(1, server.max_top_k, value=server.top_k, step=1, label="k", elem_id="top_k")
        with gr.Row():
            weights = [gr.Slider(-2, 2, value=1, step=0.1, label=_label(m), elem_id=f"weight-{m['name']}")
                       for m in server.value_models]
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature (0: greedy)", elem_id="temperature")
            max_tokens = gr.Slider(1, 512, value=64, step=1, label="max tokens", elem_id="max_tokens")
            seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
        go = gr.Button("Answer", variant="primary", elem_id="answer")
        with gr.Row():
            with gr.Column():
                plain_text = gr.Textbox(label="plain π0", lines=10, interactive=False, elem_id="plain")
                plain_stats = gr.Markdown(elem_id="plain-stats")
            with gr.Column():
                steered_text = gr.Textbox(label="steered (VAS)", lines=10, interactive=False, elem_id="steered")
                steered_stats = gr.Markdown(elem_id="steered-stats")

        async def answer(prompt_text, beta_value, k_value, temperature_value, tokens_value, seed_value, *weight_values):
            if not prompt_text or not prompt_text.strip():
                yield "", "**plain π0** · ⚠ write a prompt first", "", "**steered** · ⚠ write a prompt first"
                return
            plain, steered = Answer(), Answer()
            try:
                if not server.value_models:
                    raise VasError(NO_VALUE_MODELS)
                xargs = steering(server, beta_value, k_value, weight_values)
            except VasError as exc:
                steered.error, steered.done = str(exc), True
                xargs = None
            changed = asyncio.Event()
            common = dict(temperature=float(temperature_value), max_tokens=int(tokens_value),
                          seed=int(seed_value or 0), changed=changed, timeout=timeout)
            tasks = [asyncio.create_task(stream(server, prompt_text, xargs=None, answer=plain, **common))]
            if xargs is not None:
                tasks.append(asyncio.create_task(stream(server, prompt_text, xargs=xargs, answer=steered, **common)))
            neutral = xargs is not None and (not xargs["vas_beta"] or not any(float(w) for w in weight_values))
            label = f"steered, β = {float(beta_value):g}" + (" (β = 0 or every weight 0: this is π0)" if neutral else "")
            yield "", stats("plain π0", plain, ""), "", stats(label, steered, "")  # the last answers go at once
            while True:
                await changed.wait()
                changed.clear()
                finished = plain.done and steered.done  # before the yield, during which a stream may finish
                yield (plain.text, stats("plain π0", plain, "0 (it is π0)"), steered.text,
                       stats(label, steered, "0 (it is π0)" if neutral else STEERED_KL))
                if finished:
                    break
            await asyncio.gather(*tasks)

        go.click(answer, [prompt, beta, top_k, temperature, max_tokens, seed, *weights],
                 [plain_text, plain_stats, steered_text, steered_stats])
    return page


def _label(model: dict) -> str:
    """A weight slider's label: the value model's name, head, reward, data size and validation R²."""
    facts = [model.get("head") or "last"]
    if model.get("reward"):
        facts.append(f"reward {model['reward']}")
    if model.get("train_rows") is not None:
        facts.append(f"{model['train_rows'] + (model.get('val_rows') or 0)} responses")
    if model.get("validation_r2") is not None:
        facts.append(f"validation R² {model['validation_r2']:.0%}")
    return f"weight of {model['name']} ({', '.join(facts)})"


def launch(server: Server, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Serve the page on ``host:port`` (loopback by default).

    Returns:
        The Gradio app (when ``block`` is False; call ``.close()`` to stop it).

    Raises:
        VasError: if Gradio is not installed.
    """
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise VasError("vas playground needs Gradio: pip install 'value-augmented-sampling[playground]'") from None
    page = build(server)
    page.queue().launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=True,
                        footer_links=[])
    return page
